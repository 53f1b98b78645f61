"""The torch oracle for attention over KV in tierd's block layout.

Primitives:
  `AttentionOutput(out, lse)`          the result every attention path returns
  `attention_reference(q, k, v, *, scale, causal_offset, compute_dtype)`
  `gather_layer_kv(blocks, layer, valid_tokens) -> LayerKV(k, v)`
  `empty_output(q_shape)`              the partial over no keys (out 0, lse -inf)

Plain formulas, no tricks: fast paths are tested against this, never against each other.
Grouped-query attention: query head h reads KV head h // group (group = heads / kv_heads),
as `repeat_interleave` of the KV heads does. A multi-token query is causal: query token i
sits at position `causal_offset + i` (keys count from 0) and sees keys at or before it;
by default the queries are the last `q_tokens` positions of the keys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionOutput(NamedTuple):
    """out [q_tokens, heads, dim] and lse [q_tokens, heads], both float32; lse is the
    natural log of the softmax denominator over the scaled scores (-inf over no keys).

    A NamedTuple, so `out, lse = result` works where callers treat partials as pairs."""

    out: torch.Tensor
    lse: torch.Tensor


class LayerKV(NamedTuple):
    """One layer's keys and values, [kv_heads, seq, dim] each, contiguous over seq."""

    k: torch.Tensor
    v: torch.Tensor


def empty_output(q_shape: Sequence[int], device: torch.device | str = "cpu") -> AttentionOutput:
    """Attention over no keys: weight zero in any merge."""
    *lead, dim = q_shape
    return AttentionOutput(
        torch.zeros(*lead, dim, dtype=torch.float32, device=device),
        torch.full(tuple(lead), -math.inf, dtype=torch.float32, device=device),
    )


def check_query(q: torch.Tensor, kv_heads: int, dim: int) -> tuple[int, int]:
    """Validate q against the KV shape; returns (q_tokens, group)."""
    if q.dtype not in _FLOATS:
        raise TypeError(f"q must be a float tensor, not {q.dtype}")
    if q.dim() not in (2, 3):
        raise ValueError(f"q must be [q_tokens, heads, dim] or [heads, dim], got {list(q.shape)}")
    heads, qdim = q.shape[-2], q.shape[-1]
    if qdim != dim:
        raise ValueError(f"q head dim {qdim} != KV head dim {dim}")
    if heads == 0 or kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    q_tokens = q.shape[0] if q.dim() == 3 else 1
    if q_tokens == 0:
        raise ValueError("q has no tokens")
    return q_tokens, heads // kv_heads


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal_offset: int | None = None,
    compute_dtype: torch.dtype = torch.float64,
) -> AttentionOutput:
    """Attention of q [q_tokens, heads, dim] (or [heads, dim]) over k, v [kv_heads, seq, dim].

    `scale` defaults to 1/sqrt(dim). `causal_offset` is the position of query token 0
    (None: seq - q_tokens); pass `seq` or more to let every query see every key. The
    result has q's rank: [heads, dim] and [heads] for a 2-D q."""
    if not (k.is_floating_point() and v.is_floating_point()):
        raise TypeError(f"k and v must be float tensors, not {k.dtype}, {v.dtype}")
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be [kv_heads, seq, dim]: {list(k.shape)}, "
                         f"{list(v.shape)}")  # fmt: skip
    kv_heads, seq, dim = k.shape
    q_tokens, group = check_query(q, kv_heads, dim)
    single = q.dim() == 2
    q3 = q.unsqueeze(0) if single else q
    heads = q3.shape[1]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    offset = seq - q_tokens if causal_offset is None else causal_offset

    qf = q3.to(compute_dtype)
    kf = k.to(compute_dtype).repeat_interleave(group, dim=0)  # [heads, seq, dim]
    vf = v.to(compute_dtype).repeat_interleave(group, dim=0)
    scores = torch.einsum("qhd,hsd->hqs", qf, kf) * scale  # [heads, q_tokens, seq]
    q_pos = offset + torch.arange(q_tokens, device=q.device).unsqueeze(1)
    hidden = torch.arange(seq, device=q.device).unsqueeze(0) > q_pos  # [q_tokens, seq]
    scores = scores.masked_fill(hidden, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [heads, q_tokens]; -inf where nothing is visible
    # A row with no visible key has lse = -inf: subtract 0 there so exp gives 0, not nan.
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = torch.einsum("hqs,hsd->qhd", probs, vf)

    result = AttentionOutput(out.float(), lse.transpose(0, 1).float())
    if single:
        return AttentionOutput(result.out[0], result.lse[0])
    assert result.out.shape == (q_tokens, heads, dim)
    return result


def gather_layer_kv(
    blocks: Sequence[torch.Tensor], layer: int, valid_tokens: int | None = None
) -> LayerKV:
    """One layer's K and V of consecutive blocks, each [layers, 2, kv_heads, T, dim], as
    contiguous [kv_heads, seq, dim] copies; the last block holds `valid_tokens` tokens
    (all T when None)."""
    if not blocks:
        raise ValueError("no blocks to gather (the KV shape is unknown)")
    shape = blocks[0].shape
    if len(shape) != 5 or shape[1] != 2:
        raise ValueError(f"a block must be [layers, 2, kv_heads, T, dim], got {list(shape)}")
    if any(b.shape != shape for b in blocks):
        raise ValueError("all blocks must have the same shape")
    if not 0 <= layer < shape[0]:
        raise ValueError(f"layer {layer} is not in [0, {shape[0]})")
    block_tokens = shape[3]
    ks = [b[layer, 0] for b in blocks]
    vs = [b[layer, 1] for b in blocks]
    if valid_tokens is not None:
        if not 0 <= valid_tokens <= block_tokens:
            raise ValueError(f"valid_tokens {valid_tokens} is not in [0, {block_tokens}]")
        ks[-1] = ks[-1][:, :valid_tokens]
        vs[-1] = vs[-1][:, :valid_tokens]
    return LayerKV(torch.cat(ks, dim=1), torch.cat(vs, dim=1))
