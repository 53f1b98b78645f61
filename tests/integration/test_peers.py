"""Two real daemons on loopback with [peers]: B pulls what A's client put, through A's
transfer engine, byte-exact, and keeps it after A is gone; another tenant finds nothing;
A down, a wrong secret or damaged bytes are misses on B, never errors, counted per peer."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.integration.conftest import DaemonProcess
from tests.integration.test_remote_redis import LAY, T, block_for, poll
from tests.integration.test_tier_stats import configured
from tests.integration.test_tls import make_pki
from tests.mooncake_master import needs_mooncake
from tests.ports import free_port
from tierctl.status import render_status
from tierd.tiers.host import segments_of
from tierd_client import TierdClient
from tierd_client._proto import peer_pb2, peer_pb2_grpc

pytestmark = needs_mooncake
TOKEN = "peer-secret-0123456789abcdef"
Spawn = Callable[..., DaemonProcess]


def peer_daemon(spawn: Spawn, *, listen: str = "", peers: tuple[str, ...] = (),
                token: str = TOKEN, pki: Path | None = None) -> DaemonProcess:  # fmt: skip
    daemon = spawn(start=False)
    token_file = daemon.base / "peer.token"
    token_file.write_text(token + "\n")
    lines = [f'token_file = "{token_file}"', "timeout_ms = 1000", "retry_ms = 200"]
    if listen:
        lines.append(f'listen = "{listen}"')
    if peers:
        lines.append("peers = [" + ", ".join(f'"{p}"' for p in peers) + "]")
    if pki is not None:  # one certificate per daemon, as server and as client
        lines += [f'ca_file = "{pki / "ca.pem"}"', f'cert_file = "{pki / "server.pem"}"',
                  f'key_file = "{pki / "server.key"}"']  # fmt: skip
    body = ('[host]\ncapacity = "64MiB"\n\n[nvme]\ncapacity = "256MiB"\n\n[peers]\n'
            + "\n".join(lines) + "\n")  # fmt: skip
    daemon = configured(daemon, body)
    daemon.start()
    return daemon


def pair(spawn: Spawn, *, token_b: str = TOKEN) -> tuple[DaemonProcess, DaemonProcess, str]:
    """A serves peers; B pulls from A. Returns both and A's peer address."""
    where = f"127.0.0.1:{free_port()}"
    return (peer_daemon(spawn, listen=where), peer_daemon(spawn, peers=(where,), token=token_b),
            where)  # fmt: skip


def put_prefix(address: str, name: str, blocks: int, tenant: str = "it") -> tuple[
        np.ndarray, list[bytes], np.ndarray]:  # fmt: skip
    tokens = np.arange(blocks * T) + 7
    with TierdClient(address, tenant=tenant) as c:
        ns = c.open_namespace(name, LAY)
        keys = c.block_keys(ns, tokens)
        data = np.stack([block_for(k) for k in keys])
        c.put(ns, keys, data)
    return tokens, keys, data


def test_b_pulls_a_prefix_a_put_byte_exact_and_keeps_it(spawn_daemon: Spawn) -> None:
    a, b, where = pair(spawn_daemon)
    tokens, keys, data = put_prefix(a.address, "p2p", 4)
    with TierdClient(b.address, tenant="it") as c:
        ns = c.open_namespace("p2p", LAY)
        before = c.stats()["peers"][where]
        assert before["available"] and before["blocks"] == 0
        # A longer prompt than A holds: the prefix A has comes across, the rest is a miss.
        found = c.lookup(ns, np.concatenate([tokens, np.arange(2 * T) + 10_000]))
        assert found.cached_tokens == 4 * T
        assert [blk.key for blk in found.blocks] == keys
        assert {blk.tier for blk in found.blocks} == {"host"}
        stats = c.stats()
        peer = stats["peers"][where]
        assert peer["blocks"] == 4 and peer["bytes"] == 4 * data[0].nbytes and peer["pulls"] >= 1
        assert peer["errors"] == 0 and peer["corrupt"] == 0
        assert stats["tiers"]["host"]["blocks"] == 4
        row = next(line for line in render_status(stats).splitlines() if line.startswith(where))
        assert row.split()[1:4] == ["up", "1", "4"]
        a.stop()  # the pulled blocks are B's own now
        res = c.get(ns, keys)
        assert res.found == [True] * 4 and res.blocks.tobytes() == data.tobytes()
        assert c.lookup(ns, tokens).cached_tokens == 4 * T


def test_another_tenant_on_b_finds_nothing(spawn_daemon: Spawn) -> None:
    a, b, where = pair(spawn_daemon)
    tokens, keys, _ = put_prefix(a.address, "private", 3, tenant="it")
    with TierdClient(b.address, tenant="other") as c:
        ns = c.open_namespace("private", LAY)
        assert c.lookup(ns, tokens).cached_tokens == 0
        peer = c.stats()["peers"][where]
        assert peer["blocks"] == 0 and peer["errors"] == 0 and peer["available"]
    # Asked directly with the right secret, A still names nothing of "it" to "other".
    with TierdClient(a.address, tenant="it") as c:
        ns_id = c.open_namespace("private", LAY).id
    with grpc.insecure_channel(where) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        auth = (("authorization", f"Bearer {TOKEN}"),)
        wrong = stub.PeerLocate(peer_pb2.PeerLocateRequest(
            tenant="other", namespace_id=ns_id, keys=keys), metadata=auth, timeout=5)  # fmt: skip
        assert wrong.lease_id == 0 and not any(blk.found for blk in wrong.blocks)
        right = stub.PeerLocate(peer_pb2.PeerLocateRequest(
            tenant="it", namespace_id=ns_id, keys=keys), metadata=auth, timeout=5)  # fmt: skip
        assert right.lease_id and [blk.found for blk in right.blocks] == [True] * 3
        assert stub.PeerRelease(peer_pb2.PeerReleaseRequest(tenant="other",
                                lease_id=right.lease_id), metadata=auth).released is False  # fmt: skip
        assert stub.PeerRelease(peer_pb2.PeerReleaseRequest(tenant="it",
                                lease_id=right.lease_id), metadata=auth).released  # fmt: skip


def test_a_stopped_is_a_miss_on_b_not_an_error(spawn_daemon: Spawn) -> None:
    a, b, where = pair(spawn_daemon)
    tokens, _, _ = put_prefix(a.address, "gone", 2)
    a.stop()
    with TierdClient(b.address, tenant="it") as c:
        ns = c.open_namespace("gone", LAY)
        assert c.lookup(ns, tokens).cached_tokens == 0
        stats = c.stats()
        peer = stats["peers"][where]
        assert peer["errors"] >= 1 and not peer["available"] and peer["blocks"] == 0
        assert f"{where} DOWN" in " ".join(render_status(stats).split())


def test_a_wrong_peer_token_is_refused(spawn_daemon: Spawn) -> None:
    a, b, where = pair(spawn_daemon, token_b="not-the-group-secret-000")
    tokens, keys, _ = put_prefix(a.address, "secret", 2)
    with TierdClient(b.address, tenant="it") as c:
        ns = c.open_namespace("secret", LAY)
        assert c.lookup(ns, tokens).cached_tokens == 0
        peer = c.stats()["peers"][where]
        assert peer["errors"] >= 1 and peer["blocks"] == 0
    with grpc.insecure_channel(where) as channel, pytest.raises(grpc.RpcError) as err:
        peer_pb2_grpc.PeerStub(channel).PeerLocate(
            peer_pb2.PeerLocateRequest(tenant="it", keys=keys), timeout=5)  # fmt: skip
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    poll(lambda: "refused a peer call" in a.log.read_text(errors="replace"), "A logs it")


def _damage(segment_dir: Path, block: np.ndarray) -> None:
    """Flip bytes of `block` where A's memory tier holds it (its shared-memory segment)."""
    needle = block.tobytes()
    for path in segments_of(segment_dir):
        with open(path, "r+b") as f:
            raw = f.read()
            at = raw.find(needle)
            if at >= 0:
                f.seek(at + 100)
                f.write(bytes(b ^ 0xFF for b in needle[100:108]))
                return
    raise AssertionError("the block is not in A's memory")


def test_damaged_bytes_are_a_miss_counted_corrupt(spawn_daemon: Spawn) -> None:
    a, b, where = pair(spawn_daemon)
    tokens, keys, data = put_prefix(a.address, "damaged", 3)
    _damage(a.base / "data", data[1])
    with TierdClient(b.address, tenant="it") as c:
        ns = c.open_namespace("damaged", LAY)
        assert c.lookup(ns, tokens).cached_tokens == T  # the first block only
        peer = c.stats()["peers"][where]
        assert peer["corrupt"] == 1 and peer["blocks"] == 1
        res = c.get(ns, keys)
        assert res.found == [True, False, False]
        assert res.blocks[0].tobytes() == data[0].tobytes()


@pytest.fixture
def silent() -> Iterator[str]:
    """A TCP port that accepts connections and never answers (a hung peer)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"127.0.0.1:{s.getsockname()[1]}"


def test_a_hung_peer_costs_its_deadline_then_the_next_peer_serves(
    spawn_daemon: Spawn, silent: str
) -> None:
    where = f"127.0.0.1:{free_port()}"
    a = peer_daemon(spawn_daemon, listen=where)
    b = peer_daemon(spawn_daemon, peers=(silent, where))
    tokens, keys, data = put_prefix(a.address, "hung", 2)
    with TierdClient(b.address, tenant="it", timeout=30) as c:
        ns = c.open_namespace("hung", LAY)
        started = time.monotonic()
        assert c.lookup(ns, tokens).cached_tokens == 2 * T
        assert time.monotonic() - started < 10  # timeout_ms = 1000 for the hung one
        stats = c.stats()["peers"]
        assert stats[silent]["errors"] == 1 and not stats[silent]["available"]
        assert stats[where]["blocks"] == 2
        assert c.get(ns, keys).blocks.tobytes() == data.tobytes()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_mutual_tls_between_daemons(spawn_daemon: Spawn, tmp_path: Path) -> None:
    make_pki(tmp_path)  # a CA and a certificate for 127.0.0.1, which both daemons use
    where = f"127.0.0.1:{free_port()}"
    a = peer_daemon(spawn_daemon, listen=where, pki=tmp_path)
    b = peer_daemon(spawn_daemon, peers=(where,), pki=tmp_path)
    tokens, keys, data = put_prefix(a.address, "tls", 2)
    with TierdClient(b.address, tenant="it") as c:
        ns = c.open_namespace("tls", LAY)
        assert c.lookup(ns, tokens).cached_tokens == 2 * T
        assert c.get(ns, keys).blocks.tobytes() == data.tobytes()
    # Without a certificate (even with the secret) the listener does not answer.
    with grpc.insecure_channel(where) as channel, pytest.raises(grpc.RpcError):
        peer_pb2_grpc.PeerStub(channel).PeerLocate(
            peer_pb2.PeerLocateRequest(tenant="it", keys=keys),
            metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=5,
        )  # fmt: skip
