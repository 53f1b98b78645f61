"""Placement: where blocks live along the tier chain. Demotion, promotion, eviction.

Primitives: `Placer(service)`, `start()`, `stop()`, `kick()`, `settle(timeout)`,
`flush(deadline)`, `allocate_top(tenant, n)` (caller holds the core lock),
`make_resident(entries)` (caller holds reader references, not the lock),
`allocate_in(tier, tenant, n)` (caller holds the lock).

Writes land in the chain's first tier (memory). A background thread keeps its occupancy
under the high watermark by demoting the blocks its policy ranks lowest until occupancy is
under the low watermark, into the next tier down that takes demotions (and whose admission
filter admits them); a block that already has a copy further down (it was promoted
earlier) just drops its memory copy. A slower tier makes room by evicting its own
lowest-ranked copies; a block left with no copy leaves the cache. Pinned blocks are never
evicted, only moved; blocks with readers, or already moving, are never touched. Bytes move
through the transfer engine (`tierd.transfer`), outside the core lock.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from tierd.config import TierSpec
from tierd.core.catalog import CopyRow, copy_rows, plan_set_copies, plan_set_layer_sums
from tierd.core.fairness import over_quota
from tierd.core.index import BlockEntry
from tierd.errors import ResourceExhausted
from tierd.tiers.base import Copy, Location, Tier
from tierd.transfer.engine import Move, Outcome
from tierd.transfer.integrity import copy_intact

if TYPE_CHECKING:
    from tierd.core.service import CacheService

log = logging.getLogger("tierd.placement")

# How long a put waits for demotion to make room before answering RESOURCE_EXHAUSTED.
ROOM_WAIT_SECONDS = 10.0
# Idle period of the placement thread; it is woken early whenever work appears.
IDLE_SECONDS = 0.25
# Bytes one demotion pass (or flush step) writes before it looks at the world again.
PASS_BYTES = 256 << 20


class _Stopped(Exception):
    """The placement thread was asked to stop."""


class Placer:
    def __init__(self, service: CacheService) -> None:
        self.svc = service
        self.cond = service.cond
        self.top = service.tiers.top
        self.dir = service.directory
        self._wanted = 0  # bytes that callers are waiting for in the memory tier
        self._passes = 0
        self._last_pass_freed = 0
        self._over_quota: dict[str, int] = {}  # tenant -> memory bytes it is waiting to reach
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tierd-placement", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        """The placement thread runs (the watchdog's sign of life)."""
        return self._thread.is_alive()

    def stop(self) -> None:
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def settle(self, timeout: float) -> bool:
        """Wait until the memory tier is under its watermarks and nothing is moving."""
        with self.cond:
            self.cond.notify_all()
            return self.cond.wait_for(
                lambda: self._top_goal() == 0 and not self._any_moving(), timeout
            )

    def flush(self, deadline: float) -> int:
        """Write every block only the memory tier holds to the next tier down (SIGTERM with
        flush_on_stop), so a reboot, which empties /dev/shm, loses nothing. Returns the
        blocks written."""
        dest = self.svc.tiers.below(self.top.name)
        if dest is None:
            return 0
        written = 0
        while time.monotonic() < deadline:
            with self.cond:
                batch, total = [], 0
                for entry in self.svc.index.entries():
                    if list(entry.copies) == [self.top.name] and entry.movable:
                        size = self.svc.transfer.stored_bytes(dest, entry)
                        loc = self.allocate_in(dest, entry.ns.tenant, size)
                        if loc is None:
                            break
                        self.dir.claim(entry)
                        batch.append((entry, loc))
                        total += entry.nbytes
                        if total >= PASS_BYTES:
                            break
            if not batch:
                break
            self._demote(dest, batch)
            written += len(batch)
        return written

    def kick(self) -> None:
        """Wake the thread if the memory tier is above its high watermark (caller holds
        the lock)."""
        if self.top.used_bytes > self.top.capacity * self._spec(self.top).high_watermark:
            self.cond.notify_all()

    def _spec(self, tier: Tier) -> TierSpec:
        """The tier's spec as configured now (a reload may have moved its watermarks)."""
        return next((s for s in self.svc.config.tiers if s.name == tier.name), tier.spec)

    # -- memory-tier space ----------------------------------------------------------------

    def allocate_top(self, tenant: str, nbytes: int) -> int | None:
        """Room in the memory tier, waiting for demotion if it is full; None if nothing
        can move."""
        top = self.top
        deadline = time.monotonic() + ROOM_WAIT_SECONDS
        while True:
            offset = None
            usage = top.tenant_used(tenant) or 0
            within_quota = not over_quota(self.svc.config, tenant, top.name, usage + nbytes)
            if within_quota:
                offset = top.reserve(tenant, nbytes)
            else:
                self._over_quota[tenant] = usage + nbytes
            if offset is not None or time.monotonic() >= deadline or self._stop:
                self._over_quota.pop(tenant, None)
                return None if offset is None else int(offset)
            self._wanted += nbytes
            self.cond.notify_all()
            passes = self._passes
            while self._passes == passes and not self._stop and time.monotonic() < deadline:
                self.cond.wait(deadline - time.monotonic())
            self._wanted -= nbytes
            if self._passes != passes and self._last_pass_freed == 0 and not self._any_moving():
                self._over_quota.pop(tenant, None)
                if not within_quota:
                    return None
                got = top.reserve(tenant, nbytes)  # a pass could free nothing
                return None if got is None else int(got)

    def _any_moving(self) -> bool:
        return self.dir.moving > 0

    def make_resident(self, entries: list[BlockEntry], *, promote: bool = True) -> None:
        """Bring blocks without a memory copy into memory (from their fastest copy), and
        verify memory copies adopted after a restart.

        With promote=False only the verification happens (attend reads slower tiers in
        place). A copy whose bytes fail their checksum is dropped (a counted corrupt
        read) and the block is loaded from its next copy; the caller sees a block with no
        memory copy left (a miss) only when none was intact.
        """
        svc, top = self.svc, self.top
        mine: list[tuple[BlockEntry, Copy | None, int | None]] = []  # (entry, source, staging)
        theirs: list[Future[bool]] = []
        with self.cond:
            for entry in entries:
                held = entry.copies.get(top.name)
                if entry.loading is not None:
                    theirs.append(entry.loading)
                elif promote and held is None and entry.copies:
                    fastest = svc.directory.best(entry)
                    source = svc.tiers.get(fastest.tier) if fastest is not None else None
                    if source is not None and not source.available():
                        svc.counters.tier(source.name).misses += 1
                        continue  # a miss now, without waiting for room it cannot fill
                    staging = self.allocate_top(entry.ns.tenant, entry.nbytes)
                    if staging is None:
                        for e, src, off in mine:  # undo what this call started
                            self._finish_load(e, src, off, Outcome.UNREACHABLE)
                        raise ResourceExhausted(
                            f"{top.name} tier full: cannot stage blocks from slower tiers",
                            field="keys",
                        )
                    # Waiting for room let others in: another call may have promoted or
                    # started loading it (a second copy would replace one a lease maps).
                    if entry.loading is not None or top.name in entry.copies or not entry.copies:
                        top.release(entry.ns.tenant, staging, entry.nbytes)
                        if entry.loading is not None:
                            theirs.append(entry.loading)
                        continue
                    entry.loading = Future()
                    mine.append((entry, svc.directory.best(entry), staging))
                elif held is not None and not held.verified:
                    entry.loading = Future()
                    mine.append((entry, None, None))
        moves = [Move(e, src, top, off) for e, src, off in mine if src is not None]
        futures = iter(svc.transfer.copy_many(moves))
        made = iter(moves)
        outcomes: list[tuple[Outcome, Copy | None]] = []
        for entry, src, _ in mine:
            if src is None:  # verification of an adopted memory copy
                held = entry.copies[top.name]
                view = top.view(entry.ns.tenant, int(held.location), held.length)
                outcomes.append((Outcome.OK if copy_intact(held, view) else Outcome.CORRUPT,
                                 None))  # fmt: skip
            else:
                outcomes.append((next(futures).result(), next(made).result))
        with self.cond:
            for (entry, src, staging), (outcome, copy) in zip(mine, outcomes):
                self._finish_load(entry, src, staging, outcome, copy)
            # A copy that failed its check is gone now; a block with another copy is read
            # from that one in this same call (each round drops a copy, so this ends).
            again = [e for (e, _, _), (outcome, _) in zip(mine, outcomes)
                     if outcome is Outcome.CORRUPT and promote and not e.deleted
                     and e.copies and top.name not in e.copies]  # fmt: skip
        for fut in theirs:
            fut.result()
        if again:
            self.make_resident(again, promote=promote)

    def _finish_load(
        self, entry: BlockEntry, src: Copy | None, staging: int | None, outcome: Outcome,
        made: Copy | None = None,
    ) -> None:  # fmt: skip
        svc, top = self.svc, self.top.name
        ok = outcome is Outcome.OK
        changed = False
        if src is None:  # verification of an adopted memory copy
            held = entry.copies.get(top)
            if held is not None and ok:
                held.verified = True
            elif held is not None and outcome is Outcome.CORRUPT:  # not a check undone
                self.dir.drop_copy(entry, held)
                changed = True
        elif ok and not entry.deleted:
            # The copy the move made: the source's bytes, or decoded from an encoded copy.
            assert made is not None
            self.dir.add_copy(entry, made)
            svc.counters.promotions += 1
            changed = True
        else:
            self.top.release(entry.ns.tenant, int(staging or 0), entry.nbytes)
            if outcome is Outcome.CORRUPT and entry.copies.get(src.tier) is src:
                self.dir.drop_copy(entry, src)
                svc.counters.tier(src.tier).misses += 1
                changed = True
            elif outcome is Outcome.UNREACHABLE:
                svc.counters.tier(src.tier).misses += 1
        if outcome is Outcome.CORRUPT:
            svc.counters.corrupt_reads += 1
            log.warning("block %s failed its checksum; dropped that copy", entry.key.hex())
        try:
            if changed:
                self.dir.record_copies(entry)
        finally:
            # Whatever happened, whoever waits on this load is woken.
            fut, entry.loading = entry.loading, None
            if fut is not None:
                fut.set_result(ok)
            self.cond.notify_all()

    # -- the background pass --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._pass()
            except _Stopped:
                return
            except Exception:  # keep the thread (and the daemon) alive: blocks stay put
                log.exception("placement pass failed")
                with self.cond:
                    self._passes += 1
                    self.cond.notify_all()
                    if not self._stop:
                        self.cond.wait(IDLE_SECONDS)

    def _pass(self) -> None:
        self.dir.log.commit_all()  # where copies went, recorded at least once a pass
        self.svc.reap()
        with self.cond:
            if self._stop:
                raise _Stopped
            dest, writes = self._plan_demotion()
            if not writes:
                self._passes += 1
                self.cond.notify_all()
                if self._wanted == 0 or self._last_pass_freed == 0:
                    self.cond.wait(IDLE_SECONDS)
                return
        assert dest is not None
        self._demote(dest, writes)

    def _top_goal(self) -> int:
        """Bytes to move out of the memory tier now (0 when occupancy is fine and nobody
        waits)."""
        top = self.top
        spec = self._spec(top)
        used = top.used_bytes
        # A tenant waiting at its quota needs its own blocks moved: the fair order puts an
        # over-quota tenant first, so asking for that many bytes moves its blocks.
        quota_need = sum(
            want - (tc.quota(top.name) if (tc := self.svc.config.tenant(t)) else 0)
            for t, want in self._over_quota.items()
        )
        if used <= top.capacity * spec.high_watermark and self._wanted == 0 and not quota_need:
            return 0
        return max(0, int(used - top.capacity * spec.low_watermark) + self._wanted, quota_need)

    def _plan_demotion(self) -> tuple[Tier | None, list[tuple[BlockEntry, Location]]]:
        """Under the lock: free memory copies that have a copy further down now, reserve
        space below for the rest."""
        svc, top = self.svc, self.top
        self._last_pass_freed = 0
        goal = self._top_goal()
        if goal == 0:
            return None, []
        # Pinned blocks are demoted like any other, never dropped.
        victims = self.dir.victims(top.name, goal, include_pinned=True)
        dest = svc.tiers.below(top.name)
        # Clean ones (a slower tier already has their bytes) just drop the memory copy,
        # once that is on record.
        clean = [e for e in victims if len(e.copies) > 1]
        self.dir.log.add(plan_set_copies((e.ns.id, e.key, _rows_without(e, top.name))
                                         for e in clean))  # fmt: skip
        dirty = [e for e in victims if len(e.copies) == 1]
        for entry in clean:
            self.dir.drop_copy(entry, entry.copies[top.name])
            svc.counters.demotions += 1
            self._last_pass_freed += entry.nbytes
        writes: list[tuple[BlockEntry, Location]] = []
        for entry in dirty:
            if dest is None or (not entry.pinned and not self._admits(dest, entry)):
                if not entry.pinned:  # nowhere below takes it: it leaves the cache
                    self._evict(entry, top)
                    self._last_pass_freed += entry.nbytes
                continue
            loc = self.allocate_in(dest, entry.ns.tenant, svc.transfer.stored_bytes(dest, entry))
            if loc is None:
                if not entry.pinned:  # nowhere to demote: evict it from the cache
                    self._evict(entry, top)
                    self._last_pass_freed += entry.nbytes
                continue
            self.dir.claim(entry)
            writes.append((entry, loc))
        if clean:
            self.cond.notify_all()
        return dest, writes

    def _admits(self, dest: Tier, entry: BlockEntry) -> bool:
        """Whether `dest`'s admission filter takes a demoted block; a filter that weighs it
        against the block it would displace (TinyLFU) is shown that one when `dest` is
        full."""
        gate = self.svc.policies[dest.name]
        victim = None
        if gate.wants_victim and dest.used_bytes + entry.nbytes > dest.capacity:
            first = self.dir.victims(dest.name, entry.nbytes)
            victim = first[0] if first else None
        return gate.admit(entry, victim)

    def _demote(self, dest: Tier, writes: list[tuple[BlockEntry, Location]]) -> None:
        """Write memory copies down (outside the lock), then record and free them."""
        svc, top = self.svc, self.top
        moves = [Move(e, e.copies[top.name], dest, loc) for e, loc in writes]
        stamped = [e.layer_sums is None for e, _ in writes]
        outcomes = [f.result() for f in svc.transfer.copy_many(moves)]
        bad: list[tuple[BlockEntry, Copy]] = []
        done: list[tuple[BlockEntry, Copy, bool]] = []  # (entry, new copy, memory copy kept)
        with self.cond:
            for (entry, loc), outcome, move in zip(writes, outcomes, moves):
                # A block being deleted (out of the index) is not recorded: its key may
                # be another block's by now.
                if outcome is Outcome.OK and not entry.deleted and self.dir.index.holds(entry):
                    assert move.result is not None
                    done.append((entry, move.result, entry.readers > 0))
                    continue  # still claimed until its new copy is on record
                self.dir.unclaim(entry)
                dest.release(entry.ns.tenant, loc, svc.transfer.stored_bytes(dest, entry))
                if outcome is Outcome.CORRUPT:
                    bad.append((entry, move.src))
                elif outcome is Outcome.UNREACHABLE:
                    log.error("writing a block to %s failed during demotion", dest.name)
            rows = []
            for entry, copy, keep_top in done:
                keep = [c for c in entry.copies.values() if c.tier != top.name or keep_top]
                rows.append((entry.ns.id, entry.key, copy_rows([*keep, copy])))
            sums = [(e.ns.id, e.key, e.checksum, e.layer_sums)
                    for (e, _), fresh in zip(writes, stamped)
                    if fresh and e.layer_sums is not None]  # fmt: skip
            ticket = self.dir.log.add(plan_set_copies(rows) + plan_set_layer_sums(sums))
        # On record before memory changes, committed without the lock: a catalog that
        # cannot take the rows (its disk is full) leaves every block where it was.
        try:
            self.dir.log.commit(ticket)
            recorded = True
        except Exception as exc:  # noqa: BLE001 - the blocks stay; the pass goes on
            log.error("demotion not recorded, blocks stay in %s: %s", top.name, exc)
            recorded = False
        with self.cond:
            for entry, copy, keep_top in done:
                if not recorded or entry.deleted:
                    dest.release(entry.ns.tenant, copy.location, copy.length)
                    self.dir.unclaim(entry)
                    continue
                self.dir.add_copy(entry, copy)
                held = entry.copies.get(top.name)
                if entry.readers == 0 and held is not None:
                    self.dir.drop_copy(entry, held)
                    svc.counters.demotions += 1
                    self._last_pass_freed += entry.nbytes
                if (top.name in entry.copies) != keep_top:  # readers came or went meanwhile
                    self.dir.record_copies(entry)
                self.dir.unclaim(entry)
            self._passes += 1
            self.cond.notify_all()
        for entry, src in bad:  # the memory copy is not what was stored: drop it, never spread it
            self.dir.drop_corrupt_copy(entry, src.tier, src.location)

    # -- space in slower tiers --------------------------------------------------------------

    def allocate_in(self, tier: Tier, tenant: str, nbytes: int) -> Location | None:
        """Room for a block in `tier`, evicting its lowest-ranked copies if it is full.
        Caller holds the lock."""
        loc = tier.reserve(tenant, nbytes)
        if loc is not None or not tier.available():
            return loc  # evicting from a tier that is down would only lose its copies
        # Evict a batch (a few percent of the tier) so each eviction pass amortises the sort.
        goal = max(nbytes, tier.capacity // 32)
        for entry in self.dir.victims(tier.name, goal):
            self._evict(entry, tier)
        return tier.reserve(tenant, nbytes)

    def _evict(self, entry: BlockEntry, tier: Tier) -> None:
        """Drop the block's copy in `tier`; a block left with no copy leaves the cache."""
        self.dir.evict(entry, tier.name)



def _rows_without(entry: BlockEntry, tier: str) -> tuple[CopyRow, ...]:
    return copy_rows(c for c in entry.copies.values() if c.tier != tier)
