"""Remote clients moving blocks through the transfer engine instead of gRPC payloads.

Primitives: `Bulk(service, area)`; `lend(ns_id, keys, ttl_ms) -> Lent` (a get: copies the
found blocks into the exchange area under a get lease and names their addresses in the
clients' engine; the client reads them and ends the lease with `release`, which frees and
zeroes the slots), `put(ns_id, keys, dims, dtype, source, checksums) -> [result]` (reads
the blocks out of the client's registered buffer into exchange slots, copies them into
room in the memory tier, checks each against the checksum the client sent, and commits
them as a put), `close()`.

The caller (the servicer) has checked the tenant against the namespace; the bounds are
the in-band calls': keys per call, shape, the tenant's lease bytes, the lease's TTL, and
the exchange area's room (a call that does not fit is RESOURCE_EXHAUSTED on field
`exchange`, which the client answers by making that one call in-band).

The clients' engine is its own, apart from the peer daemons', and exposes only the
exchange area (`tierd.transfer.exchange`): Mooncake checks no identity, so whoever
reaches its port can read and write every byte registered with it, which is then the
blocks in transit and nothing else. Tenants' cached KV is never registered with it; a
stranger writing into a slot is caught by the checksum its reader compares (the client's
on a get; on a put the daemon's, computed on the memory tier's copy after the slot was
copied out); a stranger reading a slot sees that transfer's block, so tenants that do
not trust each other must still not share a network that reaches the port (the README
says so). The daemon never writes into a client's memory: on a get the client reads; on
a put the daemon reads, from `[address, address + length)` only, the range the client
registered and named (block i at `address + i * block_bytes`).

A put's read has no deadline of its own: Mooncake gives up on a transfer that makes no
progress for 30 s, and on a first contact (the handshake with an engine address it has
not reached before) that gets no answer for 60 s. While such a handshake waits, every
other read of the clients' engine waits behind it (other tenants' puts; peer daemons'
pulls use their own engine), so one tenant naming an address that accepts and never
answers stalls the others' puts for a minute per call; a client engine that keeps
trickling bytes holds its own call's thread longer. `bulk = true` therefore suits tenants
trusted not to do that. Until the read ends, the reserved room counts against the
tenant's lease limits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tierd.config_checks import host_port
from tierd.core import limits, validate
from tierd.core.leases import GetLease
from tierd.errors import (
    ConfigError,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from tierd.tiers.base import Copy, MemoryTier
from tierd.tiers.checksum import checksum
from tierd.transfer.exchange import ExchangeArea

if TYPE_CHECKING:
    from tierd.core.index import NamespaceInfo
    from tierd.core.service import CacheService

_ADDRESS_END = 1 << 64


@dataclass(frozen=True)
class LentBlock:
    found: bool
    address: int = 0  # in this daemon's engine
    length: int = 0
    checksum: int = 0
    tier: str = ""  # where the block was before this get


@dataclass(frozen=True)
class Lent:
    lease_id: int  # a get lease (0: nothing found)
    engine_address: str
    protocol: str
    blocks: list[LentBlock]


@dataclass(frozen=True)
class Source:
    """A put's bytes: a buffer registered with the client's engine."""

    engine_address: str
    protocol: str
    address: int
    length: int


class Bulk:
    def __init__(self, service: CacheService, area: ExchangeArea) -> None:
        self.svc = service
        self.area = area
        self.engine = area.engine
        top = service.top
        assert isinstance(top, MemoryTier), "the first tier is the memory clients map"
        self._top: MemoryTier = top
        # Puts between their reservation and their commit, as the tenant's lease limits
        # count them (they hold room as a put lease does): id -> (tenant, bytes). Under cond.
        self.held: dict[int, tuple[str, int]] = {}
        self._next_hold = 0
        # Calls copying into or out of the area, or with the engine reading into it: the
        # area is unmapped only once none is (the last one out does it). Under cond.
        self._calls = 0
        self._closing = False

    def close(self) -> None:
        """Refuse new calls; unmap the area now, or when the last call in it ends (a
        call's engine read may go on for a minute, and would write into unmapped memory).
        Leases ending later find nothing left to free."""
        with self.svc.cond:  # as `give` is: a lease ending now sees the area open or closed
            self._closing = True
            if not self._calls:
                self.area.close()

    @contextmanager
    def _call(self) -> Iterator[None]:
        with self.svc.cond:
            if self._closing:
                raise Unavailable("the daemon is shutting down; retry on its successor")
            self._calls += 1
        try:
            yield
        finally:
            with self.svc.cond:
                self._calls -= 1
                if self._closing and not self._calls:
                    self.area.close()

    def _full(self, n: int, nbytes: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"the exchange area ({self.area.capacity} bytes, {self.area.used_bytes} in use) "
            f"has no room for {n} blocks of {nbytes} bytes now; make the call in-band, or "
            "smaller", field="exchange",
        )  # fmt: skip

    def _slots(self, n: int, nbytes: int) -> list[int]:
        """`n` exchange slots of `nbytes`, all or none; under cond."""
        taken: list[int] = []
        for _ in range(n):
            offset = self.area.take(nbytes)
            if offset is None:
                for t in taken:
                    self.area.give(t, nbytes)
                raise self._full(n, nbytes)
            taken.append(offset)
        return taken

    def _give(self, slots: list[int], nbytes: int) -> None:
        """Free exchange slots; under cond."""
        for offset in slots:
            self.area.give(offset, nbytes)

    def lend(self, ns_id: bytes, keys: Sequence[bytes], ttl_ms: int) -> Lent:
        with self._call():
            return self._lend(ns_id, keys, ttl_ms)

    def _lend(self, ns_id: bytes, keys: Sequence[bytes], ttl_ms: int) -> Lent:
        svc = self.svc
        svc._check_open()
        ns = svc.namespace(ns_id)
        validate.check_keys(keys, svc.config.leases.max_keys_per_call)
        with svc.cond:
            # Refused before the get promotes or counts anything: the client makes this
            # call in-band next, and that one does both.
            cached = sum(1 for k in keys if svc.index.get(ns.id, k) is not None)
            if cached * ns.block_bytes > self.area.capacity - self.area.used_bytes:
                raise self._full(cached, ns.block_bytes)
        got = svc.prepare_get(ns_id, keys, ttl_ms)
        blocks = [LentBlock(False)] * len(keys)
        if not got.lease_id:
            return Lent(0, self.engine.address, self.engine.protocol, blocks)
        bb = ns.block_bytes
        with svc.cond:
            lease = svc.leases.get(got.lease_id)
            # Gone already: a TTL shorter than the promotion took.
            if not isinstance(lease, GetLease):
                raise FailedPrecondition("the get lease expired before it was handed out; "
                                         "ask for a longer lease_ttl_ms",
                                         field="lease_ttl_ms")  # fmt: skip
            entries = list(lease.entries)
            try:
                slots = self._slots(len(entries), bb)
            except ResourceExhausted:
                svc.leases.pop(lease.id)
                svc.end_lease(lease)
                raise
            lease.on_end = lambda: self._give(slots, bb)
            lease.other_bytes = len(slots) * bb
            lease.copying = True  # neither expires nor is released under the copy
            granted = lease.deadline - time.monotonic()  # the TTL left for the client
        # The lease pins the memory copies while they are copied out (outside the lock).
        copied: list[tuple[int, Copy]] = []  # (slot, the memory copy it holds), in order
        try:
            for entry, offset in zip(entries, slots):
                copy = entry.copies[self._top.name]  # raw: the memory tier's is
                self.area.view(offset, bb)[:] = self._top.view(ns.tenant, copy.location, bb)
                copied.append((offset, copy))
        finally:
            with svc.cond:
                lease.copying = False
                # The client's time to read starts when it is handed the slots, not before
                # the copy: a TTL spent copying would leave it zeroed slots.
                lease.deadline = max(lease.deadline, time.monotonic() + granted)
                # The slots hold the bytes now (or the call failed): the memory copies
                # need no pin while the client reads.
                for entry in lease.entries:
                    svc.drop_reader(entry)
                lease.entries = []
                if len(copied) < len(entries):
                    svc.leases.pop(lease.id)
                    svc.end_lease(lease)
                svc.cond.notify_all()
        it = iter(copied)
        for i, slot in enumerate(got.slots):
            if slot.found:
                offset, copy = next(it)
                blocks[i] = LentBlock(True, self.area.address(offset), copy.length,
                                      copy.checksum, slot.tier)  # fmt: skip
        return Lent(got.lease_id, self.engine.address, self.engine.protocol, blocks)

    def _check_source(self, source: Source, n: int, bb: int) -> None:
        try:
            host_port(source.engine_address, "engine.address", "HOST:PORT")
        except ConfigError as e:
            raise InvalidArgument(e.message, field="engine.address") from None
        if source.protocol != self.engine.protocol:
            raise InvalidArgument(f"this daemon's engine speaks {self.engine.protocol}, "
                                  f"not {source.protocol or 'unspecified'}",
                                  field="engine.protocol")  # fmt: skip
        if source.address == 0 or source.address + source.length > _ADDRESS_END:
            raise InvalidArgument("not a buffer's range", field="buffer_address")
        if source.length < n * bb:
            raise InvalidArgument(f"{source.length} bytes hold fewer than {n} blocks of {bb}",
                                  field="buffer_length")  # fmt: skip

    def put(
        self, ns_id: bytes, keys: Sequence[bytes], dims: Sequence[int], dtype: str,
        source: Source, checksums: Sequence[int],
    ) -> list[str]:  # fmt: skip
        """Per key "stored" or "already_present", as an in-band put answers."""
        with self._call():
            return self._put(ns_id, keys, dims, dtype, source, checksums)

    def _put(
        self, ns_id: bytes, keys: Sequence[bytes], dims: Sequence[int], dtype: str,
        source: Source, checksums: Sequence[int],
    ) -> list[str]:  # fmt: skip
        svc = self.svc
        svc._check_open()
        ns = svc.namespace(ns_id)
        validate.check_keys(keys, svc.config.leases.max_keys_per_call, unique=True)
        validate.check_shape(ns, dims, dtype)
        if len(checksums) != len(keys):
            raise InvalidArgument(f"{len(checksums)} checksums for {len(keys)} keys",
                                  field="checksums")  # fmt: skip
        bb, top = ns.block_bytes, self._top
        self._check_source(source, len(keys), bb)
        limits.check_put_lease(svc, ns, keys)
        offsets: dict[int, int] = {}  # key's index -> its room in the memory tier
        with svc.cond:
            try:
                for i, key in enumerate(keys):
                    if svc.index.get(ns.id, key) is not None:
                        continue
                    offset = svc.placer.allocate_top(ns.tenant, bb)
                    if offset is None:
                        raise ResourceExhausted(
                            f"{top.name} tier full: no room for {len(keys)} blocks of {bb} "
                            "bytes and nothing can be demoted", field="keys",
                        )  # fmt: skip
                    offsets[i] = offset
            except BaseException:
                for offset in offsets.values():
                    top.release(ns.tenant, offset, bb)
                raise
            self._next_hold += 1
            hold = self._next_hold
            if offsets:
                self.held[hold] = (ns.tenant, len(offsets) * bb)
        try:
            return self._fill(ns, keys, source, checksums, offsets)
        finally:
            with svc.cond:
                self.held.pop(hold, None)
                svc.cond.notify_all()

    def _fill(
        self, ns: NamespaceInfo, keys: Sequence[bytes], source: Source,
        checksums: Sequence[int], offsets: dict[int, int],
    ) -> list[str]:  # fmt: skip
        """Read the reserved blocks from the client into exchange slots, copy them into
        their room in the memory tier, check and commit them."""
        svc, bb, top = self.svc, ns.block_bytes, self._top
        placed: list[tuple[bytes, Copy]] = []
        slots: list[int] = []
        try:
            with svc.cond:
                slots = self._slots(len(offsets), bb)
            reads = [(self.area.address(slot), source.address + i * bb, bb)
                     for i, slot in zip(offsets, slots)]  # fmt: skip
            if not self.engine.read(source.engine_address, reads):
                raise Unavailable(f"reading {len(reads)} blocks from the client's engine at "
                                  f"{source.engine_address} failed",
                                  field="engine.address")  # fmt: skip
            for (i, off), slot in zip(offsets.items(), slots):
                room = top.view(ns.tenant, off, bb)
                room[:] = self.area.view(slot, bb)
                # Checked on the memory tier's copy, after the slot: whatever is written
                # into the slot from now on is not what is stored.
                digest = checksum(room)
                if digest != checksums[i]:
                    raise DataLoss(f"block {i} read from the client's buffer does not match "
                                   "its checksum; nothing stored",
                                   field=f"checksums[{i}]")  # fmt: skip
                placed.append((keys[i], Copy(top.name, off, bb, digest)))
        except BaseException:
            with svc.cond:
                for offset in offsets.values():
                    top.release(ns.tenant, offset, bb)
                self._give(slots, bb)
            raise
        with svc.cond:
            self._give(slots, bb)
        svc.record_put(ns, placed)
        return ["stored" if i in offsets else "already_present" for i in range(len(keys))]
