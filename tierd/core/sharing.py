"""Tiers other daemons share, as the core sees them: blocks found at lookup, copies written
through, and promotions started before a client asks.

Primitives: `Sharing(service)`, `find(ns, keys, depth, now) -> (found, missed)` (caller
holds no lock), `write_through(entries)` (caller holds the lock), `start()`, `stop()`.

A lookup whose prefix ends locally asks each available `shared` tier about the keys that
follow, in a few growing batches (at most `PROBE_KEYS` keys, one call per batch). Keys found there continue the prefix:
each becomes a new entry whose one copy is the shared tier's ("found": space this daemon
accounts for but did not write), with the checksums the copy's header vouches for, and
is promoted into the memory tier in the background, so a get that follows usually finds
it there (or waits for that promotion, which every tier bounds). This is how a daemon
finds what another one wrote.

A `write_through` tier gets a copy of every committed block, written by one thread from a
bounded queue, so other daemons can find a block as soon as it is committed rather than
when memory demotes it; the memory copy stays (a later demotion just drops it). Nothing
here names a kind: tiers say what they are by `shared` and `write_through`.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import TYPE_CHECKING

from tierd.core.catalog import plan_set_layer_sums
from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.tiers.base import Copy, Found, Location, Tier
from tierd.transfer.engine import Move, Outcome

if TYPE_CHECKING:
    from tierd.core.service import CacheService

log = logging.getLogger("tierd.core")

PROBE_KEYS = 1024  # keys past the local prefix one lookup asks a shared tier about
PROBE_FIRST = 32  # ...in batches of this many, then four times as many each
THROUGH_QUEUE = 4096  # blocks waiting for a write-through copy; beyond, they get none
THROUGH_PASS_BYTES = 64 << 20  # written per round, so the queue's head is never starved
PROMOTE_SHARE = 4  # background promotions hold at most 1/PROMOTE_SHARE of memory


class Sharing:
    def __init__(self, service: CacheService) -> None:
        self.svc = service
        below = service.tiers.chain[1:]
        self.shared = [t for t in below if t.shared]
        self.through = [t for t in below if t.write_through]
        self._cond = threading.Condition()
        self._queue: deque[BlockEntry] = deque()
        self._stop = False
        self.through_dropped = 0  # blocks the full queue turned away
        self._thread = (threading.Thread(target=self._run, name="tierd-through", daemon=True)
                        if self.through else None)  # fmt: skip
        self._promoter = (ThreadPoolExecutor(1, thread_name_prefix="tierd-promote")
                          if self.shared else None)  # fmt: skip
        self._promoting = 0  # bytes of background promotions under way

    def start(self) -> None:
        if self._thread is not None:
            self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join()
        if self._promoter is not None:
            self._promoter.shutdown(wait=True, cancel_futures=True)

    # -- lookup ------------------------------------------------------------------------

    def find(
        self, ns: NamespaceInfo, keys: Iterator[bytes], depth: int, now: float
    ) -> tuple[list[tuple[bytes, str]], bool]:
        """Continue a prefix from shared tiers: (key, tier) of each block, in order, and
        whether it ended short of the tokens (a miss, or the probe's bound).

        The keys are asked in batches that grow (PROBE_FIRST, then four times as many, at
        most PROBE_KEYS in all): a lookup that misses at once costs one small call, a long
        prefix a few."""
        tiers = [t for t in self.shared if t.available()]
        if not tiers:
            return [], True
        out: list[tuple[bytes, str]] = []
        size, asked, missed = PROBE_FIRST, 0, False
        while not missed and asked < PROBE_KEYS:
            batch = list(islice(keys, min(size, PROBE_KEYS - asked)))
            if not batch:
                return out, False
            asked, size = asked + len(batch), 4 * size
            answers = [(t, t.find(ns, batch)) for t in tiers]  # each bounded by its tier
            missed = self._continue(ns, batch, answers, depth, now, out)
        return out, missed or next(keys, None) is not None

    def _continue(self, ns: NamespaceInfo, batch: list[bytes],
                  answers: list[tuple[Tier, list[Found | None]]], depth: int, now: float,
                  out: list[tuple[bytes, str]]) -> bool:  # fmt: skip
        """Extend `out` with the batch's keys, in order, up to the first that neither this
        daemon nor a shared tier holds; True if there was one."""
        svc = self.svc
        adopted: list[BlockEntry] = []
        with svc.cond:
            try:
                for i, key in enumerate(batch):
                    entry = svc.index.get(ns.id, key)
                    if entry is None:
                        entry = self._adopt(ns, key, [(t, got[i]) for t, got in answers], now)
                        if entry is None:
                            return True
                        adopted.append(entry)
                    entry.last_access = now
                    entry.depth = depth + len(out)
                    out.append((key, svc.directory.best_name(entry)))
                return False
            finally:
                self._promote_later(adopted)

    def _adopt(self, ns: NamespaceInfo, key: bytes, answers: list[tuple[Tier, Found | None]],
               now: float) -> BlockEntry | None:  # fmt: skip
        """A new entry for a block a shared tier holds (caller holds the lock), or None:
        not found, being put here now, or no room in this daemon's budget there."""
        svc = self.svc
        hit = next(((t, f) for t, f in answers if f is not None), None)
        if hit is None or (ns.id, key) in svc.directory.pending:
            return None
        tier, what = hit
        if tier.used_bytes + what.length > tier.capacity:
            for victim in svc.directory.victims(tier.name, max(what.length, tier.capacity // 32)):
                svc.directory.evict(victim, tier.name)
        if (tier.used_bytes + what.length > tier.capacity
                or not tier.adopt(ns.tenant, what.location, what.length)):  # fmt: skip
            return None
        copy = Copy(tier.name, what.location, what.length, what.checksum)
        if what.encoding != "raw":
            # Codes vouch for themselves; the entry is the block they decode to, whose
            # per-layer sums nobody has yet.
            copy.encoding, copy.layer_sums = what.encoding, what.layer_sums
            what = Found(what.location, what.length, what.block_checksum)
        added = svc.directory.add_found(ns, [(key, what, copy)], now)
        if not added:
            tier.release(ns.tenant, what.location, what.length)
            return None
        return added[0]

    def _promote_later(self, entries: list[BlockEntry]) -> None:
        """Start promoting found blocks into memory (caller holds the lock); held by a
        reader reference until done. Past the bound, a get promotes them itself."""
        svc = self.svc
        if self._promoter is None:
            return
        room = svc.top.capacity // PROMOTE_SHARE - self._promoting
        fits = 0
        while fits < len(entries) and entries[fits].nbytes <= room:
            room -= entries[fits].nbytes
            fits += 1
        entries = entries[:fits]  # the prefix's first blocks: a client reads those first
        nbytes = sum(e.nbytes for e in entries)
        if not entries:
            return
        for entry in entries:
            entry.readers += 1
        self._promoting += nbytes
        try:
            self._promoter.submit(self._promote, entries, nbytes)
        except RuntimeError:  # stopping
            self._promoted(entries, nbytes)

    def _promote(self, entries: list[BlockEntry], nbytes: int) -> None:
        try:
            self.svc.placer.make_resident(entries)
        except Exception as e:  # noqa: BLE001 - a get promotes (or misses) them later
            log.info("promoting blocks found in a shared tier failed: %s", e)
        finally:
            with self.svc.cond:
                self._promoted(entries, nbytes)

    def _promoted(self, entries: list[BlockEntry], nbytes: int) -> None:
        for entry in entries:
            self.svc.drop_reader(entry)
        self._promoting -= nbytes
        self.svc.cond.notify_all()

    # -- write-through -----------------------------------------------------------------

    def write_through(self, entries: list[BlockEntry]) -> None:
        """Queue committed blocks for a copy in each write-through tier."""
        if not self.through or not entries:
            return
        with self._cond:
            room = max(0, THROUGH_QUEUE - len(self._queue))
            self._queue.extend(entries[:room])
            self.through_dropped += len(entries) - len(entries[:room])
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                batch, size = [], 0
                while self._queue and size < THROUGH_PASS_BYTES:
                    batch.append(self._queue.popleft())
                    size += batch[-1].nbytes
            for tier in self.through:
                try:
                    self._copy(tier, batch)
                except Exception:  # keep the thread: those blocks just get no copy there
                    log.exception("writing blocks through to %s failed", tier.name)

    def _copy(self, tier: Tier, batch: list[BlockEntry]) -> None:
        """Write each block's memory copy to `tier`, keeping the memory copy."""
        svc, top = self.svc, self.svc.top.name
        writes: list[tuple[BlockEntry, Location, int]] = []
        with svc.cond:
            for entry in batch:
                if (entry.deleted or entry.moving or tier.name in entry.copies
                        or top not in entry.copies or not svc.index.holds(entry)):  # fmt: skip
                    continue  # gone, demoted, or being written out by someone else
                # Room for the copy as the tier stores it (its codec's size).
                need = svc.transfer.stored_bytes(tier, entry)
                loc = svc.placer.allocate_in(tier, entry.ns.tenant, need)
                if loc is None:
                    continue  # no room (or the tier is down with its queue full)
                svc.directory.claim(entry)
                writes.append((entry, loc, need))
            moves = [Move(e, e.copies[top], tier, loc) for e, loc, _ in writes]
        stamped = [e.layer_sums is None for e, _, _ in writes]
        outcomes = [f.result() for f in svc.transfer.copy_many(moves)]
        bad: list[tuple[BlockEntry, Copy]] = []
        with svc.cond:
            for (entry, loc, need), outcome, move, fresh in zip(writes, outcomes, moves,
                                                                stamped):  # fmt: skip
                if outcome is Outcome.OK and not entry.deleted and svc.index.holds(entry):
                    assert move.result is not None  # what was written (checksum of its bytes)
                    svc.directory.add_copy(entry, move.result)
                    svc.directory.record_copies(entry)
                    if fresh and entry.layer_sums is not None:
                        svc.directory.log.add(
                            plan_set_layer_sums(
                                [(entry.ns.id, entry.key, entry.checksum, entry.layer_sums)]
                            )
                        )
                else:
                    tier.release(entry.ns.tenant, loc, need)
                    if outcome is Outcome.CORRUPT:
                        bad.append((entry, move.src))
                svc.directory.unclaim(entry)
        for entry, src in bad:  # the memory copy is not what was stored: never spread it
            svc.directory.drop_corrupt_copy(entry, src.tier, src.location)
