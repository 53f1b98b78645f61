"""Compressed KV on a CSD tier, through a real daemon and its worker process: blocks moved
to a CSD tier with a codec are stored encoded in the worker's shard (the tier and the
tenant count encoded bytes), a get decodes exactly the codec's round trip, the worker
attends over the codes and agrees with attention over the dequantized KV, the worker's
catalog keeps each block's encoding across a restart, and a lossless namespace is stored
raw there."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch

from tests.integration.conftest import START_DEADLINE_S, DaemonProcess
from tests.integration.test_tier_codecs import GROUP, LAY, block_for, reference, usage
from tests.integration.test_tier_stats import configured
from tierd.csd.shard import CATALOG_FILE
from tierd_client import AttendItem, TierdClient
from tierd_kernels.codecs import make_codec


def chain(codec: str) -> str:
    return (
        '[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = "4MiB"\n\n'
        f'[[tiers]]\nname = "shards"\nkind = "csd"\ncapacity = "16MiB"\nworkers = 1\n'
        f'codec = "{codec}"\n'
    )


def round_trip(codec_name: str, block: np.ndarray) -> np.ndarray:
    """The codec's own quantize -> dequantize of a block."""
    codec = make_codec(codec_name)
    t = torch.from_numpy(block)
    return codec.decode(codec.encode(t), LAY.block_shape, torch.float32).numpy()


def worker_rows(daemon: DaemonProcess) -> dict[bytes, tuple[int, str]]:
    """key -> (stored length, encoding) as the worker's own catalog has them."""
    path = daemon.base / "data" / "shards" / "w0" / CATALOG_FILE
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        return {k: (n, e) for k, n, e in db.execute("SELECT key, nbytes, encoding FROM blocks")}


def extent(nbytes: int) -> int:
    """What a block of `nbytes` takes in a worker's shard (whole 4 KiB extents)."""
    return -(-nbytes // 4096) * 4096


def available(c: TierdClient) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while not c.stats()["tiers"]["shards"]["available"]:
        assert time.monotonic() < deadline, "the csd worker never came up"
        time.sleep(0.05)


@pytest.mark.parametrize("codec", ["int8", "kivi4"])
def test_csd_tier_stores_decodes_and_attends_on_codes(
    spawn_daemon: Callable[..., DaemonProcess], codec: str
) -> None:
    daemon = configured(spawn_daemon(start=False), chain(codec))
    daemon.start()
    encoded = make_codec(codec).block_bytes(LAY.block_shape, torch.float32)
    assert encoded < LAY.block_bytes
    n = 6
    with TierdClient(daemon.address, tenant="it") as c:
        available(c)
        ns = c.open_namespace("csd-codecs", LAY)
        exact = c.open_namespace("csd-codecs", LAY, lossless=True)
        keys = c.block_keys(ns, np.arange(n * LAY.block_tokens))
        blocks = [block_for(k) for k in keys]
        c.put(ns, keys, np.stack(blocks))
        assert c.move(ns, keys, "shards") == n
        assert c.locate(ns, keys) == ["shards"] * n

        # Stored encoded: the tenant, the tier and the worker's rows all count codes.
        assert usage(c, "shards") == n * encoded
        assert c.stats()["tiers"]["shards"]["used_bytes"] == n * extent(encoded)
        rows = worker_rows(daemon)
        assert {rows[k] for k in keys} == {(encoded, codec)}

        # Attend runs in the worker on the codes: equal to attention over the dequantized
        # KV within float tolerance (and near the raw KV, as the codec allows).
        seen = [round_trip(codec, b) for b in blocks]
        seq = c.open_sequence(ns, keys)
        rng = np.random.default_rng(3)
        for layer in range(LAY.num_layers):
            q = rng.standard_normal((1, GROUP * LAY.num_kv_heads, LAY.head_dim), dtype=np.float32)
            (got,) = c.attend([AttendItem(seq, layer, q)], as_torch=False)
            want = reference(q, seen, layer)
            assert np.abs(got.out - want).max() <= 1e-4 * np.abs(want).max() + 1e-5
            raw = reference(q, blocks, layer)
            assert np.abs(got.out - raw).max() < 0.2 * np.abs(raw).max()
        c.close_sequence(seq)

        # A get decodes the worker's codes: byte-exact the codec's round trip.
        res = c.get(ns, keys[:1])
        assert res.found == [True] and res.blocks[0].tobytes() == seen[0].tobytes()
        assert not np.array_equal(res.blocks[0], blocks[0])

        # A lossless namespace is never stored lossy there.
        exact_keys = c.block_keys(exact, np.arange(2 * LAY.block_tokens))
        c.put(exact, exact_keys, np.stack([block_for(k) for k in exact_keys]))
        assert c.move(exact, exact_keys, "shards") == 2
        assert {worker_rows(daemon)[k] for k in exact_keys} == {(LAY.block_bytes, "raw")}
        res = c.get(exact, exact_keys)
        assert [b.tobytes() for b in res.blocks] == [block_for(k).tobytes() for k in exact_keys]

    daemon.restart()  # the daemon and its worker: both catalogs keep the encodings
    with TierdClient(daemon.address, tenant="it") as c:
        available(c)
        ns = c.open_namespace("csd-codecs", LAY)
        assert c.locate(ns, keys[1:]) == ["shards"] * (n - 1)
        assert usage(c, "shards") == n * encoded + 2 * LAY.block_bytes  # gets keep them
        seq = c.open_sequence(ns, keys[1:])
        q = np.ones((1, GROUP * LAY.num_kv_heads, LAY.head_dim), dtype=np.float32)
        (got,) = c.attend([AttendItem(seq, 1, q)], as_torch=False)
        want = reference(q, seen[1:], 1)
        assert np.abs(got.out - want).max() <= 1e-4 * np.abs(want).max() + 1e-5
        c.close_sequence(seq)
        res = c.get(ns, keys[1:])
        assert all(res.found)
        assert [b.tobytes() for b in res.blocks] == [s.tobytes() for s in seen[1:]]


def test_a_full_csd_tier_with_a_codec_evicts_to_make_room(
    spawn_daemon: Callable[..., DaemonProcess],
) -> None:
    """int8 codes of these blocks are 8704 bytes, which the worker keeps in 12 KiB extents:
    the tier counts what the worker holds, so once that is full the daemon evicts from the
    tier to demote more, and puts keep succeeding as they do on a raw CSD tier."""
    body = ('[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = "512KiB"\n\n'
            '[[tiers]]\nname = "shards"\nkind = "csd"\ncapacity = "256KiB"\nworkers = 1\n'
            'codec = "int8"\n')  # fmt: skip
    daemon = configured(spawn_daemon(start=False), body)
    daemon.start()
    with TierdClient(daemon.address, tenant="it") as c:
        available(c)
        ns = c.open_namespace("csd-full", LAY)
        keys = c.block_keys(ns, np.arange(64 * LAY.block_tokens))
        for i in range(0, len(keys), 8):
            c.put(ns, keys[i : i + 8], np.stack([block_for(k) for k in keys[i : i + 8]]))
        tier = c.stats()["tiers"]["shards"]
        assert 0 < tier["used_bytes"] <= tier["capacity_bytes"] and tier["evictions"] > 0
