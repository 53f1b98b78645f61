"""Remote clients moving blocks through the transfer engine instead of gRPC payloads.

Primitives: `Bulk(service, engine)`; `lend(ns_id, keys, ttl_ms) -> Lent` (a get: pins the
found blocks in the memory tier under a normal get lease and names their addresses in
this daemon's engine; the client reads them and ends the lease with `release`),
`put(ns_id, keys, dims, dtype, source, checksums) -> [result]` (reads the blocks out of
the client's registered buffer into the memory tier, checks each against the checksum
the client sent, and commits them as a put).

The caller (the servicer) has checked the tenant against the namespace; the bounds are
the in-band calls': keys per call, shape, the tenant's lease bytes, the lease's TTL.

The daemon never writes into a client's memory: on a get the client reads; on a put the
daemon reads, from `[address, address + length)` only, the range the client registered
and named (block i at `address + i * block_bytes`), into room it reserved in its own
memory tier, and nothing is visible before every block matched its checksum. An engine's
port exposes its registered memory to whoever can reach it, so it must be reachable by
trusted hosts only (the README says so): Mooncake checks no identity, and whoever reaches
it can read and also write (`batch_transfer_sync_write`) every registered byte, every
tenant's memory-tier segment alike. With `bulk` the client hosts reach it, so the tenant
checks of BulkGet/BulkPut bound honest clients only; tenants that do not trust each other
are not isolated from one another on a daemon with `bulk = true`.

A put's read has no deadline of its own: Mooncake gives up on a transfer that makes no
progress for 30 s, and on a first contact (the handshake with an engine address it has
not reached before) that gets no answer for 60 s. While such a handshake waits, every
other read of this daemon's engine waits behind it (other tenants' puts, pulls from peer
daemons), so one tenant naming an address that accepts and never answers stalls them for
a minute per call; a client engine that keeps trickling bytes holds its own call's
thread longer. `bulk = true` therefore suits tenants trusted not to do that. Until the
read ends, the reserved room counts against the tenant's lease limits.
"""

from __future__ import annotations

from collections.abc import Sequence
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
from tierd.transfer.p2p import PeerEngine

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
    def __init__(self, service: CacheService, engine: PeerEngine) -> None:
        self.svc = service
        self.engine = engine
        top = service.top
        assert isinstance(top, MemoryTier), "the first tier is the memory clients map"
        self._top: MemoryTier = top
        # Puts between their reservation and their commit, as the tenant's lease limits
        # count them (they hold room as a put lease does): id -> (tenant, bytes). Under cond.
        self.held: dict[int, tuple[str, int]] = {}
        self._next_hold = 0

    def _segment_address(self, tenant: str) -> int:
        """The tenant's memory-tier segment, registered with the engine; its address."""
        return self.engine.expose(self._top.view(tenant, 0, self._top.segment_size(tenant)))

    def lend(self, ns_id: bytes, keys: Sequence[bytes], ttl_ms: int) -> Lent:
        svc = self.svc
        got = svc.prepare_get(ns_id, keys, ttl_ms)
        blocks = [LentBlock(False)] * len(keys)
        if not got.lease_id:
            return Lent(0, self.engine.address, self.engine.protocol, blocks)
        ns = svc.namespace(ns_id)
        base = self._segment_address(ns.tenant)
        with svc.cond:
            lease = svc.leases.get(got.lease_id)
            # Gone already: a TTL shorter than the promotion took.
            if not isinstance(lease, GetLease):
                raise FailedPrecondition("the get lease expired before it was handed out; "
                                         "ask for a longer lease_ttl_ms",
                                         field="lease_ttl_ms")  # fmt: skip
            entries = iter(lease.entries)
            for i, slot in enumerate(got.slots):
                if not slot.found:
                    continue
                copy = next(entries).copies[self._top.name]  # raw: the memory tier's is
                blocks[i] = LentBlock(True, base + slot.offset, copy.length, copy.checksum,
                                      slot.tier)  # fmt: skip
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
        """Read the reserved blocks from the client, check and commit them."""
        svc, bb, top = self.svc, ns.block_bytes, self._top
        placed: list[tuple[bytes, Copy]] = []
        try:
            base = self._segment_address(ns.tenant)
            reads = [(base + off, source.address + i * bb, bb) for i, off in offsets.items()]
            if not self.engine.read(source.engine_address, reads):
                raise Unavailable(f"reading {len(reads)} blocks from the client's engine at "
                                  f"{source.engine_address} failed",
                                  field="engine.address")  # fmt: skip
            for i, off in offsets.items():
                digest = checksum(top.view(ns.tenant, off, bb))
                if digest != checksums[i]:
                    raise DataLoss(f"block {i} read from the client's buffer does not match "
                                   "its checksum; nothing stored",
                                   field=f"checksums[{i}]")  # fmt: skip
                placed.append((keys[i], Copy(top.name, off, bb, digest)))
        except BaseException:
            with svc.cond:
                for offset in offsets.values():
                    top.release(ns.tenant, offset, bb)
            raise
        svc.record_put(ns, placed)
        return ["stored" if i in offsets else "already_present" for i in range(len(keys))]
