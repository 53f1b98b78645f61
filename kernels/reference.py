"""The torch oracle for attention over KV in the block layout.

Primitives: `AttentionOutput(out, lse)`, `attention_reference(q, k, v, scale, causal)`,
`gather_layer_kv(blocks, layer, valid_tokens)`.

Plain formulas, no tricks: fast paths are tested against this, never against each other.
Grouped-query attention: query head h reads KV head h // group. A multi-token query is
causal: query token i sits at position S - q_tokens + i and sees keys at or before it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionOutput:
    out: torch.Tensor  # [q_tokens, heads, dim]
    lse: torch.Tensor  # [q_tokens, heads], natural log of the softmax denominator


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    compute_dtype: torch.dtype = torch.float32,
) -> AttentionOutput:
    """q [q_tokens, heads, dim] (or [heads, dim]); k, v [kv_heads, seq, dim]."""
    single = q.dim() == 2
    if single:
        q = q.unsqueeze(0)
    qt, heads, dim = q.shape
    kv_heads, seq, _ = k.shape
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    group = heads // kv_heads
    qf = q.to(compute_dtype)
    kf = k.to(compute_dtype).repeat_interleave(group, dim=0)  # [heads, seq, dim]
    vf = v.to(compute_dtype).repeat_interleave(group, dim=0)
    scores = torch.einsum("qhd,hsd->hqs", qf, kf) * scale
    if causal and qt > 1:
        q_pos = torch.arange(seq - qt, seq).unsqueeze(1)
        scores = scores.masked_fill(torch.arange(seq).unsqueeze(0) > q_pos, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [heads, qt]; -inf where nothing is visible
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(torch.finfo(compute_dtype).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("hqs,hsd->qhd", probs, vf)
    out, lse = out.float(), lse.transpose(0, 1).float()
    if single:
        out, lse = out[0], lse[0]
    return AttentionOutput(out, lse)


def gather_layer_kv(
    blocks: Sequence[torch.Tensor], layer: int, valid_tokens: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V of consecutive blocks [layers, 2, kv_heads, T, dim], as
    [kv_heads, seq, dim] each; the last block holds `valid_tokens` tokens if given."""
    ks = [b[layer, 0] for b in blocks]
    vs = [b[layer, 1] for b in blocks]
    if valid_tokens is not None and blocks:
        ks[-1] = ks[-1][:, :valid_tokens]
        vs[-1] = vs[-1][:, :valid_tokens]
    return torch.cat(ks, dim=1), torch.cat(vs, dim=1)
