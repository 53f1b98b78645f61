"""The Triton kernel behind `triton_codes.decode_attention_codes` (imports triton: load lazily).

Primitives: `paged_codes_partial[grid](...)`, one program per (sequence, KV head, split).

The same flash-decoding walk as `_triton_decode`, over a pool of encoded blocks: each
block is its layers' records of one codec (`codecs`), `record_bytes` each, so a layer's
record sits at `block * block_bytes + layer * record_bytes`. A tile of `BLOCK_N` tokens
reads the packed codes and the scales and zero points that cover them from memory, and
turns them into K and V values in registers only, right before the two dots: the memory
traffic is the codes' (a quarter of bf16's for kivi4), and nothing dequantized is ever
written anywhere.

The pool is passed as four views of one buffer (bytes, int8 or fp8 codes, float16 and
float32 parameters) so that each section is read with its own element type; offsets are
in bytes and divided by the element size (the launcher checks the alignment).

Codecs (`CODEC`): 0 per-token int8, 1 per-token fp8 (codes, then one float32 scale per K|V
row); 2 kivi (packed `BITS`-bit codes of K and V, then K scale/zero per channel and
group of `K_GROUP` tokens, V scale/zero per token and group of `V_GROUP` channels,
float16). Every product runs in float32 ("tf32x3" dots, about float32's accuracy).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_codes_partial(
    q_ptr,  # [batch, heads, dim]
    u8_ptr,  # the pool as bytes: [num_blocks, block_bytes]
    c8_ptr,  # the same bytes as int8 or fp8 codes (per-token codecs)
    f16_ptr,  # the same bytes as float16 (kivi parameters)
    f32_ptr,  # the same bytes as float32 (per-token scales)
    table_ptr,  # [batch, max_blocks] block indices
    seq_lens_ptr,  # [batch]
    out_ptr,  # [batch, heads, splits, dim] float32
    lse_ptr,  # [batch, heads, splits] float32
    scale,
    layer,
    split_tokens,
    block_bytes,
    record_bytes,
    stride_qb,
    stride_qh,
    stride_table_b,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CODEC: tl.constexpr,
    BITS: tl.constexpr,
    K_GROUP: tl.constexpr,
    V_GROUP: tl.constexpr,
    WHOLE_TILES: tl.constexpr,
    TILE_IN_K_GROUP: tl.constexpr,
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

    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    ).to(tl.float32)  # [GROUP_PAD, DIM_PAD]

    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    start = split * split_tokens
    end = tl.minimum(seq_len, start + split_tokens)
    table = table_ptr + seq * stride_table_b

    # Section offsets inside one layer's record (bytes), fixed by the shape and the codec
    # (per-token codecs are launched with BITS 8 and whole-row groups: these stay valid).
    n_elems = KV_HEADS * BLOCK_TOKENS * HEAD_DIM
    row_bytes = HEAD_DIM * BITS // 8
    code_bytes = n_elems * BITS // 8
    k_params = KV_HEADS * (BLOCK_TOKENS // K_GROUP) * HEAD_DIM
    v_params = KV_HEADS * BLOCK_TOKENS * (HEAD_DIM // V_GROUP)
    k_scale_at = 2 * code_bytes
    v_scale_at = k_scale_at + 4 * k_params  # after the K scales and the K zero points

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_t
        n_ok = offs_n < end
        if WHOLE_TILES:
            # A tile inside one block: one table entry, and a scalar base the compiler can
            # see rows contiguous from (vector loads).
            block = tl.load(table + n0 // BLOCK_TOKENS).to(tl.int64)
            rec = block * block_bytes + layer * record_bytes
            tok = n0 % BLOCK_TOKENS + offs_t
        else:
            blocks = tl.load(table + offs_n // BLOCK_TOKENS, mask=n_ok, other=0).to(tl.int64)
            rec = blocks * block_bytes + layer * record_bytes  # per token, 64-bit
            tok = offs_n % BLOCK_TOKENS
        tile_ok = n_ok[:, None] & d_ok[None, :]
        head_rows = kv_head * BLOCK_TOKENS + tok  # row of (head, token) in [H, T, .]
        if CODEC == 2:
            # Each code's byte, read once per code (the repeats hit in L1), then its field.
            # (Interleaving the fields of a [N, D/2] load with tl.join gave wrong 4-bit
            # codes at dim 64 on an H200 with Triton 3.6, while exact when interpreted.)
            byte_at = (rec + head_rows * row_bytes)[:, None] + (offs_d * BITS // 8)[None, :]
            shift = ((offs_d % (8 // BITS)) * BITS)[None, :]
            kc = (tl.load(u8_ptr + byte_at, mask=tile_ok, other=0).to(tl.int32) >> shift) & (
                (1 << BITS) - 1
            )
            vc = (
                tl.load(u8_ptr + byte_at + code_bytes, mask=tile_ok, other=0).to(tl.int32) >> shift
            ) & ((1 << BITS) - 1)
            k_params_at = (rec + k_scale_at) // 2  # float16 index of the K scales
            if TILE_IN_K_GROUP:  # one scale and zero row per channel for the whole tile
                k_row = kv_head * (BLOCK_TOKENS // K_GROUP) + (n0 % BLOCK_TOKENS) // K_GROUP
                k_at = k_params_at + k_row * HEAD_DIM + offs_d
                ks = tl.load(f16_ptr + k_at, mask=d_ok, other=0.0).to(tl.float32)[None, :]
                kz = tl.load(f16_ptr + k_at + k_params, mask=d_ok, other=0.0).to(tl.float32)
                kz = kz[None, :]
            else:
                k_row = kv_head * (BLOCK_TOKENS // K_GROUP) + tok // K_GROUP
                k_at = (k_params_at + k_row * HEAD_DIM)[:, None] + offs_d[None, :]
                ks = tl.load(f16_ptr + k_at, mask=tile_ok, other=0.0).to(tl.float32)
                kz = tl.load(f16_ptr + k_at + k_params, mask=tile_ok, other=0.0).to(tl.float32)
            v_params_at = (rec + v_scale_at) // 2
            if V_GROUP == HEAD_DIM:  # one scale and zero per token
                v_at = v_params_at + head_rows
                vs = tl.load(f16_ptr + v_at, mask=n_ok, other=0.0).to(tl.float32)[:, None]
                vz = tl.load(f16_ptr + v_at + v_params, mask=n_ok, other=0.0).to(tl.float32)
                vz = vz[:, None]
            else:
                v_row = head_rows * (HEAD_DIM // V_GROUP)
                v_at = (v_params_at + v_row)[:, None] + (offs_d // V_GROUP)[None, :]
                vs = tl.load(f16_ptr + v_at, mask=tile_ok, other=0.0).to(tl.float32)
                vz = tl.load(f16_ptr + v_at + v_params, mask=tile_ok, other=0.0).to(tl.float32)
            k = kc.to(tl.float32) * ks + kz
            v = vc.to(tl.float32) * vs + vz
        else:
            code_at = (rec + head_rows * HEAD_DIM)[:, None] + offs_d[None, :]
            kc = tl.load(c8_ptr + code_at, mask=tile_ok, other=0.0).to(tl.float32)
            vc = tl.load(c8_ptr + code_at + n_elems, mask=tile_ok, other=0.0).to(tl.float32)
            scale_at = (rec + 2 * n_elems) // 4 + head_rows  # float32 [2, H, T] after codes
            ks = tl.load(f32_ptr + scale_at, mask=n_ok, other=0.0)
            vs = tl.load(f32_ptr + scale_at + KV_HEADS * BLOCK_TOKENS, mask=n_ok, other=0.0)
            k = kc * ks[:, None]
            v = vc * vs[:, None]
        k = tl.where(tile_ok, k, 0.0)
        v = tl.where(tile_ok, v, 0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="tf32x3") * scale
        scores = tl.where(n_ok[None, :], scores, float("-inf"))  # [GROUP_PAD, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32x3")
        m_i = m_new

    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    out_rows = out_ptr + seq * stride_ob + heads * stride_oh + split * stride_os
    tl.store(out_rows[:, None] + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=g_ok)
