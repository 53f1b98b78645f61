"""The redis tier kind against real servers: one redis-server and a cluster of three masters
with a replica each (tests/redis_cluster.py), started on free loopback ports. Values round
trip byte-exact; a value damaged, replaced or gone is a lost copy, never served; tenants'
keys never meet; a store that is down or stalled fails calls within the deadline, queues
writes and comes back by itself; options and credentials are checked with clear errors."""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.redis_cluster import Cluster, SingleServer, make_tls, needs_redis, started
from tierd.config import Config, TierSpec, load_config
from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.errors import ConfigError, Unavailable
from tierd.tiers.base import Copy, CopyLost
from tierd.tiers.checksum import checksum, layer_checksums
from tierd.tiers.registry import TierContext, build_tier
from tierd.tiers.remote_redis import RedisTier
from tierd.tiers.remote_value import header_bytes
from tierd_client.layout import KVLayout

pytestmark = needs_redis

LAY = KVLayout(num_layers=4, num_kv_heads=2, head_dim=32, dtype="float32", block_tokens=8)
BB = LAY.block_bytes
SPAN = BB // LAY.num_layers


def ns_of(tenant: str, tag: bytes = b"n") -> NamespaceInfo:
    return NamespaceInfo(tag * 16, tenant, "m", LAY, ())


def block(ns: NamespaceInfo, key: bytes, seed: int = 0) -> tuple[BlockEntry, bytes]:
    data = np.random.default_rng(seed).bytes(BB)
    entry = BlockEntry(ns, key, BB, checksum(data), layer_sums=layer_checksums(data, 4))
    return entry, data


def open_tier(nodes: list[str], mode: str, **opts: Any) -> RedisTier:
    options = {"nodes": tuple(nodes), "mode": mode, "timeout_ms": 500, **opts}
    spec = TierSpec("far", "redis", 64 << 20, options=tuple(options.items()))
    tier = build_tier(spec, TierContext(Path("/nonexistent"), "t"))
    assert isinstance(tier, RedisTier)
    tier.start()
    return tier


def stored(tier: RedisTier, entry: BlockEntry, data: bytes) -> Copy:
    loc = tier.reserve(entry.ns.tenant, BB)
    assert loc is not None
    tier.write(entry, loc, memoryview(data)).result()
    return Copy(tier.name, loc, BB, entry.checksum)


def read(tier: RedisTier, entry: BlockEntry, copy: Copy) -> bytes:
    out = bytearray(BB)
    tier.read(entry, copy, memoryview(out)).result()
    return bytes(out)


def poll(cond: Any, what: str, deadline_s: float = 15.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {deadline_s}s"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started(Cluster, tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SingleServer]:
    yield from started(SingleServer, tmp_path_factory.mktemp("single"))


@pytest.fixture(params=["single", "cluster"])
def store(request: pytest.FixtureRequest) -> Iterator[tuple[Any, RedisTier]]:
    servers = request.getfixturevalue(request.param)
    tier = open_tier(servers.nodes, request.param)
    try:
        yield servers, tier
    finally:
        tier.close()


def test_a_block_round_trips_byte_exact_and_by_layer(store: tuple[Any, RedisTier]) -> None:
    servers, tier = store
    ns = ns_of("team{a}:b")
    entry, data = block(ns, b"k" * 16)
    copy = stored(tier, entry, data)
    assert read(tier, entry, copy) == data
    part = bytearray(SPAN)
    tier.read_range(entry, copy, 2 * SPAN, memoryview(part)).result()
    assert bytes(part) == data[2 * SPAN : 3 * SPAN]
    # Under the caller's tenant (braces and colons encoded) and namespace, in one slot.
    rkey = f"tierd:{{team%7Ba%7D%3Ab:{ns.id.hex()}}}:{entry.key.hex()}"
    assert tier.key_of(ns, entry.key) == rkey
    with servers.client() as r:
        value = r.get(rkey)
    assert value is not None and value[header_bytes(4) :] == data
    # A lookup learns the checksums from the header alone; a key never written is absent.
    found = tier.find(ns, [entry.key, b"z" * 16])
    assert found[1] is None and found[0] is not None
    assert (found[0].location, found[0].length, found[0].checksum) == ("found", BB, entry.checksum)
    assert found[0].layer_sums == entry.layer_sums
    assert tier.usage().available and tier.used_bytes == BB


def test_a_damaged_replaced_or_missing_value_is_a_lost_copy(
    cluster: Cluster, store: tuple[Any, RedisTier]
) -> None:
    servers, tier = store
    ns = ns_of("t", b"d")
    with servers.client() as r:
        cases = {}
        for i, how in enumerate(["data", "header", "replaced", "gone", "garbage"]):
            entry, data = block(ns, bytes([65 + i]) * 16, seed=i)
            copy = stored(tier, entry, data)
            rkey = tier.key_of(ns, entry.key)
            if how == "data":
                r.setrange(rkey, header_bytes(4) + 100, b"\xff\xfe")
            elif how == "header":
                r.setrange(rkey, 40, b"\x01")
            elif how == "replaced":  # an intact value of the same key, with other bytes
                other, other_data = block(ns, entry.key, seed=99)
                tier.write(other, "own", memoryview(other_data)).result()
            elif how == "gone":  # as the cluster's maxmemory policy would
                r.delete(rkey)
            else:
                r.set(rkey, b"not a block at all")
            cases[how] = (entry, copy)
    for how, (entry, copy) in cases.items():
        with pytest.raises(CopyLost):
            read(tier, entry, copy)
        if how != "data":  # a layer range is checked by its caller; its header here
            with pytest.raises(CopyLost):
                tier.read_range(entry, copy, 0, memoryview(bytearray(SPAN))).result()
    keys = [e.key for e, _ in cases.values()]
    found = dict(zip(cases, tier.find(ns, keys)))
    assert found["gone"] is None and found["garbage"] is None and found["header"] is None
    assert (
        found["replaced"] is not None
        and found["replaced"].checksum != cases["replaced"][0].checksum
    )


def test_tenants_keys_never_meet(single: SingleServer) -> None:
    tier = open_tier(single.nodes, "single")
    try:
        a, b = ns_of("a", b"a"), ns_of("b", b"a")  # even the same namespace id and key
        entry, data = block(a, b"s" * 16)
        stored(tier, entry, data)
        theirs = BlockEntry(b, entry.key, BB, entry.checksum, layer_sums=entry.layer_sums)
        assert tier.key_of(a, entry.key) != tier.key_of(b, entry.key)
        assert tier.find(b, [entry.key]) == [None]
        with pytest.raises(CopyLost):
            read(tier, theirs, Copy("far", "found", BB, entry.checksum))
    finally:
        tier.close()


def test_freeing_deletes_own_copies_and_only_forgets_found_ones(single: SingleServer) -> None:
    tier = open_tier(single.nodes, "single")
    try:
        ns = ns_of("t", b"f")
        mine, data = block(ns, b"m" * 16)
        own = stored(tier, mine, data)
        theirs, data2 = block(ns, b"o" * 16, seed=1)
        stored(tier, theirs, data2)
        found = tier.find(ns, [theirs.key])[0]
        assert found is not None and tier.adopt("t", found.location, BB)
        with single.client() as r:
            tier.free(mine, own)
            tier.free(theirs, Copy("far", found.location, BB, found.checksum))
            poll(lambda: not r.exists(tier.key_of(ns, mine.key)), "own copy deleted")
            assert r.exists(tier.key_of(ns, theirs.key))
        assert tier.used_bytes == BB  # `theirs` is still this tier's own copy too
    finally:
        tier.close()


def test_a_store_down_fails_reads_at_once_queues_writes_and_comes_back(tmp_path: Path) -> None:
    servers = SingleServer(tmp_path)
    servers.start()
    tier = open_tier(servers.nodes, "single", max_queued_bytes=2 * (BB + header_bytes(4)))
    try:
        ns = ns_of("t", b"q")
        entry, data = block(ns, b"u" * 16)
        copy = stored(tier, entry, data)
        servers.stop()
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            read(tier, entry, copy)
        assert time.monotonic() - t0 < 0.5
        assert not tier.available() and tier.details()["state"].startswith("down")
        assert tier.find(ns, [entry.key]) == [None]
        # Two blocks' worth is queued (and read back from the queue); the third is refused.
        queued = [block(ns, bytes([97 + i]) * 16, seed=10 + i) for i in range(3)]
        copies = [stored(tier, e, d) for e, d in queued[:2]]
        assert [read(tier, e, c) for (e, _), c in zip(queued, copies)] == [queued[0][1],
                                                                          queued[1][1]]  # fmt: skip
        assert tier.reserve("t", BB) is None
        servers.start()
        poll(tier.available, "the tier back up")
        poll(lambda: tier.details()["queued_bytes"] == 0, "the queue written out")
        with servers.client() as r:
            assert r.get(tier.key_of(ns, queued[1][0].key))[header_bytes(4) :] == queued[1][1]
        assert read(tier, queued[0][0], copies[0]) == queued[0][1]
    finally:
        tier.close()
        servers.stop()


def test_a_stalled_store_never_holds_a_caller_past_the_deadline(tmp_path: Path) -> None:
    servers = SingleServer(tmp_path)
    servers.start()
    tier = open_tier(servers.nodes, "single", timeout_ms=300)
    assert servers.server.proc is not None
    pid = servers.server.proc.pid
    try:
        ns = ns_of("t", b"s")
        entry, data = block(ns, b"w" * 16)
        copy = stored(tier, entry, data)
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(Unavailable):
            read(tier, entry, copy)
        assert time.monotonic() - t0 < 0.3 + 0.2
        t0 = time.monotonic()
        assert tier.find(ns, [entry.key]) == [None]
        assert time.monotonic() - t0 < 0.3 + 0.2
        assert not tier.available()
        os.kill(pid, signal.SIGCONT)
        poll(tier.available, "the tier back up")
        assert read(tier, entry, copy) == data
    finally:
        os.kill(pid, signal.SIGCONT)
        tier.close()
        servers.stop()


def test_a_batch_longer_than_the_deadline_is_not_an_outage(single: SingleServer) -> None:
    """The deadline runs per call from when the store is asked: reads queued behind others
    the store is answering wait their turn, and the tier stays up."""
    # A deadline that one read meets even on a loaded machine, and a queue of reads sized
    # from one read's time to take several deadlines in all.
    deadline_s = 1.0
    tier = open_tier(single.nodes, "single", timeout_ms=int(deadline_s * 1000), io_threads=1)
    try:
        big = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, dtype="float16",
                       block_tokens=256)  # fmt: skip
        ns = NamespaceInfo(b"b" * 16, "t", "m", big, ())
        data = np.random.default_rng(3).bytes(big.block_bytes)  # 2 MiB
        entry = BlockEntry(ns, b"l" * 16, len(data), checksum(data),
                           layer_sums=layer_checksums(data, 4))  # fmt: skip
        loc = tier.reserve("t", len(data))
        assert loc is not None
        tier.write(entry, loc, memoryview(data)).result()
        copy = Copy("far", loc, len(data), entry.checksum)
        outs = [bytearray(len(data)) for _ in range(8)]
        one = []  # the fastest of a few reads: a slow outlier would shorten the queue
        for _ in range(5):
            t0 = time.monotonic()
            tier.read(entry, copy, memoryview(outs[0])).result()
            one.append(time.monotonic() - t0)
        reads = min(4000, int(3 * deadline_s / max(min(one), 1e-4)) + 1)
        t0 = time.monotonic()
        futures = [tier.read(entry, copy, memoryview(outs[i % 8])) for i in range(reads)]
        for f in futures:
            f.result()
        assert time.monotonic() - t0 > deadline_s  # longer than one deadline in all
        assert tier.available() and bytes(outs[0]) == data
    finally:
        tier.close()


def test_credentials_are_checked_at_open(tmp_path: Path) -> None:
    servers = SingleServer(tmp_path / "s", password="s3cret")
    servers.start()
    try:
        secret = tmp_path / "pw"
        secret.write_text("s3cret\n")
        tier = open_tier(servers.nodes, "single", password_file=str(secret))
        assert tier.available()
        tier.close()
        for opts in ({"password": "wrong"}, {}):
            with pytest.raises(ConfigError, match=r"far\.password.*refused these credentials"):
                open_tier(servers.nodes, "single", **opts)
        with pytest.raises(ConfigError, match=r"far\.password_file.*cannot read"):
            open_tier(servers.nodes, "single", password_file=str(tmp_path / "nope"))
    finally:
        servers.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for certificates")
def test_tls_with_a_client_certificate(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    servers = SingleServer(tmp_path / "s", tls=tls)
    servers.start()
    try:
        files = {"ca_file": str(tls.ca), "cert_file": str(tls.client_cert),
                 "key_file": str(tls.client_key)}  # fmt: skip
        tier = open_tier(servers.nodes, "single", tls=True, **files)
        try:
            assert tier.available()
            entry, data = block(ns_of("t", b"s"), b"t" * 16)
            assert read(tier, entry, stored(tier, entry, data)) == data
        finally:
            tier.close()
        # Without a client certificate, or trusting another CA, or in plain text: never up.
        other = make_tls(tmp_path / "other")
        for opts in ({"tls": True, "ca_file": str(tls.ca)},
                     {**files, "tls": True, "ca_file": str(other.ca)}, {}):  # fmt: skip
            tier = open_tier(servers.nodes, "single", **opts)
            try:
                assert not tier.available()
            finally:
                tier.close()
        with pytest.raises(ConfigError, match=r"far\.ca_file.*not a readable file"):
            open_tier(servers.nodes, "single", tls=True, ca_file=str(tmp_path / "none.pem"))
    finally:
        servers.stop()


def test_a_store_unreachable_at_start_is_unavailable_not_an_error() -> None:
    from tests.ports import free_port

    tier = open_tier([f"127.0.0.1:{free_port()}"], "single")
    try:
        assert not tier.available() and tier.start() != []
    finally:
        tier.close()


@pytest.mark.parametrize(("options", "error"), [
    ({}, r"tiers\[1\]\.nodes.*at least one node"),
    ({"nodes": ["nohost"]}, r"tiers\[1\]\.nodes.*'nohost' is not host:port"),
    ({"nodes": "h:1"}, r"tiers\[1\]\.nodes.*expected tuple"),
    ({"nodes": ["a:1", "b:2"], "mode": "single"}, r"tiers\[1\]\.nodes.*exactly one node"),
    ({"mode": "sentinel"}, r"tiers\[1\]\.mode.*cluster or single"),
    ({"password": "x", "password_file": "/p"}, r"tiers\[1\]\.password_file.*not both"),
    ({"ca_file": "/ca.pem"}, r"tiers\[1\]\.ca_file.*tls = true"),
    ({"tls": True, "cert_file": "/c.pem"}, r"tiers\[1\]\.cert_file.*go together"),
    ({"key_prefix": "a{b}"}, r"tiers\[1\]\.key_prefix.*no braces"),
    ({"timeout_ms": 0}, r"tiers\[1\]\.timeout_ms"),
    ({"write": "back"}, r"tiers\[1\]\.write.*demote or through"),
    ({"capacity": 0}, r"tiers\[1\]\.capacity.*budget in the store"),
    ({"shards": 3}, r"tiers\[1\]\.shards.*its own keys: ca_file, cert_file"),
])  # fmt: skip
def test_options_are_checked_at_config_load(
    tmp_path: Path, options: dict[str, Any], error: str
) -> None:
    table = {"nodes": ["127.0.0.1:7000"], "capacity": "1GiB", **options}
    if not options and "nodes" in table:
        del table["nodes"]
    lines = [f"{k} = {_toml(v)}" for k, v in table.items()]
    path = tmp_path / "tierd.toml"
    path.write_text('[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = "64MiB"\n\n'
                    '[[tiers]]\nname = "far"\nkind = "redis"\n' + "\n".join(lines) + "\n")  # fmt: skip
    with pytest.raises(ConfigError, match=error):
        load_config(path)


def test_a_good_redis_table_loads() -> None:
    cfg = Config(tier_list=(
        TierSpec("mem", "host", 64 << 20),
        TierSpec("far", "redis", 1 << 30, options=(("nodes", ("10.0.0.5:6379", "[::1]:7000")),
                                                   ("write", "through"))),
    ))  # fmt: skip
    cfg.validate()


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return f'"{v}"' if isinstance(v, str) else str(v)
