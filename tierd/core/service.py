"""CacheService: the core. It decides; tiers store; the servicer only translates.

Primitives (bookkeeping apart from data movement, as a protocol):
  open_namespace -> lookup -> prepare_put -> (client copies) -> commit_put
                           -> prepare_get -> (client reads)  -> release
  put_inband / view (the in-band forms), delete, pin, unpin, stats, start, close.

The directory (`tierd.core.directory`) keeps the books under one condition variable;
bytes move outside it through the transfer engine (`tierd.transfer`), with the entries
concerned marked `loading` or `moving` so nobody frees what is being read. Placement
(demotion, eviction, lease reaping) runs in `tierd.core.placement` on its own thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from itertools import chain, islice
from typing import TYPE_CHECKING

import numpy as np

from tierd.config import Config
from tierd.core import limits, validate
from tierd.core.adapters import AdapterBook
from tierd.core.catalog import NamespaceRow
from tierd.core.directory import Directory
from tierd.core.inband import InbandPut
from tierd.core.index import BlockEntry, NamespaceInfo, layout_to_list
from tierd.core.leases import GetLease, PutLease, PutSlotLease
from tierd.core.placement import Placer
from tierd.core.policies import make_policy
from tierd.core.results import (
    ClientFds,
    GetSlot,
    LookupResult,
    PreparedGet,
    PreparedPut,
    PutSlot,
    SegmentInfo,
)
from tierd.core.sharing import Sharing
from tierd.core.startup import open_storage, recover
from tierd.core.stats import StatsSnapshot, TierSnapshot
from tierd.core.tierset import TierSet
from tierd.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from tierd.tiers.base import Copy
from tierd.tiers.host import segment_tag
from tierd.tiers.staging import StagingArea, StagingAreas
from tierd.transfer.engine import TransferEngine
from tierd.weights.registry import ModelRegistry
from tierd_client.hostinfo import host_id
from tierd_client.keys import iter_block_keys, namespace_id
from tierd_client.layout import KVLayout

if TYPE_CHECKING:
    from tierd.attention.attend import AttendService
    from tierd.core.bulk import Bulk
    from tierd.core.peers import Peers

log = logging.getLogger("tierd.core")

# How often memory a client faulted in by reading unallocated shared memory is given back.
TRIM_SECONDS = 5.0


class CacheService:
    def __init__(self, config: Config) -> None:
        self.config = config
        data_dir = config.data_dir
        self._lock_file, self.catalog = open_storage(config)
        try:
            self.tiers = TierSet.open(config, segment_tag(data_dir))
        except BaseException:
            self.catalog.close()
            self._lock_file.close()
            raise
        self.top = self.tiers.top  # where puts land and gets are served from
        self.transfer = TransferEngine(self.tiers)
        # Uncommitted puts: per tenant as the limit says (default: the memory tier), and
        # never more in all than the memory tier could take in.
        self.staging = StagingAreas(
            config.limits.max_lease_bytes_per_tenant or self.top.capacity, self.top.capacity
        )
        self._last_trim = 0.0
        self.policies = {t.name: make_policy(t.spec.policy, t.name) for t in self.tiers}
        self.directory = Directory(self.catalog, [t.name for t in self.tiers], self.policies,
                                   self._release, lambda: self.config)  # fmt: skip
        # The directory's books, by their usual names (the lock guards all of them).
        self.cond = self.directory.cond
        self.index = self.directory.index
        self.leases = self.directory.leases
        self.counters = self.directory.counters
        self._host_id = host_id()
        recover(self)
        self.placer = Placer(self)
        self.sharing = Sharing(self)  # shared and write-through tiers (tierd.core.sharing)
        self.peers: Peers | None = None  # other daemons to pull from; the server sets it
        self.bulk: Bulk | None = None  # remote clients' transfer engine path; the server too
        self.weights = ModelRegistry(config.weights.capacity_bytes or self.top.capacity,
                                     data_dir / "weights", config.weights.roots)  # fmt: skip
        self.adapters = AdapterBook(self.directory, self.weights)  # adapters and their KV
        self._attend: AttendService | None = None
        self.draining = False  # set on SIGTERM: no new leases, existing ones may finish
        self._attend_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        for tier, down in self.tiers.start().items():
            log.warning("tier %s: not serving yet (its blocks are misses): %s", tier, down)
        self.placer.start()
        self.sharing.start()

    @property
    def attend(self) -> AttendService:
        """Sequences and attention; built on first use, since it needs torch (slow import)."""
        with self._attend_lock:
            if self._attend is None:
                from tierd.attention.attend import AttendService

                self._attend = AttendService(self)
            return self._attend

    def begin_drain(self, deadline: float) -> bool:
        """Refuse new leases and sequences; wait (until `deadline`) for open leases to be
        committed or released. Returns whether they all were."""
        with self.cond:
            self.draining = True
            return self.cond.wait_for(lambda: len(self.leases) == 0,
                                      max(0.0, deadline - time.monotonic()))  # fmt: skip

    def _check_open(self) -> None:
        if self.draining:
            raise Unavailable("the daemon is shutting down; retry on its successor")

    def close(self) -> None:
        if self._attend is not None:
            self._attend.close()
        self.placer.stop()
        self.sharing.stop()
        self.weights.close()
        self.directory.log.commit_all()
        self.tiers.close()
        self.catalog.close()
        self.staging.close()
        self._lock_file.close()  # releases the data dir for the next daemon

    # -- namespaces and lookup ------------------------------------------------------------

    def open_namespace(
        self, tenant: str, model: str, layout: KVLayout, extra_keys: Sequence[str] = (),
        *, lossless: bool = False, adapter: str = "",
    ) -> tuple[NamespaceInfo, SegmentInfo]:  # fmt: skip
        """`adapter`: a LoRA adapter of `model` the tenant sees (a name or fingerprint)."""
        if not tenant:
            raise InvalidArgument("a tenant name is required", field="namespace.tenant")
        if not model:
            raise InvalidArgument("a model fingerprint is required", field="namespace.model")
        limits.check_namespace(self, tenant, model, layout, extra_keys)
        adapter = self.adapters.open(tenant, adapter, model)  # its fingerprint
        ns_id = namespace_id(tenant, model, layout_to_list(layout), extra_keys,
                             lossless=lossless, adapter=adapter)  # fmt: skip
        with self.cond:
            ns = self.index.namespaces.get(ns_id)
        if ns is None:
            # On record (idempotent, and never removed) before it is known, without the
            # lock: a slow catalog holds only this call.
            row = NamespaceRow(ns_id, tenant, model, layout_to_list(layout), list(extra_keys),
                               lossless, adapter)  # fmt: skip
            self.catalog.upsert_namespace(row)
            info = NamespaceInfo(ns_id, tenant, model, layout, tuple(extra_keys), lossless,
                                 adapter)  # fmt: skip
            with self.cond:
                ns = self.index.namespaces.setdefault(ns_id, info)
        return ns, self.segment_info(ns)

    def namespace(self, ns_id: bytes, principal: str | None = None) -> NamespaceInfo:
        """The namespace, if it exists and `principal` (None: open mode) may use it.

        Another tenant's namespace is answered exactly like one that does not exist."""
        ns = self.index.namespaces.get(ns_id)
        if ns is None or (principal is not None and ns.tenant != principal):
            raise InvalidArgument("unknown namespace; call OpenNamespace first",
                                  field="namespace_id")
        if self.adapter_gone(ns):
            raise FailedPrecondition(f"the adapter {ns.adapter[:16]} of this namespace is no "
                                     "longer held (dropped or evicted), nor is its KV: register "
                                     "it again and reopen the namespace", field="namespace_id")  # fmt: skip
        return ns

    def adapter_gone(self, ns: NamespaceInfo) -> bool:
        """The namespace names an adapter its tenant no longer sees (dropped, unshared or
        evicted): its KV is being swept and nothing may be added to it."""
        return bool(ns.adapter) and not self.weights.sees(ns.tenant, ns.adapter)

    def segment_info(self, ns: NamespaceInfo, area: StagingArea | None = None) -> SegmentInfo:
        size = self.top.segment_size(ns.tenant)
        area = self.staging.current(ns.tenant) if area is None else area
        return SegmentInfo(size, self._host_id, area.size, area.generation)

    def client_fds(self, tenant: str) -> ClientFds:
        """Fresh descriptors for one client of `tenant`: its segment read-only, its current
        staging area read-write. The caller closes them once handed over."""
        seg_fd, seg_size = self.top.client_fd(tenant)
        try:
            staging_fd, staging_size, generation = self.staging.client_fd(tenant)
        except BaseException:
            os.close(seg_fd)
            raise
        return ClientFds(seg_fd, seg_size, staging_fd, staging_size, generation)

    def knows_tenant(self, tenant: str) -> bool:
        """Whether some namespace belongs to `tenant` (its shared memory may be handed out)."""
        with self.cond:
            return any(ns.tenant == tenant for ns in self.index.namespaces.values())

    def lookup(self, ns_id: bytes, tokens: Sequence[int] | np.ndarray) -> LookupResult:
        ns = self.namespace(ns_id)
        limits.check_lookup(self.config.limits, len(tokens))
        arr = validate.check_tokens(tokens)
        # Keys are hashed lazily, in batches that double (outside the lock), so hashing
        # stops at the first miss: at most about twice the hits are ever hashed.
        keys = iter_block_keys(ns.id, arr, ns.layout.block_tokens)
        found: list[tuple[bytes, str]] = []
        now, batch, missed, rest = time.time(), 1, False, []
        watcher, hint = self.directory.watcher, ("", 0)
        while not missed and (todo := list(islice(keys, batch))):
            with self.cond:
                for i, key in enumerate(todo):
                    entry = self.index.get(ns.id, key)
                    if entry is None:
                        missed, rest = True, todo[i:]
                        break
                    entry.last_access = now
                    entry.depth = len(found)
                    found.append((key, self.directory.best_name(entry)))
                    if watcher is not None:
                        watcher.touched(entry, now)
            batch = min(2 * batch, 1024)
        if missed and self.sharing.shared:  # the prefix may go on in a tier others share
            more, missed = self.sharing.find(ns, chain(rest, keys), len(found), now)
            found += more
        if missed and self.peers is not None:  # ...or on another daemon, then pulled here
            more, missed, hint = self.peers.pull(ns, arr, len(found), now)
            found += more
        with self.cond:
            self.counters.lookups += 1
            self.counters.misses += missed
        return LookupResult(len(found) * ns.layout.block_tokens, found, *hint)

    # -- put ------------------------------------------------------------------------------

    def prepare_put(
        self, ns_id: bytes, keys: Sequence[bytes], dims: Sequence[int], dtype: str,
        ttl_ms: int = 0, *, inband: bool = False,
    ) -> PreparedPut:
        """Lease a staging slot per missing key; the client writes its blocks there."""
        self._check_open()
        ns = self.namespace(ns_id)
        validate.check_keys(keys, self.config.leases.max_keys_per_call, unique=True)
        validate.check_shape(ns, dims, dtype)
        ttl = validate.check_ttl(ttl_ms, self.config.leases)
        limits.check_put_lease(self, ns, keys)
        slots: list[PutSlot] = []
        leased: list[PutSlotLease] = []
        area: StagingArea | None = None
        with self.cond:
            for key in keys:
                if self.index.get(ns.id, key) is not None:
                    slots.append(PutSlot("already_present", 0))
                    continue
                got = self.staging.allocate(ns.tenant, ns.block_bytes)
                if got is None or (area is not None and got[0] is not area):
                    if got is not None:
                        self.staging.free(got[0], got[1], ns.block_bytes)
                    for slot in leased:
                        self.staging.free(area, slot.offset, ns.block_bytes)  # type: ignore[arg-type]
                    raise ResourceExhausted(
                        f"{len(keys)} blocks of {ns.block_bytes} bytes do not fit in staging: "
                        f"the tenant's leases hold {self.staging.used_bytes(ns.tenant)} of "
                        f"{self.staging.per_tenant} bytes, all tenants' "
                        f"{self.staging.used_bytes()} of {self.staging.total} (or /dev/shm "
                        "is full): commit or release open puts, or put fewer blocks per call",
                        field="keys",
                    )
                area, offset = got
                leased.append(PutSlotLease(key, offset))
                slots.append(PutSlot("leased", offset))
            lease_id = 0
            if leased:
                assert area is not None
                lease_id = self.leases.next_id()
                self.leases.add(PutLease(lease_id, ns, leased, time.monotonic() + ttl, area,
                                         inband=inband))  # fmt: skip
        return PreparedPut(lease_id, slots, self.segment_info(ns, area))

    def commit_put(self, lease_id: int, *, inband: bool = False) -> int:
        """Copy the lease's staging slots into the memory tier, checksum the copies, and
        make them visible. The copy, not the client's staging bytes, is what is checksummed and
        served: nothing a client does to its staging area afterwards reaches a block."""
        with self.cond:
            lease = self._live_put_lease(lease_id, inband=inband)
            if lease.writers:
                raise FailedPrecondition("the put lease is being written", field="lease_id")
            lease.committing = True  # the reaper leaves it alone from here on
            ns, bb = lease.ns, lease.ns.block_bytes
            todo = [s for s in lease.slots if self.index.get(ns.id, s.key) is None]
            targets: list[int] = []
            try:
                for _ in todo:
                    offset = self.placer.allocate_top(ns.tenant, bb)
                    if offset is None:
                        raise ResourceExhausted(
                            f"{self.top.name} tier full: no room for {len(todo)} blocks of "
                            f"{bb} bytes and nothing can be demoted", field="lease_id",
                        )
                    targets.append(offset)
            except BaseException:
                for offset in targets:
                    self.top.release(ns.tenant, offset, bb)
                self.leases.pop(lease_id)
                self.end_lease(lease)
                raise
        sums = [self.transfer.ingest(self.staging.view(lease.area, slot.offset, bb), ns.tenant,
                                     offset) for slot, offset in zip(todo, targets)]  # fmt: skip
        top = self.top.name
        with self.cond:
            self.leases.pop(lease_id)
            self.end_lease(lease)
        return self.record_put(ns, [(slot.key, Copy(top, offset, bb, digest))
                                    for slot, offset, digest in zip(todo, targets, sums)])  # fmt: skip

    def record_put(self, ns: NamespaceInfo, placed: list[tuple[bytes, Copy]]) -> int:
        """Put blocks whose checked copies are in the memory tier (space the caller
        reserved) on record, then make them visible; how many were this put's own."""
        bb = ns.block_bytes
        with self.cond:
            # Keys another client committed (or is committing) meanwhile stay theirs.
            staged, ticket = self.directory.stage_blocks(ns, placed)
            mine = {key for key, _ in staged}
            for key, copy in placed:
                if key not in mine:
                    self.top.release(ns.tenant, copy.location, bb)
        # On record before visible, committed without the lock: a slow catalog holds this
        # call (and others waiting to record), never lookups, reads or attends.
        try:
            self.directory.log.commit(ticket)
        except BaseException:
            with self.cond:
                self.directory.unstage(ns, staged)
                for _, copy in staged:
                    self.top.release(ns.tenant, copy.location, bb)
            raise
        with self.cond:
            self.sharing.write_through(self.directory.publish(ns, staged))
            self.placer.kick()
        if self.adapter_gone(ns):
            # The adapter went while this put was under way; the sweep after it may have
            # looked before these blocks were visible (a drop after this check sweeps them).
            self.directory.delete(ns, [key for key, _ in staged])
            raise FailedPrecondition(f"the adapter {ns.adapter[:16]} of this namespace was "
                                     "dropped or evicted during the put; its KV is gone",
                                     field="namespace_id")  # fmt: skip
        return len(staged)

    def _live_put_lease(self, lease_id: int, *, inband: bool) -> PutLease:
        """The open, uncommitted put lease `lease_id`; caller holds `cond`."""
        lease = self.leases.get(lease_id)
        if not isinstance(lease, PutLease) or lease.committing or lease.inband != inband:
            raise FailedPrecondition(
                "no put lease with this id (expired, released or committed)", field="lease_id"
            )
        return lease

    def write_staging(self, lease_id: int, offset: int, data: memoryview) -> None:
        """Write in-band bytes into a slot of an open put lease (fenced: a lease that
        expired, was released or is committing takes no more bytes, and one being written
        is never reaped, so no byte lands in a slot that now belongs to another lease)."""
        with self.cond:
            lease = self._live_put_lease(lease_id, inband=True)
            lease.writers += 1
        try:
            self.staging.view(lease.area, offset, len(data))[:] = data
        finally:
            with self.cond:
                lease.writers -= 1
                self.cond.notify_all()

    def store_block(self, ns: NamespaceInfo, key: bytes, data: memoryview) -> BlockEntry | None:
        """Cache one block made inside the daemon (a sealed tail), held for the caller.

        Returns the entry with a reader reference taken, or None when host has no room
        (or the namespace's adapter is gone).
        """
        with self.cond:
            entry = self.index.get(ns.id, key)
            if entry is None and self.adapter_gone(ns):
                # Its adapter went during this attend; a drop after this check sweeps the block.
                return None
            if entry is None:
                offset = self.placer.allocate_top(ns.tenant, ns.block_bytes)
                if offset is None:
                    return None
                digest = self.transfer.ingest(data, ns.tenant, offset)
                bb = ns.block_bytes
                added = self.directory.add_blocks(ns, [(key, Copy(self.top.name, offset, bb,
                                                                  digest))])  # fmt: skip
                if not added:  # a put of the same key is being recorded: that one stays
                    self.top.release(ns.tenant, offset, bb)
                    return None
                (entry,) = added
                self.sharing.write_through(added)
                self.placer.kick()
            entry.readers += 1
            held = entry.copies.get(self.top.name)
            if held is None or held.verified:
                return entry
        # Cached before a restart and not checked since: checked before anyone attends over
        # it; damaged, it leaves the cache and these bytes take its key.
        self.placer.make_resident([entry], promote=False)
        if not entry.deleted:
            return entry
        with self.cond:
            self.drop_reader(entry)
        return self.store_block(ns, key, data)

    def reap(self, now: float | None = None) -> None:
        """Expire leases and idle sequences (the placement thread calls this each pass)."""
        now = time.monotonic() if now is None else now
        with self.cond:
            for lease in self.leases.expired(now):
                log.info("lease %d expired; releasing what it held", lease.id)
                if isinstance(lease, PutLease) and not lease.inband:
                    # Its client may still be writing into those slots: fence them off.
                    self.staging.retire(lease.area)
                self.end_lease(lease)
        if self._attend is not None:
            self._attend.reap(now)
        if now - self._last_trim >= TRIM_SECONDS:
            self._last_trim = now
            self.top.trim()
            self.staging.trim()

    def begin_inband_put(
        self, ns_id: bytes, keys: Sequence[bytes], dims: Sequence[int], dtype: str
    ) -> InbandPut:
        """A put whose bytes arrive in chunks; each chunk is copied straight into its slot."""
        ns = self.namespace(ns_id)
        return InbandPut(self, ns, self.prepare_put(ns_id, keys, dims, dtype, inband=True))

    # -- get ------------------------------------------------------------------------------

    def prepare_get(
        self, ns_id: bytes, keys: Sequence[bytes], ttl_ms: int = 0, *, hold: bool = False
    ) -> PreparedGet:
        """Lease the blocks in the memory tier for the caller to read (promoting them from
        slower tiers). `hold`: the lease never expires (the daemon itself streams the bytes
        and releases in all cases)."""
        self._check_open()
        ns = self.namespace(ns_id)
        validate.check_keys(keys, self.config.leases.max_keys_per_call)
        limits.check_get_lease(self, ns, keys)
        ttl = float("inf") if hold else validate.check_ttl(ttl_ms, self.config.leases)
        with self.cond:
            held = self.directory.hold(ns, keys)  # from here on nothing moves or frees them
            tiers = [self.directory.best_name(e) if e else "" for e in held]
        try:
            self.placer.make_resident([e for e in held if e is not None])
        except BaseException:
            with self.cond:
                for entry in held:
                    if entry is not None:
                        self.drop_reader(entry)
            raise
        slots: list[GetSlot] = []
        now, top = time.time(), self.top.name
        with self.cond:
            lease = GetLease(self.leases.next_id(), ns, deadline=time.monotonic() + ttl,
                             inband=hold)  # fmt: skip
            for entry, tier in zip(held, tiers):
                copy = entry.copies.get(top) if entry is not None else None
                if entry is None or copy is None or entry.deleted:
                    if entry is not None:  # its copy could not be read (the load counted it)
                        self.drop_reader(entry)
                    slots.append(GetSlot(False, 0, ""))
                    self.counters.misses += 1
                    continue
                entry.last_access = now
                entry.hits += 1
                for name in entry.copies:
                    self.policies[name].on_hit(entry)
                self.directory.accessed(entry)
                # Booked to the tier that served it (a promotion's source, not the target).
                self.counters.tier(tier).hits += 1
                self.counters.tier(tier).bytes_read += entry.nbytes
                lease.entries.append(entry)
                slots.append(GetSlot(True, int(copy.location), tier))
            if lease.entries:
                self.leases.add(lease)
        return PreparedGet(lease.id if lease.entries else 0, slots, self.segment_info(ns))

    def view(self, ns: NamespaceInfo, offset: int) -> memoryview:
        """The bytes of a block a get lease holds (in-band gets stream from here)."""
        return self.top.view(ns.tenant, offset, ns.block_bytes)

    def lease_tenant(self, lease_id: int) -> str | None:
        """The tenant owning a lease (None if there is no such lease)."""
        with self.cond:
            lease = self.leases.get(lease_id)
            return lease.ns.tenant if lease is not None else None

    def release(self, lease_id: int, *, inband: bool = False) -> bool:
        """End a get lease, or abort an uncommitted put lease. `inband`: the daemon ends a
        lease it holds for a stream (a client's Release never touches those).

        False when no such lease was open (it expired, or was released or committed): a
        reader then knows the bytes it copied may have been reused under it."""
        if lease_id == 0:
            return True
        with self.cond:
            lease = self.leases.get(lease_id)
            if (lease is None or lease.inband != inband
                    or (isinstance(lease, PutLease) and (lease.committing or lease.writers))
                    or (isinstance(lease, GetLease) and lease.copying)):
                return False  # fmt: skip
            self.leases.pop(lease_id)
            self.end_lease(lease)
            return True

    def end_lease(self, lease: PutLease | GetLease) -> None:
        """Undo what a lease holds; the caller holds `cond`."""
        if isinstance(lease, PutLease):
            for slot in lease.slots:
                self.staging.free(lease.area, slot.offset, lease.ns.block_bytes)
        else:
            for entry in lease.entries:
                self.drop_reader(entry)
            if lease.on_end is not None:
                lease.on_end()
        self.cond.notify_all()

    def drop_reader(self, entry: BlockEntry) -> None:
        self.directory.drop_reader(entry)

    def drop_corrupt_copy(
        self, entry: BlockEntry, tier: str, where: int | str, *, own_readers: int = 0
    ) -> None:
        """A read of `entry`'s copy in `tier` failed its checksum (see the directory)."""
        self.directory.drop_corrupt_copy(entry, tier, where, own_readers=own_readers)

    def _release(self, entry: BlockEntry, copy: Copy) -> None:
        """Give a copy's space back to its tier (the directory decided it goes)."""
        tier = self.tiers.get(copy.tier)
        if tier is not None:
            tier.free(entry, copy)

    # -- management -----------------------------------------------------------------------

    def locate(self, ns_id: bytes, keys: Sequence[bytes]) -> list[str]:
        """The tier of each key ("" when not cached); moves nothing, leases nothing."""
        ns = self.namespace(ns_id)
        validate.check_keys(keys, self.config.leases.max_keys_per_call)
        with self.cond:
            return [self.directory.best_name(e) if (e := self.index.get(ns.id, k)) is not None
                    else "" for k in keys]  # fmt: skip

    def delete(self, ns_id: bytes, keys: Sequence[bytes]) -> int:
        ns = self.namespace(ns_id)
        validate.check_keys(keys, self.config.leases.max_keys_per_call)
        return self.directory.delete(ns, keys)

    def move(self, ns_id: bytes, keys: Sequence[bytes], tier: str) -> int:
        from tierd.core.moves import move

        return move(self, ns_id, keys, tier)

    def set_pinned(self, ns_id: bytes, keys: Sequence[bytes], pinned: bool) -> int:
        ns = self.namespace(ns_id)
        validate.check_keys(keys, self.config.leases.max_keys_per_call)
        if pinned:
            limits.check_pins(self, ns, keys)
        return self.directory.set_pinned(ns, keys, pinned)

    def usage_by_tenant(self) -> dict[tuple[str, str], int]:
        """Bytes each tenant holds in each tier (metrics, status)."""
        with self.cond:
            return self.directory.usage_by_tenant()

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration (only keys that may change live differ)."""
        with self.cond:
            self.config = config
            self.cond.notify_all()

    def stats(self) -> StatsSnapshot:
        with self.cond:
            c = self.counters
            tiers = []
            for tier in self.tiers:
                usage = tier.usage()
                tiers.append(TierSnapshot(
                    tier.name, usage.capacity_bytes, usage.used_bytes,
                    self.directory.blocks_in(tier.name),
                    replace(c.tier(tier.name)), usage.backend, tier.kind, usage.available,
                ))  # fmt: skip
            return StatsSnapshot(
                tiers=tiers,
                lookups=c.lookups, misses=c.misses, demotions=c.demotions,
                promotions=c.promotions, corrupt_reads=c.corrupt_reads,
                active_leases=len(self.leases), namespaces=len(self.index.namespaces),
                active_sequences=len(self._attend.sequences) if self._attend else 0,
            )  # fmt: skip

