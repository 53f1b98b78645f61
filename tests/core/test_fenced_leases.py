"""Fenced leases: once a put lease has ended, nothing written under it reaches a block, and
no write lands in memory that now belongs to another lease or block."""

from __future__ import annotations

import time

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
from tierd.errors import FailedPrecondition


def _ns(svc):
    ns, _ = svc.open_namespace("t1", "m", LAYOUT)
    return ns


def test_inband_stream_past_its_lease_writes_nothing(harness: Harness) -> None:
    svc = harness.open()
    ns = _ns(svc)
    slow_keys, other_keys = keys_for(ns.id, 2, seed=1), keys_for(ns.id, 2, seed=2)
    slow = svc.begin_inband_put(ns.id, slow_keys, LAYOUT.block_shape, LAYOUT.dtype)
    slow.write(b"\x11" * (BB // 2))  # half of its first block, then it stalls
    svc.reap(now=float("inf"))  # ...past its lease
    # Another put of the tenant now holds (some of) the staging the slow one had.
    other = svc.prepare_put(ns.id, other_keys, LAYOUT.block_shape, LAYOUT.dtype)
    for key, slot in zip(other_keys, other.slots):
        slot_view(svc, other.lease_id, slot.offset)[:] = block_bytes_for(key)
    with pytest.raises(FailedPrecondition) as e:
        slow.write(b"\x22" * (BB + BB // 2))  # the rest of the slow stream
    assert e.value.field == "lease_id"
    assert svc.commit_put(other.lease_id) == 2
    assert get_blocks(svc, ns.id, other_keys) == [block_bytes_for(k) for k in other_keys]
    assert get_blocks(svc, ns.id, slow_keys) == [None, None]  # the slow put never landed


def test_commit_after_expiry_fails_cleanly(harness: Harness) -> None:
    svc = harness.open()
    ns = _ns(svc)
    keys = keys_for(ns.id, 3, seed=3)
    prepared = svc.prepare_put(ns.id, keys, LAYOUT.block_shape, LAYOUT.dtype, ttl_ms=1)
    for key, slot in zip(keys, prepared.slots):
        slot_view(svc, prepared.lease_id, slot.offset)[:] = block_bytes_for(key)
    svc.reap(now=float("inf"))
    with pytest.raises(FailedPrecondition):
        svc.commit_put(prepared.lease_id)
    assert get_blocks(svc, ns.id, keys) == [None] * 3
    assert svc.staging.used_bytes("t1") == 0 and svc.top.used_bytes == 0


def test_writes_to_staging_after_commit_never_reach_the_block(harness: Harness) -> None:
    """A client that keeps writing into its slot after committing changes nothing stored:
    the block is the daemon's copy, checksummed at commit."""
    svc = harness.open()
    ns = _ns(svc)
    keys = keys_for(ns.id, 2, seed=4)
    prepared = svc.prepare_put(ns.id, keys, LAYOUT.block_shape, LAYOUT.dtype)
    views = [slot_view(svc, prepared.lease_id, slot.offset) for slot in prepared.slots]
    for key, view in zip(keys, views):
        view[:] = block_bytes_for(key)
    assert svc.commit_put(prepared.lease_id) == 2
    for view in views:  # the misbehaving client, after the fact
        view[:] = b"\xee" * BB
    assert get_blocks(svc, ns.id, keys) == [block_bytes_for(k) for k in keys]
    # And a later put that reuses the slots stores its own bytes.
    more = keys_for(ns.id, 2, seed=5)
    assert put_blocks(svc, ns.id, more) == 2
    assert get_blocks(svc, ns.id, keys + more) == [block_bytes_for(k) for k in keys + more]


def test_a_lease_being_written_is_not_reaped(harness: Harness) -> None:
    svc = harness.open()
    ns = _ns(svc)
    keys = keys_for(ns.id, 1, seed=6)
    writer = svc.begin_inband_put(ns.id, keys, LAYOUT.block_shape, LAYOUT.dtype)
    lease = svc.leases.get(writer._prepared.lease_id)
    with svc.cond:
        lease.writers += 1  # as write_staging does while it copies a chunk
    svc.reap(now=float("inf"))
    assert svc.leases.get(lease.id) is lease  # still there: its slot is being written
    with svc.cond:
        lease.writers -= 1
    writer.write(block_bytes_for(keys[0]))
    assert writer.finish() == ["stored"]
    assert get_blocks(svc, ns.id, keys) == [block_bytes_for(keys[0])]


def test_expired_shared_memory_lease_retires_its_staging(harness: Harness) -> None:
    """A client whose shared-memory lease expired may still write into its slots. The next
    puts never get those slots: the tenant's staging area is retired (new leases go to a
    new one), so the late writes reach no other put."""
    svc = harness.open()
    ns = _ns(svc)
    slow_keys, other_keys = keys_for(ns.id, 2, seed=7), keys_for(ns.id, 2, seed=8)
    slow = svc.prepare_put(ns.id, slow_keys, LAYOUT.block_shape, LAYOUT.dtype, ttl_ms=1)
    stale = [slot_view(svc, slow.lease_id, s.offset) for s in slow.slots]  # its mapping
    svc.reap(now=float("inf"))
    other = svc.prepare_put(ns.id, other_keys, LAYOUT.block_shape, LAYOUT.dtype)
    assert other.segment.staging_generation != slow.segment.staging_generation
    for key, slot in zip(other_keys, other.slots):
        slot_view(svc, other.lease_id, slot.offset)[:] = block_bytes_for(key)
    for view in stale:  # the stalled client wakes up
        view[:] = b"\x5a" * BB
    assert svc.commit_put(other.lease_id) == 2
    assert get_blocks(svc, ns.id, other_keys) == [block_bytes_for(k) for k in other_keys]
    # The retired area went away with its last lease; staging holds nothing now.
    assert svc.staging.used_bytes("t1") == 0


def test_inband_leases_are_out_of_reach_of_commit_and_release_calls(harness: Harness) -> None:
    svc = harness.open()
    ns = _ns(svc)
    keys = keys_for(ns.id, 1, seed=9)
    writer = svc.begin_inband_put(ns.id, keys, LAYOUT.block_shape, LAYOUT.dtype)
    lease_id = writer._prepared.lease_id
    writer.write(block_bytes_for(keys[0])[: BB // 2])
    # What a client's CommitPut / Release with a guessed id would do:
    with pytest.raises(FailedPrecondition):
        svc.commit_put(lease_id)
    assert not svc.release(lease_id)
    writer.write(block_bytes_for(keys[0])[BB // 2 :])
    assert writer.finish() == ["stored"]
    assert get_blocks(svc, ns.id, keys) == [block_bytes_for(keys[0])]


def test_a_catalog_that_cannot_record_a_demotion_leaves_blocks_in_host(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierd.errors import ResourceExhausted

    svc = harness.open(host_blocks=8, nvme_blocks=64)
    ns = _ns(svc)
    keys = keys_for(ns.id, 6, seed=10)
    assert put_blocks(svc, ns.id, keys) == 6

    def full(*_a, **_k):
        raise ResourceExhausted("the catalog's disk is full")

    monkeypatch.setattr(svc.catalog, "run", full)  # every catalog write fails
    assert svc.placer.flush(deadline=time.monotonic() + 1) >= 0
    assert not any(e.moving for e in svc.index.entries())  # nothing stuck mid-move
    assert all("host" in e.copies and "nvme" not in e.copies for e in svc.index.entries())
    assert svc.tiers.get("nvme").store.used_bytes == 0  # the extents written for nothing were freed
    monkeypatch.undo()
    assert svc.placer.flush(deadline=time.monotonic() + 5) == 6
    assert all("nvme" in e.copies for e in svc.index.entries())
    assert get_blocks(svc, ns.id, keys) == [block_bytes_for(k) for k in keys]
