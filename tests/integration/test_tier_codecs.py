"""Compressed KV per tier, through a real daemon: a host tier kept raw above an NVMe tier
with `codec = "kivi4"`. Demoted blocks are stored encoded (stats count encoded bytes), a
get decodes them within kivi4's bound, attend computes on the codes and agrees with
attention over the dequantized KV, encodings survive a restart, a damaged encoded copy is
never served, and a lossless namespace stays byte-exact."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing

import numpy as np
import pytest
import torch

from tests.integration.conftest import START_DEADLINE_S, DaemonProcess
from tests.integration.test_tier_stats import configured
from tierctl.cli import main as tierctl
from tierd.core.startup import CATALOG_FILE
from tierd.tiers.block_header import HEADER_BYTES
from tierd.tiers.nvme_files import DATA_FILE
from tierd_client import AttendItem, DataLoss, KVLayout, TierdClient
from tierd_kernels.codecs import make_codec

LAY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_tokens=16)
KIVI4 = make_codec("kivi4")
ENCODED = KIVI4.block_bytes(LAY.block_shape, torch.float32)  # 5376 of 32768 raw bytes
GROUP = 2  # query heads per KV head
CHAIN = (
    '[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = "1MiB"\n\n'  # 32 blocks
    '[[tiers]]\nname = "disk"\nkind = "nvme"\ncapacity = "64MiB"\ncodec = "kivi4"\n'
)


def block_for(key: bytes) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.standard_normal(LAY.block_shape, dtype=np.float32)


def dequantized(block: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(block)
    return KIVI4.decode(KIVI4.encode(t), LAY.block_shape, torch.float32).numpy()


def usage(c: TierdClient, tier: str) -> int:
    return sum(u["used_bytes"] for u in c.stats()["tenants"] if u["tier"] == tier)


def settled(c: TierdClient, keys: list[bytes], ns: object, want_disk: int) -> list[str | None]:
    """Where each key is, once at least `want_disk` of them were demoted to disk."""
    deadline = time.monotonic() + START_DEADLINE_S
    while (where := c.locate(ns, keys)).count("disk") < want_disk:  # type: ignore[arg-type]
        assert time.monotonic() < deadline, f"demotion never happened: {where}"
        time.sleep(0.05)
    return where


def reference(q: np.ndarray, blocks: list[np.ndarray], layer: int) -> np.ndarray:
    """Dense decode attention of q [1, heads, dim] over the blocks' layer, in float64."""
    k = np.concatenate([b[layer, 0] for b in blocks], axis=1).astype(np.float64)  # [H, T, D]
    v = np.concatenate([b[layer, 1] for b in blocks], axis=1).astype(np.float64)
    qh = q[0].astype(np.float64).reshape(LAY.num_kv_heads, GROUP, LAY.head_dim)
    s = np.einsum("hgd,htd->hgt", qh, k) / np.sqrt(LAY.head_dim)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hgt,htd->hgd", p, v).reshape(1, -1, LAY.head_dim)


def flip(daemon: DaemonProcess, ns_id: bytes, key: bytes, at: int) -> None:
    """Damage byte `at` of the block's copy in the NVMe tier, where the catalog says it is."""
    with sqlite3.connect(f"file:{daemon.base / 'data' / CATALOG_FILE}?mode=ro", uri=True) as db:
        (location, length, encoding), = db.execute(
            "SELECT location, length, encoding FROM copies WHERE ns_id = ? AND key = ? AND "
            "tier = 'disk'", (ns_id, key)).fetchall()  # fmt: skip
    assert (length, encoding) == (ENCODED, "kivi4") and at < length
    fd = os.open(daemon.base / "data" / "disk" / DATA_FILE, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, location + at)
        os.pwrite(fd, bytes([byte[0] ^ 0x5A]), location + at)
    finally:
        os.close(fd)


@pytest.fixture
def daemon(spawn_daemon: Callable[..., DaemonProcess]) -> DaemonProcess:
    d = configured(spawn_daemon(start=False), CHAIN)
    d.start()
    return d


def test_demoted_blocks_are_encoded_decoded_attended_on_codes_and_survive_restart(
    daemon: DaemonProcess,
) -> None:
    n = 48
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("codecs", LAY)
        keys = c.block_keys(ns, np.arange(n * LAY.block_tokens))
        blocks = [block_for(k) for k in keys]
        for i in range(0, n, 8):  # more than the host tier holds: the oldest go down
            c.put(ns, keys[i : i + 8], np.stack(blocks[i : i + 8]))
        # Demotion takes the memory tier down to its low watermark (0.75 of 32 blocks)
        # and stops there, so the split is settled once 24 blocks are on disk.
        where = settled(c, keys, ns, n - 24)
        down = [i for i, w in enumerate(where) if w == "disk"]
        up = [i for i, w in enumerate(where) if w == "mem"]
        assert len(down) + len(up) == n

        # Stored encoded: the tenant holds kivi4's bytes per block on disk, not raw ones.
        assert usage(c, "disk") == len(down) * ENCODED
        stats = c.stats()["tiers"]["disk"]
        assert stats["blocks"] == len(down)
        assert stats["used_bytes"] < len(down) * LAY.block_bytes

        # Attend over blocks in both tiers: the disk ones on their codes, equal to
        # attention over the dequantized KV (the memory ones exact).
        seen = [dequantized(b) if i in down else b for i, b in enumerate(blocks)]
        seq = c.open_sequence(ns, keys)
        rng = np.random.default_rng(5)
        before = c.stats()["tiers"]["disk"]["hits"]
        for layer in range(LAY.num_layers):
            q = rng.standard_normal((1, GROUP * LAY.num_kv_heads, LAY.head_dim), dtype=np.float32)
            (got,) = c.attend([AttendItem(seq, layer, q)], as_torch=False)
            want = reference(q, seen, layer)
            assert np.abs(got.out - want).max() <= 1e-4 * np.abs(want).max() + 1e-5
            exact = reference(q, blocks, layer)  # what raw KV gives: kivi4 moves it a little
            assert np.abs(got.out - exact).max() < 0.2 * np.abs(exact).max()
        assert c.stats()["tiers"]["disk"]["hits"] == before + len(down) * LAY.num_layers
        c.close_sequence(seq)

        # A get decodes: exactly the codec's round trip, within its bound of the original.
        i = down[0]
        res = c.get(ns, [keys[i]])
        assert res.found == [True]
        assert np.array_equal(res.blocks[0], seen[i])
        step = (blocks[i].max() - blocks[i].min()) / 15  # one kivi4 step of the widest range
        assert np.abs(res.blocks[0] - blocks[i]).max() <= step / 2 + 1e-2
        assert not np.array_equal(res.blocks[0], blocks[i])

    daemon.restart()
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("codecs", LAY)
        assert usage(c, "disk") == len(down) * ENCODED  # recovered as encoded copies
        j = down[-1]
        assert c.locate(ns, [keys[j]]) == ["disk"]
        res = c.get(ns, [keys[j]])
        assert res.found == [True] and np.array_equal(res.blocks[0], seen[j])

        # A damaged encoded copy: a get misses (the copy is dropped), attend fails.
        flip(daemon, ns.id, keys[down[1]], ENCODED // 2)
        corrupt = c.stats()["corrupt_reads"]
        assert c.get(ns, [keys[down[1]]]).found == [False]
        assert c.stats()["corrupt_reads"] == corrupt + 1
        k = down[2]
        flip(daemon, ns.id, keys[k], 10)  # in layer 0's record
        seq = c.open_sequence(ns, [keys[k]])
        q = np.ones((1, GROUP * LAY.num_kv_heads, LAY.head_dim), dtype=np.float32)
        with pytest.raises(DataLoss, match=keys[k].hex()):
            c.attend([AttendItem(seq, 0, q)], as_torch=False)
        assert c.stats()["corrupt_reads"] == corrupt + 2


def test_a_lossless_namespace_is_stored_raw_in_a_lossy_tier(daemon: DaemonProcess) -> None:
    with TierdClient(daemon.address, tenant="it") as c:
        exact = c.open_namespace("codecs", LAY, lossless=True)
        lossy = c.open_namespace("codecs", LAY)
        assert exact.id != lossy.id  # apart: they never share a block
        tokens = np.arange(4 * LAY.block_tokens)
        for ns in (exact, lossy):
            keys = c.block_keys(ns, tokens)
            c.put(ns, keys, np.stack([block_for(k) for k in keys]))
            assert c.move(ns, keys, "disk") == 4
        assert usage(c, "disk") == 4 * LAY.block_bytes + 4 * ENCODED
        keys = c.block_keys(exact, tokens)
        res = c.get(exact, keys)
        assert all(res.found)
        for k, got in zip(keys, res.blocks):
            assert got.tobytes() == block_for(k).tobytes()
        lossy_keys = c.block_keys(lossy, tokens)
        res = c.get(lossy, lossy_keys)
        assert all(res.found)
        assert np.array_equal(res.blocks[0], dequantized(block_for(lossy_keys[0])))

    daemon.restart()  # the namespace's choice is on record
    with TierdClient(daemon.address, tenant="it") as c:
        exact = c.open_namespace("codecs", LAY, lossless=True)
        keys = c.block_keys(exact, np.arange(6 * LAY.block_tokens))
        c.put(exact, keys[4:], np.stack([block_for(k) for k in keys[4:]]))
        assert c.move(exact, keys, "disk") == 6
        assert usage(c, "disk") == 6 * LAY.block_bytes + 4 * ENCODED
        res = c.get(exact, keys)
        assert [got.tobytes() for got in res.blocks] == [block_for(k).tobytes() for k in keys]

    # fsck finds raw and encoded copies alike intact, headers describing the stored bytes.
    daemon.stop()
    config, data = daemon.base / "tierd.toml", daemon.base / "data"
    assert tierctl(["fsck", "--config", str(config), "--data-dir", str(data)]) == 0


def test_a_rebuilt_catalog_reads_encoded_extents_as_encoded_copies(
    daemon: DaemonProcess,
) -> None:
    tokens = np.arange(4 * LAY.block_tokens)
    with TierdClient(daemon.address, tenant="it") as c:
        lossy = c.open_namespace("rebuild", LAY)
        exact = c.open_namespace("rebuild", LAY, lossless=True)
        for ns in (lossy, exact):
            keys = c.block_keys(ns, tokens)
            c.put(ns, keys, np.stack([block_for(k) for k in keys]))
            assert c.move(ns, keys, "disk") == 4
            assert c.locate(ns, keys) == ["disk"] * 4
    daemon.stop()
    config, data = daemon.base / "tierd.toml", daemon.base / "data"
    (data / CATALOG_FILE).unlink()
    fsck = ["fsck", "--config", str(config), "--data-dir", str(data)]
    assert tierctl([*fsck, "--repair"]) == 1
    assert tierctl(fsck) == 0  # every block came back as the copy it is
    daemon.start()
    with TierdClient(daemon.address, tenant="it") as c:
        lossy = c.open_namespace("rebuild", LAY)
        exact = c.open_namespace("rebuild", LAY, lossless=True)
        keys = c.block_keys(lossy, tokens)
        res = c.get(lossy, keys)
        assert all(res.found)  # decoded: what kivi4 kept, never the codes read as floats
        for k, got in zip(keys, res.blocks):
            assert np.array_equal(got, dequantized(block_for(k)))
        keys = c.block_keys(exact, tokens)
        res = c.get(exact, keys)  # raw on disk: every block comes back byte-exact
        assert all(res.found)
        assert [got.tobytes() for got in res.blocks] == [block_for(k).tobytes() for k in keys]


def test_fsck_rewrites_the_header_of_an_encoded_copy_as_the_copy_it_is(
    daemon: DaemonProcess,
) -> None:
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("header", LAY)
        keys = c.block_keys(ns, np.arange(2 * LAY.block_tokens))
        c.put(ns, keys, np.stack([block_for(k) for k in keys]))
        assert c.move(ns, keys, "disk") == 2
    daemon.stop()
    config, data = daemon.base / "tierd.toml", daemon.base / "data"
    with closing(sqlite3.connect(data / CATALOG_FILE)) as db:
        ((location,),) = db.execute("SELECT location FROM copies WHERE ns_id = ? AND key = ? "
                                    "AND tier = 'disk'", (ns.id, keys[0])).fetchall()  # fmt: skip
    fd = os.open(data / "disk" / DATA_FILE, os.O_RDWR)
    try:
        os.pwrite(fd, bytes(HEADER_BYTES), location - HEADER_BYTES)  # a lost header page
    finally:
        os.close(fd)
    fsck = ["fsck", "--config", str(config), "--data-dir", str(data)]
    assert tierctl([*fsck, "--repair"]) == 1
    assert tierctl(fsck) == 0  # the rewritten header describes the encoded bytes
    (data / CATALOG_FILE).unlink()
    assert tierctl([*fsck, "--repair"]) == 1  # a rebuild finds the block through it
    daemon.start()
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("header", LAY)
        res = c.get(ns, keys)
        assert all(res.found)
        assert np.array_equal(res.blocks[0], dequantized(block_for(keys[0])))
