"""Other tierd daemons, as the core sees them: blocks this daemon lends to a peer's pull,
and blocks it pulls from peers when a lookup's prefix ends here.

Primitives: `Peers(service, engine, links, config, holders=None)`; source side `locate(tenant, ns_id,
keys, ttl_ms) -> Located` (pins a run of blocks in the memory tier and names where they
are in this daemon's transfer engine), `release(tenant, lease_id)`; pulling side
`pull(ns, tokens, depth, now) -> (found, missed, (held_by, held_blocks))` (caller holds
no lock); `snapshot()` (counters per peer), `directory()` (the prefix directory's),
`close()`. `PeerLink` is what a peer is to the core (the server
package implements it over gRPC).

A lookup asks peers after the local tiers and after the shared tiers: a shared tier's
hit costs a probe and its bytes move later, in the background, while a peer's bytes move
during the lookup itself; so peers are asked only for what neither holds. The run of keys
that follows the local prefix is asked in a few growing batches (at most `PULL_KEYS`),
each peer in configured order until one holds the batch's first key. That peer pins the
run for a lease; this daemon reserves room in its own memory tier, reads the bytes with
one-sided reads through the transfer engine straight into that room (never through
Python bytes or a gRPC payload), checks each block's xxh3 checksum, commits the good
ones as its own blocks and releases the peer's lease. Whatever goes wrong with a peer
(down, past its deadline, refusing the secret, bytes that fail their checksum) is a miss
counted against that peer, never an error of the lookup; a peer that failed is skipped
for `retry_ms`.

With a prefix directory (`[peers] directory`, `tierd.core.holders`) this daemon records
the blocks it holds there, and a pull first asks it (one batch, the first batch's keys)
which peers hold the run: those of the configured peers it names are asked first, longest
run first, then the others in configured order. When the named peer's blocks were not
pulled (it failed, or memory had no room), the lookup says which peer holds how many.

The tenant travels with every call and the source checks it against the namespace (whose
id is derived from tenant, model and layout), so a puller never learns of another
tenant's blocks. Pulled blocks carry only their whole-block checksum: per-layer sums are
computed from trusted bytes when a block is first written below memory, as for a put.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from itertools import chain, islice
from typing import TYPE_CHECKING, Protocol

import numpy as np

from tierd.core.holders import DirectoryCounters, Holders
from tierd.core.index import NamespaceInfo
from tierd.peer_config import PeersConfig
from tierd.tiers.base import Copy, MemoryTier
from tierd.tiers.checksum import checksum
from tierd.transfer.p2p import PeerEngine
from tierd_client.keys import iter_block_keys

if TYPE_CHECKING:
    from tierd.core.service import CacheService

log = logging.getLogger("tierd.peers")

PULL_KEYS = 1024  # keys past the local prefix one lookup asks peers about
PULL_FIRST = 32  # ...in batches of this many, then four times as many each


@dataclass(frozen=True)
class RemoteBlock:
    """One pinned block in a peer's memory."""

    address: int  # in the peer's transfer engine
    length: int
    checksum: int
    layer_sums: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Located:
    """A peer's answer: the run of the asked keys it holds (from the first), pinned under
    `lease_id` (0: nothing pinned), in the engine at `engine_address`."""

    lease_id: int
    engine_address: str
    protocol: str
    blocks: list[RemoteBlock]


class PeerLink(Protocol):
    """One peer daemon; every call is bounded by a deadline and raises on any failure."""

    address: str

    def locate(self, tenant: str, ns_id: bytes, keys: list[bytes], ttl_ms: int) -> Located: ...

    def release(self, tenant: str, lease_id: int) -> None: ...

    def close(self) -> None: ...


@dataclass
class PeerCounters:
    address: str
    available: bool = True
    pulls: int = 0  # locate calls that brought blocks
    blocks: int = 0
    bytes: int = 0
    errors: int = 0
    corrupt: int = 0
    asked: int = 0  # locate calls
    directory_hits: int = 0  # lookups the prefix directory sent to it first


class _Peer:
    def __init__(self, link: PeerLink) -> None:
        self.link = link
        self.counters = PeerCounters(link.address)
        self.retry_at = 0.0  # monotonic time before which it is not asked


class Peers:
    def __init__(
        self, service: CacheService, engine: PeerEngine, links: Sequence[PeerLink],
        config: PeersConfig, holders: Holders | None = None,
    ) -> None:  # fmt: skip
        self.svc = service
        self.engine = engine
        self.config = config
        self._peers = [_Peer(link) for link in links]
        self._by_address = {p.link.address: p for p in self._peers}
        self._lock = threading.Lock()  # guards the counters
        top = service.top
        assert isinstance(top, MemoryTier), "the first tier is the memory clients map"
        self._top: MemoryTier = top
        self.holders = holders
        if holders is not None and holders.holder:
            with service.cond:
                service.directory.watcher = holders

    def close(self) -> None:
        if self.holders is not None:
            with self.svc.cond:
                if self.svc.directory.watcher is self.holders:
                    self.svc.directory.watcher = None
            self.holders.close()
        for peer in self._peers:
            peer.link.close()
        self.engine.close()

    def snapshot(self) -> list[PeerCounters]:
        with self._lock:
            return [replace(p.counters) for p in self._peers]

    def directory(self) -> DirectoryCounters | None:
        return self.holders.snapshot() if self.holders is not None else None

    def _segment_address(self, tenant: str) -> int:
        """The tenant's memory-tier segment, registered with the engine; its address."""
        return self.engine.expose(self._top.view(tenant, 0, self._top.segment_size(tenant)))

    # -- the source: a peer pulls from this daemon --------------------------------------

    def locate(self, tenant: str, ns_id: bytes, keys: list[bytes], ttl_ms: int) -> Located:
        """Pin the run of `keys` this daemon holds, from the first, in the memory tier
        (promoting what is below) for `ttl_ms`, and say where each block is."""
        svc, none = self.svc, Located(0, self.engine.address, self.engine.protocol, [])
        with svc.cond:
            ns = svc.index.namespaces.get(ns_id)
        if ns is None or ns.tenant != tenant:  # another tenant's is as unknown as none
            return none
        tiers = svc.locate(ns_id, keys)
        run = keys[: next((i for i, t in enumerate(tiers) if not t), len(keys))]
        if not run:
            return none
        got = svc.prepare_get(ns_id, run, ttl_ms)
        if not got.lease_id:
            return none
        base = self._segment_address(tenant)
        blocks: list[RemoteBlock] = []
        with svc.cond:
            lease = svc.leases.get(got.lease_id)
            entries = iter(lease.entries if lease is not None else ())
            for slot in got.slots:
                entry = next(entries, None) if slot.found else None
                copy = entry.copies.get(self._top.name) if entry is not None else None
                if copy is None or copy.encoding != "raw":
                    break
                blocks.append(RemoteBlock(base + slot.offset, copy.length, copy.checksum,
                                          entry.layer_sums if entry else None))  # fmt: skip
        return Located(got.lease_id, self.engine.address, self.engine.protocol, blocks)

    def release(self, tenant: str, lease_id: int) -> bool:
        """End a pull's lease (one of `tenant`'s only)."""
        if self.svc.lease_tenant(lease_id) != tenant:
            return False
        return self.svc.release(lease_id)

    # -- the puller: this daemon pulls from peers --------------------------------------

    def pull(
        self, ns: NamespaceInfo, tokens: np.ndarray, depth: int, now: float
    ) -> tuple[list[tuple[bytes, str]], bool, tuple[str, int]]:
        """Continue a prefix of `depth` blocks from peers: (key, tier) of each block pulled,
        in order, whether it ended short of the tokens, and (peer, blocks) the directory
        says holds the next blocks, where they were not pulled (("", 0): none)."""
        if not any(p.retry_at <= time.monotonic() for p in self._peers):
            return [], True, ("", 0)
        keys = islice(iter_block_keys(ns.id, tokens, ns.layout.block_tokens), depth, None)
        first = list(islice(keys, PULL_FIRST))
        if not first:
            return [], False, ("", 0)
        order, runs = self._order(ns, first)
        out, missed = self._pull_run(ns, chain(first, keys), depth, now, order)
        held = next(((a, n - len(out)) for a, n in runs[:1] if n > len(out)), ("", 0))
        return out, missed, held

    def _order(
        self, ns: NamespaceInfo, first: list[bytes]
    ) -> tuple[list[_Peer], tuple[tuple[str, int], ...]]:
        """The peers to ask, in order (those the directory names first), and its runs."""
        if self.holders is None:
            return self._peers, ()
        advice = self.holders.advise(ns, first, [p.link.address for p in self._peers])
        named = [self._by_address[address] for address, _ in advice.runs]
        if named:
            with self._lock:
                named[0].counters.directory_hits += 1
        return named + [p for p in self._peers if p not in named], advice.runs

    def _pull_run(
        self, ns: NamespaceInfo, keys: Iterator[bytes], depth: int, now: float,
        order: list[_Peer],
    ) -> tuple[list[tuple[bytes, str]], bool]:  # fmt: skip
        out: list[tuple[bytes, str]] = []
        size, asked = PULL_FIRST, 0
        while asked < PULL_KEYS:
            batch = list(islice(keys, min(size, PULL_KEYS - asked)))
            if not batch:
                return out, False
            asked, size = asked + len(batch), 4 * size
            got = self._pull_batch(ns, batch, depth + len(out), now, order)
            out += got
            if len(got) < len(batch):
                return out, True
        return out, next(keys, None) is not None

    def _pull_batch(
        self, ns: NamespaceInfo, batch: list[bytes], depth: int, now: float, order: list[_Peer]
    ) -> list[tuple[bytes, str]]:
        """The batch's run, from the first peer (in `order`) that holds its first key."""
        ttl = self.config.lease_ttl_ms
        for peer in order:
            if peer.retry_at > time.monotonic():
                continue
            with self._lock:
                peer.counters.asked += 1
            try:
                located = peer.link.locate(ns.tenant, ns.id, batch, ttl)
            except Exception as e:  # noqa: BLE001 - a peer's failure is a miss, never an error
                self._failed(peer, f"locate: {e}")
                continue
            self._answered(peer)
            if not located.lease_id:
                continue
            try:
                return self._fetch(ns, batch, peer, located, depth, now)
            finally:
                try:
                    peer.link.release(ns.tenant, located.lease_id)
                except Exception as e:  # noqa: BLE001 - its lease expires on its own
                    log.info("peer %s: releasing lease %d failed: %s", peer.link.address,
                             located.lease_id, e)  # fmt: skip
        return []

    def _fetch(
        self, ns: NamespaceInfo, batch: list[bytes], peer: _Peer, located: Located, depth: int,
        now: float,
    ) -> list[tuple[bytes, str]]:  # fmt: skip
        """Read the located run into this daemon's memory tier, check it, commit it."""
        svc, top, bb = self.svc, self._top, ns.block_bytes
        if located.protocol != self.engine.protocol:
            self._failed(peer, f"its engine speaks {located.protocol}, "
                         f"this one {self.engine.protocol}")  # fmt: skip
            return []
        run = located.blocks[: len(batch)]
        run = run[: next((i for i, b in enumerate(run) if b.length != bb), len(run))]
        offsets: list[int] = []
        with svc.cond:
            for _ in run:
                offset = svc.placer.allocate_top(ns.tenant, bb)
                if offset is None:
                    break  # memory is full of what cannot move: pull what fits
                offsets.append(offset)
        run = run[: len(offsets)]
        good: list[tuple[bytes, Copy]] = []
        try:
            base = self._segment_address(ns.tenant)
            reads = [(base + off, b.address, bb) for off, b in zip(offsets, run)]
            if not self.engine.read(located.engine_address, reads):
                self._failed(peer, f"reading {len(reads)} blocks from {located.engine_address}")
                return []
            for key, off, block in zip(batch, offsets, run):
                digest = checksum(top.view(ns.tenant, off, bb))
                if digest != block.checksum:
                    with self._lock:
                        peer.counters.corrupt += 1
                    log.warning("peer %s: block %s failed its checksum; not cached",
                                peer.link.address, key.hex())  # fmt: skip
                    break
                good.append((key, Copy(top.name, off, bb, digest)))
        finally:
            with svc.cond:
                for off in offsets[len(good) :]:
                    top.release(ns.tenant, off, bb)
        return self._commit(ns, peer, good, depth, now)

    def _commit(
        self, ns: NamespaceInfo, peer: _Peer, good: list[tuple[bytes, Copy]], depth: int,
        now: float,
    ) -> list[tuple[bytes, str]]:  # fmt: skip
        svc, out = self.svc, []
        with svc.cond:
            added = svc.directory.add_blocks(ns, good, now)
            mine = {e.key for e in added}
            for key, copy in good:
                if key not in mine:  # a put of the same key came first: that one stays
                    self._top.release(ns.tenant, copy.location, copy.length)
            svc.sharing.write_through(added)
            svc.placer.kick()
            for key, _ in good:
                entry = svc.index.get(ns.id, key)
                if entry is None:
                    break
                entry.last_access = now
                entry.depth = depth + len(out)
                out.append((key, svc.directory.best_name(entry)))
        if added:
            with self._lock:
                peer.counters.pulls += 1
                peer.counters.blocks += len(added)
                peer.counters.bytes += sum(e.nbytes for e in added)
        return out

    def _answered(self, peer: _Peer) -> None:
        with self._lock:
            if not peer.counters.available:
                log.info("peer %s answers again", peer.link.address)
            peer.counters.available = True

    def _failed(self, peer: _Peer, why: str) -> None:
        with self._lock:
            peer.counters.errors += 1
            if peer.counters.available:
                log.warning("peer %s failed (%s); its blocks are misses for %d ms",
                            peer.link.address, why, self.config.retry_ms)  # fmt: skip
            peer.counters.available = False
            peer.retry_at = time.monotonic() + self.config.retry_ms / 1000.0
