"""LFU with aging: the block with the fewest recent hits leaves first.

Each hit adds one to a count that halves every `half_life` ticks of the policy's clock
(one tick per insert or hit), so a block that was hot long ago does not stay forever.
The decay is applied lazily: an entry stores (count, tick of last update), and since
count * 2**(tick / half_life) orders entries exactly as their counts decayed to any
common time, the sort key is log2(count) + tick / half_life -- no periodic pass over all
entries. Equal counts: the older one leaves first. (Aging as in the "LFU with dynamic
aging" family; the logarithmic form is the usual exponential-decay trick.)
"""

from __future__ import annotations

import math

from tierd.core.index import BlockEntry
from tierd.core.policies.base import Policy

HALF_LIFE = 4096


class LFU(Policy):
    name = "lfu"

    def __init__(self, tier: str = "tier", half_life: int = HALF_LIFE) -> None:
        super().__init__(tier)
        self.half_life = half_life

    def fresh(self, entry: BlockEntry, now: int) -> list[float]:
        return [1.0, float(now)]  # [count at `tick`, tick]

    def decayed(self, st: list[float], now: int) -> float:
        return st[0] * 2.0 ** (-(now - st[1]) / self.half_life)

    def on_hit(self, entry: BlockEntry) -> None:
        st = self.state(entry)
        now = self.tick()
        st[0] = self.decayed(st, now) + 1.0
        st[1] = float(now)
        self.track(entry)

    def priority(self, entry: BlockEntry) -> float:
        count, at = self.state(entry)
        return math.log2(count) + at / self.half_life
