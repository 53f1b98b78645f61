"""The directory: the daemon's books. Which blocks exist, where their copies are, who holds
them, what each tier and tenant holds, and the catalog that makes it durable.

Primitives:
  books    `index`, `leases`, `counters`, `policies`, `cond` (guards all of it)
  copies   `best(entry)` (the copy a read uses), `add_blocks(ns, placed)`, `add_copy`,
           `drop_copy`, `record_copies`, `drop_corrupt_copy`, `evict(entry, tier)`,
           `free_space(entry)`, `delete(ns, keys)`, `set_pinned(ns, keys, pinned)`
  holders  `hold(ns, keys)`, `drop_reader(entry)`, `claim(entry)` / `unclaim(entry)` (a
           copy is being written out), `moving`
  choices  `candidates(tier)`, `victims(tier, goal)` (which blocks leave a tier, in order)
  counts   `usage(tier)` (bytes per tenant), `blocks_in(tier)`, `usage_by_tenant()`

It moves no bytes and touches no tier: freeing a copy's space is handed to `release`
(the service passes the tiers' `free`, which never blocks), so every decision here can be
unit-tested step by step. Usage per tier and tenant and the number of blocks moving are
kept incrementally as copies come and go, so the placer never scans the index to learn
them. Callers hold `cond` for every call except where a method says it takes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence

from tierd.config import Config
from tierd.core.catalog import BlockRow, Catalog, copy_rows
from tierd.core.fairness import fair_victims
from tierd.core.index import BlockEntry, Index, NamespaceInfo
from tierd.core.leases import LeaseTable
from tierd.core.policies import Policy
from tierd.core.stats import Counters
from tierd.errors import ResourceExhausted
from tierd.tiers.base import Copy, Location

log = logging.getLogger("tierd.core")

Release = Callable[[BlockEntry, Copy], None]


class Directory:
    def __init__(
        self,
        catalog: Catalog,
        chain: Sequence[str],
        policies: dict[str, Policy],
        release: Release,
        config: Callable[[], Config],
    ) -> None:
        self.catalog = catalog
        self.chain = list(chain)  # tier names, fastest first
        self.top = self.chain[0]
        self._rank = {name: i for i, name in enumerate(self.chain)}
        self.policies = policies
        self._release = release
        self._config = config
        self.cond = threading.Condition()
        self.index = Index()
        self.leases = LeaseTable()
        self.counters = Counters()
        self.moving = 0  # blocks claimed by a demotion or move right now
        self._usage: dict[str, dict[str, int]] = {name: {} for name in self.chain}
        self._blocks: dict[str, int] = dict.fromkeys(self.chain, 0)

    # -- which copy -------------------------------------------------------------------------

    def best(self, entry: BlockEntry) -> Copy | None:
        """The copy a read uses: the one in the fastest tier."""
        if len(entry.copies) == 1:
            return next(iter(entry.copies.values()))
        return min(entry.copies.values(), key=lambda c: self._rank[c.tier], default=None)

    def best_name(self, entry: BlockEntry) -> str:
        copy = self.best(entry)
        return copy.tier if copy is not None else ""

    # -- copies come and go -------------------------------------------------------------------

    def adopt(self, entry: BlockEntry) -> None:
        """A block recovered with its copies (start-up)."""
        self.index.add(entry)
        for copy in entry.copies.values():
            self._count(entry, copy, +1)

    def add_blocks(
        self, ns: NamespaceInfo, placed: Sequence[tuple[bytes, Copy]], now: float | None = None
    ) -> list[BlockEntry]:
        """New blocks, each with its first copy: on record first (a catalog that cannot
        take the rows fails the call before any block is visible), then in the index."""
        now = time.time() if now is None else now
        entries = [BlockEntry(ns, key, ns.block_bytes, copy.checksum, {}, last_access=now)
                   for key, copy in placed]  # fmt: skip
        self.catalog.insert_blocks(
            BlockRow(ns.id, e.key, e.nbytes, e.checksum, False, now, copies=copy_rows([c]))
            for e, (_, c) in zip(entries, placed)
        )
        for entry, (_, copy) in zip(entries, placed):
            self.index.add(entry)
            self.add_copy(entry, copy)
        return entries

    def add_copy(self, entry: BlockEntry, copy: Copy) -> None:
        """The block got a copy in `copy.tier` (not recorded: the caller records)."""
        old = entry.copies.get(copy.tier)
        if old is not None:
            self.drop_copy(entry, old)
        entry.copies[copy.tier] = copy
        self._count(entry, copy, +1)
        self.policies[copy.tier].on_insert(entry)
        self.counters.tier(copy.tier).bytes_written += copy.length

    def drop_copy(self, entry: BlockEntry, copy: Copy) -> None:
        """Forget one copy and release its space (not recorded: the caller records)."""
        if entry.copies.get(copy.tier) is not copy:
            return
        del entry.copies[copy.tier]
        self._count(entry, copy, -1)
        self.policies[copy.tier].on_evict(entry)
        self._release(entry, copy)

    def _count(self, entry: BlockEntry, copy: Copy, sign: int) -> None:
        usage = self._usage.setdefault(copy.tier, {})
        tenant = entry.ns.tenant
        usage[tenant] = usage.get(tenant, 0) + sign * copy.length
        if not usage[tenant]:
            del usage[tenant]
        self._blocks[copy.tier] = self._blocks.get(copy.tier, 0) + sign

    def record_copies(self, entry: BlockEntry) -> None:
        """Put on record where `entry`'s copies now are; a block left with none leaves the
        cache. A catalog that cannot write (its disk is full) is only logged: the copies
        are gone from memory either way, and a stale row names bytes that fail their
        checksum after a restart (or a copy that is simply not adopted), so nothing wrong
        is ever served."""
        if entry.deleted:
            return
        gone = not entry.copies
        if gone:
            self.index.remove(entry)
            entry.deleted = True
        try:
            if gone:
                self.catalog.delete_blocks([(entry.ns.id, entry.key)])
            else:
                self.catalog.set_copies([(entry.ns.id, entry.key,
                                          copy_rows(entry.copies.values()))])  # fmt: skip
        except ResourceExhausted as e:
            log.error("where block %s's copies are was not recorded: %s", entry.key.hex(), e)

    def drop_corrupt_copy(
        self, entry: BlockEntry, tier: str, where: Location, *, own_readers: int = 0
    ) -> None:
        """A read of `entry`'s copy in `tier` (at `where`) failed its checksum: count it
        and drop that copy; a block left with no copy leaves the cache. Idempotent: a copy
        already dropped or replaced is left alone (and not counted again). A copy in the
        memory tier that others read (beyond the caller's `own_readers`) is only marked
        for a check, which the next reader's load runs. Takes `cond`."""
        with self.cond:
            copy = entry.copies.get(tier)
            if copy is None or copy.location != where:
                return
            if tier == self.top and entry.readers > own_readers:
                copy.verified = False
                return
            self.drop_copy(entry, copy)
            self.counters.corrupt_reads += 1
            self.counters.tier(tier).misses += 1
            log.warning("block %s failed its checksum in %s; dropped that copy",
                        entry.key.hex(), tier)  # fmt: skip
            self.record_copies(entry)
            self.cond.notify_all()

    def free_space(self, entry: BlockEntry) -> None:
        """Release every copy of a block already out of the index."""
        for copy in list(entry.copies.values()):
            self.drop_copy(entry, copy)

    def evict(self, entry: BlockEntry, tier: str) -> None:
        """The placer takes the block's copy out of `tier` to make room (on record first);
        a block left with no copy leaves the cache."""
        self.counters.tier(tier).evictions += 1
        if len(entry.copies) > 1:
            rest = [c for c in entry.copies.values() if c.tier != tier]
            self.catalog.set_copies([(entry.ns.id, entry.key, copy_rows(rest))])
            self.drop_copy(entry, entry.copies[tier])
            return
        self.catalog.delete_blocks([(entry.ns.id, entry.key)])
        self.index.remove(entry)
        entry.deleted = True
        self.free_space(entry)

    def delete(self, ns: NamespaceInfo, keys: Sequence[bytes]) -> int:
        """Remove blocks; their space is released now, or when their last reader is done."""
        entries = [e for e in dict.fromkeys(self.index.get(ns.id, k) for k in keys) if e]
        # Off the record first: a catalog that cannot write (full disk) fails the call
        # with nothing deleted, rather than leaving rows that name freed space.
        self.catalog.delete_blocks((ns.id, e.key) for e in entries)
        for entry in entries:
            self.index.remove(entry)
            entry.deleted = True
            if entry.idle:
                self.free_space(entry)
        self.cond.notify_all()
        return len(entries)

    def set_pinned(self, ns: NamespaceInfo, keys: Sequence[bytes], pinned: bool) -> int:
        changed = [e for e in dict.fromkeys(self.index.get(ns.id, k) for k in keys)
                   if e is not None and e.pinned != pinned]  # fmt: skip
        self.catalog.set_pinned([(ns.id, e.key) for e in changed], pinned)  # record first
        for entry in changed:
            entry.pinned = pinned
        return len(changed)

    # -- holders --------------------------------------------------------------------------------

    def hold(self, ns: NamespaceInfo, keys: Iterable[bytes]) -> list[BlockEntry | None]:
        """A reader reference on each block that exists: from here on nothing moves or
        frees it until `drop_reader`."""
        held: list[BlockEntry | None] = []
        for key in keys:
            entry = self.index.get(ns.id, key)
            if entry is not None:
                entry.readers += 1
            held.append(entry)
        return held

    def drop_reader(self, entry: BlockEntry) -> None:
        entry.readers -= 1
        if entry.deleted and entry.idle:
            self.free_space(entry)

    def claim(self, entry: BlockEntry) -> None:
        """Mark a block as having a copy written out (one writer at a time)."""
        assert not entry.moving, "a block claimed twice"
        entry.moving = True
        self.moving += 1

    def unclaim(self, entry: BlockEntry) -> None:
        if entry.moving:
            entry.moving = False
            self.moving -= 1
            self.cond.notify_all()

    # -- choices --------------------------------------------------------------------------------

    def candidates(self, tier: str) -> list[BlockEntry]:
        """Blocks whose copy in `tier` may leave it now: idle, not deleted, and not a
        pinned block's last copy."""
        return [e for e in self.index.entries()
                if tier in e.copies and e.movable
                and not (e.pinned and len(e.copies) == 1)]  # fmt: skip

    def victims(self, tier: str, goal: int, *, include_pinned: bool = False) -> list[BlockEntry]:
        """Blocks to take out of `tier` to free `goal` bytes, in the order they should
        leave: the tenant furthest over its fair share first, within a tenant the tier's
        policy order. `include_pinned`: pinned blocks may be moved (demoted), not dropped."""
        candidates = [e for e in self.index.entries()
                      if tier in e.copies and e.movable
                      and (include_pinned or not (e.pinned and len(e.copies) == 1))]  # fmt: skip
        order = fair_victims(candidates, self.usage(tier), self._config(),
                             self.policies[tier].victims, tier)  # fmt: skip
        picked, total = [], 0
        while total < goal and (entry := next(order, None)) is not None:
            picked.append(entry)
            total += entry.nbytes
        return picked

    # -- counts ---------------------------------------------------------------------------------

    def usage(self, tier: str) -> dict[str, int]:
        """Bytes each tenant holds in `tier`."""
        return dict(self._usage.get(tier, {}))

    def blocks_in(self, tier: str) -> int:
        return self._blocks.get(tier, 0)

    def usage_by_tenant(self) -> dict[tuple[str, str], int]:
        return {(tenant, tier): n for tier, by_tenant in self._usage.items()
                for tenant, n in by_tenant.items()}  # fmt: skip
