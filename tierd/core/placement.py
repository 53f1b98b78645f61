"""Placement: where blocks live. Demotion host -> NVMe, promotion NVMe -> host, eviction.

Primitives: `Placer(service)`, `start()`, `stop()`, `kick()`,
`allocate_host(tenant, n)` (caller holds the core lock), `make_resident(entries)` (caller
holds reader references, not the lock).

Writes land in host. A background thread keeps host occupancy under the high watermark by
demoting the blocks the eviction policy ranks lowest until occupancy is under the low
watermark; a block that already has an NVMe copy (it was promoted earlier) just drops its
host copy. NVMe makes room by evicting its lowest-ranked blocks. Pinned blocks are never
evicted, only moved; blocks with readers, or already moving, are never touched.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, wait
from typing import TYPE_CHECKING

from tierd.core.fairness import fair_victims, over_quota
from tierd.core.index import BlockEntry
from tierd.core.nvme_headers import nvme_header
from tierd.errors import ResourceExhausted
from tierd.tiers.checksum import checksum, layer_checksums

if TYPE_CHECKING:
    from tierd.core.service import CacheService

log = logging.getLogger("tierd.placement")

# How long a put waits for demotion to make room before answering RESOURCE_EXHAUSTED.
ROOM_WAIT_SECONDS = 10.0
# Idle period of the placement thread; it is woken early whenever work appears.
IDLE_SECONDS = 0.25


class _Stopped(Exception):
    """The placement thread was asked to stop."""


def host_copy_intact(entry: BlockEntry, view: memoryview) -> bool:
    """Check a host copy about to be written to another tier against its checksum, and
    give the entry its per-layer checksums from it if it has none yet.

    One pass over bytes in memory (~18 GB/s), next to a disk write: a copy adopted after a
    restart may be stale, and writing it out (or taking per-layer sums from it, which
    would then vouch for the damage) would spread it."""
    if checksum(view) != entry.checksum:
        return False
    if entry.layer_sums is None:
        entry.layer_sums = layer_checksums(view, entry.ns.layout.num_layers)
    return True


class Placer:
    def __init__(self, service: CacheService) -> None:
        self.svc = service
        self.cond = service.cond
        self._wanted = 0  # bytes that callers are waiting for in host
        self._passes = 0
        self._last_pass_freed = 0
        self._over_quota: dict[str, int] = {}  # tenant -> host bytes it is waiting to reach
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
        """Wait until host is under its watermarks and nothing is moving (drain, tests)."""
        with self.cond:
            self.cond.notify_all()
            return self.cond.wait_for(
                lambda: self._host_goal() == 0 and not self._any_moving(), timeout
            )

    def flush(self, deadline: float) -> int:
        """Write every host-only block to NVMe (SIGTERM with flush_on_stop), so a machine
        reboot, which empties /dev/shm, loses nothing. Returns the blocks written."""
        written = 0
        while time.monotonic() < deadline:
            with self.cond:
                batch, total = [], 0
                for entry in self.svc.index.entries():
                    if entry.host_off is not None and entry.nvme_off is None and entry.movable:
                        offset = self.allocate_nvme(entry.nbytes)
                        if offset is None:
                            break
                        entry.moving = True
                        batch.append((entry, offset))
                        total += entry.nbytes
                        if total >= 256 << 20:
                            break
            if not batch:
                break
            self._demote(batch)
            written += len(batch)
        return written

    def kick(self) -> None:
        """Wake the thread if host is above its high watermark (caller holds the lock)."""
        host = self.svc.host
        if host.used_bytes > host.capacity * self.svc.config.host.high_watermark:
            self.cond.notify_all()

    # -- host space -----------------------------------------------------------------------

    def allocate_host(self, tenant: str, nbytes: int) -> int | None:
        """A host extent, waiting for demotion if host is full; None if nothing can move."""
        deadline = time.monotonic() + ROOM_WAIT_SECONDS
        while True:
            offset = None
            usage = self.svc.host.segment(tenant).alloc.used_bytes
            within_quota = not over_quota(self.svc.config, tenant, "host", usage + nbytes)
            if within_quota:
                offset = self.svc.host.allocate(tenant, nbytes)
            else:
                self._over_quota[tenant] = usage + nbytes
            if offset is not None or time.monotonic() >= deadline or self._stop:
                self._over_quota.pop(tenant, None)
                return offset
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
                return self.svc.host.allocate(tenant, nbytes)  # a pass could free nothing

    def _any_moving(self) -> bool:
        return any(e.moving for e in self.svc.index.entries())

    def make_resident(self, entries: list[BlockEntry], *, promote: bool = True) -> None:
        """Bring NVMe-only blocks into host and verify host copies adopted after a restart.

        With promote=False only the verification happens (attend reads NVMe in place).

        Blocks whose bytes fail their checksum lose that copy (a counted corrupt read);
        the caller then sees them without a host copy and reports a miss.
        """
        mine: list[tuple[BlockEntry, int | None]] = []  # (entry, staging host offset)
        theirs: list[Future[bool]] = []
        with self.cond:
            for entry in entries:
                if entry.loading is not None:
                    theirs.append(entry.loading)
                elif promote and entry.host_off is None and (
                    entry.nvme_off is not None or entry.csd is not None
                ):
                    staging = self.allocate_host(entry.ns.tenant, entry.nbytes)
                    if staging is None:
                        for e, off in mine:  # undo what this call started
                            self._finish_load(e, off, ok=False, corrupt=False)
                        raise ResourceExhausted(
                            "host tier full: cannot stage blocks from NVMe", field="keys"
                        )
                    entry.loading = Future()
                    mine.append((entry, staging))
                elif entry.host_off is not None and not entry.host_verified:
                    entry.loading = Future()
                    mine.append((entry, None))
        results = [self._load(entry, staging) for entry, staging in mine]
        oks = [f.result() for f in results]
        with self.cond:
            for (entry, staging), ok in zip(mine, oks):
                self._finish_load(entry, staging, ok=bool(ok), corrupt=ok is False)
        for fut in theirs:
            fut.result()

    def _load(self, entry: BlockEntry, staging: int | None) -> Future[bool | None]:
        """Read (or just check) a block's bytes; resolves True when the checksum matches,
        None when the copy could not be reached (it stays; the caller sees a miss)."""
        svc = self.svc
        done: Future[bool | None] = Future()
        if staging is None:
            view = svc.host.view(entry.ns.tenant, entry.host_off or 0, entry.nbytes)
            done.set_result(checksum(view) == entry.checksum)
            return done
        view = svc.host.view(entry.ns.tenant, staging, entry.nbytes)
        if entry.nvme_off is None:  # only a CSD worker has it
            try:
                data = svc.csd.read(entry.csd, entry.ns.id, [entry.key]).get(entry.key)
            except Exception as e:  # noqa: BLE001 - a dead worker is a miss, not a crash
                # Unreachable is not corrupt: the worker's copy may be intact and back soon.
                log.warning("reading a block from CSD worker %s failed: %s", entry.csd, e)
                done.set_result(None)
                return done
            ok = data is not None and len(data) == entry.nbytes
            if ok:
                view[:] = data
            done.set_result(ok and checksum(view) == entry.checksum)
            return done
        io = svc.nvme.read_async(entry.nvme_off or 0, view)

        def verify(f: Future[None]) -> None:
            try:
                f.result()
                done.set_result(checksum(view) == entry.checksum)
            except OSError as e:
                log.error("NVMe read of a block failed: %s", e)
                done.set_result(False)

        io.add_done_callback(verify)
        return done

    def _finish_load(self, entry: BlockEntry, staging: int | None, *, ok: bool, corrupt: bool) -> None:
        svc = self.svc
        moved = False
        if staging is None:  # verification of an adopted host copy
            if ok:
                entry.host_verified = True
            else:
                svc.host.free(entry.ns.tenant, entry.host_off or 0, entry.nbytes)
                entry.host_off = None
                moved = True
        elif ok and not entry.deleted:
            entry.host_off = staging
            entry.host_verified = True
            svc.counters.promotions += 1
            svc.policies["host"].on_insert(entry)
            moved = True
        else:
            svc.host.free(entry.ns.tenant, staging, entry.nbytes)
            if corrupt and entry.nvme_off is not None:
                svc.nvme.free(entry.nvme_off, entry.nbytes)
                entry.nvme_off = None
                moved = True
        if corrupt:
            svc.counters.corrupt_reads += 1
            log.warning("block failed its checksum; dropped that copy")
        try:
            if moved:
                svc.record_copies(entry)
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
        self.svc.reap()
        with self.cond:
            if self._stop:
                raise _Stopped
            writes = self._plan_demotion()
            if not writes:
                self._passes += 1
                self.cond.notify_all()
                if self._wanted == 0 or self._last_pass_freed == 0:
                    self.cond.wait(IDLE_SECONDS)
                return
        self._demote(writes)

    def _host_goal(self) -> int:
        """Bytes to move out of host now (0 when occupancy is fine and nobody waits)."""
        host, cfg = self.svc.host, self.svc.config.host
        used = host.used_bytes
        # A tenant waiting at its quota needs its own blocks moved: the fair order puts an
        # over-quota tenant first, so asking for that many bytes moves its blocks.
        quota_need = sum(
            want - (tc.host_quota if (tc := self.svc.config.tenant(t)) else 0)
            for t, want in self._over_quota.items()
        )
        if used <= host.capacity * cfg.high_watermark and self._wanted == 0 and not quota_need:
            return 0
        return max(0, int(used - host.capacity * cfg.low_watermark) + self._wanted, quota_need)

    def _tier_usage(self, tier: str) -> dict[str, int]:
        usage: dict[str, int] = {}
        if tier == "host":
            for seg in self.svc.host.segments():
                usage[seg.tenant] = seg.alloc.used_bytes
            return usage
        for e in self.svc.index.entries():
            if e.nvme_off is not None:
                usage[e.ns.tenant] = usage.get(e.ns.tenant, 0) + e.nbytes
        return usage

    def _host_victims(self, goal: int) -> list[BlockEntry]:
        candidates = [e for e in self.svc.index.entries() if e.host_off is not None and e.movable]
        order = fair_victims(candidates, self._tier_usage("host"), self.svc.config,
                             self.svc.policies["host"].victims, "host")  # fmt: skip
        picked, total = [], 0
        while total < goal and (entry := next(order, None)) is not None:
            picked.append(entry)
            total += entry.nbytes
        return picked

    def _plan_demotion(self) -> list[tuple[BlockEntry, int]]:
        """Under the lock: free clean host copies now, reserve NVMe space for the rest."""
        svc = self.svc
        self._last_pass_freed = 0
        goal = self._host_goal()
        if goal == 0:
            return []
        writes: list[tuple[BlockEntry, int]] = []
        victims = self._host_victims(goal)
        # Clean ones (NVMe already has their bytes) just drop the host copy, once that is
        # on record.
        clean = [e for e in victims if e.nvme_off is not None]
        svc.catalog.update_locations([(e.ns.id, e.key, None, e.nvme_off) for e in clean])
        for entry in clean:
            svc.host.free(entry.ns.tenant, entry.host_off or 0, entry.nbytes)
            entry.host_off = None
            svc.policies["host"].on_evict(entry)
            svc.counters.demotions += 1
            self._last_pass_freed += entry.nbytes
        for entry in victims:
            if entry.nvme_off is not None:
                continue
            if not entry.pinned and not svc.policies["nvme"].admit(entry):
                self._evict(entry, tier="host")  # the slower tier's filter turned it away
                self._last_pass_freed += entry.nbytes
                continue
            offset = self.allocate_nvme(entry.nbytes)
            if offset is None:
                if not entry.pinned:  # nowhere to demote: evict it from the cache
                    self._evict(entry, tier="host")
                    self._last_pass_freed += entry.nbytes
                continue
            entry.moving = True
            writes.append((entry, offset))
        if clean:
            self.cond.notify_all()
        return writes

    def _demote(self, writes: list[tuple[BlockEntry, int]]) -> None:
        svc = self.svc
        futures: list[Future[None] | None] = []
        for e, offset in writes:
            view = svc.host.view(e.ns.tenant, e.host_off or 0, e.nbytes)
            ok = host_copy_intact(e, view)
            futures.append(svc.nvme.write_async(offset, view, header=nvme_header(e)) if ok
                           else None)  # fmt: skip
        wait([f for f in futures if f is not None])
        stamped = [e for (e, _), f in zip(writes, futures) if f is not None]
        bad: list[BlockEntry] = []
        with self.cond:
            done: list[tuple[BlockEntry, int]] = []
            for (entry, offset), fut in zip(writes, futures):
                entry.moving = False
                if fut is None:
                    svc.nvme.free(offset, entry.nbytes)
                    bad.append(entry)
                elif fut.exception() is not None:
                    log.error("NVMe write failed during demotion: %s", fut.exception())
                    svc.nvme.free(offset, entry.nbytes)
                elif entry.deleted:
                    svc.nvme.free(offset, entry.nbytes)
                    if entry.idle:
                        svc.free_space(entry)
                else:
                    done.append((entry, offset))
            # On record before memory changes: a catalog that cannot take the rows (its
            # disk is full) leaves every block where it was, in host.
            try:
                rows = [(e.ns.id, e.key, e.host_off if e.readers else None, offset)
                        for e, offset in done]  # fmt: skip
                svc.catalog.update_locations(rows)
                svc.catalog.set_layer_sums(
                    (e.ns.id, e.key, e.layer_sums) for e in stamped if e.layer_sums is not None
                )
            except ResourceExhausted as exc:
                log.error("demotion not recorded, blocks stay in host: %s", exc)
                for entry, offset in done:
                    svc.nvme.free(offset, entry.nbytes)
                done = []
            for entry, offset in done:
                entry.nvme_off = offset
                svc.policies["nvme"].on_insert(entry)
                svc.counters.nvme.bytes_written += entry.nbytes
                if entry.readers == 0 and entry.host_off is not None:
                    svc.host.free(entry.ns.tenant, entry.host_off, entry.nbytes)
                    entry.host_off = None
                    svc.policies["host"].on_evict(entry)
                    svc.counters.demotions += 1
                    self._last_pass_freed += entry.nbytes
            self._passes += 1
            self.cond.notify_all()
        for entry in bad:  # the host copy is not what was stored: drop it, never spread it
            svc.drop_corrupt_copy(entry, "host", entry.host_off or 0)

    # -- NVMe space -----------------------------------------------------------------------

    def allocate_nvme(self, nbytes: int) -> int | None:
        nvme = self.svc.nvme
        offset = nvme.allocate(nbytes)
        if offset is not None:
            return offset
        # Evict a batch (a few percent of the tier) so each eviction pass amortises the sort.
        goal = max(nbytes, nvme.capacity // 32)
        candidates = [
            e for e in self.svc.index.entries()
            if e.nvme_off is not None and e.movable and not (e.pinned and e.host_off is None)
        ]  # fmt: skip
        order = fair_victims(candidates, self._tier_usage("nvme"), self.svc.config,
                             self.svc.policies["nvme"].victims, "nvme")  # fmt: skip
        freed = 0
        while freed < goal and (entry := next(order, None)) is not None:
            freed += entry.nbytes
            self._evict(entry, tier="nvme")
        return nvme.allocate(nbytes)

    def _evict(self, entry: BlockEntry, *, tier: str) -> None:
        """Drop one copy; a block left with no copy leaves the cache."""
        svc = self.svc
        svc.counters.tier(tier).evictions += 1
        # Only the NVMe copy leaves when a host copy stays; otherwise the whole block does.
        leaving = [tier] if tier == "nvme" and entry.host_off is not None else list(svc.policies)
        for name in leaving:
            svc.policies[name].on_evict(entry)
        if tier == "nvme" and entry.host_off is not None:
            svc.nvme.free(entry.nvme_off or 0, entry.nbytes)
            entry.nvme_off = None
            svc.catalog.update_locations([(entry.ns.id, entry.key, entry.host_off, None)])
            return
        svc.index.remove(entry)
        entry.deleted = True
        svc.free_space(entry)
        svc.catalog.delete_blocks([(entry.ns.id, entry.key)])
