"""What every placement policy offers the placer, and the shared per-entry state slot.

Primitives: `Policy` (hooks `on_insert`, `on_hit`, `on_evict`, `on_access`, `admit`;
ordering `priority` / `victims`; incremental ordering `victims_of`, `tenants`),
`Policy.state(entry)`.

A policy instance serves one tier and keeps its per-block state in
`entry.policy_state[tier]`, so the state lives and dies with the entry: a block the
policy never saw (adopted after a restart) simply gets fresh state on first use.

Two ways to ask for the leave order, which agree:

- `victims(candidates)` sorts the candidates the caller hands in (a scan and a sort);
- `victims_of(tenant, live, busy)` reads an incremental structure the hooks maintain:
  here, one heap per tenant of (priority, sequence, entry) with lazy deletion. A hook
  pushes the block with its current priority and marks that item as the block's only
  valid one; older items are skipped when they surface. An item whose priority has grown
  since it was pushed (a lookup refreshed `last_access` without a hook) is pushed again
  with the new one when it reaches the top. This is exact while priorities only grow
  between hooks, as they do for every policy here (recency and decayed counts only go
  up); a change that lowers a block's priority must go through a hook (`on_hit`) to take
  effect. Only blocks some hook announced are known to `victims_of`.

`live(entry)` False means the block has left the tier by a path that called no hook
(deleted, its copy dropped): it is forgotten. Deleted blocks (`entry.deleted`) are also
forgotten by a periodic sweep, so a caller that never asks `victims_of` leaks nothing. `busy(entry)` True means it stays but may
not leave now (being read or moved): it is passed over and kept. Blocks the generator
yielded but the caller did not evict (it stopped early, or changed its mind) are back in
place for the next pass.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any

from tierd.core.index import BlockEntry

Pred = Callable[[BlockEntry], bool]
SWEEP_MIN = 4096  # hooks between two sweeps for deleted blocks, at least
Item = tuple[Any, int, BlockEntry]


class Policy(ABC):
    name = ""
    # An admission filter that compares a block with the one it would displace sets this;
    # the caller then passes that victim to `admit` (it costs a victim lookup).
    wants_victim = False

    def __init__(self, tier: str = "tier") -> None:
        self.tier = tier
        self.clock = 0  # logical time: one tick per insert or hit seen by this policy
        self._heaps: dict[str, list[Item]] = {}
        self._valid: dict[BlockEntry, int] = {}  # entry -> sequence of its valid heap item
        self._counts: dict[str, int] = {}  # blocks tracked per tenant
        self._seq = 0
        self._sweep_at = SWEEP_MIN
        # Items a `victims_of` pass popped (yielded or busy), by tenant. They go back into
        # the heap when the next pass for the tenant starts, unless evicted meanwhile: a
        # caller usually evicts what it took, and this saves pushing and popping them.
        self._aside: dict[str, list[Item]] = {}

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def state(self, entry: BlockEntry) -> Any:
        """This policy's state for `entry`, created (as if inserted long ago) if missing."""
        st = entry.policy_state.get(self.tier)
        if st is None:
            st = entry.policy_state[self.tier] = self.fresh(entry, 0)
        return st

    def fresh(self, entry: BlockEntry, now: int) -> Any:
        return now

    # -- hooks ------------------------------------------------------------------------

    def on_insert(self, entry: BlockEntry) -> None:
        """The block got a copy in this tier (put, seal, promotion, demotion into it)."""
        self.clock += 1
        entry.policy_state[self.tier] = self.fresh(entry, self.clock)
        self.track(entry)

    def on_hit(self, entry: BlockEntry) -> None:
        """A read of the block was served while it had a copy in this tier."""
        self.track(entry)

    def on_evict(self, entry: BlockEntry) -> None:
        """The block's copy left this tier (demoted or evicted)."""
        entry.policy_state.pop(self.tier, None)
        self.untrack(entry)

    def on_access(self, entry: BlockEntry) -> None:
        """A put or read of the block, whichever tier served it (frequency filters count
        every access, also of blocks they do not hold)."""

    def admit(self, entry: BlockEntry, victim: BlockEntry | None = None) -> bool:
        """Whether a block demoted from the tier above may be written here (else it is
        dropped from the cache). `victim`: the block it would displace, when the tier is
        full and the policy `wants_victim`. Pinned blocks and explicit moves are never
        asked."""
        return True

    # -- ordering ---------------------------------------------------------------------

    @abstractmethod
    def priority(self, entry: BlockEntry) -> Any:
        """Sort key: the lowest leaves first (each policy's own rule)."""

    def victims(self, candidates: Iterable[BlockEntry]) -> Iterator[BlockEntry]:
        """The candidates in the order they should leave, consumed lazily by the placer."""
        return iter(sorted(candidates, key=self.priority))

    def tenants(self) -> list[str]:
        """Tenants with blocks tracked by `victims_of`."""
        return [t for t, n in self._counts.items() if n > 0]

    def tracked(self, entry: BlockEntry) -> bool:
        return entry in self._valid

    def track(self, entry: BlockEntry) -> None:
        """(Re)announce a block to the incremental order with its current priority."""
        tenant = entry.ns.tenant
        if entry not in self._valid:
            self._counts[tenant] = self._counts.get(tenant, 0) + 1
        self._seq += 1
        self._valid[entry] = self._seq
        heap = self._heaps.setdefault(tenant, [])
        heapq.heappush(heap, (self.priority(entry), self._seq, entry))
        if len(heap) > 2 * self._counts[tenant] + 64:
            # Stale items (one per hit) would grow the heap without bound: drop them, in
            # place, since a suspended `victims_of` holds this list.
            heap[:] = [item for item in heap if self._valid.get(item[2]) == item[1]]
            heapq.heapify(heap)
        if self._seq >= self._sweep_at:
            self._sweep()

    def _sweep(self) -> None:
        """Forget deleted blocks: a delete that calls no hook would otherwise keep them
        here until a `victims_of` pass reached them. Every few times the tier's block
        count of hooks, so the cost per hook stays constant."""
        for heap in self._heaps.values():
            keep = []
            for item in heap:
                if self._valid.get(item[2]) != item[1]:
                    continue
                if item[2].deleted:
                    self.untrack(item[2])
                    continue
                keep.append(item)
            heap[:] = keep
            heapq.heapify(heap)
        for tenant, items in self._aside.items():
            for item in items:
                if item[2].deleted:
                    self.untrack(item[2])
            self._aside[tenant] = [i for i in items if self._valid.get(i[2]) == i[1]]
        self._sweep_at = self._seq + max(4 * len(self._valid), SWEEP_MIN)

    def untrack(self, entry: BlockEntry) -> None:
        if self._valid.pop(entry, None) is not None:
            self._counts[entry.ns.tenant] -= 1

    def victims_of(self, tenant: str, live: Pred, busy: Pred | None = None
                   ) -> Generator[BlockEntry, None, None]:  # fmt: skip
        """`tenant`'s blocks in leave order, from the incremental structure (see the
        module docstring for `live` and `busy`); close it when done."""
        heap = self._heaps.get(tenant)
        if heap is None:
            return
        for item in self._aside.pop(tenant, ()):  # what the last pass took but left here
            if self._valid.get(item[2]) == item[1]:
                heapq.heappush(heap, item)
        held: list[Item] = []  # popped and maybe still in the tier: see `_aside`
        try:
            while heap:
                key, seq, entry = heap[0]
                if self._valid.get(entry) != seq:
                    heapq.heappop(heap)
                    continue
                now = self.priority(entry)
                if now != key:
                    self._seq += 1
                    self._valid[entry] = self._seq
                    heapq.heapreplace(heap, (now, self._seq, entry))
                    continue
                heapq.heappop(heap)
                if not live(entry):
                    self.untrack(entry)
                    continue
                held.append((key, seq, entry))
                if busy is None or not busy(entry):
                    yield entry
        finally:
            if held:
                self._aside.setdefault(tenant, []).extend(held)
