"""Compressed KV: what each codec saves and what attention on its codes costs, in one run.

    python tools/bench_compress.py [--tokens 32768,131072] [--codecs int8,fp8,kivi4,kivi2]
        [--k-group N] [--v-group N] [--rounds 5] [--json FILE]

Per codec (tierd_kernels.codecs, default groups unless --k-group / --v-group): the
compression ratio against bf16; encode and decode throughput of the torch references, in
GB/s of bf16 KV (one layer of 64 blocks, median of 5 calls); and the decode-step attend time
over 32k and 128k tokens of one layer (32 query heads / 8 KV heads, head dim 128, blocks of
256 tokens, each block's record or tensor allocated on its own, in memory) for:
  attend              attend_codes on the compiled kernel (attention on the codes)
  decode_then_attend  every record decoded to bf16 by the torch reference, then the fused
                      kernel over the decoded blocks
and, once per size, the fused kernel over the bf16 blocks (raw) and a memcpy (`copy_`
between two preallocated buffers) of the raw K+V bytes: the physical reference, as in
tools/bench_cpu_kernel.py. Every round times one call of each path, in a rotating order,
each after writing 96 MiB to evict the caches. Figures are medians over rounds with the
range; speedups are per round (paired, so the machine's drift cancels) as raw time / codes
time. Kernel threads: the CPUs this process may run on; torch's are its default.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import statistics
import time
from collections.abc import Callable

import torch

from tierd_kernels import _native, attend_blocks
from tierd_kernels.codecs import Codec, Kivi, make_codec
from tierd_kernels.codes_attention import attend_codes

HEADS, KV_HEADS, DIM, BLOCK_TOKENS = 32, 8, 128, 256
SHAPE = (2, KV_HEADS, BLOCK_TOKENS, DIM)  # one layer of one block
THROUGHPUT_BLOCKS = 64  # 16 MiB of bf16 KV for the encode and decode figures

# Written before every timed call: a decode step finds its KV in memory, not in the 32 MiB
# L3. Written with libc on this thread, not by torch (whose OpenMP threads would spin on).
EVICT_BYTES = 96 << 20
_evict = torch.empty(EVICT_BYTES, dtype=torch.uint8)


def timed(fn: Callable[[], object]) -> float:
    ctypes.memset(_evict.data_ptr(), 1, EVICT_BYTES)
    time.sleep(0.002)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(fn: Callable[[], object], nbytes: int, calls: int = 5) -> float:
    """GB/s of `nbytes` per call, median of `calls` (after one warm-up)."""
    fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def codec_setup(name: str, k_group: int | None, v_group: int | None) -> Codec:
    params = {"k_group": k_group, "v_group": v_group} if name.startswith("kivi") else {}
    return make_codec(name, **params)


def encode_decode_gbps(codec: Codec, blocks: list[torch.Tensor]) -> tuple[float, float]:
    block = torch.stack(blocks[:THROUGHPUT_BLOCKS]).view(-1, *SHAPE)  # layers = blocks
    nbytes = block.numel() * block.element_size()
    enc = codec.encode(block)
    return (
        throughput(lambda: codec.encode(block), nbytes),
        throughput(lambda: codec.decode(enc, tuple(block.shape), torch.bfloat16), nbytes),
    )


def decode_then_attend(codec: Codec, records: list[torch.Tensor], q: torch.Tensor) -> object:
    blocks = [codec.decode(r, (1, *SHAPE), torch.bfloat16) for r in records]
    return attend_blocks(blocks, 0, q)


def measure(
    tokens: int,
    blocks: list[torch.Tensor],
    records: dict[str, list[torch.Tensor]],
    codecs: dict[str, Codec],
    q: torch.Tensor,
    rounds: int,
) -> dict[str, list[float]]:
    n = tokens // BLOCK_TOKENS
    kv_bytes = n * math.prod(SHAPE) * 2
    src = torch.ones(kv_bytes, dtype=torch.uint8)
    dst = torch.zeros_like(src)
    fns: dict[str, Callable[[], object]] = {
        "raw": lambda: attend_blocks(blocks[:n], 0, q),
        "memcpy": lambda: dst.copy_(src),
    }
    for name, codec in codecs.items():
        recs = records[name][:n]
        fns[f"{name}/attend"] = lambda c=codec, r=recs: attend_codes(r, c, SHAPE, q)
        fns[f"{name}/decode_then_attend"] = lambda c=codec, r=recs: decode_then_attend(c, r, q)
    # Warm up, and check attention on codes against decode-then-attend (which rounds the
    # decoded KV to bf16: 2^-9 relative).
    fns["raw"]()
    for name in codecs:
        got, want = fns[f"{name}/attend"](), fns[f"{name}/decode_then_attend"]()
        err = ((got.out - want.out).norm() / want.out.norm()).item()  # type: ignore[attr-defined]
        assert err < 1e-2, f"{name}: attention on codes is off decode-then-attend by {err:.3g}"
    fns["memcpy"]()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(fns[name]))
    return times


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    v = [x * scale for x in values]
    return f"{fmt.format(statistics.median(v))} ({fmt.format(min(v))}-{fmt.format(max(v))})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tokens", default="32768,131072")
    ap.add_argument("--codecs", default="int8,fp8,kivi4,kivi2")
    ap.add_argument("--k-group", type=int, help="kivi tokens per key group (default: a block)")
    ap.add_argument("--v-group", type=int, help="kivi channels per value group (default: dim)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the figures and every measured time here")
    args = ap.parse_args()
    if not _native.available():
        raise SystemExit("the compiled kernel did not build: see python -m tierd_kernels.build")
    os.environ["TIERD_KERNELS"] = "cpp"  # never time the torch fallback by accident
    sizes = [int(t) for t in args.tokens.split(",")]
    g = torch.Generator().manual_seed(0)
    n_max = max(sizes) // BLOCK_TOKENS
    blocks = [torch.randn(1, *SHAPE, generator=g).to(torch.bfloat16) for _ in range(n_max)]
    q = torch.randn(1, HEADS, DIM, generator=g).to(torch.bfloat16)
    codecs = {name: codec_setup(name, args.k_group, args.v_group)
              for name in args.codecs.split(",")}  # fmt: skip
    report: dict[str, object] = {
        "config": {"heads": HEADS, "kv_heads": KV_HEADS, "dim": DIM,
                   "block_tokens": BLOCK_TOKENS, "rounds": args.rounds,
                   "kernel_threads": _native.default_threads(),
                   "torch_threads": torch.get_num_threads(),
                   "k_group": args.k_group, "v_group": args.v_group,
                   "load_average": os.getloadavg()},
        "codecs": {}, "raw": {"ratio": 1.0, "attend_ms": {}, "memcpy_ms": {}, "rounds_ms": {}},
    }  # fmt: skip
    records: dict[str, list[torch.Tensor]] = {}
    out_codecs: dict[str, dict[str, object]] = report["codecs"]  # type: ignore[assignment]
    for name, codec in codecs.items():
        records[name] = [codec.encode(b) for b in blocks]
        enc_gbps, dec_gbps = encode_decode_gbps(codec, blocks)
        ratio = math.prod(SHAPE) * 2 / codec.record_bytes(SHAPE, torch.bfloat16)
        groups = codec.groups(SHAPE) if isinstance(codec, Kivi) else None
        out_codecs[name] = {"ratio": round(ratio, 3), "groups": groups,
                            "encode_gbps": round(enc_gbps, 3), "decode_gbps": round(dec_gbps, 3),
                            "attend_ms": {}, "decode_then_attend_ms": {},
                            "speedup_vs_raw": {}, "rounds_ms": {}}  # fmt: skip
        print(f"{name}: ratio {ratio:.2f}, encode {enc_gbps:.2f} GB/s, "
              f"decode {dec_gbps:.2f} GB/s", flush=True)  # fmt: skip
    raw: dict[str, dict[str, object]] = report["raw"]  # type: ignore[assignment]
    for tokens in sizes:
        key = f"mem_{tokens // 1024}k"
        times = measure(tokens, blocks, records, codecs, q, args.rounds)
        raw["attend_ms"][key] = statistics.median(times["raw"]) * 1e3
        raw["memcpy_ms"][key] = statistics.median(times["memcpy"]) * 1e3
        raw["rounds_ms"][key] = {p: [t * 1e3 for t in times[p]] for p in ("raw", "memcpy")}
        print(f"\n{tokens // 1024}k tokens: raw {spread(times['raw'], 1e3)} ms, "
              f"memcpy {spread(times['memcpy'], 1e3)} ms", flush=True)  # fmt: skip
        for name in codecs:
            a, d = times[f"{name}/attend"], times[f"{name}/decode_then_attend"]
            c = out_codecs[name]
            c["attend_ms"][key] = statistics.median(a) * 1e3  # type: ignore[index]
            c["decode_then_attend_ms"][key] = statistics.median(d) * 1e3  # type: ignore[index]
            speed = [r / x for r, x in zip(times["raw"], a)]
            c["speedup_vs_raw"][key] = statistics.median(speed)  # type: ignore[index]
            c["rounds_ms"][key] = {"attend": [t * 1e3 for t in a],  # type: ignore[index]
                                   "decode_then_attend": [t * 1e3 for t in d]}  # fmt: skip
            print(f"  {name}: attend {spread(a, 1e3)} ms, decode-then-attend "
                  f"{spread(d, 1e3, '{:.0f}')} ms, raw / attend {spread(speed)}",
                  flush=True)  # fmt: skip
    print("\n" + table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


def table(report: dict[str, object]) -> str:
    codecs: dict[str, dict[str, object]] = report["codecs"]  # type: ignore[assignment]
    raw: dict[str, dict[str, object]] = report["raw"]  # type: ignore[assignment]
    lines = [
        (
            "| codec | ratio | encode GB/s | decode GB/s | tokens | attend ms | raw ms "
            "| raw / attend | decode-then-attend ms | memcpy ms |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, c in codecs.items():
        rounds: dict[str, dict[str, list[float]]] = c["rounds_ms"]  # type: ignore[assignment]
        for key, per in rounds.items():
            rr = raw["rounds_ms"][key]  # type: ignore[index]
            speed = [r / a for r, a in zip(rr["raw"], per["attend"])]  # type: ignore[index]
            lines.append(
                f"| {name} | {c['ratio']:.2f} | {c['encode_gbps']:.2f} | {c['decode_gbps']:.2f} "
                f"| {key[4:]} | {spread(per['attend'])} | {spread(rr['raw'])} "  # type: ignore[index]
                f"| {spread(speed)} | {spread(per['decode_then_attend'], fmt='{:.0f}')} "
                f"| {spread(rr['memcpy'])} |"  # type: ignore[index]
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
