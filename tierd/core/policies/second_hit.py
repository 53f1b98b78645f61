"""Second-hit admission (for slower tiers): a block is written here only once it has
been seen twice; evictions inside the tier are LRU.

"Seen" is the block's put plus any read: a block read at least once since it was put is
admitted; one that was never read is dropped instead of demoted, and its key is
remembered in a bounded ghost list, so if it is put again it is admitted the next time.
This is the classic second-hit caching rule of CDNs (one-hit wonders never reach the
slow tier), with a FIFO of keys in place of a Bloom filter.
"""

from __future__ import annotations

from collections import OrderedDict

from tierd.core.index import BlockEntry
from tierd.core.policies.lru import LRU

GHOST_KEYS = 1 << 16


class SecondHit(LRU):
    name = "second_hit"

    def __init__(self, tier: str = "tier", ghost_keys: int = GHOST_KEYS) -> None:
        super().__init__(tier)
        self.ghost_keys = ghost_keys
        self.ghost: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()

    def admit(self, entry: BlockEntry, victim: BlockEntry | None = None) -> bool:
        ident = (entry.ns.id, entry.key)
        if entry.hits > 0 or ident in self.ghost:
            self.ghost.pop(ident, None)
            return True
        self.ghost[ident] = None
        if len(self.ghost) > self.ghost_keys:
            self.ghost.popitem(last=False)
        return False
