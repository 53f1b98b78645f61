"""Compressed KV on a shared tier: daemons with a redis tier that has a codec, on a real
Redis cluster (tests/redis_cluster.py). A block moved there is stored as its codes under a
version 2 header naming the encoding (the tier counts encoded bytes), a get decodes
exactly the codec's round trip, attend reads each layer's codes and agrees with attention
over the decoded KV, copies stay readable across a restart, a second daemon finds and
decodes them, a lossless namespace is stored raw under the unchanged version 1 header, and
a value naming an encoding this build cannot read is a miss, never served."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
import xxhash

from tests.integration.conftest import DaemonProcess
from tests.integration.test_remote_redis import block_for, chain, poll
from tests.integration.test_tier_codecs import GROUP, reference
from tests.integration.test_tier_stats import configured
from tests.redis_cluster import Cluster, needs_redis, started
from tierd.tiers.remote_value import encode, header_bytes
from tierd_client import AttendItem, KVLayout, TierdClient
from tierd_client.errors import DataLoss
from tierd_kernels.codecs import make_codec

pytestmark = needs_redis

LAY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_tokens=16)
T = LAY.block_tokens
RAW_HEAD = header_bytes(LAY.num_layers)
CODED_HEAD = header_bytes(LAY.num_layers, "int8")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started(Cluster, tmp_path_factory.mktemp("cluster"))


def daemon_with(spawn: Callable[..., DaemonProcess], cluster: Cluster, codec: str,
                **remote: str) -> DaemonProcess:  # fmt: skip
    body = chain(cluster.nodes, **remote) + f'codec = "{codec}"\n'
    daemon = configured(spawn(start=False), body)
    daemon.start()
    return daemon


def round_trip(codec: str, block: np.ndarray) -> np.ndarray:
    c = make_codec(codec)
    return c.decode(c.encode(torch.from_numpy(block)), LAY.block_shape, torch.float32).numpy()


def rkey(ns_id: bytes, key: bytes) -> str:
    return f"tierd:{{it:{ns_id.hex()}}}:{key.hex()}"


def used(c: TierdClient) -> int:
    return sum(u["used_bytes"] for u in c.stats()["tenants"] if u["tier"] == "remote")


def two_blocks_in_remote(cl: TierdClient, name: str) -> tuple[Any, list[bytes]]:
    """A namespace `name` with two blocks put and moved to the remote tier (their only
    copy)."""
    ns = cl.open_namespace(name, LAY)
    keys = cl.block_keys(ns, np.arange(2 * T))
    cl.put(ns, keys, np.stack([block_for(k) for k in keys]))
    assert cl.move(ns, keys, "remote") == 2
    return ns, keys


@pytest.mark.parametrize("codec", ["int8", "kivi4"])
def test_a_redis_tier_stores_codes_decodes_them_and_attends_over_them(
    cluster: Cluster, spawn_daemon: Callable[..., DaemonProcess], codec: str
) -> None:
    daemon = daemon_with(spawn_daemon, cluster, codec)
    c = make_codec(codec)
    encoded = c.block_bytes(LAY.block_shape, torch.float32)
    n = 4
    with TierdClient(daemon.address, tenant="it") as cl:
        ns = cl.open_namespace(f"rc-{codec}", LAY)
        keys = cl.block_keys(ns, np.arange(n * T))
        blocks = [block_for(k) for k in keys]
        cl.put(ns, keys, np.stack(blocks))
        assert cl.move(ns, keys, "remote") == n and cl.locate(ns, keys) == ["remote"] * n
        assert used(cl) == n * encoded
        with cluster.client() as rc:
            value = rc.get(rkey(ns.id, keys[1]))
        # Version 2, naming the encoding; the codes are the codec's own.
        assert struct.unpack_from("<H", value, 8)[0] == 2
        assert value[CODED_HEAD:] == c.encode(torch.from_numpy(blocks[1])).numpy().tobytes()
        assert codec.encode() in value[:CODED_HEAD]

        seen = [round_trip(codec, b) for b in blocks]
        seq = cl.open_sequence(ns, keys)
        q = np.random.default_rng(2).standard_normal((1, GROUP * 2, 64), dtype=np.float32)
        for layer in range(LAY.num_layers):
            (got,) = cl.attend([AttendItem(seq, layer, q)], as_torch=False)
            want = reference(q, seen, layer)
            assert np.abs(got.out - want).max() <= 1e-4 * np.abs(want).max() + 1e-5
        cl.close_sequence(seq)
        res = cl.get(ns, keys[:1])  # promotes: decoded, byte-exact the round trip
        assert res.found == [True] and res.blocks[0].tobytes() == seen[0].tobytes()

    daemon.restart()
    with TierdClient(daemon.address, tenant="it") as cl:
        ns = cl.open_namespace(f"rc-{codec}", LAY)
        assert cl.locate(ns, keys[1:]) == ["remote"] * (n - 1)
        res = cl.get(ns, keys[1:])
        assert all(res.found)
        assert [b.tobytes() for b in res.blocks] == [s.tobytes() for s in seen[1:]]


def test_a_second_daemon_finds_codes_and_lossless_blocks_stay_raw(
    cluster: Cluster, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    a = daemon_with(spawn_daemon, cluster, "int8", write="through")
    b = daemon_with(spawn_daemon, cluster, "int8")
    tokens = np.arange(3 * T)
    with TierdClient(a.address, tenant="it") as ca, TierdClient(b.address, tenant="it") as cb:
        ns = ca.open_namespace("found-codes", LAY)
        exact = ca.open_namespace("found-codes", LAY, lossless=True)
        keys, exact_keys = ca.block_keys(ns, tokens), ca.block_keys(exact, tokens)
        ca.put(ns, keys, np.stack([block_for(k) for k in keys]))
        ca.put(exact, exact_keys, np.stack([block_for(k) for k in exact_keys]))
        poll(lambda: ca.stats()["tiers"]["remote"]["blocks"] == 6, "write-through copies")
        with cluster.client() as rc:
            value = rc.get(rkey(exact.id, exact_keys[0]))
        # Lossless: raw, under the version 1 header a daemon before codecs reads.
        assert struct.unpack_from("<H", value, 8)[0] == 1
        assert value[RAW_HEAD:] == block_for(exact_keys[0]).tobytes()

        nsb = cb.open_namespace("found-codes", LAY)
        assert cb.lookup(nsb, tokens).cached_tokens == 3 * T
        got = cb.get(nsb, keys)
        assert all(got.found)
        want = [round_trip("int8", block_for(k)).tobytes() for k in keys]
        assert [g.tobytes() for g in got.blocks] == want
        exb = cb.open_namespace("found-codes", LAY, lossless=True)
        got = cb.get(exb, exact_keys) if cb.lookup(exb, tokens).cached_tokens == 3 * T else None
        assert got is not None and all(got.found)
        assert [g.tobytes() for g in got.blocks] == [block_for(k).tobytes() for k in exact_keys]


def test_a_value_naming_an_unknown_encoding_is_a_miss(
    cluster: Cluster, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    daemon = daemon_with(spawn_daemon, cluster, "int8")
    with TierdClient(daemon.address, tenant="it") as cl:
        ns, keys = two_blocks_in_remote(cl, "unknown-codec")
        with cluster.client() as rc:
            name = rkey(ns.id, keys[0])
            value = bytearray(rc.get(name))
            # Another writer's encoding, under an intact header (its own checksum fixed).
            at = value.index(b"int8")
            value[at : at + 64] = b"zstd".ljust(64, b"\0")
            end = CODED_HEAD - 8
            value[end:CODED_HEAD] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(value[:end])))
            rc.set(name, bytes(value))
        res = cl.get(ns, keys)
        assert res.found == [False, True]
        assert cl.stats()["corrupt_reads"] == 1


def test_attend_over_a_value_rewritten_in_another_encoding_drops_the_copy(
    cluster: Cluster, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    """Another daemon wrote the block again, raw: an attend over this daemon's int8 copy
    finds a header naming another encoding. The copy is lost (DATA_LOSS, dropped, counted
    corrupt), never an internal error that every later attend repeats."""
    daemon = daemon_with(spawn_daemon, cluster, "int8")
    with TierdClient(daemon.address, tenant="it") as cl:
        ns, keys = two_blocks_in_remote(cl, "rewritten")
        with cluster.client() as rc:
            name = rkey(ns.id, keys[0])
            data = block_for(keys[0]).tobytes()
            rc.set(name, encode(ns.id, keys[0], data, xxhash.xxh3_64_intdigest(data), None,
                                LAY.num_layers))  # fmt: skip
        seq = cl.open_sequence(ns, keys)
        q = np.ones((1, GROUP * 2, 64), dtype=np.float32)
        with pytest.raises(DataLoss, match=keys[0].hex()):
            cl.attend([AttendItem(seq, 0, q)], as_torch=False)
        assert cl.locate(ns, keys) == [None, "remote"]
        assert cl.stats()["corrupt_reads"] == 1
