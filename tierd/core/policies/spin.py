"""SPIN: bucketed LRU with a per-request budget, for prefix caches.

Under prefix semantics a block is only of use while every block before it in its prefix
is cached, so a prefix should shrink from its tail, and one long request should not push
many short ones out. Plain LRU does neither: the blocks of one request are used at the
same moment and touched in prefix order, so its first block is the oldest of them and
leaves first, breaking the whole prefix while keeping the now useless rest.

The rule (the lowest key leaves first):

    key = (in_budget, cohort, -depth, last_access, tick)

- `cohort = floor(last_access / bucket_seconds)`: recency, coarsened, so that blocks used
  at about the same time are one cohort, which leaves deepest block first (`-depth`) and
  whole before any block of a newer one. Recency is the entry's `last_access` (the time
  of the lookup or read that last used it, as `lru`'s), which a block keeps when it moves
  between tiers; `tick` (this policy's clock) breaks the remaining ties.
- `in_budget = 0` for blocks at `depth >= budget`, else 1: a request may hold at most
  `budget` blocks. With prefix semantics the blocks a request can use are its first ones,
  so its blocks past the budget are exactly those at depth >= budget; they leave before
  every block within budget, oldest cohort first and deepest first.
- `budget`: given, or by default 1/64 of the most blocks the tier has held at once (its
  size in blocks once it has filled), rounded down to a power of two, at least 16. It only
  grows, so keys only grow between hooks, as `victims_of` needs.

`depth` is the block's position in its prefix as the last lookup saw it (a block never
looked up counts as depth 0).
"""

from __future__ import annotations

from tierd.core.index import BlockEntry
from tierd.core.policies.base import Policy

BUCKET_SECONDS = 1.0
BUDGET_SHARE = 64  # default budget: the tier's peak block count over this
MIN_BUDGET = 16  # 8k tokens at 512-token blocks


class Spin(Policy):
    name = "spin"

    def __init__(self, tier: str = "tier", bucket_seconds: float = BUCKET_SECONDS,
                 budget: int | None = None) -> None:  # fmt: skip
        super().__init__(tier)
        self.bucket_seconds = bucket_seconds
        self.fixed_budget = budget
        self.budget = budget if budget is not None else MIN_BUDGET
        self.peak = 0  # most blocks tracked at once

    def on_insert(self, entry: BlockEntry) -> None:
        super().on_insert(entry)
        held = len(self._valid)
        if held > self.peak:
            self.peak = held
            if self.fixed_budget is None:
                self.budget = max(MIN_BUDGET, (1 << (held.bit_length() - 1)) // BUDGET_SHARE)

    def on_hit(self, entry: BlockEntry) -> None:
        entry.policy_state[self.tier] = self.tick()
        self.track(entry)

    def priority(self, entry: BlockEntry) -> tuple[int, int, int, float, int]:
        depth, seen = max(entry.depth, 0), entry.last_access
        return (0 if depth >= self.budget else 1, int(seen // self.bucket_seconds), -depth,
                seen, self.state(entry))  # fmt: skip
