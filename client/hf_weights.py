"""A transformers model whose weights are the daemon's mapped weights area (no copy).

Primitives: `model_on_weights(weights, config=None, model_class=None)`,
`load_model(client, model, config=None)`.

The model is built with its parameters on the meta device (no memory, no initialisation),
then each parameter is bound to its mapped tensor (`load_state_dict(assign=True)`).
Buffers that are not saved (RoPE frequencies and the like) are built on the CPU as usual,
which is why only parameters go to meta. Tied weights the files leave out (`lm_head`
tied to the embeddings) are tied again afterwards; a parameter still on meta after that
is an error naming it.

The weights are read-only: use the model for inference (no training, no in-place edits).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Parameters made meanwhile live on the meta device; buffers do not."""
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def _config(weights: Any) -> Any:
    from transformers import AutoConfig

    text = getattr(getattr(weights, "info", None), "config_json", "")
    if not text:
        raise ValueError("the model was registered without a config.json: pass `config`")
    doc = json.loads(text)
    return AutoConfig.for_model(doc.pop("model_type"), **doc)


def model_on_weights(weights: Mapping[str, torch.Tensor], config: Any = None,
                     model_class: Any = None) -> Any:  # fmt: skip
    """A causal LM (or `model_class`) of `config` (default: the one registered with the
    model) whose parameters are `weights` (from `TierdClient.load_weights`)."""
    from transformers import AutoModelForCausalLM

    config = config if config is not None else _config(weights)
    dtype = next((t.dtype for t in weights.values() if t.is_floating_point()), None)
    with _parameters_on_meta():
        if model_class is None:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        else:
            model = model_class._from_config(config, dtype=dtype)
    result = model.load_state_dict(dict(weights), strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"tensors the model has no place for: {result.unexpected_keys[:8]}")
    model.tie_weights()
    missing = [n for n, p in model.named_parameters(remove_duplicate=False)
               if p.device.type == "meta"]  # fmt: skip
    if missing:
        raise ValueError(f"parameters the weights lack: {missing[:8]}")
    return model.eval()


def load_model(client: Any, model: str, config: Any = None) -> Any:
    """`model` mapped from the daemon and built into a transformers causal LM."""
    return model_on_weights(client.load_weights(model), config)
