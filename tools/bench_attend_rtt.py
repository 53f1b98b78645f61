"""Per-layer attend round trip: the shared-memory ring against gRPC, and the kernel alone.

    python tools/bench_attend_rtt.py [--tokens 2048] [--steps 12] [--dtypes float32,bfloat16]
                                     [--block-tokens 16,256] [--json FILE]

A SmolLM2-sized model (30 layers, 9 query heads, 3 KV heads, head dim 64; blocks of
`--block-tokens`, 16 being what `tierd_client.hf` uses by default) with `--tokens` of
context in the host tier. Each decode step attends every layer in turn, appending that
layer's new K/V (and the token id with layer 0) as a model does, over two sequences on the
same blocks: one through the attend ring (`attend_stream` of a `TierdClient` with the fast
path), one through gRPC (`attend_stream` with `fast_attend=False`); the two alternate step
by step so that a noisy machine weighs on both alike. The same runs over an empty sequence
(each layer attends its tail alone), and for a closed sequence (refused once the request
is read and checked) show the transport with less and then no attention behind it.
`kernel alone` is the attention kernel, in this process, on blocks of the same shape
(`attend_blocks` over the cached blocks, per layer): what the round trip over the context
costs beyond it is the transport plus the daemon's per-block bookkeeping.
Figures are microseconds per layer, p50 and p99.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_kv module
import bench_trees
from bench_kv import Daemon

from tierd_client import AttendItem, KVLayout, NotFound, TierdClient, fastpath
from tierd_kernels import attend_blocks

LAYERS, HEADS, KV_HEADS, DIM = 30, 9, 3, 64


def percentiles(samples: list[float]) -> dict[str, float]:
    us = np.asarray(samples) * 1e6
    return {"p50_us": float(np.percentile(us, 50)), "p99_us": float(np.percentile(us, 99)),
            "n": len(samples)}  # fmt: skip


def fill(
    client: TierdClient, ns, layout: KVLayout, n_blocks: int
) -> tuple[list[bytes], torch.Tensor]:
    tokens = np.arange(n_blocks * layout.block_tokens) % 50_000
    keys = client.block_keys(ns, tokens)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randn(n_blocks, *layout.block_shape, generator=g).to(layout.torch_dtype())
    for start in range(0, n_blocks, 16):
        client.put(ns, keys[start : start + 16], blocks[start : start + 16])
    return keys, blocks


def step_items(seq: int, g: torch.Generator, kv_dtype: torch.dtype, token: int) -> list[AttendItem]:
    items = []
    for layer in range(LAYERS):
        q = torch.randn(1, HEADS, DIM, generator=g)
        kv = torch.randn(2, KV_HEADS, 1, DIM, generator=g).to(kv_dtype)
        items.append(AttendItem(seq, layer, q, kv[0], kv[1], [token] if layer == 0 else []))
    return items


def run_step(stream, items: list[AttendItem], into: list[float], refused: bool) -> None:
    for item in items:
        t0 = time.perf_counter()
        try:
            (res,) = stream.send([item])
        except NotFound:
            if not refused:
                raise
        into.append(time.perf_counter() - t0)
        if not refused:
            assert res.out.shape == (1, HEADS, DIM)


def kernel_alone(blocks: torch.Tensor, steps: int) -> list[float]:
    views = list(blocks)
    g = torch.Generator().manual_seed(2)
    out = []
    for step in range(steps + 1):
        for layer in range(LAYERS):
            q = torch.randn(1, HEADS, DIM, generator=g)
            t0 = time.perf_counter()
            attend_blocks(views, layer, q)
            if step:  # the first step warms the kernel's threads and scratch
                out.append(time.perf_counter() - t0)
    return out


def measure(
    daemon: Daemon, dtype: str, tokens: int, block_tokens: int, steps: int
) -> dict[str, dict[str, float]]:
    """Per layer: ring and gRPC over the full context, over an empty one (the tail alone)
    and for a closed sequence (refused once the request is read and checked: the
    transport with no attention behind it), and the kernel alone."""
    layout = KVLayout(LAYERS, KV_HEADS, DIM, dtype, block_tokens)
    kv_dtype = layout.torch_dtype()
    with (
        TierdClient(daemon.address, timeout=120) as fast,
        TierdClient(daemon.address, timeout=120, fast_attend=False) as slow,
    ):
        ns = fast.open_namespace(f"bench-rtt-{dtype}-{block_tokens}", layout)
        keys, blocks = fill(fast, ns, layout, tokens // block_tokens)
        contexts = ("context", "empty", "refused")
        runs = [(p, ctx) for ctx in contexts for p in ("ring", "grpc")]
        times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
        g = torch.Generator().manual_seed(1)
        with fast.attend_stream() as ring, slow.attend_stream() as grpc:
            clients = {"ring": (fast, ring), "grpc": (slow, grpc)}
            seqs = {(p, ctx): clients[p][0].open_sequence(ns, keys if ctx == "context" else [])
                    for p, ctx in runs}  # fmt: skip
            for p in ("ring", "grpc"):
                clients[p][0].close_sequence(seqs[(p, "refused")])
            for step in range(steps + 1):
                for run in runs:  # alternating: a noisy moment weighs on all alike
                    items = step_items(seqs[run], g, kv_dtype, 50_000 + step)
                    into = times[run] if step else []  # step 0 warms up
                    run_step(clients[run[0]][1], items, into, run[1] == "refused")
            for run in runs:
                if run[1] != "refused":
                    clients[run[0]][0].close_sequence(seqs[run])
        if fast.fast_attend_calls < len(contexts) * (steps + 1) * LAYERS:
            raise RuntimeError(f"only {fast.fast_attend_calls} calls went over the ring")
        fast.delete(ns, keys)
    out = {f"{p}_{ctx}": percentiles(times[(p, ctx)]) for p, ctx in runs}
    out["kernel"] = percentiles(kernel_alone(blocks, steps))
    return out


def print_table(results: dict[str, dict[str, dict[str, float]]], tokens: int) -> None:
    print(f"\nper-layer attend round trip (us), {HEADS} q heads / {KV_HEADS} KV heads x {DIM}")
    print("| dtype, block | context | ring p50 | ring p99 | gRPC stream p50 | gRPC stream p99 "
          "| kernel alone p50 | kernel alone p99 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for dtype, r in results.items():
        k = r["kernel"]
        labels = (("context", f"{tokens} tokens"), ("empty", "tail only"),
                  ("refused", "none (refused)"))  # fmt: skip
        for ctx, label in labels:
            ring, grpc = r[f"ring_{ctx}"], r[f"grpc_{ctx}"]
            kern = f"{k['p50_us']:.0f} | {k['p99_us']:.0f}" if ctx == "context" else "- | -"
            print(f"| {dtype} | {label} | {ring['p50_us']:.0f} | {ring['p99_us']:.0f} "
                  f"| {grpc['p50_us']:.0f} | {grpc['p99_us']:.0f} | {kern} |")  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--steps", type=int, default=12, help="decode steps (each: every layer)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--block-tokens", default="16,256", help="tokens per block (16: the hf default)")
    p.add_argument("--client-spin-us", type=float, default=fastpath.SPIN_S * 1e6,
                   help="how long a caller watches for its answer before sleeping")  # fmt: skip
    p.add_argument("--json", type=Path)
    bench_trees.add_arguments(p)
    args = p.parse_args()
    if bench_trees.trees_of(args):
        return bench_trees.compare(Path(__file__), args, metrics)
    fastpath.SPIN_S = args.client_spin_us / 1e6
    torch.manual_seed(0)
    sizes = [int(b) for b in args.block_tokens.split(",")]
    layout = KVLayout(LAYERS, KV_HEADS, DIM, "float32", max(sizes))
    host = 2 * (args.tokens // max(sizes) + 2) * layout.block_bytes + (64 << 20)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tierd-rtt-") as tmp:
        d = Daemon(Path(tmp), host, host, "rtt")
        try:
            with d.client("shm") as probe:
                deadline = time.monotonic() + 60
                while True:  # until the daemon answers
                    try:
                        probe.stats()
                        break
                    except Exception:
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
            for dtype in args.dtypes.split(","):
                for bt in sizes:
                    results[f"{dtype}, {bt}"] = measure(d, dtype, args.tokens, bt, args.steps)
        finally:
            d.stop()
    print_table(results, args.tokens)
    if args.json:
        doc = {"tokens": args.tokens, "steps": args.steps, "client_spin_us": args.client_spin_us,
               "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM,
               "results": results}  # fmt: skip
        bench_trees.stamp(doc)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


def metrics(doc: dict) -> dict[str, float]:
    """The figures a revision comparison sets side by side (bench_trees)."""
    return {k: v for k, v in bench_trees.flatten(doc["results"]).items() if k.endswith("_us")}


if __name__ == "__main__":
    sys.exit(main())
