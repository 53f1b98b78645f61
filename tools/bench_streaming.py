"""Decoder layers streamed under a budget against the resident model, one run.

    python tools/bench_streaming.py --json FILE [--device cuda] [--prompt 512] [--steps 16]

A model of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads, MLP 1536,
vocab 49152; weights random: the timing does not depend on their values), bf16 on a GPU
or float32 on the CPU. Per budget (a fraction of the decoder layers' bytes; the rest of
the model stays resident), `WeightStreamer` with lookahead 1 and 2: time of a prompt's
forward and of a decode step (median of `--steps`), over the resident model's in the same
run, and whether every logit equals the resident model's bit for bit. The copy ceiling
(pinned host to device, or a host memcpy) is measured in the same run, with the time one
pass over the layers' bytes costs at it (the floor for a decode step that streams every
layer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tierd_client.streaming import WeightStreamer, decoder_layers, layer_bytes


def smollm2_shaped(dtype: torch.dtype) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        tie_word_embeddings=True,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    def run(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    return run


@torch.no_grad()
def session(model: Any, device: torch.device, prompt: int, steps: int
            ) -> tuple[float, float, list[torch.Tensor]]:  # fmt: skip
    """Prompt forward time, median decode step time, and every step's logits."""
    t = timer(device)
    ids = torch.arange(3, 3 + prompt, device=device).unsqueeze(0) % 49152
    out: dict[str, Any] = {}

    def prefill() -> None:
        out["o"] = model(ids, use_cache=True)

    t(prefill)  # warm-up (kernels, allocator)
    t_prompt = t(prefill)
    o = out["o"]
    cache, logits, times = o.past_key_values, [o.logits[0, -1].float().cpu()], []
    token = o.logits[0, -1].argmax().view(1, 1)
    for _ in range(steps):

        def step(tok: torch.Tensor = token) -> None:
            out["o"] = model(tok, past_key_values=cache, use_cache=True)

        times.append(t(step))
        o = out["o"]
        logits.append(o.logits[0, -1].float().cpu())
        token = o.logits[0, -1].argmax().view(1, 1)
    return t_prompt, statistics.median(times), logits


def copy_gbps(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8)
    if device.type == "cuda":
        src = src.pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    t = timer(device)
    t(lambda: dst.copy_(src, non_blocking=True))
    return nbytes / statistics.median(t(lambda: dst.copy_(src, non_blocking=True))
                                      for _ in range(5)) / 1e9  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--budgets", default="0.5,0.25,0.125")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    resident = smollm2_shaped(dtype).to(device)
    r_prompt, r_step, r_logits = session(resident, device, args.prompt, args.steps)
    del resident
    model = smollm2_shaped(dtype)  # decoder layers stay on the host; the rest moves
    layers = decoder_layers(model)
    total = sum(layer_bytes(x) for x in layers)
    gbps = copy_gbps(device, layer_bytes(layers[0]) * 4)
    doc: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(dtype), "layers_bytes": total, "copy_gbps": gbps,
        "stream_all_layers_ms": total / gbps / 1e6,
        "resident": {"prompt_ms": r_prompt * 1e3, "step_ms": r_step * 1e3},
        "streamed": [],
    }  # fmt: skip
    for frac in (float(b) for b in args.budgets.split(",")):
        for lookahead in (1, 2):
            budget = int(total * frac)
            try:
                streamer = WeightStreamer(model, budget, lookahead=lookahead, device=device)
            except ValueError as e:
                print(f"budget {frac}: {e}")
                continue
            with streamer:
                s_prompt, s_step, s_logits = session(model, device, args.prompt, args.steps)
                stats = streamer.stats
            same = all(torch.equal(a, b) for a, b in zip(s_logits, r_logits))
            doc["streamed"].append({
                "budget_fraction": frac, "lookahead": lookahead, "slots": stats.slots,
                "prompt_ms": s_prompt * 1e3, "step_ms": s_step * 1e3,
                "prompt_over_resident": s_prompt / r_prompt, "step_over_resident": s_step / r_step,
                "waits": stats.waits, "identical_logits": same,
            })  # fmt: skip
    print(f"{doc['device']} {dtype}: layers {total / 2**20:.0f} MiB, copy {gbps:.1f} GB/s "
          f"(one pass over the layers: {doc['stream_all_layers_ms']:.2f} ms); resident: prompt "
          f"{r_prompt * 1e3:.1f} ms, step {r_step * 1e3:.2f} ms")  # fmt: skip
    print(f"{'budget':>7} {'ahead':>5} {'slots':>5} {'prompt ms':>10} {'x res':>6} "
          f"{'step ms':>8} {'x res':>6} {'waits':>6}  identical")  # fmt: skip
    for r in doc["streamed"]:
        print(f"{r['budget_fraction']:>7.3f} {r['lookahead']:>5} {r['slots']:>5} "
              f"{r['prompt_ms']:>10.1f} {r['prompt_over_resident']:>6.2f} {r['step_ms']:>8.2f} "
              f"{r['step_over_resident']:>6.2f} {r['waits']:>6}  {r['identical_logits']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0 if all(r["identical_logits"] for r in doc["streamed"]) else 1


if __name__ == "__main__":
    sys.exit(main())
