"""KV throughput of `attend_blocks` against memcpy of the same bytes, on this machine.

    python tests/kernels/bench_cpu_attention.py [--tokens 32768] [--block-tokens 256]
        [--dtype bfloat16] [--rounds 15] [--q-tokens 1]

32 query heads, 8 KV heads, head dim 128 (a Llama-3-8B layer); blocks hold 2 layers and
attention reads layer 1, so each block's layer is a strided view as in the host arena.
GB/s counts the K and V bytes of that layer once. memcpy is measured two ways on the same
byte count: `clone()` (allocates, so it pays page faults: the cost a copy-out would pay)
and `copy_()` into a buffer allocated once. Rounds interleave attend_blocks and copy_()
and the best round is reported beside the median, since other work on a small machine adds
noise; clone() runs on its own afterwards, because its 128 MiB frees and page faults slow
whatever runs next.
Not collected by pytest (no test_ prefix).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from tierd_kernels import attend_blocks

HEADS, KV_HEADS, DIM, LAYERS = 32, 8, 128, 2


def timings(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm: first-touch pages, allocator, oneDNN/MKL kernels
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--block-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--q-tokens", type=int, default=1)
    ap.add_argument("--chunk-tokens", type=int, default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    n_blocks = args.tokens // args.block_tokens
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(n_blocks, LAYERS, 2, KV_HEADS, args.block_tokens, DIM, generator=g)
    blocks = list(pool.to(dtype).unbind(0))
    del pool
    q = torch.randn(args.q_tokens, HEADS, DIM, generator=g).to(dtype)
    kv_bytes = n_blocks * blocks[0][1].numel() * blocks[0].element_size()
    src = torch.empty(kv_bytes, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    extra = {} if args.chunk_tokens is None else {"chunk_tokens": args.chunk_tokens}

    fns: dict[str, Callable[[], object]] = {
        "attend_blocks": lambda: attend_blocks(blocks, 1, q, **extra),
        "memcpy copy_()": lambda: dst.copy_(src),
    }
    times = timings(fns, args.rounds) | timings({"memcpy clone()": src.clone}, args.rounds)
    print(f"{args.tokens} tokens, {args.block_tokens}-token blocks, {args.dtype}, "
          f"{args.q_tokens} query token(s), {kv_bytes / 2**20:.0f} MiB of K+V, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    best = {name: kv_bytes / min(t) / 1e9 for name, t in times.items()}
    for name, t in times.items():
        print(f"  {name:16s} best {best[name]:6.2f} GB/s   median "
              f"{kv_bytes / statistics.median(t) / 1e9:6.2f} GB/s")  # fmt: skip
    for base in ("memcpy clone()", "memcpy copy_()"):
        print(f"  attend_blocks / {base}: {best['attend_blocks'] / best[base]:.0%} (best rounds)")


if __name__ == "__main__":
    main()
