"""The Triton kernel behind `triton_attention.decode_attention` (imports triton: load lazily).

Primitives: `paged_decode_partial[grid](...)`, one program per (sequence, KV head, split).

Flash-decoding over the block layout: a sequence's keys are cut into splits of
`split_tokens`; each program walks its split `BLOCK_N` tokens at a time and keeps an online
softmax for the `GROUP` query heads that share its KV head, so K and V are read once per
group rather than once per query head. It writes a partial (out, lse) per split; the
launcher merges the splits exactly by log-sum-exp.

Tiles: when `BLOCK_N` divides the block size (`WHOLE_TILES`), a tile lies inside one block,
so its rows are contiguous and one table entry locates it: wide, coalesced loads. Other
block sizes look each token's block up (any block size works).

Both products are `tl.dot`s over a query tile padded to 16 rows (its minimum; the padding
costs tensor-core time, which a decode step has to spare, not memory traffic). Precision:
when q and K share a 16-bit dtype, q.K multiplies them as they are (`NATIVE_QK`: each
product is exact in the float32 accumulator); q and K of two 16-bit dtypes meet in tf32,
which holds either exactly; with a float32 operand q.K runs as three tf32 products
("tf32x3", about float32's accuracy), as does p.V always (p is float32).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_decode_partial(
    q_ptr,  # [batch, heads, dim]
    kv_ptr,  # [num_blocks, layers, 2, kv_heads, block_tokens, dim], contiguous
    table_ptr,  # [batch, max_blocks] block indices
    seq_lens_ptr,  # [batch]
    out_ptr,  # [batch, heads, splits, dim] float32
    lse_ptr,  # [batch, heads, splits] float32
    scale,
    layer,
    split_tokens,
    stride_qb,
    stride_qh,
    stride_kv_block,
    stride_kv_layer,
    stride_kv_kv,
    stride_kv_head,
    stride_kv_token,
    stride_table_b,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WHOLE_TILES: tl.constexpr,
    QK_PRECISION: tl.constexpr,
    NATIVE_QK: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, DIM_PAD)
    offs_t = tl.arange(0, BLOCK_N)
    g_ok = offs_g < GROUP
    d_ok = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g

    # Unscaled: a scaled q would no longer be exact in tf32 (the scale goes on the scores).
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )  # [GROUP_PAD, DIM_PAD]; padded rows are 0 and never stored
    if not NATIVE_QK:
        q = q.to(tl.float32)

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)  # one loop-bound type with int64 lens
    start = split * split_tokens
    end = tl.minimum(seq_len, start + split_tokens)
    kv_base = kv_ptr + layer * stride_kv_layer + kv_head * stride_kv_head
    table = table_ptr + seq * stride_table_b

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_t
        n_ok = offs_n < end
        if WHOLE_TILES:
            # 64-bit: a large pool's byte offsets overflow int32.
            block = tl.load(table + n0 // BLOCK_TOKENS).to(tl.int64)
            rows = (
                kv_base + block * stride_kv_block + (n0 % BLOCK_TOKENS + offs_t) * stride_kv_token
            )
        else:
            blocks = tl.load(table + offs_n // BLOCK_TOKENS, mask=n_ok, other=0).to(tl.int64)
            rows = kv_base + blocks * stride_kv_block + (offs_n % BLOCK_TOKENS) * stride_kv_token
        tile_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(rows[:, None] + offs_d[None, :], mask=tile_ok, other=0.0)
        if not NATIVE_QK:
            k = k.to(tl.float32)
        v = tl.load(rows[:, None] + stride_kv_kv + offs_d[None, :], mask=tile_ok, other=0.0).to(
            tl.float32
        )
        scores = tl.dot(q, tl.trans(k), input_precision=QK_PRECISION) * scale
        scores = tl.where(n_ok[None, :], scores, float("-inf"))  # [GROUP_PAD, BLOCK_N]
        # Every tile holds at least one valid key (n0 < end), so m_new is finite and the
        # first tile's exp(m_i - m_new) = exp(-inf) = 0 rather than nan.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32x3")
        m_i = m_new

    # A split past the sequence's end saw no keys: out 0, lse -inf (weight 0 in the merge).
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out_rows = out_ptr + seq * stride_ob + heads * stride_oh + split * stride_os
    tl.store(out_rows[:, None] + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=g_ok)
