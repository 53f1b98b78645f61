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

Incrementally (`victims_of`): the hooks keep each tenant's S and M as ordered dicts in
queue order with their byte totals, and a pass runs the same rules on them, moving blocks
between the queues for real. Blocks it yields or passes over as busy are taken off their
queue's head for the pass and put back there when the generator closes, unless evicted
meanwhile; until the pass reaches them, busy blocks count in the shares (`victims` leaves
them out from the start), so the two orders agree whenever nothing is busy.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Generator, Iterable, Iterator

from tierd.core.index import BlockEntry
from tierd.core.policies.base import SWEEP_MIN, Policy, Pred

SMALL, MAIN = 0, 1
MAX_FREQ = 3


class _Queues:
    """One tenant's S and M in queue order (oldest first) and the bytes each holds."""

    def __init__(self) -> None:
        self.q: tuple[OrderedDict[BlockEntry, None], OrderedDict[BlockEntry, None]] = (
            OrderedDict(), OrderedDict())  # fmt: skip
        self.bytes = [0, 0]

    def push(self, entry: BlockEntry, queue: int, *, front: bool = False) -> None:
        self.q[queue][entry] = None
        if front:
            self.q[queue].move_to_end(entry, last=False)
        self.bytes[queue] += entry.nbytes

    def pop(self, entry: BlockEntry, queue: int) -> None:
        if self.q[queue].pop(entry, 0) is None:
            self.bytes[queue] -= entry.nbytes


class S3FIFO(Policy):
    name = "s3fifo"

    def __init__(self, tier: str = "tier", small_share: float = 0.10) -> None:
        super().__init__(tier)
        self.small_share = small_share
        self.ghost: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        self.main_blocks = 0  # ghost capacity, kept as the blocks seen entering/leaving M
        self._queues: dict[str, _Queues] = {}
        self._where: dict[BlockEntry, int] = {}  # tracked block -> its queue

    def fresh(self, entry: BlockEntry, now: int) -> list[int]:
        return [SMALL, 0, now]  # [queue, freq, position in its queue]

    def on_insert(self, entry: BlockEntry) -> None:
        st = self.fresh(entry, self.tick())
        if self.ghost.pop((entry.ns.id, entry.key), "absent") is None:
            st[0] = MAIN
            self.main_blocks += 1
        entry.policy_state[self.tier] = st
        self._untrack(entry)
        self._where[entry] = st[0]
        self._queues.setdefault(entry.ns.tenant, _Queues()).push(entry, st[0])
        if self.clock >= self._sweep_at:  # forget deleted blocks (see `Policy._sweep`)
            for gone in [e for e in self._where if e.deleted]:
                self._untrack(gone)
            self._sweep_at = self.clock + max(4 * len(self._where), SWEEP_MIN)

    def on_hit(self, entry: BlockEntry) -> None:
        st = self.state(entry)
        st[1] = min(st[1] + 1, MAX_FREQ)

    def on_evict(self, entry: BlockEntry) -> None:
        self._untrack(entry)
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

    # -- incremental order --------------------------------------------------------------

    def _untrack(self, entry: BlockEntry) -> None:
        queue = self._where.pop(entry, None)
        if queue is not None:
            self._queues[entry.ns.tenant].pop(entry, queue)

    def tracked(self, entry: BlockEntry) -> bool:
        return entry in self._where

    def tenants(self) -> list[str]:
        return [t for t, qs in self._queues.items() if qs.q[SMALL] or qs.q[MAIN]]

    def victims_of(self, tenant: str, live: Pred, busy: Pred | None = None
                   ) -> Generator[BlockEntry, None, None]:  # fmt: skip
        qs = self._queues.get(tenant)
        if qs is None:
            return
        small, main = qs.q
        aside: list[tuple[BlockEntry, int]] = []  # off their queue's head for this pass
        try:
            while small or main:
                total = qs.bytes[SMALL] + qs.bytes[MAIN]
                queue = SMALL if small and (qs.bytes[SMALL] >= self.small_share * total
                                            or not main) else MAIN  # fmt: skip
                entry = next(iter(qs.q[queue]))
                qs.pop(entry, queue)
                if not live(entry):
                    del self._where[entry]
                    continue
                st = self.state(entry)
                if st[1] > 0:
                    if queue == SMALL:  # hit while in S: on to M, counter cleared
                        st[:] = [MAIN, 0, self.tick()]
                        self.main_blocks += 1
                    else:  # second chance, one hit spent
                        st[1] -= 1
                        st[2] = self.tick()
                    self._where[entry] = MAIN
                    qs.push(entry, MAIN)
                    continue
                aside.append((entry, queue))
                if busy is None or not busy(entry):
                    yield entry
        finally:
            for entry, queue in reversed(aside):
                if self._where.get(entry) == queue and entry not in qs.q[queue]:
                    qs.push(entry, queue, front=True)
