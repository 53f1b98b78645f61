"""CacheService against real tiers: placement, durability, integrity, leases, bad input."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest

from tests.core.conftest import (
    BB,
    LAYOUT,
    Harness,
    block_bytes_for,
    get_blocks,
    keys_for,
    put_blocks,
    slot_view,
)
from tierd.core.service import CacheService
from tierd.errors import FailedPrecondition, InvalidArgument, ResourceExhausted


def open_ns(svc, tenant: str = "t1", model: str = "m"):
    ns, _ = svc.open_namespace(tenant, model, LAYOUT)
    return ns.id


def test_round_trip_is_byte_exact(harness: Harness) -> None:
    svc = harness.open()
    ns = open_ns(svc)
    keys = keys_for(ns, 8)
    assert put_blocks(svc, ns, keys) == 8
    assert get_blocks(svc, ns, keys) == [block_bytes_for(k) for k in keys]
    assert svc.stats().tiers[0].blocks == 8


def test_lookup_returns_longest_cached_prefix(harness: Harness) -> None:
    svc = harness.open()
    ns = open_ns(svc)
    tokens = np.arange(16 * 5) + 7
    from tierd_client.keys import block_keys

    keys = block_keys(ns, tokens, 16)
    put_blocks(svc, ns, keys[:3])
    put_blocks(svc, ns, keys[4:])  # a hole at block 3: the prefix stops there
    result = svc.lookup(ns, np.concatenate([tokens, [1, 2, 3]]))
    assert result.cached_tokens == 48
    assert [k for k, _ in result.blocks] == keys[:3]
    assert svc.lookup(ns, tokens[:15]).cached_tokens == 0


def test_namespaces_never_share_blocks(harness: Harness) -> None:
    svc = harness.open()
    a, b = open_ns(svc, "alice"), open_ns(svc, "bob")
    tokens = np.arange(32)
    from tierd_client.keys import block_keys

    put_blocks(svc, a, block_keys(a, tokens, 16))
    assert svc.lookup(b, tokens).cached_tokens == 0
    # Even a key taken from the other namespace is not found in this one.
    assert get_blocks(svc, b, block_keys(a, tokens, 16)) == [None, None]


def test_second_put_reports_already_present_and_race_keeps_one_copy(harness: Harness) -> None:
    svc = harness.open()
    ns = open_ns(svc)
    keys = keys_for(ns, 2)
    p1 = svc.prepare_put(ns, keys, LAYOUT.block_shape, LAYOUT.dtype)
    p2 = svc.prepare_put(ns, keys, LAYOUT.block_shape, LAYOUT.dtype)
    assert {s.state for s in p1.slots + p2.slots} == {"leased"}
    for p in (p1, p2):
        for k, s in zip(keys, p.slots):
            slot_view(svc, p.lease_id, s.offset)[:] = block_bytes_for(k)
    assert svc.commit_put(p1.lease_id) == 2
    assert svc.commit_put(p2.lease_id) == 0  # lost the race: its slots are freed
    assert svc.top.used_bytes == 2 * BB
    again = svc.prepare_put(ns, keys, LAYOUT.block_shape, LAYOUT.dtype)
    assert again.lease_id == 0 and {s.state for s in again.slots} == {"already_present"}


def test_pressure_demotes_to_nvme_and_get_promotes(harness: Harness) -> None:
    svc = harness.open(host_blocks=16, nvme_blocks=128)
    ns = open_ns(svc)
    keys = keys_for(ns, 60)
    for i in range(0, 60, 4):
        put_blocks(svc, ns, keys[i : i + 4])
    assert svc.placer.settle(10)
    stats = svc.stats()
    assert stats.demotions > 0
    assert stats.tiers[0].used_bytes <= 16 * BB * 0.9
    tiers = dict(svc.lookup(ns, np.zeros(0)).blocks)  # nothing, but lookup works on empty
    assert tiers == {}
    prepared = svc.prepare_get(ns, keys[:4])
    assert [s.tier for s in prepared.slots] == ["nvme"] * 4  # oldest were demoted
    svc.release(prepared.lease_id)
    for i in range(0, 60, 4):  # a get holds its blocks in host: batches must fit there
        assert get_blocks(svc, ns, keys[i : i + 4]) == [block_bytes_for(k) for k in keys[i : i + 4]]
    assert svc.stats().promotions >= 4


def test_nvme_evicts_lru_but_never_pinned(harness: Harness) -> None:
    svc = harness.open(host_blocks=8, nvme_blocks=32)
    ns = open_ns(svc)
    keys = keys_for(ns, 100)
    put_blocks(svc, ns, keys[:4])
    assert svc.set_pinned(ns, keys[:4], True) == 4
    for i in range(4, 100, 4):
        put_blocks(svc, ns, keys[i : i + 4])
        assert svc.placer.settle(10)
    got = [g for i in range(0, 100, 4) for g in get_blocks(svc, ns, keys[i : i + 4])]
    assert got[:4] == [block_bytes_for(k) for k in keys[:4]]  # pinned survive
    kept = [k for k, g in zip(keys, got) if g is not None]
    assert len(kept) <= 8 + 32
    assert all(g == block_bytes_for(k) for k, g in zip(keys, got) if g is not None)
    assert svc.stats().tiers[1].counters.evictions > 0
    assert svc.tiers.get("nvme").store.used_bytes <= svc.tiers.get("nvme").store.capacity


def test_restart_keeps_host_and_nvme_blocks(harness: Harness) -> None:
    svc = harness.open(host_blocks=16, nvme_blocks=128)
    ns = open_ns(svc)
    keys = keys_for(ns, 40)
    for i in range(0, 40, 8):
        put_blocks(svc, ns, keys[i : i + 8])
    assert svc.placer.settle(10)
    harness.close_all()
    svc2 = harness.open(host_blocks=16, nvme_blocks=128)
    for i in range(0, 40, 8):
        assert get_blocks(svc2, ns, keys[i : i + 8]) == [block_bytes_for(k) for k in keys[i : i + 8]]
    assert svc2.stats().corrupt_reads == 0


def test_corrupt_nvme_block_is_a_counted_miss(harness: Harness) -> None:
    svc = harness.open(host_blocks=8, nvme_blocks=64)
    ns = open_ns(svc)
    keys = keys_for(ns, 24)
    for i in range(0, 24, 4):
        put_blocks(svc, ns, keys[i : i + 4])
    assert svc.placer.settle(10)
    victim = svc.index.get(ns, keys[0])
    assert victim is not None and "host" not in victim.copies and "nvme" in victim.copies
    with open(svc.tiers.get("nvme").store.path, "r+b") as f:  # flip bytes behind the daemon's back
        f.seek(victim.copies["nvme"].location + 100)
        f.write(b"\xff" * 8)
    got = get_blocks(svc, ns, keys[:2])
    assert got[0] is None and got[1] == block_bytes_for(keys[1])
    assert svc.stats().corrupt_reads == 1
    assert svc.lookup(ns, np.zeros(0)).cached_tokens == 0
    assert svc.index.get(ns, keys[0]) is None


def _reopened_with_host_copy_damaged(
    harness: Harness, svc: CacheService, ns: bytes, key: bytes
) -> CacheService:
    """Close the services, flip bytes of `key`'s host copy in its shared-memory segment,
    and open the service again (which adopts the damaged copy)."""
    entry = svc.index.get(ns, key)
    seg = svc.top.arena.segment("t1")
    harness.close_all()
    with open(seg.path, "r+b") as f:
        f.seek(entry.copies["host"].location + 5)
        f.write(b"\x00\x01\x02")
    return harness.open()


def test_corrupt_host_copy_after_restart_is_not_returned(harness: Harness) -> None:
    svc = harness.open()
    ns = open_ns(svc)
    keys = keys_for(ns, 3)
    put_blocks(svc, ns, keys)
    svc2 = _reopened_with_host_copy_damaged(harness, svc, ns, keys[1])
    got = get_blocks(svc2, ns, keys)
    assert got == [block_bytes_for(keys[0]), None, block_bytes_for(keys[2])]
    assert svc2.stats().corrupt_reads == 1


def test_expired_leases_return_their_memory(harness: Harness) -> None:
    svc = harness.open()
    ns = open_ns(svc)
    put_blocks(svc, ns, keys_for(ns, 2, seed=1))
    used = svc.top.used_bytes
    # Long enough that the placement thread's own reaping cannot end them first; the
    # reap below runs at the end of time.
    svc.prepare_put(ns, keys_for(ns, 4, seed=2), LAYOUT.block_shape, LAYOUT.dtype, ttl_ms=60_000)
    held = svc.prepare_get(ns, keys_for(ns, 2, seed=1), ttl_ms=60_000)
    # A put lease holds staging, not host-tier space, until it commits.
    assert svc.staging.used_bytes("t1") == 4 * BB
    assert svc.top.used_bytes == used
    svc.reap(now=float("inf"))
    assert svc.staging.used_bytes("t1") == 0
    assert svc.top.used_bytes == used
    assert all(e.readers == 0 for e in svc.index.entries())
    with pytest.raises(FailedPrecondition):
        svc.commit_put(held.lease_id)


def test_delete_while_read_frees_only_after_release(harness: Harness) -> None:
    svc = harness.open()
    ns = open_ns(svc)
    keys = keys_for(ns, 2)
    put_blocks(svc, ns, keys)
    prepared = svc.prepare_get(ns, keys)
    assert svc.delete(ns, keys) == 2
    assert svc.top.used_bytes == 2 * BB  # still being read
    nsinfo = svc.namespace(ns)
    assert bytes(svc.view(nsinfo, prepared.slots[0].offset)) == block_bytes_for(keys[0])
    svc.release(prepared.lease_id)
    assert svc.top.used_bytes == 0
    assert get_blocks(svc, ns, keys) == [None, None]


def test_full_host_with_nothing_movable_is_resource_exhausted(harness: Harness) -> None:
    svc = harness.open(host_blocks=4, nvme_blocks=64)
    ns = open_ns(svc)
    keys = keys_for(ns, 4)
    put_blocks(svc, ns, keys)
    # Leases may hold more than the host tier here (the default bound is the tier).
    svc.reconfigure(replace(svc.config, limits=replace(svc.config.limits,
                                                       max_lease_bytes_per_tenant=8 * BB)))
    held = svc.prepare_get(ns, keys)  # readers make all four unmovable
    prepared = svc.prepare_put(ns, keys_for(ns, 1, seed=9), LAYOUT.block_shape, LAYOUT.dtype)
    with pytest.raises(ResourceExhausted):
        svc.commit_put(prepared.lease_id)
    # The failed put left nothing behind: no block, no lease, no staging.
    assert svc.top.used_bytes == 4 * BB
    assert svc.staging.used_bytes("t1") == 0 and len(svc.leases) == 1
    assert not svc.release(prepared.lease_id)
    svc.release(held.lease_id)
    assert put_blocks(svc, ns, keys_for(ns, 1, seed=9)) == 1


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda s, ns: s.prepare_get(ns, [b"short"]), "keys[0]"),
        (lambda s, ns: s.prepare_get(b"\x00" * 16, [b"k" * 16]), "namespace_id"),
        (lambda s, ns: s.prepare_put(ns, [b"k" * 16], [2, 2, 2, 16, 32], "float16"),
         "shape.dims"),
        (lambda s, ns: s.prepare_put(ns, [b"k" * 16], LAYOUT.block_shape, "bfloat16"),
         "shape.dtype"),
        (lambda s, ns: s.prepare_put(ns, [b"k" * 16] * 2, LAYOUT.block_shape, "float16"),
         "keys[1]"),
        (lambda s, ns: s.prepare_get(ns, [b"k" * 16] * 70_000), "keys"),
        (lambda s, ns: s.lookup(ns, [1, -2]), "tokens"),
        (lambda s, ns: s.prepare_get(ns, [b"k" * 16], ttl_ms=10**9), "lease_ttl_ms"),
        (lambda s, ns: s.commit_put(12345), "lease_id"),
    ],
)
def test_bad_input_names_the_field(harness: Harness, call, field: str) -> None:
    svc = harness.open()
    ns = open_ns(svc)
    with pytest.raises((InvalidArgument, FailedPrecondition)) as info:
        call(svc, ns)
    assert info.value.field == field
    assert svc.top.used_bytes == 0


def test_truncated_inband_put_leaves_no_trace(harness: Harness) -> None:
    svc = harness.open()
    ns = open_ns(svc)
    keys = keys_for(ns, 3)
    writer = svc.begin_inband_put(ns, keys, LAYOUT.block_shape, LAYOUT.dtype)
    writer.write(b"\x01" * (2 * BB + 100))
    with pytest.raises(InvalidArgument) as info:
        writer.finish()
    writer.abort()
    assert info.value.field == "data"
    assert svc.top.used_bytes == 0 and len(svc.index) == 0
    writer = svc.begin_inband_put(ns, keys, LAYOUT.block_shape, LAYOUT.dtype)
    with pytest.raises(InvalidArgument):
        writer.write(b"\x01" * (3 * BB + 1))
    writer.abort()
    assert svc.top.used_bytes == 0


def test_a_get_meeting_a_corrupt_host_copy_reads_the_intact_slower_one(harness: Harness) -> None:
    """A memory copy adopted after a restart that fails its check is dropped, and the same
    get then reads the block from its next copy: a miss only when no intact copy is left."""
    svc = harness.open()
    ns = open_ns(svc)
    keys = keys_for(ns, 3)
    put_blocks(svc, ns, keys)
    assert svc.placer.flush(time.monotonic() + 30) == 3  # written out to NVMe
    assert get_blocks(svc, ns, keys) == [block_bytes_for(k) for k in keys]  # and promoted
    assert set(svc.index.get(ns, keys[1]).copies) == {"host", "nvme"}
    svc2 = _reopened_with_host_copy_damaged(harness, svc, ns, keys[1])
    assert get_blocks(svc2, ns, keys) == [block_bytes_for(k) for k in keys]
    assert svc2.stats().corrupt_reads == 1
    again = svc2.index.get(ns, keys[1])
    assert again is not None and "host" in again.copies  # promoted from NVMe, checked
