"""SPIN: bucketed LRU with a per-request budget, for prefix caches.

Under prefix semantics a block is only of use while every block before it in its prefix
is cached, so a prefix should shrink from its tail, and one long request should not push
many short ones out. Plain LRU does neither: the blocks of one request are touched in
prefix order within a moment, so its first block is the oldest of them and leaves first,
breaking the whole prefix while keeping the now useless rest.

The rule (the lowest key leaves first):

    key = (in_budget, bucket, -depth, tick)

- `tick`: the policy clock at the block's last insert or hit (as `lru`'s order);
- `bucket = tick // bucket_ticks`: recency, coarsened, so that blocks used at about the
  same time are one cohort and the deepest of the cohort leaves first (`-depth`), the
  whole cohort before any block of a newer one;
- `in_budget = 0` for blocks at `depth >= budget`, else 1: a request may hold at most
  `budget` blocks in the tier. With prefix semantics the blocks a request can use are its
  first ones, so its blocks past the budget are exactly those at depth >= budget; they
  leave before every block within budget, oldest cohort first and deepest first.

`depth` is the block's position in its prefix as the last lookup saw it (a block never
looked up counts as depth 0). Ties in recency and depth go by `tick`.
"""

from __future__ import annotations

from tierd.core.index import BlockEntry
from tierd.core.policies.base import Policy

BUCKET_TICKS = 1024  # about forty requests of twenty-odd blocks
BUDGET_BLOCKS = 128  # 64k tokens at 512-token blocks


class Spin(Policy):
    name = "spin"

    def __init__(self, tier: str = "host", bucket_ticks: int = BUCKET_TICKS,
                 budget: int = BUDGET_BLOCKS) -> None:  # fmt: skip
        super().__init__(tier)
        self.bucket_ticks = bucket_ticks
        self.budget = budget

    def on_hit(self, entry: BlockEntry) -> None:
        entry.policy_state[self.tier] = self.tick()
        self.track(entry)

    def priority(self, entry: BlockEntry) -> tuple[int, int, int, int]:
        tick = self.state(entry)
        depth = max(entry.depth, 0)
        return (0 if depth >= self.budget else 1, tick // self.bucket_ticks, -depth, tick)
