"""Interleavings of the core's calls, each forced step by step: a placement thread held at
the start of its pass, a catalog commit that fails at a chosen moment, a call parked
where it waits for room. Each test checks the books and the bytes afterwards."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from tests.core.conftest import (
    BB,
    LAYOUT,
    Harness,
    block_bytes_for,
    get_blocks,
    keys_for,
    put_blocks,
)
from tests.tiers.dict_tier import DictTier
from tierd.config import Config, TierSpec
from tierd.core import moves, placement
from tierd.core.service import CacheService
from tierd.errors import ResourceExhausted
from tierd.tiers import registry
from tierd.tiers.base import BlockRef, Copy
from tierd.tiers.io_backend import ALIGNMENT
from tierd.tiers.registry import TierContext

DEADLINE_S = 20.0


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


class PassGate:
    """Holds the placement thread at the start of its next pass until opened."""

    def __init__(self, svc: CacheService) -> None:
        self.fn = svc.reap
        self.entered = threading.Event()
        self.opened = threading.Event()
        svc.reap = self  # type: ignore[method-assign]
        assert self.entered.wait(DEADLINE_S), "the placement thread never started a pass"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        self.opened.wait(DEADLINE_S)
        return self.fn(*args, **kwargs)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_a_read_waiting_for_room_does_not_promote_a_block_again(harness: Harness) -> None:
    """Two gets of a block only on NVMe: the first waits for room in memory; the second
    finds room at once and promotes it. The first, once it has room, uses that copy: the
    copy the second's lease maps is never replaced (and freed) under it."""
    svc = harness.open(host_blocks=8, nvme_blocks=64)
    ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
    (x,) = keys_for(ns, 1, seed=1)
    put_blocks(svc, ns, [x])
    assert svc.move(ns, [x], "nvme") == 1 and svc.locate(ns, [x]) == ["nvme"]
    gate = PassGate(svc)
    fill = keys_for(ns, 8, seed=2)
    put_blocks(svc, ns, fill)  # memory full; no pass runs to make room
    assert svc.top.used_bytes == 8 * BB

    first, got_first = in_thread(lambda: svc.prepare_get(ns, [x]))
    wait_until(lambda: svc.placer._wanted >= BB, "the first get to wait for room")
    assert svc.delete(ns, fill[:1]) == 1  # room for one block, taken by the second get
    second = svc.prepare_get(ns, [x])
    assert second.slots[0].found
    gate.opened.set()  # passes run again: the first get gets room too
    first.join(DEADLINE_S)
    assert not first.is_alive() and not isinstance(got_first[0], BaseException), got_first
    try:
        entry = svc.index.get(ns, x)
        assert entry.copies["host"].location == second.slots[0].offset
        assert got_first[0].slots[0].offset == second.slots[0].offset
        info = svc.namespace(ns)
        put_blocks(svc, ns, keys_for(ns, 4, seed=3))  # would land in a freed copy
        assert bytes(svc.view(info, second.slots[0].offset)) == block_bytes_for(x)
    finally:
        svc.release(second.lease_id)
        svc.release(got_first[0].lease_id)
    assert svc.placer.settle(DEADLINE_S)
    assert get_blocks(svc, ns, [x]) == [block_bytes_for(x)]


def test_a_get_without_room_leaves_the_memory_copies_it_was_checking(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a restart a get of [a block in memory, not yet checked; a block only on NVMe]
    with memory full of blocks in use fails for want of room. The memory copy it was
    about to check stays: nothing showed it is damaged."""
    svc = harness.open(host_blocks=8, nvme_blocks=64)
    ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
    v, x = keys_for(ns, 2, seed=1)
    put_blocks(svc, ns, [v, x])
    assert svc.move(ns, [x], "nvme") == 1
    harness.close_all()
    svc = harness.open(host_blocks=8, nvme_blocks=64)
    assert not svc.index.get(ns, v).copies["host"].verified
    gate = PassGate(svc)
    other = svc.open_namespace("t2", "m", LAYOUT)[0].id  # its own lease limit
    fill = keys_for(other, 7, seed=2)
    put_blocks(svc, other, fill)
    held = svc.prepare_get(other, fill)  # memory full of blocks in use
    assert svc.top.used_bytes == 8 * BB
    monkeypatch.setattr(placement, "ROOM_WAIT_SECONDS", 0.5)  # no pass makes room
    with pytest.raises(ResourceExhausted):
        svc.prepare_get(ns, [v, x])
    gate.opened.set()
    svc.release(held.lease_id)
    assert svc.locate(ns, [v]) == ["host"]
    assert get_blocks(svc, ns, [v, x]) == [block_bytes_for(v), block_bytes_for(x)]
    assert svc.stats().corrupt_reads == 0


def test_a_failed_delete_whose_key_a_put_took_frees_the_old_copy_after_its_reader(
    harness: Harness,
) -> None:
    """A delete of a block being read fails to record; meanwhile a put of the same key is
    being recorded, so the old block cannot come back. Its copy is freed by its last
    reader (it was left neither indexed nor deleted: never freed, counted forever)."""
    svc = harness.open(host_blocks=16, nvme_blocks=64)
    ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
    (k,) = keys_for(ns, 1, seed=1)
    put_blocks(svc, ns, [k])
    reading = svc.prepare_get(ns, [k])
    real_run = svc.catalog.run
    putter: list[threading.Thread] = []

    def run(*plans: Any) -> None:
        if putter:
            return real_run(*plans)
        # The delete's commit: a put of the key reaches its record meanwhile, then the
        # catalog's disk turns out full.
        putter.append(in_thread(lambda: put_blocks(svc, ns, [k]))[0])
        wait_until(lambda: (ns, k) in svc.directory.pending, "the put to be recorded")
        raise ResourceExhausted("the catalog's disk is full")

    svc.catalog.run = run  # type: ignore[method-assign]
    with pytest.raises(ResourceExhausted):
        svc.delete(ns, [k])
    putter[0].join(DEADLINE_S)
    assert not putter[0].is_alive()
    svc.catalog.run = real_run  # type: ignore[method-assign]
    assert svc.locate(ns, [k]) == ["host"]  # the put's block
    svc.release(reading.lease_id)
    assert svc.top.used_bytes == BB
    assert svc.directory.usage("host") == {"t1": BB} and svc.directory.blocks_in("host") == 1
    assert get_blocks(svc, ns, [k]) == [block_bytes_for(k)]


def test_a_block_being_deleted_never_touches_the_block_that_took_its_key(
    harness: Harness,
) -> None:
    """While a delete commits, the daemon stores a new block under the same key and a
    reader of the old one finds its copy damaged. Dropping the old block must neither
    unindex the new one nor erase its catalog row."""
    svc = harness.open(host_blocks=16, nvme_blocks=64)
    ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
    info = svc.namespace(ns)
    (k,) = keys_for(ns, 1, seed=1)
    put_blocks(svc, ns, [k])
    old = svc.index.get(ns, k)
    old_copy = old.copies["host"]
    real_run = svc.catalog.run
    new: list[Any] = []

    def others() -> None:
        new.append(svc.store_block(info, k, memoryview(block_bytes_for(k))))
        svc.drop_corrupt_copy(old, "host", old_copy.location)

    def run(*plans: Any) -> None:
        real_run(*plans)
        if not new:  # the delete is on record; it has not yet marked the block deleted
            t, _ = in_thread(others)
            t.join(DEADLINE_S)
            assert not t.is_alive()

    svc.catalog.run = run  # type: ignore[method-assign]
    assert svc.delete(ns, [k]) == 1
    svc.catalog.run = real_run  # type: ignore[method-assign]
    (entry,) = new
    assert entry is not None and entry is not old
    with svc.cond:
        svc.drop_reader(entry)
    assert svc.index.get(ns, k) is entry and svc.locate(ns, [k]) == ["host"]
    svc.directory.log.commit_all()
    rows = {r.key: r.copies for r in svc.catalog.blocks()}
    assert [c.location for c in rows[k]] == [entry.copies["host"].location]
    assert svc.top.used_bytes == BB and svc.directory.blocks_in("host") == 1


def test_a_write_that_fails_to_start_leaves_no_block_claimed(harness: Harness) -> None:
    """A tier whose write raises before it returns a future (the NVMe store refuses an
    extent, or is closed) fails that demotion like any failed write: the blocks are no
    longer claimed, the space reserved for them is given back, and the next pass
    demotes them."""
    svc = harness.open(host_blocks=8, nvme_blocks=64)
    nvme = svc.tiers.get("nvme")
    write = nvme.write
    failed = threading.Event()

    def refuse_once(*args: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise OSError(5, "refused before it started")
        return write(*args)

    nvme.write = refuse_once  # type: ignore[method-assign]
    ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
    keys = keys_for(ns, 16, seed=1)
    for i in range(0, 16, 4):
        put_blocks(svc, ns, keys[i : i + 4])
    assert svc.placer.settle(DEADLINE_S) and failed.is_set()
    assert svc.directory.moving == 0
    on_nvme = svc.directory.blocks_in("nvme")
    assert on_nvme > 0 and nvme.used_bytes == on_nvme * (ALIGNMENT + BB)  # header page each
    assert get_blocks(svc, ns, keys[:4]) == [block_bytes_for(k) for k in keys[:4]]


def test_a_move_naming_a_block_twice_moves_it_once(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Move's keys may repeat (only puts refuse that): the block is claimed once, not
    waited for as if another call were moving it."""
    monkeypatch.setattr(moves, "MOVE_WAIT_SECONDS", 2.0)
    svc = harness.open(host_blocks=16, nvme_blocks=64)
    ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
    a, b = keys_for(ns, 2, seed=1)
    put_blocks(svc, ns, [a, b])
    assert svc.move(ns, [a, b, a], "nvme") == 2
    assert svc.locate(ns, [a, b]) == ["nvme", "nvme"] and svc.directory.moving == 0
    assert svc.move(ns, [a, a], "host") == 1
    assert all(e.readers == 0 for e in svc.index.entries())
    assert get_blocks(svc, ns, [a, b]) == [block_bytes_for(a), block_bytes_for(b)]


def test_a_sealed_tail_never_attends_over_an_unchecked_copy_of_its_key(
    harness: Harness,
) -> None:
    """After a restart a block's memory copy is checked before first use. A sequence whose
    tail seals into that block's key takes the cached block: it is checked then too, and,
    damaged, replaced by the tail's own bytes, so attention is exact."""
    import torch

    from tierd.attention.attend import AttendCall
    from tierd_client.keys import block_keys

    svc = harness.open()
    ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
    gen = torch.Generator().manual_seed(0)
    shape = (LAYOUT.num_layers, 2, LAYOUT.num_kv_heads, LAYOUT.block_tokens, LAYOUT.head_dim)
    kv = torch.randn(shape, generator=gen).to(torch.float16)
    tokens = list(range(100, 100 + LAYOUT.block_tokens))
    (key,) = block_keys(ns, tokens, LAYOUT.block_tokens)
    prepared = svc.prepare_put(ns, [key], LAYOUT.block_shape, LAYOUT.dtype)
    area = svc.leases.get(prepared.lease_id).area
    svc.staging.view(area, prepared.slots[0].offset, BB)[:] = kv.numpy().tobytes()
    svc.commit_put(prepared.lease_id)
    where = svc.index.get(ns, key).copies["host"].location
    seg = svc.top.arena.segment("t1")
    harness.close_all()
    with open(seg.path, "r+b") as f:  # torn by a crash: layer 0's keys are zeros
        f.seek(where)
        f.write(bytes(BB // 4))

    svc = harness.open()
    seq, _ = svc.attend.open_sequence(ns, [])
    q = torch.randn((1, LAYOUT.num_kv_heads, LAYOUT.head_dim), generator=gen)
    for layer in range(LAYOUT.num_layers):
        svc.attend.attend([AttendCall(seq, layer, q, kv[layer, 0].float(), kv[layer, 1].float(),
                                      tuple(tokens) if layer == 0 else ())])  # fmt: skip
    assert svc.attend.sequences.get(seq).block_tokens_cached == LAYOUT.block_tokens
    ((out, _),) = svc.attend.attend([AttendCall(seq, 0, q)])
    k, v = kv[0, 0].float(), kv[0, 1].float()
    p = torch.softmax(torch.einsum("qhd,hkd->hqk", q, k) / LAYOUT.head_dim**0.5, -1)
    assert torch.allclose(out, torch.einsum("hqk,hkd->qhd", p, v), atol=1e-3)
    assert svc.stats().corrupt_reads == 1
    svc.attend.close_sequence(seq)
    assert get_blocks(svc, ns, [key]) == [kv.numpy().tobytes()]


def test_a_change_that_failed_is_reported_however_many_failed_after_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The write log tells each waiter whether its change was recorded. A waiter whose
    change failed hears so even if many later batches failed before it asked (the
    failures remembered were bounded, and the oldest silently read as recorded)."""
    svc = harness.open()
    log = svc.directory.log

    def full(*plans: Any) -> None:
        raise ResourceExhausted("the catalog's disk is full")

    monkeypatch.setattr(svc.catalog, "run", full)
    mine = log.add([])
    log.commit_all()  # another caller's commit takes this change with it, and fails
    for _ in range(300):  # more failures, each its own batch, before the waiter asks
        log.add([])
        log.commit_all()
    with pytest.raises(ResourceExhausted):
        log.commit(mine)


class SlotTier(DictTier):
    """A dict tier whose next read, while `hold_read` is set, parks until it is set."""

    kind = "slots"
    hold_read: threading.Event | None = None
    reading = threading.Event()

    @classmethod
    def open(cls, spec: TierSpec, context: TierContext) -> SlotTier:
        return cls(spec, {}, BB)

    def read(self, block: BlockRef, copy: Copy, out: memoryview) -> Future[None]:
        gate, SlotTier.hold_read = SlotTier.hold_read, None
        if gate is not None:
            SlotTier.reading.set()
            gate.wait(DEADLINE_S)
        return super().read(block, copy, out)


@pytest.fixture
def slot_chain(tmp_path: Path) -> Iterator[CacheService]:
    registry.KINDS["slots"] = f"{__name__}:SlotTier"
    cfg = Config(data_dir=tmp_path / "data", tier_list=(
        TierSpec("mem", "host", 16 * BB, options=(("pin_memory", False),)),
        TierSpec("near", "slots", 16 * BB), TierSpec("far", "slots", 16 * BB),
    )).resolved()  # fmt: skip
    svc = CacheService(cfg)
    svc.start()
    try:
        yield svc
    finally:
        svc.close()
        svc.top.arena.destroy()
        del registry.KINDS["slots"]


def test_a_move_keeps_the_copy_a_load_is_reading(slot_chain: CacheService) -> None:
    """A get promotes a block from "near" while a move sends it to "far": the copy being
    read stays until its readers are gone (freed under the read, the get missed a block
    that was cached all along)."""
    svc = slot_chain
    ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
    (k,) = keys_for(ns, 1, seed=1)
    put_blocks(svc, ns, [k])
    assert svc.move(ns, [k], "near") == 1 and svc.locate(ns, [k]) == ["near"]
    SlotTier.reading.clear()
    SlotTier.hold_read = opened = threading.Event()
    getter, got = in_thread(lambda: get_blocks(svc, ns, [k]))
    assert SlotTier.reading.wait(DEADLINE_S)  # the promotion reads "near"
    try:
        assert svc.move(ns, [k], "far") == 1
    finally:
        opened.set()
    getter.join(DEADLINE_S)
    assert got == [[block_bytes_for(k)]]
    assert svc.stats().corrupt_reads == 0


def test_a_sequence_never_attends_over_a_memory_copy_found_damaged(harness: Harness) -> None:
    """A move finds a block's memory copy damaged while a sequence holds the block: the
    copy, being read, is only marked for a check. The sequence's next attend runs that
    check instead of attending over the damaged bytes."""
    import torch

    from tierd.attention.attend import AttendCall
    from tierd.errors import DataLoss, FailedPrecondition

    svc = harness.open()
    ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
    (k,) = keys_for(ns, 1, seed=1)
    put_blocks(svc, ns, [k])
    seq, _ = svc.attend.open_sequence(ns, [k])
    copy = svc.index.get(ns, k).copies["host"]
    svc.top.view("t1", copy.location, BB)[: BB // 4] = bytes(BB // 4)  # damaged in memory
    with pytest.raises(DataLoss):
        svc.move(ns, [k], "nvme")  # its source check finds it
    assert not copy.verified
    q = torch.randn((1, LAYOUT.num_kv_heads, LAYOUT.head_dim))
    with pytest.raises(FailedPrecondition, match="no longer cached"):
        svc.attend.attend([AttendCall(seq, 0, q)])
    assert svc.locate(ns, [k]) == [""] and svc.stats().corrupt_reads == 1
    svc.attend.close_sequence(seq)
    assert svc.top.used_bytes == 0
