"""Explicit moves between tiers (the Move call): operators and tests place blocks by hand.

Primitives: `move(service, ns_id, keys, tier) -> moved`.

  host  promote (the NVMe / CSD copy stays, as with any promotion);
  nvme  write blocks that have no NVMe copy, then drop their host copy;
  csd   send each block to a worker (round robin over healthy ones), then drop the host
        and NVMe copies: attend on those blocks then runs on the workers.
A block being read elsewhere keeps its host copy until its readers are gone; the move
still counts, since the block now also lives in the target tier.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tierd.core import validate
from tierd.core.index import BlockEntry
from tierd.core.nvme_headers import nvme_header
from tierd.core.placement import host_copy_intact
from tierd.errors import DataLoss, FailedPrecondition, ResourceExhausted, Unavailable
from tierd.tiers.checksum import checksum

# How long a move waits for another call that is writing the same block out.
MOVE_WAIT_SECONDS = 30.0

if TYPE_CHECKING:
    from tierd.core.service import CacheService


def move(svc: CacheService, ns_id: bytes, keys: Sequence[bytes], tier: str) -> int:
    ns = svc.namespace(ns_id)
    validate.check_keys(keys, svc.config.leases.max_keys_per_call)
    with svc.cond:
        held = [e for e in (svc.index.get(ns.id, k) for k in keys) if e is not None]
        for entry in held:
            entry.readers += 1
    try:
        if tier == "host":
            svc.placer.make_resident(held)
            return sum(1 for e in held if e.host_off is not None)
        if tier == "nvme":
            return _to_nvme(svc, held)
        return _to_csd(svc, held)
    finally:
        with svc.cond:
            for entry in held:
                svc.drop_reader(entry)
            svc.cond.notify_all()


def _bytes_of(svc: CacheService, entry: BlockEntry) -> memoryview:
    """The block's bytes from host (in place) or NVMe (into a fresh aligned buffer),
    checked against its checksum (and the entry given its per-layer checksums): a copy
    that fails is dropped and the move answers DataLoss, so damage never spreads. The
    caller holds one reader reference."""
    if entry.host_off is not None:
        offset = entry.host_off
        view = svc.host.view(entry.ns.tenant, offset, entry.nbytes)
        if not host_copy_intact(entry, view):
            svc.drop_corrupt_copy(entry, "host", offset, own_readers=1)
            raise _corrupt(entry, "host")
        return view
    if entry.nvme_off is not None:
        offset = entry.nvme_off
        buf = mmap.mmap(-1, entry.nbytes)
        view = memoryview(buf)
        svc.nvme.read_into(offset, view)
        if checksum(view) != entry.checksum:
            svc.drop_corrupt_copy(entry, "nvme", offset)
            raise _corrupt(entry, "nvme")
        return view
    raise FailedPrecondition("block has no local copy to move", field="keys")


def _corrupt(entry: BlockEntry, tier: str) -> DataLoss:
    return DataLoss(f"block {entry.key.hex()} failed its checksum in the {tier} tier and was "
                    "dropped; recompute it", field="keys")  # fmt: skip


def _drop_host_copy(svc: CacheService, entry: BlockEntry) -> None:
    """Caller holds the lock and one reader reference of its own."""
    if (entry.host_off is not None and entry.readers == 1 and not entry.deleted
            and not entry.moving and entry.loading is None):
        svc.host.free(entry.ns.tenant, entry.host_off, entry.nbytes)
        entry.host_off = None


def _claim(svc: CacheService, entry: BlockEntry) -> None:
    """Wait until nobody else writes this block out, then mark it as ours to write.

    Caller holds the lock. Demotions and other moves skip or wait for a `moving` block, so
    one block never gets two NVMe copies (the second would leak its space)."""
    if not svc.cond.wait_for(lambda: not entry.moving, MOVE_WAIT_SECONDS):
        raise Unavailable("the block is being moved by another call; retry", field="keys")
    entry.moving = True


def _release_claim(svc: CacheService, entry: BlockEntry) -> None:
    entry.moving = False
    svc.cond.notify_all()


def _to_nvme(svc: CacheService, held: list[BlockEntry]) -> int:
    moved = 0
    for entry in held:
        with svc.cond:
            _claim(svc, entry)
            offset = None
            if entry.nvme_off is None:
                offset = svc.placer.allocate_nvme(entry.nbytes)
                if offset is None:
                    _release_claim(svc, entry)
                    raise ResourceExhausted("NVMe tier full", field="keys")
        stamped = False
        try:
            if offset is not None:
                had_sums = entry.layer_sums is not None
                data = _bytes_of(svc, entry)
                stamped = not had_sums and entry.layer_sums is not None
                svc.nvme.write(offset, data, header=nvme_header(entry))
        except BaseException:
            with svc.cond:
                svc.nvme.free(offset or 0, entry.nbytes)
                _release_claim(svc, entry)
            raise
        with svc.cond:
            if offset is not None:
                entry.nvme_off = offset
                svc.counters.nvme.bytes_written += entry.nbytes
            _release_claim(svc, entry)
            _drop_host_copy(svc, entry)
            svc.catalog.update_locations([(entry.ns.id, entry.key, entry.host_off, entry.nvme_off)])
            if stamped and entry.layer_sums is not None:
                svc.catalog.set_layer_sums([(entry.ns.id, entry.key, entry.layer_sums)])
        moved += 1
    return moved


def _to_csd(svc: CacheService, held: list[BlockEntry]) -> int:
    pool = svc.csd
    if pool is None:
        raise FailedPrecondition("no CSD workers are configured", field="tier")
    todo = [e for e in held if e.csd is None]
    if not todo:
        return len(held)
    workers = pool.pick(len(todo))
    for name in sorted(set(workers)):
        # Claimed in key order, so two moves over overlapping keys never wait on each other.
        mine = sorted((e for e, w in zip(todo, workers) if w == name), key=lambda e: e.key)
        with svc.cond:
            claimed: list[BlockEntry] = []
            try:
                for entry in mine:
                    _claim(svc, entry)
                    claimed.append(entry)
            except Unavailable:
                for entry in claimed:
                    _release_claim(svc, entry)
                raise
            for entry in [e for e in mine if e.csd is not None]:  # another move won
                _release_claim(svc, entry)
            mine = [e for e in mine if e.csd is None]
        if not mine:
            continue
        stored = False
        try:
            pool.store(name, mine[0].ns.layout, mine[0].ns.id,
                       [(e.key, e.checksum, _bytes_of(svc, e)) for e in mine])  # fmt: skip
            stored = True
        finally:
            with svc.cond:
                for entry in mine:
                    if stored:
                        entry.csd = name
                    _release_claim(svc, entry)
                    if stored:
                        _drop_host_copy(svc, entry)
                        if entry.nvme_off is not None and entry.readers == 1:
                            svc.nvme.free(entry.nvme_off, entry.nbytes)
                            entry.nvme_off = None
                if stored:
                    svc.catalog.set_csd([(e.ns.id, e.key, name) for e in mine])
                    svc.catalog.update_locations(
                        [(e.ns.id, e.key, e.host_off, e.nvme_off) for e in mine]
                    )
    return len(held)
