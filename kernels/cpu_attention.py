"""Fast CPU attention directly over KV blocks, in exact float32 arithmetic.

Primitives: `attend_blocks(blocks, layer, q, *, scale, valid_tokens, causal_offset,
chunk_tokens, query_chunk) -> AttentionOutput`.

Two implementations answer alike: the fused C++ kernel (`_native`, kernels/csrc: reads K
and V in place in their storage dtype, one pass, online softmax; `chunk_tokens` and
`query_chunk` do not apply to it, its memory is a tile of queries by a tile of keys per
thread), used whenever it loads and reads the blocks' dtype and strides, and the torch
path below, which serves otherwise or when TIERD_KERNELS=torch.

Blocks are `[layers, 2, kv_heads, T, dim]` tensors (often views into shared memory), not
one contiguous sequence. Per-op overhead, not arithmetic, is what costs on a CPU here: a
decode step is a matrix-vector product per KV head, and a torch op costs microseconds
whatever its size. So keys go a chunk of blocks at a time through one `torch.cat` into a
per-thread scratch buffer that stays in cache, converting to float32 on the way, and each
chunk then costs a handful of ops that read from cache. Chunks combine exactly by their
max and softmax sum.

Why float32 and not bf16 matmuls, which run about 1.6x faster here: a CPU bf16 matmul
rounds its *output* to bf16, so scores lose ~2^-9 of their magnitude. With peaked
attention (score std >= 3, as trained models have) that measured 1.3-3% relative error
in the output, against ~1e-7 for this path. fp16 matmul is slow on CPUs without AVX512-FP16.

Masking: with `causal_offset` None every key precedes the queries (a decode step, or the
blocks before a multi-token query's own tokens). Otherwise query token i sits at
position `causal_offset + i`; keys up to `causal_offset` are seen by every query and go
the fast way, and the at most `q_tokens - 1` keys after it go through the oracle with a
mask, merged in at the end.

Memory: a long multi-token query runs as passes of `query_chunk` query tokens (each with its
own causal offset; query rows are independent, so the passes' outputs just concatenate),
and the per-chunk partials of a pass are folded before they pile up. So scores, the causal
triangle and the stacked partials each stay within about QUERY_PASS_ELEMS floats whatever
the query and sequence lengths; only q itself and the output grow with the query.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _native
from .merge import merge_into_, merge_partials
from .reference import AttentionOutput, attention_reference, check_query, empty_output

# Float32 K and V gathered per chunk. Each chunk costs a fixed handful of ops (~5 us each),
# so chunks must be large next to that, yet stay in cache between the gather and the two
# matmuls: 8 MiB (1024 tokens of 8 KV heads x 128 dims) measured best on a 2-core EPYC
# with 2 x 2 MiB L2 and 32 MiB L3 (512 tokens ran as fast, 2048 and up clearly slower).
DEFAULT_CHUNK_BYTES = 8 << 20

# Floats any one intermediate of a pass may hold (scores [kv_heads, rows, keys per chunk],
# the causal triangle [heads, q, q], the stacked chunk partials): 32 MiB of float32. A pass
# re-reads the keys, but a query long enough to be split is bound by arithmetic, not reads.
QUERY_PASS_ELEMS = 1 << 23

# KV storage dtypes: the gather converts any of them to float32 (float8 as the CSD tier
# may hold it).
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float8_e4m3fn, torch.float8_e5m2)


# Segments at least this long are converted one `copy_` each (vectorized conversion);
# shorter ones are gathered in their own dtype by one `torch.cat` (a plain copy) and
# converted in one pass, since a converting cat runs ~1.5x slower than either and per-op
# costs dominate small blocks.
_COPY_TOKENS = 64


class _Scratch(threading.local):
    """Gather buffers per thread and dtype, kept between calls: a fresh multi-MiB tensor
    each call comes from mmap and pays a page fault per 4 KiB on first touch, which
    costs as much as the gather itself."""

    def __init__(self) -> None:
        self.bufs: dict[torch.dtype, torch.Tensor] = {}

    def get(self, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buf = self.bufs.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel]


_scratch = _Scratch()


def _gather(chunk: list[torch.Tensor], n: int) -> torch.Tensor:
    """The chunk's segments [2, kv_heads, n_i, dim] as one float32 [2, kv_heads, n, dim]."""
    _, kv_heads, _, dim = chunk[0].shape
    numel = 2 * kv_heads * n * dim
    kv = _scratch.get(numel).view(2, kv_heads, n, dim)
    if chunk[0].dtype == torch.float32:
        torch.cat(chunk, dim=2, out=kv)  # no conversion: one plain copy
    elif n >= _COPY_TOKENS * len(chunk):
        at = 0
        for seg in chunk:
            kv[:, :, at : at + seg.shape[2]].copy_(seg)
            at += seg.shape[2]
    else:
        raw = _scratch.get(numel, chunk[0].dtype).view(2, kv_heads, n, dim)
        torch.cat(chunk, dim=2, out=raw)
        kv.copy_(raw)
    return kv


@dataclass(frozen=True)
class _Layout:
    layers: int
    kv_heads: int
    block_tokens: int
    dim: int
    dtype: torch.dtype


def _check_blocks(blocks: Sequence[torch.Tensor], layer: int, valid_tokens: int | None) -> _Layout:
    shape = blocks[0].shape
    if len(shape) != 5 or shape[1] != 2:
        raise ValueError(f"a block must be [layers, 2, kv_heads, T, dim], got {list(shape)}")
    lay = _Layout(shape[0], shape[2], shape[3], shape[4], blocks[0].dtype)
    if lay.dtype not in _FLOATS:
        raise TypeError(
            f"blocks must be a float16, bfloat16, float32 or float8 type, not {lay.dtype}"
        )
    for i, b in enumerate(blocks):
        if b.shape != shape or b.dtype != lay.dtype or b.device.type != "cpu":
            raise ValueError(f"block {i} is {list(b.shape)} {b.dtype} on {b.device}; "
                             f"block 0 is {list(shape)} {lay.dtype} on cpu")  # fmt: skip
    if not 0 <= layer < lay.layers:
        raise ValueError(f"layer {layer} is not in [0, {lay.layers})")
    if valid_tokens is not None and not 0 <= valid_tokens <= lay.block_tokens:
        raise ValueError(f"valid_tokens {valid_tokens} is not in [0, {lay.block_tokens}]")
    return lay


def _segments(
    blocks: Sequence[torch.Tensor], layer: int, block_tokens: int, start: int, stop: int
) -> list[torch.Tensor]:
    """Views [2, kv_heads, n, dim] of key positions [start, stop) of the sequence."""
    segs = []
    for i in range(start // block_tokens, math.ceil(stop / block_tokens)):
        lo = max(start - i * block_tokens, 0)
        hi = min(stop - i * block_tokens, block_tokens)
        kv = blocks[i][layer]
        segs.append(kv if (lo, hi) == (0, block_tokens) else kv[:, :, lo:hi])
    return segs


def _attend_unmasked(
    qg: torch.Tensor, segs: list[torch.Tensor], chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """qg [kv_heads, rows, dim] (pre-scaled, float32) over every key of segs, no mask:
    (out [kv_heads, rows, dim], lse [kv_heads, rows])."""
    kv_heads, rows, dim = qg.shape
    chunks: list[list[torch.Tensor]] = [[]]
    filled = 0
    for seg in segs:
        if filled >= chunk_tokens:
            chunks.append([])
            filled = 0
        chunks[-1].append(seg)
        filled += seg.shape[2]
    # Partials of at most `fold` chunks are stacked at once (all of them for a decode step);
    # a long query's groups merge into a running result, so the stack stays bounded.
    fold = max(1, QUERY_PASS_ELEMS // (kv_heads * rows * dim))
    acc: AttentionOutput | None = None
    for at in range(0, len(chunks), fold):
        part = _attend_chunks(qg, chunks[at : at + fold])
        if acc is None:
            acc = part
        else:
            merge_into_(acc, part)
    assert acc is not None
    return acc


def _attend_chunks(qg: torch.Tensor, chunks: list[list[torch.Tensor]]) -> AttentionOutput:
    kv_heads, rows, dim = qg.shape
    maxes = torch.empty(len(chunks), kv_heads, rows)
    sums = torch.empty(len(chunks), kv_heads, rows)
    outs = torch.empty(len(chunks), kv_heads, rows, dim)
    for c, chunk in enumerate(chunks):
        n = sum(s.shape[2] for s in chunk)
        if len(chunk) == 1 and chunk[0].dtype == torch.float32 and chunk[0].is_contiguous():
            kv = chunk[0]  # already what the matmuls want: read it in place
        else:
            kv = _gather(chunk, n)  # float32, in cache for the matmuls
        scores = torch.bmm(qg, kv[0].transpose(1, 2))  # [kv_heads, rows, n]
        torch.amax(scores, dim=-1, out=maxes[c])
        scores.sub_(maxes[c].unsqueeze(-1)).exp_()
        torch.sum(scores, dim=-1, out=sums[c])
        torch.bmm(scores, kv[1], out=outs[c])
    # Exact combination of the chunks: every chunk is non-empty, so maxes are finite.
    top = maxes.amax(dim=0)
    weights = torch.exp(maxes - top)
    total = (weights * sums).sum(dim=0)
    out = (outs * weights.unsqueeze(-1)).sum(dim=0) / total.unsqueeze(-1)
    return AttentionOutput(out, top + torch.log(total))


def attend_blocks(
    blocks: Sequence[torch.Tensor],
    layer: int,
    q: torch.Tensor,
    *,
    scale: float | None = None,
    valid_tokens: int | None = None,
    causal_offset: int | None = None,
    chunk_tokens: int | None = None,
    query_chunk: int | None = None,
) -> AttentionOutput:
    """Attention of q [q_tokens, heads, dim] (or [heads, dim]) over `layer` of `blocks`.

    The keys are the blocks' tokens in order, the last block holding `valid_tokens`
    (all when None). out [q_tokens, heads, dim] and lse [q_tokens, heads] are float32
    (rank follows q); over no keys out is 0 and lse -inf, which merges as empty.
    `chunk_tokens` sets keys per chunk (default: DEFAULT_CHUNK_BYTES of float32 K and V),
    `query_chunk` query tokens per pass (default: what keeps a pass in QUERY_PASS_ELEMS)."""
    if chunk_tokens is not None and chunk_tokens < 1:
        raise ValueError("chunk_tokens must be positive")
    if query_chunk is not None and query_chunk < 1:
        raise ValueError("query_chunk must be positive")
    if not blocks:
        return empty_output(q.shape)
    lay = _check_blocks(blocks, layer, valid_tokens)
    q_tokens, group = check_query(q, lay.kv_heads, lay.dim)
    if q.device.type != "cpu":
        raise ValueError(f"q is on {q.device}; this path runs on the CPU")
    seq = lay.block_tokens * len(blocks)
    if valid_tokens is not None:
        seq -= lay.block_tokens - valid_tokens
    scale = 1.0 / math.sqrt(lay.dim) if scale is None else scale
    if chunk_tokens is None:
        chunk_tokens = max(1, DEFAULT_CHUNK_BYTES // (2 * lay.kv_heads * lay.dim * 4))
    q3 = q.reshape(q_tokens, -1, lay.dim)
    heads = q3.shape[1]
    if seq > 0:
        fused = _native.attend(blocks, layer, q3, scale=scale, seq=seq,
                               causal_offset=causal_offset)  # fmt: skip
        if fused is not None:
            return fused if q.dim() == 3 else AttentionOutput(fused.out[0], fused.lse[0])
    if query_chunk is None:
        per_pass = QUERY_PASS_ELEMS // heads
        query_chunk = max(1, min(per_pass // chunk_tokens, math.isqrt(per_pass)))
    if q_tokens > query_chunk:
        passes = [
            attend_blocks(blocks, layer, q3[at : at + query_chunk], scale=scale,
                          valid_tokens=valid_tokens, chunk_tokens=chunk_tokens,
                          query_chunk=query_chunk,
                          causal_offset=None if causal_offset is None else causal_offset + at)
            for at in range(0, q_tokens, query_chunk)
        ]  # fmt: skip
        result = AttentionOutput(torch.cat([p.out for p in passes]),
                                 torch.cat([p.lse for p in passes]))  # fmt: skip
        return result if q.dim() == 3 else AttentionOutput(result.out[0], result.lse[0])
    # Keys every query sees, then the causal triangle (each query sees part of it).
    shared = seq if causal_offset is None else min(seq, max(causal_offset + 1, 0))
    triangle = 0 if causal_offset is None else min(seq, causal_offset + q_tokens) - shared

    partials: list[tuple[torch.Tensor, torch.Tensor]] = []
    if shared > 0:
        # Query heads sharing a KV head are rows of one matrix: [kv_heads, group*q_tokens, dim].
        qg = (q3.float() * scale).reshape(q_tokens, lay.kv_heads, group, lay.dim)
        qg = qg.permute(1, 2, 0, 3).reshape(lay.kv_heads, group * q_tokens, lay.dim)
        segs = _segments(blocks, layer, lay.block_tokens, 0, shared)
        out, lse = _attend_unmasked(qg.contiguous(), segs, chunk_tokens)
        # Rows back to [q_tokens, heads]: head = kv_head * group + g.
        out = out.view(lay.kv_heads, group, q_tokens, lay.dim).permute(2, 0, 1, 3)
        lse = lse.view(lay.kv_heads, group, q_tokens).permute(2, 0, 1)
        partials.append((out.reshape(q_tokens, heads, lay.dim), lse.reshape(q_tokens, heads)))
    if triangle > 0:
        segs = _segments(blocks, layer, lay.block_tokens, shared, shared + triangle)
        kv = torch.cat(segs, dim=2)
        # Local key j sits at position shared + j; query i at causal_offset + i.
        assert causal_offset is not None
        tri = attention_reference(q3, kv[0], kv[1], scale=scale,
                                  causal_offset=causal_offset - shared,
                                  compute_dtype=torch.float32)  # fmt: skip
        partials.append((tri.out, tri.lse))
    result = merge_partials(partials) if partials else empty_output(q3.shape)
    if q.dim() == 2:
        return AttentionOutput(result.out[0], result.lse[0])
    return result
