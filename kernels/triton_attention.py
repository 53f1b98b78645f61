"""Decode attention over a paged block pool with Triton: the launcher and its input checks.

Primitives:
  `triton_available() -> bool`
  `interpreting() -> bool`   whether TRITON_INTERPRET runs kernels on the CPU
  `decode_attention(q, kv_pool, block_table, seq_lens, layer, *, scale, split_tokens)
      -> AttentionOutput`
  `check_device_and_table`, `split_plan`, `merged`: the launch's checks, plan and merge,
      shared with `triton_codes`

One query token per sequence (a decode step), grouped-query heads. The pool is every block
in one tensor `[num_blocks, layers, 2, kv_heads, block_tokens, dim]` (tierd's block
layout with a leading slot index); sequence b reads blocks `block_table[b, :]` in order
and its first `seq_lens[b]` tokens. The kernel (`_triton_decode`) computes a partial per
split of the keys and the splits merge here by log-sum-exp, flash-decoding style.

Triton is optional: this module imports only torch, and Triton is imported on the first
call. Kernels run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set
before the first call in this process (Triton picks interpreter or compiler when the
kernel is decorated, i.e. when `_triton_decode` is first imported).
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from .merge import merge_stacked
from .reference import AttentionOutput

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_INDEX = (torch.int32, torch.int64)
# Tokens per program: enough to keep a GPU busy for short batches, few enough splits that
# merging them costs little next to reading the keys.
DEFAULT_SPLIT_TOKENS = 512
# Keys per loop step (K and V tiles of [TILE_TOKENS, dim]) and the launch shape; chosen by
# `tools/bench_gpu.py --sweep` on an H200 (see tools/BENCHMARKS.md).
TILE_TOKENS = 64
LAUNCH = {"num_warps": 4, "num_stages": 2}
MIN_DOT = 16  # tl.dot's smallest dimension


def tile_tokens(block_tokens: int) -> int:
    """Keys per loop step: `TILE_TOKENS`, or the largest power of two (at least the dot's
    minimum) that divides the block size, so that a tile never straddles two blocks."""
    n = TILE_TOKENS
    while n > MIN_DOT and block_tokens % n:
        n //= 2
    return n


def triton_available() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    layer: int,
    split_tokens: int,
) -> None:
    if q.dim() != 3:
        raise ValueError(f"q must be [batch, heads, dim], got {list(q.shape)}")
    if kv_pool.dim() != 6 or kv_pool.shape[2] != 2:
        raise ValueError("kv_pool must be [num_blocks, layers, 2, kv_heads, block_tokens, dim], "
                         f"got {list(kv_pool.shape)}")  # fmt: skip
    batch, heads, dim = q.shape
    _, layers, _, kv_heads, block_tokens, kv_dim = kv_pool.shape
    if q.dtype not in _FLOATS or kv_pool.dtype not in _FLOATS:
        raise TypeError(f"q and kv_pool must be float16, bfloat16 or float32: {q.dtype}, "
                        f"{kv_pool.dtype}")  # fmt: skip
    if block_table.dtype not in _INDEX or seq_lens.dtype not in _INDEX:
        raise TypeError("block_table and seq_lens must be int32 or int64")
    if dim != kv_dim:
        raise ValueError(f"q head dim {dim} != KV head dim {kv_dim}")
    if heads == 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(
            f"block_table must be [{batch}, max_blocks], got {list(block_table.shape)}"
        )
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be [{batch}], got {list(seq_lens.shape)}")
    if not 0 <= layer < layers:
        raise ValueError(f"layer {layer} is not in [0, {layers})")
    if split_tokens < 1:
        raise ValueError("split_tokens must be positive")
    if not kv_pool.is_contiguous() or not block_table.is_contiguous():
        raise ValueError("kv_pool and block_table must be contiguous")
    if q.stride(-1) != 1:
        raise ValueError("q's last dimension must be contiguous")
    check_device_and_table(q, kv_pool, block_table, seq_lens, block_tokens)


def check_device_and_table(q: torch.Tensor, pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor, block_tokens: int) -> None:  # fmt: skip
    """One device Triton can run on; and on the CPU, lengths and block indices in range."""
    devices = {t.device for t in (q, pool, block_table, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        raise ValueError(f"inputs are on {device}: Triton needs CUDA tensors, "
                         "or CPU tensors with TRITON_INTERPRET=1")  # fmt: skip
    if device.type == "cpu":
        # Bounds checks read the tables; on CPU that is free, on a GPU it would stall
        # the stream every step, so there the caller owns them.
        capacity = block_table.shape[1] * block_tokens
        if bool((seq_lens < 0).any()) or bool((seq_lens > capacity).any()):
            raise ValueError(f"seq_lens must be in [0, {capacity}] (block_table width x tokens)")
        used = torch.arange(block_table.shape[1]) * block_tokens < seq_lens.unsqueeze(1)
        ids = block_table[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= pool.shape[0]):
            raise ValueError(f"block_table holds indices outside [0, {pool.shape[0]})")


def split_plan(q: torch.Tensor, block_table: torch.Tensor, block_tokens: int,
               split_tokens: int) -> tuple[int, int, int, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Tile and split sizes of a paged decode launch, and its partial outputs:
    (tile tokens, split tokens, splits, out [batch, heads, splits, dim], lse)."""
    batch, heads, dim = q.shape
    block_n = tile_tokens(block_tokens)
    # Whole tiles need every split to start on a tile boundary.
    split_tokens = -(-split_tokens // block_n) * block_n
    splits = max(1, math.ceil(block_table.shape[1] * block_tokens / split_tokens))
    out = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    return block_n, split_tokens, splits, out, lse


def merged(out: torch.Tensor, lse: torch.Tensor) -> AttentionOutput:
    """The splits' partials merged exactly (log-sum-exp) into one result per head."""
    if out.shape[2] == 1:
        return AttentionOutput(out[:, :, 0], lse[:, :, 0])
    return merge_stacked(out.permute(2, 0, 1, 3), lse.permute(2, 0, 1))


def decode_attention(
    q: torch.Tensor,
    kv_pool: torch.Tensor,
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
        raise ImportError("decode_attention needs triton (pip install triton)")
    _check(q, kv_pool, block_table, seq_lens, layer, split_tokens)
    from ._triton_decode import paged_decode_partial  # first import decorates the kernel

    batch, heads, dim = q.shape
    kv_heads, block_tokens = kv_pool.shape[3], kv_pool.shape[4]
    group = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    block_n, split_tokens, splits, out, lse = split_plan(q, block_table, block_tokens,
                                                         split_tokens)  # fmt: skip
    whole_tiles = block_tokens % block_n == 0
    if batch == 0:
        return AttentionOutput(out[:, :, 0], lse[:, :, 0])
    exact_in_tf32 = q.dtype != torch.float32 and kv_pool.dtype != torch.float32
    paged_decode_partial[(batch, kv_heads, splits)](
        q, kv_pool, block_table, seq_lens, out, lse,
        scale, layer, split_tokens,
        q.stride(0), q.stride(1),
        *kv_pool.stride()[:5],
        block_table.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        GROUP=group, GROUP_PAD=max(MIN_DOT, _pow2(group)), HEAD_DIM=dim,
        DIM_PAD=max(MIN_DOT, _pow2(dim)), BLOCK_TOKENS=block_tokens, BLOCK_N=block_n,
        WHOLE_TILES=whole_tiles, QK_PRECISION="tf32" if exact_in_tf32 else "tf32x3",
        NATIVE_QK=exact_in_tf32 and q.dtype == kv_pool.dtype and not interpreting(),
        **LAUNCH,
    )  # fmt: skip
    return merged(out, lse)
