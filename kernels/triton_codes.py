"""Decode attention over a paged pool of encoded blocks with Triton: launcher and checks.

Primitives:
  `decode_attention_codes(q, pool, codec, block_shape, block_table, seq_lens, layer, *,
      scale, split_tokens) -> AttentionOutput`

The GPU counterpart of `codes_attention.attend_codes`: the pool is every encoded block in
one uint8 tensor `[num_blocks, block_bytes]`, a block being its layers' records of
`codec` (`codecs`: int8, fp8, kivi4, kivi2) for blocks of `block_shape` = (layers, 2,
kv_heads, block_tokens, dim). Sequence b reads blocks `block_table[b, :]` in order and
its first `seq_lens[b]` tokens, as `decode_attention` does over raw blocks; the kernel
(`_triton_codes`) reads codes, scales and zero points and forms K and V in registers
only. Equal to decode-then-attend (`codec.decode`, then the oracle) up to float32
rounding. Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the rules of
`triton_attention` apply).
"""

from __future__ import annotations

import math

import torch

from .codecs import Codec, Kivi, Shape, _PerToken
from .reference import AttentionOutput
from .triton_attention import (
    _FLOATS,
    _INDEX,
    DEFAULT_SPLIT_TOKENS,
    LAUNCH,
    MIN_DOT,
    _pow2,
    check_device_and_table,
    merged,
    split_plan,
    triton_available,
)


def _kind(codec: Codec) -> tuple[int, int]:
    """(CODEC, BITS) of the kernel for `codec`."""
    if isinstance(codec, Kivi):
        return 2, codec.bits
    if isinstance(codec, _PerToken):
        return (1 if codec.code_dtype == torch.float8_e4m3fn else 0), 8
    raise TypeError(f"no compressed-domain attention for codec {codec.name!r} "
                    "(raw blocks go through decode_attention)")  # fmt: skip


def _check(q: torch.Tensor, pool: torch.Tensor, codec: Codec, block_shape: tuple[int, ...],
           block_table: torch.Tensor, seq_lens: torch.Tensor, layer: int,
           split_tokens: int) -> int:  # fmt: skip
    """Validate; returns the bytes of one layer's record."""
    _kind(codec)
    if len(block_shape) != 5 or block_shape[1] != 2:
        raise ValueError(f"block_shape must be (layers, 2, kv_heads, tokens, dim), "
                         f"got {tuple(block_shape)}")  # fmt: skip
    layers, _, kv_heads, block_tokens, dim = block_shape
    shape: Shape = (2, kv_heads, block_tokens, dim)
    codec.check(shape)
    record = codec.record_bytes(shape, torch.float32)
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, heads, dim], got {list(q.shape)}")
    batch, heads, qdim = q.shape
    if q.dtype not in _FLOATS:
        raise TypeError(f"q must be float16, bfloat16 or float32, not {q.dtype}")
    if pool.dtype != torch.uint8 or pool.dim() != 2 or pool.shape[1] != layers * record:
        raise ValueError(f"pool must be uint8 [num_blocks, {layers * record}] ({layers} "
                         f"{codec.name} records of {record} bytes), got {pool.dtype} "
                         f"{list(pool.shape)}")  # fmt: skip
    if record % 4:
        raise ValueError(f"a {codec.name} record of {record} bytes cannot hold aligned "
                         "float32/float16 parameters")  # fmt: skip
    if block_table.dtype not in _INDEX or seq_lens.dtype not in _INDEX:
        raise TypeError("block_table and seq_lens must be int32 or int64")
    if qdim != dim:
        raise ValueError(f"q head dim {qdim} != KV head dim {dim}")
    if heads == 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be [{batch}, max_blocks], "
                         f"got {list(block_table.shape)}")  # fmt: skip
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be [{batch}], got {list(seq_lens.shape)}")
    if not 0 <= layer < layers:
        raise ValueError(f"layer {layer} is not in [0, {layers})")
    if split_tokens < 1:
        raise ValueError("split_tokens must be positive")
    if not pool.is_contiguous() or not block_table.is_contiguous() or q.stride(-1) != 1:
        raise ValueError("pool and block_table must be contiguous, and q's last dimension")
    check_device_and_table(q, pool, block_table, seq_lens, block_tokens)
    return record


def decode_attention_codes(
    q: torch.Tensor,
    pool: torch.Tensor,
    codec: Codec,
    block_shape: tuple[int, ...],
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    layer: int,
    *,
    scale: float | None = None,
    split_tokens: int = DEFAULT_SPLIT_TOKENS,
) -> AttentionOutput:
    """q [batch, heads, dim] -> out [batch, heads, dim], lse [batch, heads] (float32).

    A sequence of length 0 gets out 0 and lse -inf, so its result merges as empty."""
    if not triton_available():
        raise ImportError("decode_attention_codes needs triton (pip install triton)")
    record = _check(q, pool, codec, block_shape, block_table, seq_lens, layer, split_tokens)
    from ._triton_codes import paged_codes_partial  # first import decorates the kernel

    kind, bits = _kind(codec)
    _, _, kv_heads, block_tokens, dim = block_shape
    kg, vg = codec.groups((2, kv_heads, block_tokens, dim)) if isinstance(codec, Kivi) else (
        block_tokens, dim)  # fmt: skip
    batch, heads, _ = q.shape
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    block_n, split_tokens, splits, out, lse = split_plan(q, block_table, block_tokens,
                                                         split_tokens)  # fmt: skip
    whole = block_tokens % block_n == 0  # tiles inside one block (and one key group?)
    if batch == 0:
        return AttentionOutput(out[:, :, 0], lse[:, :, 0])
    codes = pool.view(torch.float8_e4m3fn if kind == 1 else torch.int8)
    paged_codes_partial[(batch, kv_heads, splits)](
        q, pool, codes, pool.view(torch.float16), pool.view(torch.float32),
        block_table, seq_lens, out, lse,
        scale, layer, split_tokens, pool.shape[1], record,
        q.stride(0), q.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(MIN_DOT, _pow2(group)), HEAD_DIM=dim,
        DIM_PAD=max(MIN_DOT, _pow2(dim)), BLOCK_TOKENS=block_tokens, BLOCK_N=block_n,
        CODEC=kind, BITS=bits, K_GROUP=kg, V_GROUP=vg,
        WHOLE_TILES=whole, TILE_IN_K_GROUP=whole and kg % block_n == 0,
        **LAUNCH,
    )  # fmt: skip
    return merged(out, lse)
