"""Exact merge of partial attention results over disjoint key sets.

Primitives: `merge_partials([(out, lse), ...]) -> (out, lse)`.

With lse_i the log of partial i's softmax denominator, the union's denominator is
sum_i exp(lse_i), and its output is the exp(lse_i)-weighted mean of the partial outputs.
Subtracting the largest lse first keeps the exponentials in range; a partial over no keys
(lse = -inf) gets weight zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_partials(
    partials: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each out is [..., dim] and each lse is [...] (same leading shape); float32 result."""
    if not partials:
        raise ValueError("nothing to merge")
    if len(partials) == 1:
        out, lse = partials[0]
        return out.float(), lse.float()
    lses = torch.stack([lse.float() for _, lse in partials])  # [P, ...]
    top = lses.amax(dim=0)
    safe_top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(lses - safe_top)  # exp(-inf) = 0 for empty partials
    total = weights.sum(dim=0)
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, partials))
    out = out / total.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return out, safe_top + torch.log(total)
