"""Cost-aware eviction (after AsymCache): keep the blocks whose loss would cost the most
recomputation per byte held.

value = reuse likelihood x recompute cost / bytes; the lowest value leaves first.
Reuse likelihood is the aged hit count of `lfu` (hits halve every `half_life` ticks).
Recompute cost is the prefill work to rebuild the block: its `T` tokens each pay a
linear part (projections and MLP, expressed as `linear_tokens` tokens of attention) plus
attention over everything before them, (depth + 1/2) * T tokens on average, where depth
is the block's position in its prefix. A block deep in a long prompt is therefore worth
keeping over a shallow one hit as often, since attention over a longer prefix is what
recomputing it costs. Depth is learned from lookups (`entry.depth`); a block never looked
up counts as depth 0.
"""

from __future__ import annotations

import math

from tierd.core.index import BlockEntry
from tierd.core.policies.lfu import HALF_LIFE, LFU

# Per-token cost of the non-attention work, in tokens of attention context (for a model
# of hidden size h the MLP and projections cost ~24 h^2 FLOPs per token against ~4 h
# per context token of attention: about 6 h, i.e. ~24k tokens at h = 4096).
LINEAR_TOKENS = 8192


class CostAware(LFU):
    name = "cost"

    def __init__(self, tier: str = "tier", half_life: int = HALF_LIFE,
                 linear_tokens: int = LINEAR_TOKENS) -> None:  # fmt: skip
        super().__init__(tier, half_life)
        self.linear_tokens = linear_tokens

    def recompute_cost(self, entry: BlockEntry) -> float:
        tokens = entry.ns.layout.block_tokens
        depth = max(entry.depth, 0)
        return tokens * (self.linear_tokens + (depth + 0.5) * tokens)

    def priority(self, entry: BlockEntry) -> float:
        per_byte = self.recompute_cost(entry) / max(entry.nbytes, 1)
        return super().priority(entry) + math.log2(per_byte)
