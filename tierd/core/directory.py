"""The directory: the daemon's books. Which blocks exist, where their copies are, who holds
them, what each tier and tenant holds, and the catalog that makes it durable.

Primitives:
  books    `index`, `leases`, `counters`, `policies`, `cond` (guards all of it)
  copies   `best(entry)` (the copy a read uses), `add_blocks(ns, placed)`, `add_copy`,
           `add_found(ns, found)` (blocks a shared tier holds, found by a lookup),
           `drop_copy`, `record_copies`, `drop_corrupt_copy`, `evict(entry, tier)`,
           `free_space(entry)`, `delete(ns, keys)`, `set_pinned(ns, keys, pinned)`
  holders  `hold(ns, keys)`, `drop_reader(entry)`, `claim(entry)` / `unclaim(entry)` (a
           copy is being written out), `moving`
  choices  `victims(tier, goal)` (which blocks leave a tier, in order)
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
from typing import Protocol

from tierd.config import Config
from tierd.core.catalog import (
    BlockRow,
    Catalog,
    copy_rows,
    plan_delete_blocks,
    plan_insert_blocks,
    plan_set_copies,
    plan_set_pinned,
)
from tierd.core.catalog_log import CatalogLog
from tierd.core.fairness import fair_merge
from tierd.core.index import BlockEntry, Index, NamespaceInfo
from tierd.core.leases import LeaseTable
from tierd.core.policies import Policy
from tierd.core.stats import Counters
from tierd.tiers.base import Copy, Found, Location

log = logging.getLogger("tierd.core")

Release = Callable[[BlockEntry, Copy], None]


class Watcher(Protocol):
    """Told of blocks committed to the memory tier and of copies that go (the prefix
    directory, `tierd.core.holders`); called under `cond`, never blocks."""

    def added(self, entries: Sequence[BlockEntry]) -> None: ...

    def touched(self, entry: BlockEntry, now: float) -> None: ...  # a lookup hit it

    def dropped(self, entry: BlockEntry, copy: Copy) -> None: ...


def _fastest_copy(entry: BlockEntry, rank: dict[str, int]) -> Copy | None:
    """The copy in the fastest tier (by `rank`, chain position). Safe without the core lock
    (attend reads it so): a snapshot of the copies is taken before choosing."""
    copies = tuple(entry.copies.values())
    if len(copies) == 1:
        return copies[0]
    return min(copies, key=lambda c: rank[c.tier], default=None)


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
        self.log = CatalogLog(catalog)  # catalog changes, committed outside `cond`
        self.chain = list(chain)  # tier names, fastest first
        self.top = self.chain[0]
        self._rank = {name: i for i, name in enumerate(self.chain)}
        self.policies = policies
        # The policies that count accesses (frequency filters); the others are not asked.
        self._counting = [p for p in policies.values()
                          if type(p).on_access is not Policy.on_access]  # fmt: skip
        self._release = release
        self._config = config
        self.cond = threading.Condition()
        self.index = Index()
        self.leases = LeaseTable()
        self.counters = Counters()
        self.moving = 0  # blocks claimed by a demotion or move right now
        # Keys whose blocks are being recorded (a put between its decision and its row's
        # commit): not visible yet, and a concurrent put of the same key defers to them.
        self.pending: set[tuple[bytes, bytes]] = set()
        self._usage: dict[str, dict[str, int]] = {name: {} for name in self.chain}
        self._blocks: dict[str, int] = dict.fromkeys(self.chain, 0)
        self.watcher: Watcher | None = None

    # -- which copy -------------------------------------------------------------------------

    def best(self, entry: BlockEntry) -> Copy | None:
        """The copy a read uses: the one in the fastest tier."""
        return _fastest_copy(entry, self._rank)

    def rank(self, tier: str) -> int:
        """A tier's place in the chain (0: the fastest)."""
        return self._rank[tier]

    def best_name(self, entry: BlockEntry) -> str:
        copy = self.best(entry)
        return copy.tier if copy is not None else ""

    # -- copies come and go -------------------------------------------------------------------

    def adopt(self, entry: BlockEntry) -> None:
        """A block recovered with its copies (start-up)."""
        self.index.add(entry)
        for copy in entry.copies.values():
            self._count(entry, copy, +1)
            self.policies[copy.tier].track(entry)  # known to the tier's leave order

    def stage_blocks(
        self, ns: NamespaceInfo, placed: Sequence[tuple[bytes, Copy]], now: float | None = None
    ) -> tuple[list[tuple[bytes, Copy]], int]:
        """Decide to add new blocks: those whose key is neither cached nor being added are
        reserved and their rows queued. Returns them and the ticket to commit (outside
        `cond`) before `publish`; on failure, `unstage`."""
        now = time.time() if now is None else now
        mine = [(k, c) for k, c in placed
                if self.index.get(ns.id, k) is None and (ns.id, k) not in self.pending]  # fmt: skip
        self.pending.update((ns.id, k) for k, _ in mine)
        if not mine:
            # Nothing of its own to record; the keys it found may be blocks whose rows are
            # still queued (sealed tails, or another put's): it answers once those are in.
            return mine, self.log.last() if placed else 0
        ticket = self.log.add(plan_insert_blocks(
            BlockRow(ns.id, k, ns.block_bytes, c.checksum, False, now, copies=copy_rows([c]))
            for k, c in mine
        ))  # fmt: skip
        return mine, ticket

    def unstage(self, ns: NamespaceInfo, staged: Sequence[tuple[bytes, Copy]]) -> None:
        self.pending.difference_update((ns.id, k) for k, _ in staged)

    def publish(
        self, ns: NamespaceInfo, staged: Sequence[tuple[bytes, Copy]], now: float | None = None
    ) -> list[BlockEntry]:
        """Make staged blocks visible (their rows are committed)."""
        now = time.time() if now is None else now
        self.unstage(ns, staged)
        entries = []
        for key, copy in staged:
            entry = BlockEntry(ns, key, ns.block_bytes, copy.checksum, {}, last_access=now)
            self.index.add(entry)
            self.add_copy(entry, copy)
            self.accessed(entry)
            entries.append(entry)
        if self.watcher is not None:
            self.watcher.added(entries)
        return entries

    def accessed(self, entry: BlockEntry) -> None:
        """A put or read of the block: frequency filters of every tier count it."""
        for policy in self._counting:
            policy.on_access(entry)

    def add_blocks(
        self, ns: NamespaceInfo, placed: Sequence[tuple[bytes, Copy]], now: float | None = None
    ) -> list[BlockEntry]:
        """New blocks, visible now, their rows committed behind (for blocks the daemon made
        itself, which no client was told are on record). Keys cached or being added are
        skipped."""
        staged, _ = self.stage_blocks(ns, placed, now)
        return self.publish(ns, staged, now)

    def add_copy(self, entry: BlockEntry, copy: Copy, *, written: bool = True) -> None:
        """The block got a copy in `copy.tier` (not recorded: the caller records).
        `written`: False for a copy found in a shared tier (this daemon wrote nothing)."""
        old = entry.copies.get(copy.tier)
        if old is not None:
            self.drop_copy(entry, old)
        entry.copies[copy.tier] = copy
        self._count(entry, copy, +1)
        self.policies[copy.tier].on_insert(entry)
        if written:
            self.counters.tier(copy.tier).bytes_written += copy.length

    def add_found(
        self, ns: NamespaceInfo, found: Sequence[tuple[bytes, Found, Copy]],
        now: float | None = None,
    ) -> list[BlockEntry]:  # fmt: skip
        """Blocks another daemon put into a shared tier, found by a lookup: new entries
        whose one copy is there, with the checksums its header vouches for; visible now,
        their rows committed behind (a cache row lost to a crash is only a miss). Keys
        cached or being added meanwhile are skipped (the caller gives their space back)."""
        now = time.time() if now is None else now
        entries, rows = [], []
        for key, what, copy in found:
            if self.index.get(ns.id, key) is not None or (ns.id, key) in self.pending:
                continue
            entry = BlockEntry(ns, key, ns.block_bytes, what.checksum, {}, last_access=now,
                               layer_sums=what.layer_sums)  # fmt: skip
            self.index.add(entry)
            self.add_copy(entry, copy, written=False)
            self.accessed(entry)
            entries.append(entry)
            rows.append(BlockRow(ns.id, key, ns.block_bytes, what.checksum, False, now,
                                 what.layer_sums, copy_rows([copy])))  # fmt: skip
        if rows:
            self.log.add(plan_insert_blocks(rows))
        return entries

    def drop_copy(self, entry: BlockEntry, copy: Copy) -> None:
        """Forget one copy and release its space (not recorded: the caller records)."""
        if entry.copies.get(copy.tier) is not copy:
            return
        del entry.copies[copy.tier]
        self._count(entry, copy, -1)
        self.policies[copy.tier].on_evict(entry)
        self._release(entry, copy)
        if self.watcher is not None:
            self.watcher.dropped(entry, copy)

    def _count(self, entry: BlockEntry, copy: Copy, sign: int) -> None:
        usage = self._usage.setdefault(copy.tier, {})
        tenant = entry.ns.tenant
        usage[tenant] = usage.get(tenant, 0) + sign * copy.length
        if not usage[tenant]:
            del usage[tenant]
        self._blocks[copy.tier] = self._blocks.get(copy.tier, 0) + sign

    def record_copies(self, entry: BlockEntry) -> None:
        """Put on record where `entry`'s copies now are; a block left with none leaves the
        cache. Committed behind (the write log): a catalog that cannot write (its disk is
        full) is only logged, since the copies are gone from memory either way, and a
        stale row names bytes that fail their checksum after a restart (or a copy that is
        simply not adopted), so nothing wrong is ever served."""
        if entry.deleted:
            return
        # A block a delete took out of the index has the removal of its row queued (its
        # key may be another block's by now): it stays off the record from then on.
        indexed = self.index.holds(entry)
        gone = not entry.copies
        if gone:
            self.index.remove(entry)
            entry.deleted = True
        if not indexed:
            return
        if gone:
            self.log.add(plan_delete_blocks([(entry.ns.id, entry.key)]))
        else:
            self.log.add(plan_set_copies([(entry.ns.id, entry.key,
                                           copy_rows(entry.copies.values()))]))  # fmt: skip

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
        """The placer takes the block's copy out of `tier` to make room (recorded behind,
        like `record_copies`); a block left with no copy leaves the cache."""
        self.counters.tier(tier).evictions += 1
        if len(entry.copies) > 1:
            rest = [c for c in entry.copies.values() if c.tier != tier]
            self.log.add(plan_set_copies([(entry.ns.id, entry.key, copy_rows(rest))]))
            self.drop_copy(entry, entry.copies[tier])
            return
        self.log.add(plan_delete_blocks([(entry.ns.id, entry.key)]))
        self.index.remove(entry)
        entry.deleted = True
        self.free_space(entry)

    def delete(self, ns: NamespaceInfo, keys: Sequence[bytes]) -> int:
        """Remove blocks, on record before anything is freed: takes `cond` twice and
        commits the catalog between, without it. A catalog that cannot write (full disk)
        fails the call with nothing deleted. Space is released now, or by the last
        reader."""
        with self.cond:
            entries = [e for e in dict.fromkeys(self.index.get(ns.id, k) for k in keys) if e]
            for entry in entries:  # invisible from here on; freed once on record
                self.index.remove(entry)
            ticket = self.log.add(plan_delete_blocks((ns.id, e.key) for e in entries))
        try:
            self.log.commit(ticket)
        except BaseException:
            with self.cond:
                for entry in entries:  # back, unless placement evicted it or a put took its key
                    key = (ns.id, entry.key)
                    if (entry.copies and not entry.deleted and self.index.get(*key) is None
                            and key not in self.pending):  # fmt: skip
                        self.index.add(entry)
                        self.record_copies(entry)  # what changed while it was out
                    else:  # gone for good: its space is freed now or by its last holder
                        entry.deleted = True
                        if entry.idle:
                            self.free_space(entry)
            raise
        with self.cond:
            for entry in entries:
                entry.deleted = True
                if entry.idle:
                    self.free_space(entry)
            self.cond.notify_all()
        return len(entries)

    def set_pinned(self, ns: NamespaceInfo, keys: Sequence[bytes], pinned: bool) -> int:
        """Pin or unpin, on record before the call answers (committed without `cond`; a
        failure undoes the change). Takes `cond`."""
        with self.cond:
            changed = [e for e in dict.fromkeys(self.index.get(ns.id, k) for k in keys)
                       if e is not None and e.pinned != pinned]  # fmt: skip
            for entry in changed:
                entry.pinned = pinned
            ticket = self.log.add(plan_set_pinned([(ns.id, e.key) for e in changed], pinned))
        try:
            self.log.commit(ticket)
        except BaseException:
            with self.cond:
                for entry in changed:
                    entry.pinned = not pinned
            raise
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
            if entry.deleted and entry.idle:  # deleted while its copy was being written
                self.free_space(entry)
            self.cond.notify_all()

    # -- choices --------------------------------------------------------------------------------

    def victims(self, tier: str, goal: int, *, include_pinned: bool = False) -> list[BlockEntry]:
        """Blocks to take out of `tier` to free `goal` bytes, in the order they should
        leave: the tenant furthest over its fair share first, within a tenant the tier's
        policy order. Read from each policy's incremental order (no scan, no sort); blocks
        in use stay. `include_pinned`: a pinned block's last copy may be moved (demoted),
        otherwise it never leaves."""
        policy = self.policies[tier]

        def live(e: BlockEntry) -> bool:
            return tier in e.copies and not e.deleted

        def busy(e: BlockEntry) -> bool:
            # A block being deleted stays put until its delete is known to be recorded.
            return (not e.idle or (e.pinned and len(e.copies) == 1 and not include_pinned)
                    or not self.index.holds(e))  # fmt: skip

        queues = {t: policy.victims_of(t, live, busy) for t in policy.tenants()}
        picked, total = [], 0
        try:
            order = fair_merge(dict(queues), self.usage(tier), self._config(), tier)
            while total < goal and (entry := next(order, None)) is not None:
                picked.append(entry)
                held = entry.copies.get(tier)  # encoded copies free their encoded size
                total += held.length if held is not None else entry.nbytes
        finally:
            for q in queues.values():
                q.close()  # what was taken but not picked goes back in place
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
