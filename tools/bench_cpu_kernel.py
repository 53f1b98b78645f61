"""Decode attention on the CPU: the fused C++ kernel against the torch path and memcpy.

    python tools/bench_cpu_kernel.py [--tokens 4096,32768,131072] [--dtypes bfloat16,float16]
        [--rounds 7] [--json FILE]

One Llama-3-8B-like layer (32 query heads, 8 KV heads, head dim 128), one query token,
256-token blocks allocated one by one (separate tensors, as the host tier hands them over).
Per size and dtype, each round times one call of `attend_blocks` on the fused kernel
(TIERD_KERNELS=cpp), one on the torch path (TIERD_KERNELS=torch), and `copy_` of the same
number of bytes between two preallocated buffers (memcpy: the bound a kernel that reads
the KV once is measured against), in a rotating order, each after evicting the caches.
Ratios are per round (paired, so the machine's drift between rounds cancels) as memcpy
time / path time: 1.0 runs at memcpy's speed, above 1.0 faster (a kernel only reads;
memcpy reads and writes). Each figure is the median over rounds, the range in brackets.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import time
from collections.abc import Callable

import torch

from tierd_kernels import _native, attend_blocks

HEADS, KV_HEADS, DIM, BLOCK_TOKENS = 32, 8, 128, 256


# Written before every timed call: a decode step finds its KV in memory, not in the 32 MiB
# L3 (the previous call's, or memcpy's, bytes would still be there at 4k tokens). Written
# with libc on this thread, not by torch: torch's OpenMP threads spin for a while after
# each parallel region, and would take the cores from whatever runs next.
EVICT_BYTES = 96 << 20
_evict = torch.empty(EVICT_BYTES, dtype=torch.uint8)


def timed(fn: Callable[[], object]) -> float:
    ctypes.memset(_evict.data_ptr(), 1, EVICT_BYTES)
    time.sleep(0.002)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def with_path(path: str, fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        os.environ["TIERD_KERNELS"] = path
        return fn()

    return run


def measure(tokens: int, dtype: torch.dtype, rounds: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(tokens)
    n_blocks = tokens // BLOCK_TOKENS
    blocks = [torch.randn(1, 2, KV_HEADS, BLOCK_TOKENS, DIM, generator=g).to(dtype)
              for _ in range(n_blocks)]  # fmt: skip
    q = torch.randn(1, HEADS, DIM, generator=g).to(dtype)
    kv_bytes = sum(b.numel() * b.element_size() for b in blocks)
    src = torch.ones(kv_bytes, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    fns = {
        "fused": with_path("cpp", lambda: attend_blocks(blocks, 0, q)),
        "torch": with_path("torch", lambda: attend_blocks(blocks, 0, q)),
        "memcpy": lambda: dst.copy_(src),
    }
    fused, ref = fns["fused"](), fns["torch"]()  # warm up, and check they agree
    err = ((fused.out - ref.out).norm() / ref.out.norm()).item()
    assert err < 1e-4, f"fused and torch paths differ: {err:.3g}"
    fns["memcpy"]()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:
            times[name].append(timed(fns[name]))
    return {"tokens": tokens, "dtype": str(dtype)[6:], "kv_bytes": kv_bytes, "times_s": times}


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    v = [x * scale for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def table(results: list[dict[str, object]]) -> str:
    lines = [
        (
            "| dtype | tokens | MiB K+V | fused ms | torch ms | memcpy ms | fused / memcpy "
            "| torch / memcpy | fused / torch |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t = r["times_s"]
        assert isinstance(t, dict)
        f, tp, m = t["fused"], t["torch"], t["memcpy"]
        lines.append(
            f"| {r['dtype']} | {int(r['tokens']) // 1024}k | {int(r['kv_bytes']) >> 20} "
            f"| {spread(f, 1e3)} | {spread(tp, 1e3)} | {spread(m, 1e3)} "
            f"| {spread([b / a for a, b in zip(f, m)])} "
            f"| {spread([b / a for a, b in zip(tp, m)])} "
            f"| {spread([b / a for a, b in zip(f, tp)])} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", default="4096,32768,131072")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", help="write every measured time here")
    args = ap.parse_args()
    if not _native.available():
        raise SystemExit("the fused kernel did not build: see python -m tierd_kernels.build")
    results = []
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        for tokens in (int(t) for t in args.tokens.split(",")):
            results.append(measure(tokens, dtype, args.rounds))
            print(table(results[-1:]).splitlines()[-1], flush=True)
    print(f"\n{args.rounds} rounds; fused kernel threads {_native.default_threads()}, "
          f"torch threads {torch.get_num_threads()}\n")  # fmt: skip
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": args.rounds, "threads": _native.default_threads(),
                       "torch_threads": torch.get_num_threads(), "results": results}, f,
                      indent=1)  # fmt: skip


if __name__ == "__main__":
    main()
