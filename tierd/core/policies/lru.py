"""LRU: the block used longest ago leaves first.

Recency is the entry's `last_access` (which lookups and gets refresh, as before this
module existed), ties broken by the order of inserts and hits this policy saw.
"""

from __future__ import annotations

from tierd.core.index import BlockEntry
from tierd.core.policies.base import Policy


class LRU(Policy):
    name = "lru"

    def on_hit(self, entry: BlockEntry) -> None:
        entry.policy_state[self.tier] = self.tick()
        self.track(entry)

    def priority(self, entry: BlockEntry) -> tuple[float, int]:
        tick = entry.policy_state.get(self.tier)  # `state` inlined: the hottest call here
        return (entry.last_access, tick if tick is not None else self.state(entry))
