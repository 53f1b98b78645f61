"""S3-FIFO (Yang et al., "FIFO queues are all you need for cache eviction", SOSP 2023).

Three FIFO queues: new blocks enter the small queue S, unless their key is in the ghost
queue G, in which case they enter the main queue M. Hits bump a per-block counter capped
at 3. To evict: while S holds at least `small_share` (10%) of the bytes, look at S's
oldest block: if it was hit since insertion it moves to M (counter cleared), otherwise it
leaves and its key goes into G. Otherwise look at M's oldest block: if its counter is
above 0 it is reinserted at M's head with the counter decremented, otherwise it leaves.
G remembers as many keys as M holds blocks, oldest forgotten first.

Adapted to the placer: `victims(candidates)` runs those rules over the blocks the placer
may move and yields them in eviction order; the placer stops pulling when it has freed
enough, so only the blocks the rules actually passed over were moved to M or aged, as in
the paper. The byte shares are those of the candidates (blocks being read are not
counted).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator

from tierd.core.index import BlockEntry
from tierd.core.policies.base import Policy

SMALL, MAIN = 0, 1
MAX_FREQ = 3


class S3FIFO(Policy):
    name = "s3fifo"

    def __init__(self, tier: str = "host", small_share: float = 0.10) -> None:
        super().__init__(tier)
        self.small_share = small_share
        self.ghost: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        self.main_blocks = 0  # ghost capacity, kept as the blocks seen entering/leaving M

    def fresh(self, entry: BlockEntry, now: int) -> list[int]:
        return [SMALL, 0, now]  # [queue, freq, position in its queue]

    def on_insert(self, entry: BlockEntry) -> None:
        st = self.fresh(entry, self.tick())
        if self.ghost.pop((entry.ns.id, entry.key), "absent") is None:
            st[0] = MAIN
            self.main_blocks += 1
        entry.policy_state[self.tier] = st

    def on_hit(self, entry: BlockEntry) -> None:
        st = self.state(entry)
        st[1] = min(st[1] + 1, MAX_FREQ)

    def on_evict(self, entry: BlockEntry) -> None:
        st = entry.policy_state.pop(self.tier, None)
        if st is None:
            return
        if st[0] == MAIN:
            self.main_blocks = max(0, self.main_blocks - 1)
            return
        self.ghost[(entry.ns.id, entry.key)] = None
        while len(self.ghost) > max(self.main_blocks, 1):
            self.ghost.popitem(last=False)

    def priority(self, entry: BlockEntry) -> tuple[int, int, int]:
        """A static approximation (small queue first, then main by counter and age);
        the placer uses `victims`, which applies the rules exactly."""
        queue, freq, pos = self.state(entry)
        return (queue, freq, pos)

    def victims(self, candidates: Iterable[BlockEntry]) -> Iterator[BlockEntry]:
        entries = list(candidates)
        small = deque(sorted((e for e in entries if self.state(e)[0] == SMALL),
                             key=lambda e: self.state(e)[2]))  # fmt: skip
        main = deque(sorted((e for e in entries if self.state(e)[0] == MAIN),
                            key=lambda e: self.state(e)[2]))  # fmt: skip
        small_bytes = sum(e.nbytes for e in small)
        total = small_bytes + sum(e.nbytes for e in main)
        while small or main:
            if small and (small_bytes >= self.small_share * total or not main):
                entry = small.popleft()
                st = self.state(entry)
                small_bytes -= entry.nbytes
                if st[1] > 0:  # hit while in S: on to M, counter cleared
                    st[:] = [MAIN, 0, self.tick()]
                    self.main_blocks += 1
                    main.append(entry)
                    continue
            else:
                entry = main.popleft()
                st = self.state(entry)
                if st[1] > 0:  # second chance, one hit spent
                    st[1] -= 1
                    st[2] = self.tick()
                    main.append(entry)
                    continue
            total -= entry.nbytes
            yield entry
