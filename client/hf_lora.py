"""A LoRA adapter held in tierd, applied to a transformers model without merging.

Primitives: `apply_adapter(model, adapter) -> AppliedAdapter` (`remove()`), `scaling(info)`.

`adapter` is what `TierdClient.load_adapter` returns: the PEFT matrices as read-only views
of the daemon's mapped area (no copy; half-precision ones are used as float32 copies, as
PEFT loads them). Each target linear layer gets a forward hook that adds `B(A(x)) *
scaling` to its output, computed as PEFT's LoRA layer computes it: the input cast to the
adapter's dtype, the sum cast back to the layer's output dtype, so the
outputs equal those of `PeftModel.from_pretrained` on the same directory. The base weights
are never written (they may be the read-only mapping of `hf_weights.model_on_weights`),
and removing the hooks gives the base model back, so one base can serve several adapters
in turn.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

_PREFIX = "base_model.model."
_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def scaling(info: Any) -> float:
    """alpha / r, or alpha / sqrt(r) for an adapter trained with use_rslora."""
    a = info.adapter
    rslora = bool(json.loads(info.config_json or "{}").get("use_rslora", False))
    return a.alpha / (math.sqrt(a.rank) if rslora else a.rank)


class AppliedAdapter:
    """The hooks of one adapter on one model."""

    def __init__(self, handles: list[Any], modules: list[str]) -> None:
        self._handles = handles
        self.modules = modules  # the layers it adapts, by name in the model

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _pairs(adapter: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in adapter.items():
        suffix = next((s for s in _SUFFIXES if name.endswith(s)), None)
        if not name.startswith(_PREFIX) or suffix is None:
            raise ValueError(f"{name!r} is not a LoRA matrix of a PEFT adapter")
        module = name[len(_PREFIX) : -len(suffix)]
        out.setdefault(module, {})[suffix[6]] = t  # ".lora_A.weight"[6] == "A"
    return out


def apply_adapter(model: torch.nn.Module, adapter: Mapping[str, torch.Tensor],
                  scale: float | None = None) -> AppliedAdapter:  # fmt: skip
    """Hook `adapter` (from `TierdClient.load_adapter`) onto `model` (a transformers model
    of its base); `scale` defaults to `scaling(adapter.info)`."""
    if scale is None:
        scale = scaling(adapter.info)  # type: ignore[attr-defined]
    handles, names = [], []
    try:
        for module_name, ab in sorted(_pairs(adapter).items()):
            layer = model.get_submodule(module_name)
            if not isinstance(layer, torch.nn.Linear) or set(ab) != {"A", "B"}:
                raise ValueError(f"{module_name} is not a linear layer with both LoRA matrices")
            a, b = (_compute_dtype(ab[m]) for m in "AB")
            handles.append(layer.register_forward_hook(_hook(a, b, scale)))
            names.append(module_name)
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return AppliedAdapter(handles, names)


def _compute_dtype(t: torch.Tensor) -> torch.Tensor:
    """What PEFT computes with: it loads half-precision LoRA matrices as float32
    (`autocast_adapter_dtype`, on by default); the copy is the matrices' size, small."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _hook(a: torch.Tensor, b: torch.Tensor, scale: float) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        x = args[0]
        if x.dtype != a.dtype:
            x = x.to(a.dtype)
        return (output + F.linear(F.linear(x, a), b) * scale).to(output.dtype)

    return hook
