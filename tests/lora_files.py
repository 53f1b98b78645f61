"""PEFT-layout LoRA adapters with random weights, written without peft (the daemon's and
the registry's tests need only the files)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.integration.test_models import write_safetensors


def write_adapter(directory: Path, modules: dict[str, tuple[int, int]], *, rank: int = 2,
                  alpha: float = 4.0, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:  # fmt: skip
    """A LoRA adapter of `modules` (name -> (out, in) of its base weight) in `directory`."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (d_out, d_in) in modules.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, d_in, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(d_out, rank, generator=g)
    tensors = {k: v.to(dtype) for k, v in tensors.items()}
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "adapter_model.safetensors", tensors)
    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": targets,
        "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM",
    }))  # fmt: skip
    return tensors


# The q_proj layers of tests.integration.test_models.small_model.
SMALL_Q = {f"model.layers.{i}.self_attn.q_proj": (16, 16) for i in (0, 1)}


def area_bytes(path: Path, *, adapter: bool = False) -> int:
    """Bytes of `[weights] capacity` the model (or adapter) at `path` takes once held."""
    from tierd.weights import area
    from tierd.weights.adapters import open_adapter
    from tierd.weights.sources import open_source

    source = open_adapter(path, "") if adapter else open_source(path, "")
    try:
        return area.plan(source)[0]
    finally:
        source.close()
