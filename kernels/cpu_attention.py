"""Fast CPU decode attention directly over KV blocks, at memory bandwidth.

Primitives: `attend_blocks(blocks, layer, q, scale, valid_tokens, chunk_tokens)`.

Blocks are [layers, 2, kv_heads, T, dim] tensors (often views into shared memory), not one
contiguous sequence, so keys are gathered a chunk at a time into a small float32 buffer
that stays in cache: the gather is the dtype conversion too (fp16 matmul is slow on CPUs,
bf16 scores would be too coarse), and the batched matmuls then read from cache. Chunks
combine with the running max / sum of an online softmax. All keys are taken to precede
the queries (no mask): callers attend causal tails separately and merge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# Keys per chunk: K and V of 8 KV heads x 128 dims in float32 take 2 x 4 KiB per token,
# so 256 tokens are ~2 MiB, about what a core's L2 holds.
DEFAULT_CHUNK_TOKENS = 256


def attend_blocks(
    blocks: Sequence[torch.Tensor],
    layer: int,
    q: torch.Tensor,
    *,
    scale: float | None = None,
    valid_tokens: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [q_tokens, heads, dim] -> (out [q_tokens, heads, dim], lse [q_tokens, heads]),
    float32, over every key of `blocks` at `layer` (the last block holds `valid_tokens`)."""
    if not blocks:
        raise ValueError("no blocks to attend over")
    qt, heads, dim = q.shape
    _, _, kv_heads, block_tokens, bdim = blocks[0].shape
    if bdim != dim or heads % kv_heads:
        raise ValueError(f"q {list(q.shape)} does not fit blocks {list(blocks[0].shape)}")
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    # [kv_heads, group * q_tokens, dim]: the query heads sharing a KV head form one batch row.
    qg = (q.float() * scale).reshape(qt, kv_heads, group, dim).permute(1, 2, 0, 3)
    qg = qg.reshape(kv_heads, group * qt, dim).contiguous()

    lengths = [block_tokens] * len(blocks)
    if valid_tokens is not None:
        lengths[-1] = valid_tokens
    per_chunk = max(1, chunk_tokens // block_tokens)
    k_buf = torch.empty(kv_heads, per_chunk * block_tokens, dim, dtype=torch.float32)
    v_buf = torch.empty_like(k_buf)
    run_max = torch.full((kv_heads, group * qt), float("-inf"))
    run_sum = torch.zeros(kv_heads, group * qt)
    acc = torch.zeros(kv_heads, group * qt, dim)
    for start in range(0, len(blocks), per_chunk):
        n = 0
        for blk, length in zip(blocks[start : start + per_chunk], lengths[start : start + per_chunk]):
            k_buf[:, n : n + length].copy_(blk[layer, 0, :, :length])
            v_buf[:, n : n + length].copy_(blk[layer, 1, :, :length])
            n += length
        if n == 0:
            continue
        scores = torch.bmm(qg, k_buf[:, :n].transpose(1, 2))  # [kvh, g*qt, n]
        chunk_max = scores.amax(dim=-1)
        new_max = torch.maximum(run_max, chunk_max)
        correction = torch.exp(run_max - new_max)
        probs = torch.exp(scores - new_max.unsqueeze(-1))
        run_sum = run_sum * correction + probs.sum(dim=-1)
        acc = acc * correction.unsqueeze(-1) + torch.bmm(probs, v_buf[:, :n])
        run_max = new_max
    out = acc / run_sum.unsqueeze(-1)
    lse = run_max + torch.log(run_sum)
    # Back to [q_tokens, heads, dim] with head = kv_head * group + g.
    out = out.reshape(kv_heads, group, qt, dim).permute(2, 0, 1, 3).reshape(qt, heads, dim)
    lse = lse.reshape(kv_heads, group, qt).permute(2, 0, 1).reshape(qt, heads)
    return out, lse
