"""Attend never computes on bytes it has not verified: a flipped byte in an NVMe block or a
CSD shard makes the call fail with DataLoss naming the block, never a wrong answer."""

from __future__ import annotations

import os
import sqlite3

import pytest
import torch

from tests.attention.test_attend_core import DIM, GROUP, KV_HEADS, LAYERS, dense, layout, service
from tests.attention.test_attend_core import put_sequence as put_blocks
from tierd.attention.attend import AttendCall
from tierd.core.service import CacheService
from tierd.csd.shard import CATALOG_FILE
from tierd.errors import DataLoss, FailedPrecondition
from tierd.tiers.nvme import DATA_FILE


@pytest.fixture
def core(tmp_path):
    yield from service(tmp_path, 64)


@pytest.fixture
def csd_core(tmp_path):
    yield from service(tmp_path, 64, csd_workers=1)


def flip(path: os.PathLike, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0x5A]), offset)
    finally:
        os.close(fd)


def query(layer: int) -> torch.Tensor:
    return torch.randn(1, KV_HEADS * GROUP, DIM, generator=torch.Generator().manual_seed(layer))


def attend(svc: CacheService, seq_id: int, layer: int) -> torch.Tensor:
    ((out, _),) = svc.attend.attend([AttendCall(seq_id, layer, query(layer))])
    return out


def check_exact(svc: CacheService, seq_id: int, kv: torch.Tensor, layer: int) -> None:
    want = dense(query(layer), kv[layer, 0], kv[layer, 1])
    out = attend(svc, seq_id, layer)
    assert ((out.double() - want).norm() / want.norm()) <= 1e-5


@pytest.mark.parametrize("old_catalog", [False, True], ids=["layer-sums", "whole-block"])
def test_flipped_nvme_byte_fails_attend_naming_the_block(core: CacheService, old_catalog: bool):
    svc = core
    lay = layout("float32")
    ns, keys, _, kv = put_blocks(svc, lay, 6, seed=3)
    assert svc.move(ns.id, keys, "nvme") == len(keys)
    victim = svc.index.get(ns.id, keys[4])
    assert svc.directory.best_name(victim) == "nvme" and victim.layer_sums is not None
    if old_catalog:  # rows of a release without per-layer checksums
        for k in keys:
            svc.index.get(ns.id, k).layer_sums = None
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    check_exact(svc, seq_id, kv, 1)  # intact: exact (and whole-block rows get their sums)
    assert victim.layer_sums is not None
    span = lay.block_bytes // LAYERS
    flip(svc.tiers.get("nvme").store.path, victim.copies["nvme"].location + 1 * span + 77)  # inside layer 1 of block 4
    before = svc.stats().corrupt_reads
    with pytest.raises(DataLoss) as e:
        attend(svc, seq_id, 1)
    assert keys[4].hex() in e.value.message and e.value.field == "sequence_id"
    assert svc.stats().corrupt_reads == before + 1
    assert svc.index.get(ns.id, keys[4]) is None  # dropped: it will not get better
    with pytest.raises(FailedPrecondition):  # the sequence now lacks it: never partial
        attend(svc, seq_id, 0)
    svc.attend.close_sequence(seq_id)
    assert not svc.prepare_get(ns.id, [keys[4]]).slots[0].found
    # The other blocks still serve exactly in a sequence without it.
    seq2, _ = svc.attend.open_sequence(ns.id, keys[:4])
    ((out, _),) = svc.attend.attend([AttendCall(seq2, 2, query(2))])
    want = dense(query(2), kv[2, 0, :, : 4 * lay.block_tokens], kv[2, 1, :, : 4 * lay.block_tokens])
    assert ((out.double() - want).norm() / want.norm()) <= 1e-5


def test_layer_sums_are_on_record(core: CacheService) -> None:
    svc = core
    lay = layout("bfloat16")
    ns, keys, _, _ = put_blocks(svc, lay, 3, seed=4)
    svc.move(ns.id, keys, "nvme")
    db = sqlite3.connect(svc.config.data_dir / "index.sqlite3")
    blobs = [r[0] for r in db.execute("SELECT layer_sums FROM blocks")]
    db.close()
    assert len(blobs) == 3 and all(b is not None and len(b) == 8 * LAYERS for b in blobs)


def test_flipped_csd_byte_fails_attend_naming_the_block(csd_core: CacheService) -> None:
    svc = csd_core
    lay = layout("float32")
    ns, keys, _, kv = put_blocks(svc, lay, 4, seed=9)
    assert svc.move(ns.id, keys, "csd") == len(keys)
    victim = svc.index.get(ns.id, keys[2])
    assert svc.directory.best_name(victim) == "csd"
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    check_exact(svc, seq_id, kv, 2)  # after a first read, layer reads still verify
    shard = svc.config.data_dir / "csd" / str(victim.copies["csd"].location)
    with sqlite3.connect(shard / CATALOG_FILE) as db:
        (off,) = db.execute("SELECT offset FROM blocks WHERE key = ?", (keys[2],)).fetchone()
    span = lay.block_bytes // LAYERS
    flip(shard / DATA_FILE, off + 2 * span + 5)
    with pytest.raises(DataLoss) as e:
        attend(svc, seq_id, 2)
    assert keys[2].hex() in e.value.message
    assert svc.index.get(ns.id, keys[2]) is None
    assert svc.stats().corrupt_reads >= 1


def test_damaged_host_copy_is_never_written_out(core: CacheService) -> None:
    """A host copy that no longer matches its checksum (adopted after a restart, say) is
    dropped when a move or a demotion would write it to NVMe: the damage is not spread,
    nor vouched for by per-layer checksums taken from it."""
    import time

    svc = core
    lay = layout("float32")
    ns, keys, _, kv = put_blocks(svc, lay, 4, seed=5)
    for i in (1, 3):
        victim = svc.index.get(ns.id, keys[i])
        svc.top.view(ns.tenant, victim.copies["host"].location, victim.nbytes)[100] ^= 0xFF
        victim.copies["host"].verified = False
    before = svc.stats().corrupt_reads
    with pytest.raises(DataLoss) as e:  # an explicit move names the block
        svc.move(ns.id, keys[:2], "nvme")
    assert keys[1].hex() in e.value.message
    assert svc.index.get(ns.id, keys[1]) is None
    assert svc.placer.flush(time.monotonic() + 5) == 2  # demotion tries 2 and 3: 3 dropped
    assert svc.index.get(ns.id, keys[3]) is None
    assert svc.stats().corrupt_reads == before + 2
    intact = [keys[0], keys[2]]
    assert all(svc.index.get(ns.id, k).layer_sums is not None for k in intact)
    seq_id, _ = svc.attend.open_sequence(ns.id, intact)
    t = lay.block_tokens
    cols = torch.cat([torch.arange(0, t), torch.arange(2 * t, 3 * t)])
    want = dense(query(1), kv[1, 0][:, cols], kv[1, 1][:, cols])
    out = attend(svc, seq_id, 1)
    assert ((out.double() - want).norm() / want.norm()) <= 1e-5
