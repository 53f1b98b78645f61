"""The GPU paths on a CUDA device: copy ceilings, and paged decode attention (Triton) against
the memory floor and torch's own attention on the same keys, in one run.

    python tools/bench_gpu.py --json FILE [--tokens 4096,32768,131072] [--batch 1,8]
    python tools/bench_gpu.py --smoke      # tiny sizes; on the CPU under TRITON_INTERPRET=1

Ceilings (each the median of several timed repeats, CUDA events):
  d2d      device-to-device copy of 2 GiB; GB/s counts bytes read plus bytes written
  read     a max over the same 2 GiB (bytes read only): the floor for attention
  h2d      pinned host to device, 1 GiB (what the HBM tier's promotions would cost)
  d2h      device to pinned host, 1 GiB (its demotions)
  h2d_page pageable host to device, 1 GiB (a client buffer that was not pinned)

Decode attention, per batch size and context (32 query heads, 8 KV heads, dim 128, bf16,
blocks of 64 tokens in a pool in shuffled order, as a paged cache holds them):
  triton      `tierd_kernels.decode_attention` over the pool
  sdpa        torch's scaled_dot_product_attention on the same keys laid out contiguous
              (the peer: it reads the same bytes without the block table)
  gather+sdpa gather the blocks into contiguous K, V and then sdpa (what a caller without
              a paged kernel pays)
  floor       the bytes of K and V read once at the `read` ceiling
and the relative error of triton and sdpa against a float64 reference on the same inputs.

Decode attention on codes (`--codecs`, default int8,kivi4,kivi2), same shapes: the pool
holds encoded blocks (`tierd_kernels.triton_codes.decode_attention_codes`), timed against
the raw kernel's row above and against the floor of the code bytes; `err` is its
relative error against decode-then-attend (float64) on a small case of the same codec.
Every input is random (never zeros); each case draws its own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch

Q_HEADS, KV_HEADS, DIM, BLOCK_TOKENS = 32, 8, 128, 64
DTYPE = torch.bfloat16


def timed(fn: Any, *, repeats: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `repeats` runs after two warm-ups."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        import time

        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def ceilings(device: torch.device, size: int, repeats: int) -> dict[str, float]:
    """GB/s of the copies that bound the GPU paths."""
    out: dict[str, float] = {}
    src = torch.randint(0, 255, (size,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    out["d2d"] = 2 * size / timed(partial(dst.copy_, src), repeats=repeats, device=device) / 1e9
    words = src.view(torch.int32) if size % 4 == 0 else src
    out["read"] = size / timed(partial(torch.amax, words), repeats=repeats, device=device) / 1e9
    src = dst = None  # give the memory back before the next pair
    pinned = device.type == "cuda"
    host = torch.randint(0, 255, (size // 2,), dtype=torch.uint8).pin_memory() if pinned else (
        torch.randint(0, 255, (size // 2,), dtype=torch.uint8))  # fmt: skip
    dev = torch.empty(size // 2, dtype=torch.uint8, device=device)
    half = size // 2
    out["h2d"] = half / timed(partial(dev.copy_, host, non_blocking=True), repeats=repeats,
                              device=device) / 1e9  # fmt: skip
    out["d2h"] = half / timed(partial(host.copy_, dev, non_blocking=True), repeats=repeats,
                              device=device) / 1e9  # fmt: skip
    pageable = torch.randint(0, 255, (half,), dtype=torch.uint8)
    out["h2d_page"] = half / timed(partial(dev.copy_, pageable), repeats=repeats,
                                   device=device) / 1e9  # fmt: skip
    return out


def make_case(batch: int, tokens: int, device: torch.device, gen: torch.Generator
              ) -> dict[str, Any]:  # fmt: skip
    """A pool holding `batch` sequences of `tokens` tokens in shuffled blocks (random K, V
    and q, scores spread like a trained model's: std about 3)."""
    per_seq = math.ceil(tokens / BLOCK_TOKENS)
    nblocks = batch * per_seq
    shape = (nblocks, 1, 2, KV_HEADS, BLOCK_TOKENS, DIM)
    pool = torch.randn(shape, generator=gen, device=device, dtype=DTYPE)
    order = torch.randperm(nblocks, generator=gen, device=device).to(torch.int32)
    table = order.view(batch, per_seq)
    lens = torch.full((batch,), tokens, dtype=torch.int32, device=device)
    q = torch.randn(batch, Q_HEADS, DIM, generator=gen, device=device, dtype=DTYPE) * 3.0
    return {"pool": pool, "table": table, "lens": lens, "q": q, "tokens": tokens}


def contiguous_kv(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V as [batch, kv_heads, tokens, dim], gathered through the block table."""
    pool, table, tokens = case["pool"], case["table"], case["tokens"]
    blocks = pool[table.long()]  # [batch, per_seq, 1, 2, kvh, T, D]
    kv = blocks[:, :, 0].permute(0, 2, 3, 1, 4, 5)  # [batch, 2, kvh, per_seq, T, D]
    kv = kv.reshape(kv.shape[0], 2, KV_HEADS, -1, DIM)[:, :, :, :tokens]
    return kv[:, 0].contiguous(), kv[:, 1].contiguous()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Decode attention by torch: q [batch, heads, dim] -> [batch, heads, dim]."""
    out = torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True)
    return out.squeeze(2)


def gather_sdpa(q: torch.Tensor, case: dict[str, Any]) -> torch.Tensor:
    return sdpa(q, *contiguous_kv(case))


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Float64 decode attention, one sequence at a time (bounded memory)."""
    outs = []
    group = Q_HEADS // KV_HEADS
    for b in range(q.shape[0]):
        qb = q[b].double().view(KV_HEADS, group, DIM)
        kb, vb = k[b].double(), v[b].double()
        scores = torch.einsum("hgd,htd->hgt", qb, kb) / math.sqrt(DIM)
        p = torch.softmax(scores, dim=-1)
        outs.append(torch.einsum("hgt,htd->hgd", p, vb).reshape(Q_HEADS, DIM))
    return torch.stack(outs)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got = got.double()
    if not torch.isfinite(got).all():
        return math.inf
    return float((got - ref).norm() / ref.norm())


def attention_rows(device: torch.device, batches: list[int], contexts: list[int],
                   repeats: int, read: float) -> list[dict[str, Any]]:  # fmt: skip
    from tierd_kernels import decode_attention

    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for batch in batches:
        for tokens in contexts:
            case = make_case(batch, tokens, device, gen)
            q, pool, table, lens = case["q"], case["pool"], case["table"], case["lens"]
            k, v = contiguous_kv(case)
            ref = reference(q, k, v)
            tri = decode_attention(q, pool, table, lens, 0)
            err_tri = rel_err(tri.out, ref)
            err_sdpa = rel_err(sdpa(q, k, v), ref)
            kv_bytes = 2 * batch * tokens * KV_HEADS * DIM * pool.element_size()
            t_tri = timed(partial(decode_attention, q, pool, table, lens, 0), repeats=repeats,
                          device=device)  # fmt: skip
            t_sdpa = timed(partial(sdpa, q, k, v), repeats=repeats, device=device)
            t_gather = timed(partial(gather_sdpa, q, case), repeats=repeats,
                             device=device)  # fmt: skip
            floor = kv_bytes / (read * 1e9)
            rows.append({
                "batch": batch, "tokens": tokens, "kv_bytes": kv_bytes,
                "triton_us": t_tri * 1e6, "sdpa_us": t_sdpa * 1e6,
                "gather_sdpa_us": t_gather * 1e6, "floor_us": floor * 1e6,
                "triton_gbs": kv_bytes / t_tri / 1e9, "sdpa_gbs": kv_bytes / t_sdpa / 1e9,
                "triton_vs_floor": floor / t_tri, "triton_vs_sdpa": t_sdpa / t_tri,
                "err_triton": err_tri, "err_sdpa": err_sdpa,
            })  # fmt: skip
            case = k = v = q = pool = tri = ref = None  # free before the next case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def split_sweep(device: torch.device, repeats: int, tokens: int) -> dict[str, float]:
    """Microseconds per call of one batch-1 sequence for several split sizes."""
    from tierd_kernels import decode_attention

    gen = torch.Generator(device).manual_seed(1)
    case = make_case(1, tokens, device, gen)
    args = (case["q"], case["pool"], case["table"], case["lens"], 0)
    return {
        str(split): timed(
            lambda s=split: decode_attention(*args, split_tokens=s), repeats=repeats, device=device
        )
        * 1e6
        for split in (128, 256, 512, 1024, 2048)
    }


def launch_sweep(device: torch.device, repeats: int, cases: list[tuple[int, int]]
                 ) -> list[dict[str, Any]]:  # fmt: skip
    """Microseconds per call for each tile size and launch shape, per (batch, tokens)."""
    from triton.runtime.errors import OutOfResources

    from tierd_kernels import decode_attention, triton_attention

    saved = (triton_attention.TILE_TOKENS, dict(triton_attention.LAUNCH))
    gen = torch.Generator(device).manual_seed(2)
    rows = []
    try:
        for batch, tokens in cases:
            case = make_case(batch, tokens, device, gen)
            args = (case["q"], case["pool"], case["table"], case["lens"], 0)
            for tile in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (1, 2, 3):
                        triton_attention.TILE_TOKENS = tile
                        triton_attention.LAUNCH = {"num_warps": warps, "num_stages": stages}
                        try:
                            us = timed(partial(decode_attention, *args), repeats=repeats,
                                       device=device) * 1e6  # fmt: skip
                        except OutOfResources as e:  # a shape the chip cannot hold
                            us = math.nan
                            print(f"tile {tile} warps {warps} stages {stages}: {e}"[:200])
                        rows.append({"batch": batch, "tokens": tokens, "tile": tile,
                                     "warps": warps, "stages": stages, "us": us})  # fmt: skip
            case = None
    finally:
        triton_attention.TILE_TOKENS, triton_attention.LAUNCH = saved
    return rows


def codes_rows(device: torch.device, codecs: list[str], raw_rows: list[dict[str, Any]],
               repeats: int, read: float) -> list[dict[str, Any]]:  # fmt: skip
    """One row per codec and (batch, tokens) of `raw_rows`."""
    from tierd_kernels.codecs import make_codec
    from tierd_kernels.triton_codes import decode_attention_codes

    gen = torch.Generator().manual_seed(3)
    block_shape = (1, 2, KV_HEADS, BLOCK_TOKENS, DIM)
    rows = []
    for name in codecs:
        codec = make_codec(name)
        # Encoding on the CPU is slow: a few distinct blocks, repeated through the pool
        # (the kernel's time does not depend on the values).
        distinct = [torch.randn(block_shape, generator=gen).to(DTYPE) for _ in range(16)]
        encoded = torch.stack([codec.encode(b) for b in distinct]).to(device)
        decoded = torch.stack([codec.decode(e.cpu(), block_shape, torch.float64)
                               for e in encoded]).to(device)  # fmt: skip
        err = _codes_error(device, codec, encoded, decoded, gen)
        for raw in raw_rows:
            batch, tokens = raw["batch"], raw["tokens"]
            per_seq = math.ceil(tokens / BLOCK_TOKENS)
            pick = torch.randint(len(distinct), (batch * per_seq,), generator=gen).to(device)
            pool = encoded[pick].contiguous()
            table = torch.randperm(batch * per_seq, generator=gen).to(device, torch.int32)
            table = table.view(batch, per_seq)
            lens = torch.full((batch,), tokens, dtype=torch.int32, device=device)
            q = (torch.randn(batch, Q_HEADS, DIM, generator=gen) * 3.0).to(device, DTYPE)
            run = partial(decode_attention_codes, q, pool, codec, block_shape, table, lens, 0)
            t = timed(run, repeats=repeats, device=device)
            code_bytes = pool.numel() * tokens // (per_seq * BLOCK_TOKENS)
            floor = code_bytes / (read * 1e9)
            rows.append({
                "codec": name, "batch": batch, "tokens": tokens, "code_bytes": code_bytes,
                "us": t * 1e6, "floor_us": floor * 1e6, "vs_floor": floor / t,
                "raw_us": raw["triton_us"], "speedup_vs_raw": raw["triton_us"] / (t * 1e6),
                "err_vs_decoded": err,
            })  # fmt: skip
            pool = table = q = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _codes_error(device: torch.device, codec: Any, encoded: torch.Tensor,
                 decoded: torch.Tensor, gen: torch.Generator) -> float:  # fmt: skip
    """Relative error of the codes kernel against float64 attention over the decoded
    blocks, two sequences of 5 and 3.5 blocks."""
    from tierd_kernels.triton_codes import decode_attention_codes

    n = len(encoded)
    table = torch.stack([torch.randperm(n, generator=gen)[:6] for _ in range(2)])
    lens = [5 * BLOCK_TOKENS, 3 * BLOCK_TOKENS + BLOCK_TOKENS // 2]
    q = (torch.randn(2, Q_HEADS, DIM, generator=gen) * 3.0).to(device, DTYPE)
    got = decode_attention_codes(q, encoded.contiguous(), codec, tuple(decoded.shape[1:]),
                                 table.to(device, torch.int32),
                                 torch.tensor(lens, dtype=torch.int32, device=device), 0)  # fmt: skip
    want = []
    for b, tokens in enumerate(lens):
        kv = decoded[table[b].to(device)][:, 0]  # [6, 2, kvh, T, D]
        kv = kv.permute(1, 2, 0, 3, 4).reshape(2, KV_HEADS, -1, DIM)[:, :, :tokens]
        want.append(reference(q[b : b + 1], kv[0][None], kv[1][None])[0])
    return rel_err(got.out, torch.stack(want))


def print_report(doc: dict[str, Any]) -> None:
    c = doc["ceilings_gbs"]
    print(f"device: {doc['device']}")
    print("ceilings GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in c.items()))
    print(f"{'batch':>5} {'tokens':>7} {'MiB':>7} {'triton us':>10} {'sdpa us':>9} "
          f"{'gath+sdpa':>10} {'floor us':>9} {'tri/floor':>9} {'sdpa/tri':>8} "
          f"{'err tri':>8} {'err sdpa':>8}")  # fmt: skip
    for r in doc["attention"]:
        print(f"{r['batch']:>5} {r['tokens']:>7} {r['kv_bytes'] / 2**20:>7.0f} "
              f"{r['triton_us']:>10.1f} {r['sdpa_us']:>9.1f} {r['gather_sdpa_us']:>10.1f} "
              f"{r['floor_us']:>9.1f} {r['triton_vs_floor']:>9.2f} {r['triton_vs_sdpa']:>8.2f} "
              f"{r['err_triton']:>8.1e} {r['err_sdpa']:>8.1e}")  # fmt: skip
    for batch, tokens in sorted({(r["batch"], r["tokens"]) for r in doc.get("launch_sweep", [])}):
        mine = [r for r in doc["launch_sweep"] if (r["batch"], r["tokens"]) == (batch, tokens)]
        mine.sort(key=lambda r: r["us"] if r["us"] == r["us"] else math.inf)
        print(f"launch sweep, batch {batch}, {tokens} tokens (best first): "
              + ", ".join(f"t{r['tile']}/w{r['warps']}/s{r['stages']} {r['us']:.0f}"
                          for r in mine[:6]))  # fmt: skip
    if doc.get("codes"):
        print(f"{'codec':>6} {'batch':>5} {'tokens':>7} {'MiB':>7} {'us':>9} {'floor us':>9} "
              f"{'vs floor':>8} {'raw us':>9} {'raw/codes':>9} {'err':>8}")  # fmt: skip
        for r in doc["codes"]:
            print(f"{r['codec']:>6} {r['batch']:>5} {r['tokens']:>7} "
                  f"{r['code_bytes'] / 2**20:>7.0f} {r['us']:>9.1f} {r['floor_us']:>9.1f} "
                  f"{r['vs_floor']:>8.2f} {r['raw_us']:>9.1f} {r['speedup_vs_raw']:>9.2f} "
                  f"{r['err_vs_decoded']:>8.1e}")  # fmt: skip
    if doc.get("split_sweep_us"):
        print("split tokens -> us (batch 1, "
              f"{doc['split_sweep_tokens']} tokens): "
              + ", ".join(f"{k}: {v:.1f}" for k, v in doc["split_sweep_us"].items()))  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="4096,32768,131072")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--copy-mib", type=int, default=2048)
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes on the CPU under TRITON_INTERPRET=1 (checks the script)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="also time tile sizes and launch shapes (batch 8 x 32k, batch 1 x 128k)",
    )
    p.add_argument(
        "--codecs",
        default="int8,kivi4,kivi2",
        help="codecs to time attention on codes for ('' for none)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        contexts, batches, repeats, copy = [256], [1, 2], 2, 8 << 20
    else:
        if not torch.cuda.is_available():
            print("no CUDA device (use --smoke to check the script on the CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        contexts = [int(t) for t in args.tokens.split(",")]
        batches = [int(b) for b in args.batch.split(",")]
        repeats, copy = args.repeats, args.copy_mib << 20
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor()
    doc: dict[str, Any] = {"device": name, "torch": torch.__version__}
    doc["ceilings_gbs"] = ceilings(device, copy, repeats)
    doc["attention"] = attention_rows(
        device, batches, contexts, repeats, doc["ceilings_gbs"]["read"]
    )
    codecs = [c for c in args.codecs.split(",") if c]
    doc["codes"] = codes_rows(device, codecs, doc["attention"], repeats,
                              doc["ceilings_gbs"]["read"])  # fmt: skip
    sweep_tokens = max(contexts) if device.type == "cuda" else contexts[0]
    doc["split_sweep_tokens"] = sweep_tokens
    doc["split_sweep_us"] = split_sweep(device, repeats, sweep_tokens)
    if args.sweep:
        sweep_cases = [(8, 32768), (1, 131072)] if device.type == "cuda" else [(1, 256)]
        doc["launch_sweep"] = launch_sweep(device, repeats, sweep_cases)
    print_report(doc)
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
