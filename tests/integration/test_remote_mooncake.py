"""Daemons with a mooncake tier below host, on a real Mooncake Store master that the tests
start on loopback: blocks round-trip byte-exact, a damaged value is a miss, tenants stay
apart, a second daemon finds and reads what the first wrote, and the daemon keeps serving
while the master is down and comes back with it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from tests.integration.conftest import DaemonProcess
from tests.integration.test_remote_redis import LAY, T, block_for, poll
from tests.integration.test_tier_stats import configured, wait_available
from tests.mooncake_master import Master, needs_mooncake
from tierd.tiers.remote_value import header_bytes
from tierd_client import AttendItem, TierdClient
from tierd_client.errors import ResourceExhausted

pytestmark = needs_mooncake
HEAD = header_bytes(LAY.num_layers)


def chain(master: Master, **remote: Any) -> str:
    opts = {"master": master.address, "metadata_server": master.metadata, "timeout_ms": 1000,
            **remote}  # fmt: skip
    lines = "\n".join(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}"
                      for k, v in opts.items())  # fmt: skip
    return ('[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = "64MiB"\n\n'
            f'[[tiers]]\nname = "remote"\nkind = "mooncake"\ncapacity = "48MiB"\n{lines}\n')  # fmt: skip


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Master]:
    m = Master(tmp_path_factory.mktemp("mooncake"))
    m.start()
    try:
        yield m
    finally:
        m.kill()


@pytest.fixture
def daemon_on(spawn_daemon: Callable[..., DaemonProcess]) -> Callable[..., DaemonProcess]:
    def start(master: Master, **remote: Any) -> DaemonProcess:
        daemon = configured(spawn_daemon(start=False), chain(master, **remote))
        daemon.start()
        return daemon

    return start


def key_in_store(tenant: str, ns_id: bytes, key: bytes) -> str:
    return f"tierd/{tenant}/{ns_id.hex()}/{key.hex()}"


def test_blocks_round_trip_through_the_mooncake_tier_byte_exact(
    master: Master, daemon_on: Callable[..., DaemonProcess]
) -> None:
    daemon = daemon_on(master)
    with TierdClient(daemon.address, tenant="it") as c:
        stats = c.stats()["tiers"]["remote"]
        assert stats["available"] and stats["kind"] == "mooncake"
        ns = c.open_namespace("rt", LAY)
        keys = c.block_keys(ns, np.arange(4 * T))
        blocks = np.stack([block_for(k) for k in keys])
        c.put(ns, keys, blocks)
        assert c.move(ns, keys, "remote") == 4 and c.locate(ns, keys) == ["remote"] * 4
        store = master.client()
        try:  # in the store, under the tenant and namespace, behind a checked header
            raw = store.get(key_in_store("it", ns.id, keys[2]))
        finally:
            store.close()
        assert raw[HEAD:] == blocks[2].tobytes()

        q = np.random.default_rng(1).standard_normal((1, 4, 64), dtype=np.float32)
        seq = c.open_sequence(ns, keys)
        far = c.attend([AttendItem(seq, 1, q)], as_torch=False)[0].out
        res = c.get(ns, keys)
        assert res.found == [True] * 4 and res.blocks.tobytes() == blocks.tobytes()
        assert c.move(ns, keys, "mem") == 4
        near = c.attend([AttendItem(seq, 1, q)], as_torch=False)[0].out
        np.testing.assert_allclose(far, near, rtol=1e-5, atol=1e-6)
        c.close_sequence(seq)


def test_a_damaged_value_is_a_miss_never_served(
    master: Master, daemon_on: Callable[..., DaemonProcess]
) -> None:
    daemon = daemon_on(master)
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("damage", LAY)
        keys = c.block_keys(ns, np.arange(2 * T))
        c.put(ns, keys, np.stack([block_for(k) for k in keys]))
        assert c.move(ns, keys, "remote") == 2
        store = master.client()
        try:
            name = key_in_store("it", ns.id, keys[0])
            value = bytearray(store.get(name))
            value[HEAD + 4 : HEAD + 6] = b"\x7f\x7f"
            assert store.upsert(name, bytes(value)) == 0
        finally:
            store.close()
        res = c.get(ns, keys)
        assert res.found == [False, True]
        assert res.blocks[1].tobytes() == block_for(keys[1]).tobytes()
        assert c.stats()["corrupt_reads"] == 1 and c.locate(ns, keys[:1]) == [None]


def test_another_tenant_cannot_find_it(
    master: Master, daemon_on: Callable[..., DaemonProcess]
) -> None:
    a = daemon_on(master, write="through")
    b = daemon_on(master)
    tokens = np.arange(3 * T)
    with TierdClient(a.address, tenant="one") as ca, TierdClient(b.address, tenant="two") as cb:
        ns = ca.open_namespace("private", LAY)
        keys = ca.block_keys(ns, tokens)
        ca.put(ns, keys, np.stack([block_for(k) for k in keys]))
        poll(lambda: ca.stats()["tiers"]["remote"]["blocks"] == 3, "write-through copies")
        other = cb.open_namespace("private", LAY)  # same model name, another tenant
        assert cb.lookup(other, tokens).cached_tokens == 0


def test_a_second_daemon_finds_and_reads_the_prefix_the_first_wrote(
    master: Master, daemon_on: Callable[..., DaemonProcess]
) -> None:
    a = daemon_on(master, write="through")
    b = daemon_on(master)
    tokens = np.arange(5 * T + 3)
    with TierdClient(a.address, tenant="it") as ca, TierdClient(b.address, tenant="it") as cb:
        ns = ca.open_namespace("shared-prefix", LAY)
        keys = ca.block_keys(ns, tokens)
        blocks = np.stack([block_for(k) for k in keys])
        ca.put(ns, keys, blocks)
        poll(lambda: ca.stats()["tiers"]["remote"]["blocks"] == 5, "write-through copies")
        nsb = cb.open_namespace("shared-prefix", LAY)
        res = cb.lookup(nsb, tokens)
        assert res.cached_tokens == 5 * T and {b.tier for b in res.blocks} <= {"remote", "mem"}
        got = cb.get(nsb, keys)
        assert got.found == [True] * 5 and got.blocks.tobytes() == blocks.tobytes()
        assert cb.stats()["corrupt_reads"] == 0


def test_the_daemon_serves_while_the_master_is_down_and_comes_back_with_it(
    master: Master, daemon_on: Callable[..., DaemonProcess]
) -> None:
    """Last in the module: it kills the master (and starts it again, empty)."""
    daemon = daemon_on(master)
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("outage", LAY)
        keys = c.block_keys(ns, np.arange(6 * T))
        blocks = np.stack([block_for(k) for k in keys])
        c.put(ns, keys, blocks)
        assert c.move(ns, keys[3:], "remote") == 3

        master.kill()
        wait_available(c, "remote", False)  # the link's probe saw it go
        more = c.block_keys(ns, np.arange(8 * T))[6:]
        c.put(ns, more, np.stack([block_for(k) for k in more]))  # puts go on
        with pytest.raises(ResourceExhausted):  # down, and no queue (max_queued_bytes 0)
            c.move(ns, more, "remote")
        res = c.get(ns, keys)  # no error: local blocks served, the store's are misses
        assert res.found[:3] == [True] * 3 and res.blocks[:3].tobytes() == blocks[:3].tobytes()
        assert res.found[3:] == [False] * 3
        assert c.get(ns, more).found == [True, True]

        master.start()  # back, empty
        wait_available(c, "remote", True)
        assert c.move(ns, more, "remote") == 2 and c.locate(ns, more) == ["remote"] * 2
        res = c.get(ns, more)  # writes resumed: read back from the store
        assert res.found == [True, True]
        assert res.blocks.tobytes() == np.stack([block_for(k) for k in more]).tobytes()
