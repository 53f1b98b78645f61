"""CsdShard: round trip, restart, kill -9, corruption, space, and layer reads."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierd.csd.shard import CATALOG_FILE, CsdShard, StoreItem
from tierd.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from tierd.tiers.checksum import checksum
from tierd.tiers.io_backend import PosixBackend
from tierd.tiers.nvme import DATA_FILE
from tierd_client.layout import KVLayout

# 12 tokens: one layer's K|V is 6 KiB, so layer 1 starts mid-page (the unaligned case).
LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=12)
BB = LAYOUT.block_bytes  # 18 KiB -> a 20 KiB extent
EXTENT = 20 * 1024
NS = b"n" * 16


def _blocks(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, BB, dtype=np.uint8) for _ in range(n)]


def _items(blocks: list[np.ndarray], ns: bytes = NS, base: int = 0) -> list[StoreItem]:
    return [StoreItem(ns, _key(base + i), checksum(b), b) for i, b in enumerate(blocks)]


def _key(i: int) -> bytes:
    return i.to_bytes(4, "big") * 4


def _open(d: Path, blocks: int = 16) -> CsdShard:
    return CsdShard(d, blocks * EXTENT, backend=PosixBackend(), io_threads=4)


def _offset(d: Path, key: bytes) -> int:
    with sqlite3.connect(d / CATALOG_FILE) as db:
        (off,) = db.execute("SELECT offset FROM blocks WHERE key = ?", (key,)).fetchone()
    return int(off)


def _corrupt(d: Path, key: bytes, at: int = 100) -> None:
    """Flip a byte of a stored block behind the shard's back (buffered write; O_DIRECT
    reads see it because the kernel flushes the range first)."""
    fd = os.open(d / DATA_FILE, os.O_RDWR)
    try:
        off = _offset(d, key) + at
        byte = os.pread(fd, 1, off)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), off)
    finally:
        os.close(fd)


@pytest.fixture
def shard_dir(tmp_path: Path) -> Path:
    return tmp_path / "shard"


@pytest.fixture
def shard(shard_dir: Path) -> Iterator[CsdShard]:
    s = _open(shard_dir)
    yield s
    s.close()


def test_round_trip_and_restart(shard_dir: Path) -> None:
    blocks = _blocks(5)
    keys = [_key(i) for i in range(5)]
    with _open(shard_dir) as s:
        assert s.store(LAYOUT, _items(blocks)) == 5
        got = s.read(NS, [*keys, _key(99)])
        assert got == {k: b.tobytes() for k, b in zip(keys, blocks)}
        assert s.stats().blocks == 5 and s.stats().used_bytes == 5 * EXTENT
    assert (shard_dir / DATA_FILE).exists() and (shard_dir / CATALOG_FILE).exists()
    with _open(shard_dir) as s:
        st = s.stats()
        assert (st.blocks, st.used_bytes, st.corrupt_reads) == (5, 5 * EXTENT, 0)
        assert sorted(s.list_blocks()[NS]) == keys
        assert s.read(NS, keys) == {k: b.tobytes() for k, b in zip(keys, blocks)}
        # Space was rebuilt from the catalog: new blocks never land on old ones.
        s.store(LAYOUT, _items(_blocks(3, seed=1), base=10))
        assert s.read(NS, keys) == {k: b.tobytes() for k, b in zip(keys, blocks)}


def test_survives_kill_9(shard_dir: Path) -> None:
    script = f"""
import os, signal, numpy as np
from pathlib import Path
from tierd.csd.shard import CsdShard, StoreItem
from tierd.tiers.checksum import checksum
from tierd.tiers.io_backend import PosixBackend
from tierd_client.layout import KVLayout
layout = KVLayout(**{LAYOUT.__dict__!r})
s = CsdShard(Path({str(shard_dir)!r}), 16 * {EXTENT}, backend=PosixBackend())
rng = np.random.default_rng(7)
blocks = [rng.integers(0, 256, {BB}, dtype=np.uint8) for _ in range(3)]
s.store(layout, [StoreItem({NS!r}, i.to_bytes(4, "big") * 4, checksum(b), b)
                 for i, b in enumerate(blocks)])
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    rng = np.random.default_rng(7)
    expect = [rng.integers(0, 256, BB, dtype=np.uint8) for _ in range(3)]
    with _open(shard_dir) as s:  # the flock died with the process
        assert s.read(NS, [_key(i) for i in range(3)]) == {
            _key(i): b.tobytes() for i, b in enumerate(expect)
        }


def test_one_process_per_directory(shard: CsdShard, shard_dir: Path) -> None:
    with pytest.raises(FailedPrecondition):
        _open(shard_dir)


def test_store_checks_input(shard: CsdShard) -> None:
    blocks = _blocks(2)
    items = _items(blocks)
    bad = [items[0], StoreItem(NS, items[1].key, items[1].checksum ^ 1, blocks[1])]
    with pytest.raises(InvalidArgument) as e:
        shard.store(LAYOUT, bad)
    assert e.value.field == "blocks[1].checksum"
    with pytest.raises(InvalidArgument) as e:
        shard.store(LAYOUT, [StoreItem(NS, b"k", checksum(b"x" * 10), b"x" * 10)])
    assert e.value.field == "blocks[0].data"
    with pytest.raises(InvalidArgument) as e:
        shard.store(LAYOUT, [StoreItem(NS, b"", items[0].checksum, blocks[0])])
    assert e.value.field == "blocks[0].key"
    assert shard.stats().blocks == 0  # nothing half-stored


def test_full_is_all_or_nothing(shard_dir: Path) -> None:
    with _open(shard_dir, blocks=4) as s:
        assert s.store(LAYOUT, _items(_blocks(3))) == 3
        with pytest.raises(ResourceExhausted):
            s.store(LAYOUT, _items(_blocks(2, seed=1), base=10))
        st = s.stats()
        assert (st.blocks, st.used_bytes) == (3, 3 * EXTENT)
        assert s.read(NS, [_key(10)]) == {}
        assert s.store(LAYOUT, _items(_blocks(1, seed=1), base=10)) == 1


def test_overwrite_and_idempotent_store(shard: CsdShard) -> None:
    a, b = _blocks(2)
    assert shard.store(LAYOUT, _items([a])) == 1
    assert shard.store(LAYOUT, _items([a])) == 1  # already held: nothing written
    assert shard.stats().used_bytes == EXTENT
    assert shard.store(LAYOUT, _items([b])) == 1  # same key, new bytes: replaced
    assert shard.stats().used_bytes == EXTENT  # the old extent went back
    assert shard.read(NS, [_key(0)]) == {_key(0): b.tobytes()}


def test_drop_frees_space(shard: CsdShard) -> None:
    shard.store(LAYOUT, _items(_blocks(4)))
    assert shard.drop(NS, [_key(0), _key(2), _key(77)]) == 2
    assert shard.drop(b"other", [_key(1)]) == 0
    assert sorted(shard.read(NS, [_key(i) for i in range(4)])) == [_key(1), _key(3)]
    assert shard.stats().used_bytes == 2 * EXTENT


def test_corrupt_block_is_missing_and_counted(shard: CsdShard, shard_dir: Path) -> None:
    blocks = _blocks(3)
    shard.store(LAYOUT, _items(blocks))
    _corrupt(shard_dir, _key(1))
    got = shard.read(NS, [_key(i) for i in range(3)])
    assert sorted(got) == [_key(0), _key(2)]
    st = shard.stats()
    assert (st.corrupt_reads, st.blocks, st.used_bytes) == (1, 2, 2 * EXTENT)
    assert _key(1) not in shard.list_blocks()[NS]
    shard.close()
    with _open(shard_dir) as again:  # the drop was recorded too
        assert again.stats().blocks == 2


def _layer(block: np.ndarray, layer: int) -> bytes:
    n = BB // LAYOUT.num_layers
    return block[layer * n : (layer + 1) * n].tobytes()


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_read_layers_slices_exactly(shard_dir: Path, layer: int) -> None:
    blocks = _blocks(4)
    keys = [_key(i) for i in range(4)]
    with _open(shard_dir) as s:
        s.store(LAYOUT, _items(blocks))
    with _open(shard_dir) as s:
        # First read after a start reads whole blocks (checksum), the second only the layer.
        for _ in range(2):
            batch = s.read_layers(NS, LAYOUT, [keys[2], _key(50), keys[0], keys[3]], layer)
            assert batch.keys == [keys[2], keys[0], keys[3]] and batch.missing == [_key(50)]
            for i, b in enumerate([blocks[2], blocks[0], blocks[3]]):
                assert batch.layer_bytes(i).tobytes() == _layer(b, layer)


def test_layer_reads_verify_every_read(shard_dir: Path) -> None:
    """Each layer read is checked against that layer's checksum, every time: bytes that
    rot after a block was first read are caught by the next read of their layer."""
    with _open(shard_dir) as s:
        s.store(LAYOUT, _items(_blocks(3)))
    with _open(shard_dir) as s:
        assert s.read_layers(NS, LAYOUT, [_key(0), _key(1), _key(2)], 2).missing == []
        _corrupt(shard_dir, _key(1), at=BB - 1)  # in the last layer
        # Layer 0 of block 1 is intact and is served; the damaged layer is not.
        assert s.read_layers(NS, LAYOUT, [_key(1)], 0).keys == [_key(1)]
        batch = s.read_layers(NS, LAYOUT, [_key(0), _key(1), _key(2)], 2)
        assert batch.keys == [_key(0), _key(2)] and batch.missing == [_key(1)]
        assert s.stats().corrupt_reads == 1
        # Dropped: its bytes will not get better.
        assert s.read_layers(NS, LAYOUT, [_key(1)], 0).missing == [_key(1)]
    with _open(shard_dir) as s:  # and the drop is on record
        assert s.read_layers(NS, LAYOUT, [_key(1)], 0).missing == [_key(1)]


def test_rows_without_layer_sums_are_read_whole_once(shard_dir: Path) -> None:
    """A shard written before per-layer checksums: the first layer read of a block reads it
    whole and checks the block checksum (damage anywhere is caught), then records them."""
    with _open(shard_dir) as s:
        s.store(LAYOUT, _items(_blocks(3)))
    db = sqlite3.connect(shard_dir / CATALOG_FILE)
    db.execute("UPDATE blocks SET layer_sums = NULL")
    db.commit()
    db.close()
    _corrupt(shard_dir, _key(1), at=BB - 1)  # in the last layer: a layer-0 read misses it
    with _open(shard_dir) as s:
        batch = s.read_layers(NS, LAYOUT, [_key(0), _key(1), _key(2)], 0)
        assert batch.keys == [_key(0), _key(2)] and batch.missing == [_key(1)]
        assert s.stats().corrupt_reads == 1
    db = sqlite3.connect(shard_dir / CATALOG_FILE)
    sums = [r[0] for r in db.execute("SELECT layer_sums FROM blocks ORDER BY key")]
    db.close()
    assert len(sums) == 2 and all(b is not None and len(b) == 8 * LAYOUT.num_layers for b in sums)


def test_read_layers_checks_input(shard: CsdShard) -> None:
    shard.store(LAYOUT, _items(_blocks(1)))
    with pytest.raises(InvalidArgument) as e:
        shard.read_layers(NS, LAYOUT, [_key(0)], 3)
    assert e.value.field == "layer"
    with pytest.raises(InvalidArgument) as e:
        shard.read_layers(NS, LAYOUT, [_key(0), _key(0)], 0)
    assert e.value.field == "keys"
    other = KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_tokens=12)
    with pytest.raises(InvalidArgument) as e:
        shard.read_layers(NS, other, [_key(0)], 0)
    assert e.value.field == "layout"
