"""Two daemons in separate network namespaces, joined by a veth pair (10.213.x.1 and .2):
B pulls the prefix A's client put over that link (the `Peer` call and the transfer
engine's reads both cross it), byte-exact, and its own client gets it with A gone; a
client in B's namespace (another host, as far as A can tell) gets and puts through A's
transfer engine over the link.
Clients reach the daemons through their unix sockets, which network namespaces do not
separate. Skipped where `ip netns` is not permitted (it needs CAP_NET_ADMIN)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import DaemonProcess
from tests.integration.test_peers import TOKEN, put_prefix
from tests.integration.test_remote_redis import LAY, T, chain, poll
from tests.integration.test_tier_stats import configured
from tests.mooncake_master import needs_mooncake
from tierd_client import TierdClient

pytestmark = needs_mooncake
PEER_PORT = 7001


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=False, capture_output=True, text=True,
                          timeout=30)  # fmt: skip


@pytest.fixture
def namespaces() -> Iterator[dict[str, str]]:
    """Two namespaces, name -> the address of its end of the veth pair."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (ip)")
    tag = f"{os.getpid() % 100_000}"
    subnet = 1 + os.getpid() % 250
    spaces = {f"tierd-{tag}-a": f"10.213.{subnet}.1", f"tierd-{tag}-b": f"10.213.{subnet}.2"}
    made: list[str] = []
    try:
        for ns in spaces:
            got = _ip("netns", "add", ns)
            if got.returncode != 0:
                pytest.skip(f"ip netns is not permitted here: {got.stderr.strip()}")
            made.append(ns)
        (a, addr_a), (b, addr_b) = spaces.items()
        ends = (f"tda{tag}", f"tdb{tag}")
        steps = [
            ("link", "add", ends[0], "netns", a, "type", "veth", "peer", "name", ends[1],
             "netns", b),
            ("-n", a, "addr", "add", f"{addr_a}/24", "dev", ends[0]),
            ("-n", b, "addr", "add", f"{addr_b}/24", "dev", ends[1]),
            ("-n", a, "link", "set", ends[0], "up"), ("-n", b, "link", "set", ends[1], "up"),
            ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up"),
        ]  # fmt: skip
        for step in steps:
            got = _ip(*step)
            if got.returncode != 0:
                pytest.skip(f"cannot set up the veth pair ({' '.join(step)}): "
                            f"{got.stderr.strip()}")  # fmt: skip
        yield spaces
    finally:
        for ns in made:  # the veth pair goes with its namespaces
            _ip("netns", "del", ns)


def netns_daemon(spawn: Callable[..., DaemonProcess], ns: str, address: str,
                 peers: tuple[str, ...] = (), bulk: bool = False) -> DaemonProcess:  # fmt: skip
    daemon = spawn(start=False)
    token_file = daemon.base / "peer.token"
    token_file.write_text(TOKEN + "\n")
    lines = [f'token_file = "{token_file}"', f'engine_hostname = "{address}"',
             f'listen = "{address}:{PEER_PORT}"', "timeout_ms = 2000",
             "retry_ms = 200"]  # fmt: skip
    if peers:
        lines.append("peers = [" + ", ".join(f'"{p}"' for p in peers) + "]")
    if bulk:
        lines.append("bulk = true")
    body = ('[host]\ncapacity = "64MiB"\n\n[nvme]\ncapacity = "256MiB"\n\n[peers]\n'
            + "\n".join(lines) + "\n")  # fmt: skip
    daemon = configured(daemon, body)
    daemon.cmd[:0] = ["ip", "netns", "exec", ns]
    daemon.start()
    return daemon


def test_b_pulls_from_a_across_network_namespaces(
    spawn_daemon: Callable[..., DaemonProcess], namespaces: dict[str, str]
) -> None:
    (ns_a, addr_a), (ns_b, addr_b) = namespaces.items()
    # B reaches A's address over the veth pair (its namespace has no other way out).
    route = _ip("netns", "exec", ns_b, "ip", "route", "get", addr_a)
    assert route.returncode == 0 and " dev tdb" in route.stdout
    a = netns_daemon(spawn_daemon, ns_a, addr_a)
    b = netns_daemon(spawn_daemon, ns_b, addr_b, peers=(f"{addr_a}:{PEER_PORT}",))
    tokens, keys, data = put_prefix(a.address, "netns", 4)
    with TierdClient(b.address, tenant="it") as c:
        ns = c.open_namespace("netns", LAY)
        assert c.lookup(ns, tokens).cached_tokens == 4 * T
        peer = c.stats()["peers"][f"{addr_a}:{PEER_PORT}"]
        assert peer["blocks"] == 4 and peer["bytes"] == data.nbytes and peer["errors"] == 0
        a.stop()
        got = c.get(ns, keys)
        assert got.found == [True] * 4 and got.blocks.tobytes() == data.tobytes()
        more = np.concatenate([tokens, np.arange(T) + 50_000])  # A is gone: a miss, no error
        assert c.lookup(ns, more).cached_tokens == 4 * T


REMOTE_CLIENT = """
import sys
import numpy as np
from tierd_client import KVLayout, TierdClient
address, host, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
lay = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_tokens=16)
with TierdClient(address, tenant="it", transport="inband", bulk="engine",
                 bulk_hostname=host) as c:
    ns = c.open_namespace("netns-bulk", lay)
    assert ns.transport == "engine", ns.transport
    keys = c.block_keys(ns, np.arange(2 * n * 16) + 7)
    got = c.get(ns, keys[:n])
    assert all(got.found), got.found
    sys.stdout.buffer.write(got.blocks.tobytes())
    more = np.random.default_rng(9).standard_normal((n, *lay.block_shape), dtype=np.float32)
    assert c.put(ns, keys[n:], more) == ["stored"] * n
"""


def test_a_client_in_another_namespace_gets_and_puts_through_the_engine(
    spawn_daemon: Callable[..., DaemonProcess], namespaces: dict[str, str]
) -> None:
    (ns_a, addr_a), (ns_b, addr_b) = namespaces.items()
    a = netns_daemon(spawn_daemon, ns_a, addr_a, bulk=True)
    _, keys, data = put_prefix(a.address, "netns-bulk", 3)
    got = subprocess.run(
        ["ip", "netns", "exec", ns_b, sys.executable, "-c", REMOTE_CLIENT, a.address, addr_b,
         "3"], check=False, capture_output=True, timeout=120,
    )  # fmt: skip
    assert got.returncode == 0, got.stderr.decode(errors="replace")[-3000:]
    assert got.stdout == data.tobytes()
    more = np.random.default_rng(9).standard_normal((3, *LAY.block_shape), dtype=np.float32)
    with TierdClient(a.address, tenant="it") as c:
        ns = c.open_namespace("netns-bulk", LAY)
        all_keys = c.block_keys(ns, np.arange(6 * T) + 7)
        assert all_keys[:3] == keys
        res = c.get(ns, all_keys[3:])
        assert res.found == [True] * 3 and res.blocks.tobytes() == more.tobytes()
        assert c.stats()["active_leases"] == 0


REDIS_PORT = 7002


def _in(ns: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=False, capture_output=True,
                          text=True, timeout=30)  # fmt: skip


@pytest.fixture
def cluster_in_a(namespaces: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A one-master Redis cluster (every slot) in A's namespace, bound to A's address only:
    B reaches it over the veth pair, as another host reaches a cluster node."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        pytest.skip("needs redis-server and redis-cli")
    (ns_a, addr_a), _ = namespaces.items()
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns_a, server, "--port", str(REDIS_PORT), "--bind", addr_a,
         "--dir", str(tmp_path), "--save", "", "--appendonly", "no", "--protected-mode", "no",
         "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
         "--cluster-announce-ip", addr_a, "--logfile", str(tmp_path / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        ask = (ns_a, cli, "-h", addr_a, "-p", str(REDIS_PORT))
        poll(lambda: _in(*ask, "PING").stdout.strip() == "PONG", "redis-server in A's namespace")
        assert _in(*ask, "CLUSTER", "ADDSLOTSRANGE", "0", "16383").stdout.strip() == "OK"
        poll(lambda: "cluster_state:ok" in _in(*ask, "CLUSTER", "INFO").stdout, "cluster ok")
        yield f"{addr_a}:{REDIS_PORT}"
    finally:
        proc.terminate()
        proc.wait(30)


def test_two_hosts_share_a_prefix_through_a_redis_cluster(
    spawn_daemon: Callable[..., DaemonProcess], namespaces: dict[str, str], cluster_in_a: str
) -> None:
    """No peers: A writes its blocks through to the cluster; B, on the other side of the
    link, finds the prefix there and reads it byte-exact."""
    (ns_a, _), (ns_b, _) = namespaces.items()
    daemons = []
    for ns, write in ((ns_a, "through"), (ns_b, "")):
        remote = {"write": write} if write else {}
        d = configured(spawn_daemon(start=False), chain([cluster_in_a], **remote))
        d.cmd[:0] = ["ip", "netns", "exec", ns]
        d.start()
        daemons.append(d)
    a, b = daemons
    tokens = np.arange(6 * T + 5) + 900
    with TierdClient(a.address, tenant="it") as ca, TierdClient(b.address, tenant="it") as cb:
        ns = ca.open_namespace("netns-shared", LAY)
        keys = ca.block_keys(ns, tokens)
        blocks = np.random.default_rng(3).standard_normal((6, *LAY.block_shape),
                                                          dtype=np.float32)  # fmt: skip
        assert ca.put(ns, keys, blocks) == ["stored"] * 6
        poll(lambda: ca.stats()["tiers"]["remote"]["blocks"] == 6, "write-through copies")
        nsb = cb.open_namespace("netns-shared", LAY)
        assert cb.lookup(nsb, tokens).cached_tokens == 6 * T
        got = cb.get(nsb, keys)
        assert got.found == [True] * 6 and got.blocks.tobytes() == blocks.tobytes()
        assert cb.stats()["corrupt_reads"] == 0
