"""Exact merge of partial attention results over disjoint key sets.

Primitives:
  `merge_partials([(out, lse), ...]) -> AttentionOutput`   any number of partials
  `merge_stacked(outs [P, ..., dim], lse [P, ...]) -> AttentionOutput`   already stacked
  `merge_into_(acc, (out, lse))`   fold one partial into a running result, in place

With lse_i the log of partial i's softmax denominator, the union's denominator is
sum_i exp(lse_i), and its output is the exp(lse_i)-weighted mean of the partial outputs.
Subtracting the largest lse first keeps the exponentials in range; a partial over no keys
(lse = -inf) gets weight zero whatever its out holds, and a merge of only empty partials
is itself empty (out 0, lse -inf). Results are float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .reference import AttentionOutput

_TINY = torch.finfo(torch.float32).tiny


def _shift(top: torch.Tensor) -> torch.Tensor:
    # Where every partial is empty the max is -inf; shifting by 0 there keeps
    # exp(-inf - shift) = 0 instead of exp(nan).
    return torch.where(torch.isinf(top), torch.zeros_like(top), top)


def merge_stacked(outs: torch.Tensor, lses: torch.Tensor) -> AttentionOutput:
    """Merge P partials stacked on dim 0: outs [P, ..., dim], lses [P, ...]."""
    if outs.dim() < 2 or lses.shape != outs.shape[:-1]:
        raise ValueError(f"outs {list(outs.shape)} and lses {list(lses.shape)} do not match")
    if outs.shape[0] == 0:
        raise ValueError("nothing to merge")
    outs, lses = outs.float(), lses.float()
    shift = _shift(lses.amax(dim=0))
    weights = torch.exp(lses - shift)  # [P, ...]; 0 for empty partials
    total = weights.sum(dim=0)
    w = weights.unsqueeze(-1)
    # where(), not a product alone: an empty partial's out may hold nan (0 * nan = nan).
    out = torch.where(w > 0, outs * w, 0.0).sum(dim=0) / total.clamp_min(_TINY).unsqueeze(-1)
    return AttentionOutput(out, shift + torch.log(total))


def merge_partials(partials: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> AttentionOutput:
    """Each partial is (out [..., dim], lse [...]) with one leading shape for all."""
    if not partials:
        raise ValueError("nothing to merge")
    first_out, first_lse = partials[0]
    for i, (o, l) in enumerate(partials):
        if o.shape != first_out.shape or l.shape != first_lse.shape:
            raise ValueError(f"partial {i} has shapes {list(o.shape)}, {list(l.shape)}; "
                             f"partial 0 has {list(first_out.shape)}, {list(first_lse.shape)}")  # fmt: skip
    if len(partials) == 1:
        return AttentionOutput(first_out.float(), first_lse.float())
    outs = torch.stack([o.float() for o, _ in partials])
    lses = torch.stack([l.float() for _, l in partials])
    return merge_stacked(outs, lses)


def merge_into_(acc: AttentionOutput, part: tuple[torch.Tensor, torch.Tensor]) -> None:
    """acc := merge(acc, part), writing acc.out and acc.lse (float32) in place."""
    out, lse = part
    if out.shape != acc.out.shape or lse.shape != acc.lse.shape:
        raise ValueError("the partial's shapes differ from the accumulator's")
    shift = _shift(torch.maximum(acc.lse, lse.float()))
    w_acc = torch.exp(acc.lse - shift)
    w_part = torch.exp(lse.float() - shift)
    total = w_acc + w_part
    denom = total.clamp_min(_TINY)
    acc.out.mul_((w_acc / denom).unsqueeze(-1))
    # An empty accumulator may hold nan in out; w_acc = 0 there, so reset it explicitly.
    acc.out.masked_fill_((w_acc == 0).unsqueeze(-1), 0.0)
    contrib = out.float() * (w_part / denom).unsqueeze(-1)
    acc.out.add_(torch.where((w_part > 0).unsqueeze(-1), contrib, 0.0))
    acc.lse.copy_(shift + torch.log(total))
