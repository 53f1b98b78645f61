"""Decode attention: attend inside tierd vs get the KV and compute in the client.

    python tools/bench_attend.py [--tokens 4096,32768,131072] [--steps 5]
                                 [--nvme-codecs kivi4,int8] [--json FILE]

One Llama-3-8B-like layer (32 query heads, 8 KV heads, head dim 128, bfloat16, 256-token
blocks), KV in the host tier and in the NVMe tier. For each size and tier:
  attend      the client sends q, tierd computes next to the KV, one output comes back
  get+local   the client gets every block (shared memory) and runs the same CPU kernel
It reports per-step latency, bytes crossing the client boundary per step, and attend's KV
throughput as a fraction of memcpy (host) and of raw O_DIRECT read (NVMe), both measured
in the same run on the same machine. `--nvme-codecs` adds, per codec, a daemon whose NVMe
tier stores blocks in that codec, and attend over those codes against the raw NVMe tier
(`nvme_codec_speedup` in the JSON). `--tree`/`--trees` compare checkouts of this
repository in one run (see bench_trees.py).
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
from bench_kv import Daemon, bench_disk, bench_memcpy, gbps

from tierd_client import AttendItem, KVLayout, TierdClient
from tierd_client.attend import request_of
from tierd_kernels import attend_blocks

HEADS, KV_HEADS, DIM, BLOCK_TOKENS = 32, 8, 128, 256
LAYOUT = KVLayout(1, KV_HEADS, DIM, "bfloat16", BLOCK_TOKENS)


def fill(client: TierdClient, ns, n_blocks: int, seed: int) -> list[bytes]:
    tokens = np.random.default_rng(seed).integers(0, 100_000, n_blocks * BLOCK_TOKENS)
    keys = client.block_keys(ns, tokens)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n_blocks, 32):
        n = min(32, n_blocks - start)
        blocks = torch.randn(n, *LAYOUT.block_shape, generator=g).to(torch.bfloat16)
        client.put(ns, keys[start : start + n], blocks)
    return keys


def step_attend(stream, seq_id: int, q: torch.Tensor) -> None:
    (res,) = stream.send([AttendItem(seq_id, 0, q)])
    assert res.out.shape == (1, HEADS, DIM)


def step_get(client: TierdClient, ns, keys: list[bytes], out: torch.Tensor, q) -> None:
    got = client.get(ns, keys, out=out)
    assert all(got.found)
    attend_blocks(list(out), 0, q)


def measure(client, ns, keys, tier: str, steps: int, q: torch.Tensor) -> dict[str, float]:
    kv_bytes = len(keys) * LAYOUT.block_bytes
    r: dict[str, float] = {"kv_bytes": kv_bytes}
    client.move(ns, keys, tier)
    seq_id = client.open_sequence(ns, keys)
    with client.attend_stream() as stream:
        step_attend(stream, seq_id, q)  # warm the path once
        t0 = time.perf_counter()
        for _ in range(steps):
            step_attend(stream, seq_id, q)
        r["attend_ms"] = (time.perf_counter() - t0) / steps * 1e3
    client.close_sequence(seq_id)
    req = request_of([AttendItem(seq_id, 0, q)]).ByteSize()
    resp = (HEADS * DIM + HEADS) * 4 + 64  # out + lse float32, plus message framing
    r["attend_bytes_per_step"] = req + resp
    out = torch.empty(len(keys), *LAYOUT.block_shape, dtype=torch.bfloat16)
    total = 0.0
    for _ in range(steps):
        client.move(ns, keys, tier)  # a get promotes NVMe blocks: put them back first
        t0 = time.perf_counter()
        step_get(client, ns, keys, out, q)
        total += time.perf_counter() - t0
    r["get_ms"] = total / steps * 1e3
    r["get_bytes_per_step"] = kv_bytes
    r["attend_kv_gbps"] = gbps(kv_bytes, r["attend_ms"] / 1e3)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="4096,32768,131072")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dir", type=Path, help="work dir on the disk to measure (default: cwd)")
    p.add_argument(
        "--nvme-codecs",
        default="",
        help="also attend over NVMe tiers storing these codecs (e.g. kivi4,int8,\"kivi4;v_group=32\")",
    )
    p.add_argument("--json", type=Path)
    bench_trees.add_arguments(p)
    args = p.parse_args()
    if bench_trees.trees_of(args):
        return bench_trees.compare(Path(__file__), args, metrics)
    sizes = [int(s) for s in args.tokens.split(",")]
    most = max(sizes) // BLOCK_TOKENS * LAYOUT.block_bytes
    torch.manual_seed(0)
    q = torch.randn(1, HEADS, DIM)
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tierd-attend-", dir=args.dir or Path.cwd()) as tmp:
        work = Path(tmp)
        memcpy = bench_memcpy(1 << 20, 256 << 20)
        _, disk_read = bench_disk(work, 1 << 20, 512 << 20, 8)
        d = Daemon(work, 2 * most + (256 << 20), 2 * most + (256 << 20), "attend")
        try:
            with d.client("shm") as client:
                ns = client.open_namespace("bench-attend-llama8b-layer", LAYOUT)
                for seed, tokens in enumerate(sizes):
                    keys = fill(client, ns, tokens // BLOCK_TOKENS, seed)
                    for tier in ("host", "nvme"):
                        r = measure(client, ns, keys, tier, args.steps, q)
                        results.setdefault(tier, {})[str(tokens)] = r
                    client.delete(ns, keys)
        finally:
            d.stop()
        for codec in [c for c in args.nvme_codecs.split(",") if c]:
            tag = codec.replace(";", "-").replace("=", "")  # "kivi4;v_group=32" -> a dir name
            d = Daemon(work, 2 * most + (256 << 20), 2 * most + (256 << 20), f"attend-{tag}",
                       nvme_codec=codec)  # fmt: skip
            try:
                with d.client("shm") as client:
                    ns = client.open_namespace("bench-attend-llama8b-layer", LAYOUT)
                    for seed, tokens in enumerate(sizes):
                        keys = fill(client, ns, tokens // BLOCK_TOKENS, seed)
                        r = measure(client, ns, keys, "nvme", args.steps, q)
                        results.setdefault(f"nvme-{codec}", {})[str(tokens)] = r
                        client.delete(ns, keys)
            finally:
                d.stop()
    print_table(results, memcpy, disk_read)
    if args.json:
        doc = summary(results, memcpy, disk_read)
        bench_trees.stamp(doc)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


def metrics(doc: dict) -> dict[str, float]:
    """The figures a revision comparison sets side by side (bench_trees)."""
    keep = ("attend_ms", "get_ms", "attend_kv_gbps")
    per = bench_trees.flatten(doc["results"])
    out = {k: v for k, v in per.items() if k.rsplit(".", 1)[-1] in keep}
    return {"memcpy_gbps": doc["memcpy_gbps"], "disk_read_gbps": doc["disk_read_gbps"], **out}


def summary(results, memcpy: float, disk_read: float) -> dict:
    host, nvme = results["host"], results["nvme"]
    mid = "32768" if "32768" in host else next(iter(host))
    return {
        "memcpy_gbps": memcpy,
        "disk_read_gbps": disk_read,
        "host_attend_frac_of_memcpy": host[mid]["attend_kv_gbps"] / memcpy,
        "nvme_attend_frac_of_disk": nvme[mid]["attend_kv_gbps"] / disk_read,
        "attend_bytes_per_step": host[mid]["attend_bytes_per_step"],
        "get_bytes_per_step": host[mid]["get_bytes_per_step"],
        "attend_beats_get_everywhere": all(
            r["attend_ms"] < r["get_ms"] for t in results.values() for r in t.values()
        ),
        "latency_ms": {
            tier: {
                size: {"attend": r["attend_ms"], "get_local": r["get_ms"]}
                for size, r in by_size.items()
            }
            for tier, by_size in results.items()
        },
        "results": results,
        # raw NVMe attend time over attend on an NVMe tier of each codec (> 1: faster)
        "nvme_codec_speedup": {
            tier.split("-", 1)[1]: {
                size: nvme[size]["attend_ms"] / r["attend_ms"]
                for size, r in by_size.items()
                if size in nvme
            }
            for tier, by_size in results.items()
            if tier.startswith("nvme-")
        },
    }


def print_table(results, memcpy: float, disk_read: float) -> None:
    print(f"memcpy {memcpy:.2f} GB/s, O_DIRECT read {disk_read:.2f} GB/s")
    head = ["tier", "tokens", "attend ms", "get+local ms", "speedup", "attend GB/s", "frac",
            "attend B/step", "get B/step"]  # fmt: skip
    print("".join(h.rjust(14) for h in head))
    for tier, by_size in results.items():
        ceiling = memcpy if tier == "host" else disk_read
        for size, r in by_size.items():
            row = [tier, size, f"{r['attend_ms']:.2f}", f"{r['get_ms']:.2f}",
                   f"{r['get_ms'] / r['attend_ms']:.1f}x", f"{r['attend_kv_gbps']:.2f}",
                   f"{r['attend_kv_gbps'] / ceiling:.2f}", str(int(r["attend_bytes_per_step"])),
                   str(int(r["get_bytes_per_step"]))]  # fmt: skip
            print("".join(c.rjust(14) for c in row))
    for tier, by_size in results.items():
        if tier.startswith("nvme-") and "nvme" in results:
            print(f"{tier}: raw NVMe attend / {tier} attend: " + ", ".join(
                f"{size} {results['nvme'][size]['attend_ms'] / r['attend_ms']:.2f}x"
                for size, r in by_size.items() if size in results["nvme"]))  # fmt: skip
    print(
        "targets: host attend >= 0.70 of memcpy at 32k; attend beats get+local at every size;"
        " bytes per step O(heads x dim); NVMe attend over kivi4 >= 3x over raw at 128k"
    )


if __name__ == "__main__":
    sys.exit(main())
