"""The prefix directory: which daemon of the group holds which blocks, kept with an expiry
in a cluster the daemons share, so a lookup asks the peer that holds its prefix first.

Primitives: `HolderBook` (the store side: `available()`, `record(holder, held, gone,
ttl_ms)`, `holders(ns, keys) -> [{address: expiry in unix ms}]`); `Holders(book, holder,
ttl_ms, local)`: `added(entries)`, `dropped(entry, copy)` (the core directory's watcher)
and `touched(entry, now)` (a lookup's hit), none of which blocks (callers hold the core
lock); `advise(ns, keys, peers) -> Advice` (one batch); `snapshot()`, `close()`.

What is recorded. A daemon with an address (`[peers] listen`, or `advertise`) records
"<address> holds <block>" for each block it commits to its memory tier (a put, a pull, a
sealed tail), valid for `ttl_ms`; a lookup that hits a block renews its entry once a
third of the TTL has passed since the last write, and a block that leaves the daemon's
own tiers (evicted or deleted; a copy left only in a shared tier does not count) has its
entry removed. A block the daemon keeps but nobody looks up expires from the directory:
an entry says "held recently", never more.

Off the request path: the calls above only queue (at most `QUEUE` entries); one thread
writes what is queued in batches of up to `BATCH`, one pipeline each. A full queue, a
cluster that is down or a batch that fails drops those entries, counted in
`writes_dropped`: a missing entry only means a lookup asks peers in configured order.

Advice, not authority: `advise` names only peers the caller passes (its `[peers]
peers`); an address the directory names that is not one of them is ignored, and the
bytes a peer then lends are checked as any pull's are. Entries live under the tenant's
and namespace's keys (the store decides how), so one tenant's lookups never name or
read another tenant's entries.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.tiers.base import Copy

log = logging.getLogger("tierd.peers")

QUEUE = 65_536  # entries waiting to be written; beyond, they are dropped
BATCH = 1024  # entries one pipeline writes
REFRESH_SHARE = 3  # an entry is renewed once 1/REFRESH_SHARE of its TTL has passed


class HolderBook(Protocol):
    """Where the entries live. Every call has a deadline and raises on any failure."""

    name: str  # what the operator configured (the tier's name)

    def available(self) -> bool: ...

    def record(self, holder: str, held: Sequence[tuple[NamespaceInfo, bytes]],
               gone: Sequence[tuple[NamespaceInfo, bytes]], ttl_ms: int) -> None: ...  # fmt: skip

    def holders(self, ns: NamespaceInfo, keys: Sequence[bytes]) -> list[dict[str, int]]: ...


@dataclass
class DirectoryCounters:
    tier_name: str
    available: bool = False
    hits: int = 0  # lookups it named a configured peer for
    misses: int = 0  # lookups it was asked and named none
    writes: int = 0
    writes_dropped: int = 0
    errors: int = 0


@dataclass(frozen=True)
class Advice:
    """Configured peers the directory names as holding a run of the asked keys from the
    first, longest run first: (address, blocks)."""

    runs: tuple[tuple[str, int], ...] = ()


class Holders:
    def __init__(self, book: HolderBook, holder: str, ttl_ms: int, local: Collection[str]) -> None:
        self.book = book
        self.holder = holder  # this daemon's address; "": it only reads the directory
        self.ttl_ms = ttl_ms
        self._refresh_s = ttl_ms / 1000 / REFRESH_SHARE
        self._local = frozenset(local)  # its own tiers (not shared ones)
        self._cond = threading.Condition()
        self._queue: deque[tuple[bool, BlockEntry]] = deque()  # (held?, block)
        self._closed = False
        self.counters = DirectoryCounters(book.name)
        self._thread = threading.Thread(target=self._run, name="tierd-holders", daemon=True)
        if holder:
            self._thread.start()

    # -- what the core tells it (callers hold the core lock: only queues) ------------------

    def added(self, entries: Sequence[BlockEntry]) -> None:
        """Blocks committed to the memory tier."""
        if self.holder and entries:
            now = time.time()
            for entry in entries:
                entry.advertised = now
            self._put([(True, e) for e in entries])

    def touched(self, entry: BlockEntry, now: float) -> None:
        """A lookup hit `entry`: renew its entry if it is getting old (only while a copy is
        in the daemon's own tiers: one left only in a shared tier is not held here)."""
        if (self.holder and now - entry.advertised >= self._refresh_s
                and any(t in self._local for t in entry.copies)):  # fmt: skip
            entry.advertised = now
            self._put([(True, entry)])

    def dropped(self, entry: BlockEntry, copy: Copy) -> None:
        """`copy` is gone; once no copy is left in the daemon's own tiers, neither is its
        entry (even one this run never advertised: it may have been before a restart)."""
        if (not self.holder or copy.tier not in self._local
                or any(t in self._local for t in entry.copies)):  # fmt: skip
            return
        entry.advertised = 0.0
        self._put([(False, entry)])

    def _put(self, items: list[tuple[bool, BlockEntry]]) -> None:
        with self._cond:
            room = QUEUE - len(self._queue)
            if len(items) > room:
                self.counters.writes_dropped += len(items) - max(room, 0)
                items = items[: max(room, 0)]
            if items:
                self._queue.extend(items)
                self._cond.notify()

    # -- the writer ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            last = {(e.ns.id, e.key): (is_held, e) for is_held, e in batch}
            held = [(e.ns, e.key) for is_held, e in last.values() if is_held]
            # A copy replaced in place (dropped, then added) left the block here after all.
            gone = [(e.ns, e.key) for is_held, e in last.values()
                    if not is_held and not self._holds(e)]  # fmt: skip
            ok = self.book.available()
            if ok and (held or gone):
                try:
                    self.book.record(self.holder, held, gone, self.ttl_ms)
                except Exception as e:  # noqa: BLE001 - dropped and counted, never an error
                    ok = False
                    log.debug("prefix directory: writing %d entries failed: %s", len(batch), e)
                    with self._cond:
                        self.counters.errors += 1
            with self._cond:
                if ok:
                    self.counters.writes += len(batch)
                else:
                    self.counters.writes_dropped += len(batch)

    def _holds(self, entry: BlockEntry) -> bool:
        """Whether the block still has a copy in this daemon's own tiers (read without the
        core lock: a snapshot of its copies, as attend reads them)."""
        return not entry.deleted and any(t in self._local for t in tuple(entry.copies))

    # -- lookups -------------------------------------------------------------------------

    def advise(self, ns: NamespaceInfo, keys: Sequence[bytes], peers: Sequence[str]) -> Advice:
        """Which of `peers` hold a run of `keys` from the first, by the directory (one
        batch; nothing when the cluster is down or the call fails)."""
        if not keys or not peers or not self.book.available():
            return Advice()
        try:
            entries = self.book.holders(ns, keys)
        except Exception as e:  # noqa: BLE001 - advice lost: peers are asked in order
            log.debug("prefix directory: asking about %d keys failed: %s", len(keys), e)
            with self._cond:
                self.counters.errors += 1
            return Advice()
        now_ms = time.time() * 1000
        runs: dict[str, int] = {}
        live = set(peers)
        for i, held in enumerate(entries):
            live &= {addr for addr, expiry in held.items() if expiry > now_ms}
            if not live:
                break
            for addr in live:
                runs[addr] = i + 1
        order = {addr: i for i, addr in enumerate(peers)}
        advice = Advice(tuple(sorted(runs.items(), key=lambda r: (-r[1], order[r[0]]))))
        with self._cond:
            if advice.runs:
                self.counters.hits += 1
            else:
                self.counters.misses += 1
        return advice

    # -- lifecycle -------------------------------------------------------------------------

    def snapshot(self) -> DirectoryCounters:
        with self._cond:
            return replace(self.counters, available=self.book.available())

    def close(self) -> None:
        """Stop writing (what is still queued is left to expire)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
