"""The prefix directory in a real Redis cluster, with three real daemons on loopback: C,
whose peers are [B, A], finds through the directory that A holds a prefix and pulls it
from A without asking B; entries are renewed by lookups, expire without them and go
with a delete; another tenant finds nothing; a cluster that is down costs lookups
nothing but the advice, and the writes it missed are counted as dropped; a peer the
directory names whose blocks could not be pulled is named in the lookup's answer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.integration.conftest import DaemonProcess
from tests.integration.test_peers import TOKEN, put_prefix
from tests.integration.test_remote_redis import LAY, T, chain, poll
from tests.integration.test_tier_stats import configured
from tests.mooncake_master import needs_mooncake
from tests.ports import free_port
from tests.redis_cluster import Cluster, needs_redis, started
from tests.server.test_metrics import scrape
from tierctl.status import render_status
from tierd_client import TierdClient

pytestmark = [*needs_redis, needs_mooncake]
Spawn = Callable[..., DaemonProcess]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started(Cluster, tmp_path_factory.mktemp("cluster"))


def daemon(spawn: Spawn, cluster: Cluster, *, listen: str = "", peers: tuple[str, ...] = (),
           ttl_ms: int = 30_000, metrics: int = 0, token: str = TOKEN,
           directory: str = "remote") -> DaemonProcess:  # fmt: skip
    """A daemon whose redis tier takes no demotions (`spill = false`): the cluster keeps
    only the directory, so whatever C finds, it finds through a peer."""
    d = spawn(start=False)
    token_file = d.base / "peer.token"
    token_file.write_text(token + "\n")
    lines = [f'token_file = "{token_file}"', "timeout_ms = 1000", "retry_ms = 200",
             f'directory = "{directory}"', f"directory_ttl_ms = {ttl_ms}"]  # fmt: skip
    if listen:
        lines.append(f'listen = "{listen}"')
    if peers:
        lines.append("peers = [" + ", ".join(f'"{p}"' for p in peers) + "]")
    body = chain(cluster.nodes).replace('kind = "redis"', 'kind = "redis"\nspill = false')
    if metrics:
        body += f'\n[metrics]\nlisten = "127.0.0.1:{metrics}"\n'
    d = configured(d, body + "\n[peers]\n" + "\n".join(lines) + "\n")
    d.start(wait=directory == "remote")
    return d


def held_key(ns_id: bytes, key: bytes, tenant: str = "it") -> str:
    return f"tierd:held:{{{tenant}:{ns_id.hex()}}}:{key.hex()}"


def holders(cluster: Cluster, ns_id: bytes, key: bytes) -> dict[str, int]:
    with cluster.client() as rc:
        got = rc.hgetall(held_key(ns_id, key))
    return {a.decode(): int(v) for a, v in got.items()}


def stats(d: DaemonProcess) -> dict[str, Any]:
    with TierdClient(d.address, tenant="it") as c:
        return c.stats()


def ns_id_of(d: DaemonProcess, name: str, tenant: str = "it") -> bytes:
    with TierdClient(d.address, tenant=tenant) as c:
        return c.open_namespace(name, LAY).id


def test_c_pulls_from_the_peer_the_directory_names_not_the_first_configured(
    spawn_daemon: Spawn, cluster: Cluster
) -> None:
    at_a, at_b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    a = daemon(spawn_daemon, cluster, listen=at_a)
    daemon(spawn_daemon, cluster, listen=at_b)
    c = daemon(spawn_daemon, cluster, peers=(at_b, at_a), metrics=(port := free_port()))
    tokens, keys, data = put_prefix(a.address, "dir", 4)
    ns_id = ns_id_of(a, "dir")
    poll(lambda: all(at_a in holders(cluster, ns_id, k) for k in keys), "A's entries")
    with cluster.client() as rc:
        assert 0 < rc.pttl(held_key(ns_id, keys[0])) <= 30_000

    with TierdClient(c.address, tenant="it") as cc:
        ns = cc.open_namespace("dir", LAY)
        found = cc.lookup(ns, tokens)
        assert found.cached_tokens == 4 * T and found.held_by == ""
        s = cc.stats()
        assert s["peers"][at_b]["asked"] == 0  # B comes first in C's list, and was skipped
        assert s["peers"][at_a]["asked"] == 1 and s["peers"][at_a]["blocks"] == 4
        assert s["peers"][at_a]["directory_hits"] == 1
        d = s["directory"]
        assert d["available"] and d["hits"] == 1 and d["misses"] == 0
        assert d["tier_name"] == "remote"
        shown = render_status(s).splitlines()
        row = shown[shown.index(next(x for x in shown if x.startswith("directory"))) + 2]
        assert row.split()[:3] == ["remote", "up", "1"]
        assert cc.get(ns, keys).blocks.tobytes() == data.tobytes()
    m = scrape(port)
    assert m["tierd_prefix_directory_hits_total"] == 1
    assert m["tierd_prefix_directory_available"] == 1

    # Another tenant's lookup of the same prompt names nothing of "it": its keys differ.
    with TierdClient(c.address, tenant="other") as co:
        other = co.open_namespace("dir", LAY)
        assert co.lookup(other, tokens).cached_tokens == 0
        d = co.stats()["directory"]
        assert d["hits"] == 1 and d["misses"] == 1
    with cluster.client() as rc:
        assert not any(rc.exists(held_key(other.id, k, "other")) for k in keys)

    # A deletes the blocks: its entries go (C never recorded any: it has no address).
    with TierdClient(a.address, tenant="it") as ca:
        assert ca.delete(ca.open_namespace("dir", LAY), keys) == 4
    poll(lambda: not any(holders(cluster, ns_id, k) for k in keys), "A's entries removed")
    assert stats(a)["directory"]["writes"] >= 8


def test_entries_are_renewed_by_lookups_and_expire_without(
    spawn_daemon: Spawn, cluster: Cluster
) -> None:
    at_a, at_b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    a = daemon(spawn_daemon, cluster, listen=at_a, ttl_ms=1500)
    daemon(spawn_daemon, cluster, listen=at_b)
    c = daemon(spawn_daemon, cluster, peers=(at_b, at_a))
    tokens, keys, _ = put_prefix(a.address, "expiry", 2)
    ns_id = ns_id_of(a, "expiry")
    first = held_key(ns_id, keys[0])
    poll(lambda: at_a in holders(cluster, ns_id, keys[0]), "A's entry")
    with cluster.client() as rc:
        poll(lambda: 0 < rc.pttl(first) < 900, "the entry ages past a third of its TTL")
        with TierdClient(a.address, tenant="it") as ca:
            assert ca.lookup(ca.open_namespace("expiry", LAY), tokens).cached_tokens == 2 * T
        poll(lambda: rc.pttl(first) > 1000, "a lookup on A renews it")
        poll(lambda: not rc.exists(first), "the entry expires", deadline_s=10)

    with TierdClient(c.address, tenant="it") as cc:
        ns = cc.open_namespace("expiry", LAY)
        assert cc.lookup(ns, tokens).cached_tokens == 2 * T  # configured order: B, then A
        s = cc.stats()
        assert s["peers"][at_b]["asked"] == 1 and s["peers"][at_b]["blocks"] == 0
        assert s["peers"][at_a]["blocks"] == 2 and s["peers"][at_a]["directory_hits"] == 0
        assert s["directory"]["misses"] == 1 and s["directory"]["hits"] == 0


def test_a_peer_named_but_not_pulled_from_is_named_in_the_lookup(
    spawn_daemon: Spawn, cluster: Cluster
) -> None:
    at_a = f"127.0.0.1:{free_port()}"
    a = daemon(spawn_daemon, cluster, listen=at_a)
    c = daemon(spawn_daemon, cluster, peers=(at_a,), token="not-the-group-secret-000")
    tokens, keys, _ = put_prefix(a.address, "named", 3)
    ns_id = ns_id_of(a, "named")
    poll(lambda: all(at_a in holders(cluster, ns_id, k) for k in keys), "A's entries")
    with TierdClient(c.address, tenant="it") as cc:
        found = cc.lookup(cc.open_namespace("named", LAY), tokens)  # A refuses C's secret
        assert found.cached_tokens == 0
        assert (found.held_by, found.held_blocks) == (at_a, 3)
        peer = cc.stats()["peers"][at_a]
        assert peer["errors"] == 1 and peer["directory_hits"] == 1 and peer["blocks"] == 0


def test_a_directory_that_is_not_a_redis_tier_stops_the_daemon(
    spawn_daemon: Spawn, cluster: Cluster
) -> None:
    bad = daemon(spawn_daemon, cluster, listen=f"127.0.0.1:{free_port()}", directory="mem")
    assert bad.proc is not None and bad.proc.wait(60) == 2
    log = bad.log.read_text()
    assert "configuration error" in log and "peers.directory" in log


def test_cluster_down_lookups_answer_and_missed_writes_are_counted(
    spawn_daemon: Spawn, cluster: Cluster
) -> None:
    at_a = f"127.0.0.1:{free_port()}"
    a = daemon(spawn_daemon, cluster, listen=at_a)
    c = daemon(spawn_daemon, cluster, peers=(at_a,))
    mine, _, _ = put_prefix(c.address, "local", 2)
    cluster.stop()
    try:
        poll(lambda: not stats(a)["directory"]["available"], "A sees the cluster down")
        poll(lambda: not stats(c)["directory"]["available"], "C sees the cluster down")
        tokens, keys, data = put_prefix(a.address, "down", 3)
        poll(lambda: stats(a)["directory"]["writes_dropped"] >= 3, "A drops its entries")
        with TierdClient(c.address, tenant="it") as cc:
            assert cc.lookup(cc.open_namespace("local", LAY), mine).cached_tokens == 2 * T
            ns = cc.open_namespace("down", LAY)
            assert cc.lookup(ns, tokens).cached_tokens == 3 * T  # pulled in configured order
            assert cc.get(ns, keys).blocks.tobytes() == data.tobytes()
            d = cc.stats()["directory"]
            assert not d["available"] and d["hits"] == 0 and d["misses"] == 0
    finally:
        cluster.start()
