"""Remote clients' gets and puts through the transfer engine, against a real daemon with
`[peers] bulk = true` and real Mooncake engines over TCP loopback: byte-exact both ways,
a put whose bytes do not match their checksum is refused and stores nothing, another
tenant gets nothing, the lease ends with the read (or expires when the client dies), and
a daemon without an engine is served in-band."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.integration.test_remote_redis import poll
from tests.mooncake_master import needs_mooncake
from tierd.tiers.host import segments_of
from tierd_client import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    KVLayout,
    ResourceExhausted,
    TierdClient,
    Unavailable,
)
from tierd_client._proto import tierd_pb2 as pb

pytestmark = needs_mooncake
TOKENS = {"alpha": "alpha-secret-0123", "beta": "beta-secret-01234"}
LAY = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype="float16", block_tokens=16)
BB = LAY.block_bytes  # 2 MiB


def _config(base: Path, *, bulk: bool, extra: str = "", peers_extra: str = "") -> str:
    tenants = "".join(
        f'[[tenants]]\nname = "{name}"\n'
        f'token_sha256 = "{hashlib.sha256(tok.encode()).hexdigest()}"\n'
        for name, tok in TOKENS.items()
    )
    peers = ('[peers]\nbulk = true\nengine_hostname = "127.0.0.1"\n' + peers_extra
             if bulk else "")  # fmt: skip
    return (f'data_dir = "{base}/data"\n[server]\nlisten = ["unix:{base}/s.sock"]\n'
            '[host]\ncapacity = "256MiB"\n[nvme]\ncapacity = "256MiB"\n'
            f"{extra}{peers}{tenants}")  # fmt: skip


def _serve(base: Path, *, bulk: bool, extra: str = "",
           peers_extra: str = "") -> tuple[subprocess.Popen[bytes], str]:  # fmt: skip
    cfg = base / "tierd.toml"
    cfg.write_text(_config(base, bulk=bulk, extra=extra, peers_extra=peers_extra))
    with (base / "log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tierd", "serve", "--config", str(cfg)],
                                stderr=log)  # fmt: skip
    address = f"unix:{base}/s.sock"
    with TierdClient(address, tenant="alpha", token=TOKENS["alpha"], timeout=30) as c:
        c.stats()  # waits for the daemon to answer
    return proc, address


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="bulk-") as d:
        base = Path(d)
        proc, address = _serve(base, bulk=True)
        try:
            yield address
        finally:
            proc.terminate()
            proc.wait(30)
            for seg in segments_of(base / "data"):
                seg.unlink(missing_ok=True)


def remote(address: str, tenant: str = "alpha", bulk: str = "engine") -> TierdClient:
    """A client that maps no shared memory: what a client on another host does."""
    return TierdClient(address, tenant=tenant, token=TOKENS[tenant], transport="inband",
                       bulk=bulk, timeout=60)  # fmt: skip


def blocks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1 << 16, size=(n, *LAY.block_shape), dtype=np.uint16).view(np.float16)


def keys_of(name: str, n: int) -> list[bytes]:
    return [hashlib.sha256(f"{name}/{i}".encode()).digest()[:16] for i in range(n)]


def test_many_2mib_blocks_byte_exact_both_ways(address: str) -> None:
    n = 24
    data, keys = blocks(n, 1), keys_of("exact", n)
    with remote(address) as c, remote(address, bulk="inband") as ib:
        ns = c.open_namespace("bulk/exact", LAY)
        assert ns.transport == "engine"
        assert c.put(ns, keys[:16], data[:16]) == ["stored"] * 16
        assert c.put(ns, keys, data) == ["already_present"] * 16 + ["stored"] * 8
        # Separate rows (not one contiguous array) go through a contiguous copy.
        assert c.put(ns, keys[-1:], [data[-1]]) == ["already_present"]
        asked = keys[:10] + [keys_of("never", 1)[0]] + keys[10:]
        got = c.get(ns, asked)
        assert got.found == [True] * 10 + [False] + [True] * 14
        assert got.blocks[:10].tobytes() == data[:10].tobytes()
        assert got.blocks[11:].tobytes() == data[10:].tobytes()
        assert not got.blocks[10].any()
        # What the engine put is what the daemon serves by the other path too.
        nsi = ib.open_namespace("bulk/exact", LAY)
        assert nsi.transport == "inband"
        assert ib.get(nsi, keys).blocks.tobytes() == data.tobytes()
        assert c.stats()["active_leases"] == 0  # each get released its lease


def _raw_put(address: str, ns_id: bytes, keys: list[bytes], data: np.ndarray,
             sums: list[int], length: int | None = None) -> None:  # fmt: skip
    """A BulkPut from an engine of the test's own, with the checksums it is told."""
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    flat = data.reshape(-1).view(np.uint8)
    assert engine.register_memory(flat.ctypes.data, flat.nbytes) == 0
    try:
        with remote(address) as c:
            c._unary("BulkPut", pb.BulkPutRequest(
                namespace_id=ns_id, keys=keys, shape=pb.BlockShape(
                    dims=list(LAY.block_shape), dtype=pb.DTYPE_FLOAT16),
                engine=pb.BulkEngine(address=f"127.0.0.1:{engine.get_rpc_port()}",
                                     protocol="tcp"),
                buffer_address=flat.ctypes.data, buffer_length=length or flat.nbytes,
                checksums=sums))  # fmt: skip
    finally:
        engine.unregister_memory(flat.ctypes.data)


def test_a_put_that_fails_its_checksum_stores_nothing(address: str) -> None:
    import xxhash

    data, keys = blocks(3, 2), keys_of("damaged", 3)
    sums = [xxhash.xxh3_64_intdigest(b.tobytes()) for b in data]
    with remote(address) as c:
        ns = c.open_namespace("bulk/damaged", LAY)
        wrong = [sums[0], sums[1] ^ 1, sums[2]]
        with pytest.raises(DataLoss) as err:
            _raw_put(address, ns.id, keys, data, wrong)
        assert err.value.field == "checksums[1]"
        assert c.locate(ns, keys) == [None] * 3
        # The range named must hold every block: the daemon reads nothing past it.
        with pytest.raises(InvalidArgument) as err2:
            _raw_put(address, ns.id, keys, data, sums, length=2 * BB)
        assert err2.value.field == "buffer_length"
        assert c.locate(ns, keys) == [None] * 3
        _raw_put(address, ns.id, keys, data, sums)
        assert c.get(ns, keys).blocks.tobytes() == data.tobytes()


def test_another_tenant_cannot_get_or_release(address: str) -> None:
    data, keys = blocks(2, 3), keys_of("private", 2)
    with remote(address) as a, remote(address, "beta") as b:
        ns = a.open_namespace("bulk/private", LAY)
        a.put(ns, keys, data)
        with pytest.raises(InvalidArgument) as err:
            b._unary("BulkGet", pb.BulkGetRequest(namespace_id=ns.id, keys=keys))
        assert err.value.field == "namespace_id"
        lent = a._unary("BulkGet", pb.BulkGetRequest(namespace_id=ns.id, keys=keys))
        assert lent.lease_id and [blk.found for blk in lent.blocks] == [True, True]
        with pytest.raises(FailedPrecondition):
            b._unary("Release", pb.ReleaseRequest(lease_id=lent.lease_id))
        a._unary("Release", pb.ReleaseRequest(lease_id=lent.lease_id))
        # beta's own namespace of the same name holds none of alpha's blocks.
        nsb = b.open_namespace("bulk/private", LAY)
        assert b.get(nsb, keys).found == [False, False]


DYING_CLIENT = """
import sys
from tierd_client import TierdClient
from tierd_client._proto import tierd_pb2 as pb
c = TierdClient(sys.argv[1], tenant="alpha", token=sys.argv[2], transport="inband",
                bulk="engine")
ns_id, keys = bytes.fromhex(sys.argv[3]), [bytes.fromhex(k) for k in sys.argv[4:]]
lent = c._unary("BulkGet", pb.BulkGetRequest(namespace_id=ns_id, keys=keys, lease_ttl_ms=500))
print(lent.lease_id, flush=True)
sys.stdin.read()
"""


def test_the_lease_expires_when_the_client_dies(address: str) -> None:
    data, keys = blocks(2, 4), keys_of("dying", 2)
    with remote(address) as c:
        ns = c.open_namespace("bulk/dying", LAY)
        c.put(ns, keys, data)
        before = c.stats()["active_leases"]
        child = subprocess.Popen(
            [sys.executable, "-c", DYING_CLIENT, address, TOKENS["alpha"], ns.id.hex(),
             *(k.hex() for k in keys)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert child.stdout is not None and int(child.stdout.readline()) > 0
            assert c.stats()["active_leases"] == before + 1
        finally:
            os.kill(child.pid, signal.SIGKILL)
            child.wait(30)
        poll(lambda: c.stats()["active_leases"] == before, "the dead client's lease expires")
        assert c.get(ns, keys).blocks.tobytes() == data.tobytes()


def test_a_daemon_without_an_engine_is_served_in_band() -> None:
    with tempfile.TemporaryDirectory(prefix="bulk-") as d:
        proc, address = _serve(Path(d), bulk=False)
        try:
            data, keys = blocks(3, 5), keys_of("inband", 3)
            with remote(address, bulk="auto") as c:
                ns = c.open_namespace("bulk/none", LAY)
                assert ns.transport == "inband"
                assert c.put(ns, keys, data) == ["stored"] * 3
                assert c.get(ns, keys).blocks.tobytes() == data.tobytes()
                with pytest.raises(FailedPrecondition) as err:
                    c._unary("BulkGet", pb.BulkGetRequest(namespace_id=ns.id, keys=keys))
                assert err.value.field == "engine"
            with remote(address) as c, pytest.raises(FailedPrecondition) as err2:
                c.open_namespace("bulk/none", LAY)
            assert err2.value.field == "bulk"
        finally:
            proc.terminate()
            proc.wait(30)
            for seg in segments_of(Path(d) / "data"):
                seg.unlink(missing_ok=True)


def test_a_put_held_in_its_engine_read_counts_as_a_lease() -> None:
    """A BulkPut whose client engine does not answer holds memory-tier room until the read
    gives up; it counts against the tenant's lease limits meanwhile, and leaves nothing
    once it failed."""
    with tempfile.TemporaryDirectory(prefix="bulk-") as d:
        extra = "[limits]\nmax_leases_per_tenant = 1\n"
        proc, address = _serve(Path(d), bulk=True, extra=extra)
        # An "engine" that accepts the daemon's connection and never answers.
        hung = socket.create_server(("127.0.0.1", 0))
        accepted: list[socket.socket] = []
        threading.Thread(target=lambda: accepted.append(hung.accept()[0]), daemon=True).start()
        failed: list[BaseException] = []
        try:
            data, keys = blocks(2, 6), keys_of("held", 2)
            with remote(address, bulk="inband") as c:
                ns = c.open_namespace("bulk/held", LAY)
                used = c.stats()["tiers"]["host"]["used_bytes"]
                put = pb.BulkPutRequest(
                    namespace_id=ns.id, keys=keys[:1], shape=pb.BlockShape(
                        dims=list(LAY.block_shape), dtype=pb.DTYPE_FLOAT16),
                    engine=pb.BulkEngine(address=f"127.0.0.1:{hung.getsockname()[1]}",
                                         protocol="tcp"),
                    buffer_address=1 << 20, buffer_length=BB, checksums=[0])  # fmt: skip

                def held_put() -> None:
                    try:
                        c._unary("BulkPut", put)
                    except BaseException as e:  # noqa: BLE001 - examined below
                        failed.append(e)

                t = threading.Thread(target=held_put)
                t.start()
                poll(lambda: bool(accepted), "the daemon connects to the client's engine")
                with pytest.raises(ResourceExhausted) as err:
                    c.put(ns, keys[1:], data[1:])
                assert err.value.field == "limits.max_leases_per_tenant"
                accepted[0].close()
                t.join(60)
                assert len(failed) == 1 and isinstance(failed[0], Unavailable)
                assert c.locate(ns, keys) == [None, None]
                assert c.stats()["tiers"]["host"]["used_bytes"] == used
                assert c.put(ns, keys[1:], data[1:]) == ["stored"]
        finally:
            for conn in accepted:
                conn.close()
            hung.close()
            proc.terminate()
            proc.wait(30)
            for seg in segments_of(Path(d) / "data"):
                seg.unlink(missing_ok=True)


class _Reader:
    """A transfer engine of the test's own, reading what it is told from another engine: a
    stranger who reached the port."""

    def __init__(self, nbytes: int) -> None:
        from mooncake.engine import TransferEngine

        self.engine = TransferEngine()
        assert self.engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        self.buf = np.zeros(nbytes, dtype=np.uint8)
        assert self.engine.register_memory(self.buf.ctypes.data, nbytes) == 0

    def read(self, target: str, address: int, nbytes: int) -> bytes | None:
        self.buf[:nbytes] = 0xEE
        done = self.engine.batch_transfer_sync_read(target, [self.buf.ctypes.data],
                                                     [address], [nbytes])  # fmt: skip
        return self.buf[:nbytes].tobytes() if done == 0 else None

    def close(self) -> None:
        self.engine.unregister_memory(self.buf.ctypes.data)


def test_the_clients_engine_exposes_blocks_in_transit_only(address: str) -> None:
    """What a BulkGet names is a copy in the exchange area: readable through the clients'
    engine until Release, zeroes after it; the cached block itself never was exposed."""
    data, keys = blocks(2, 7), keys_of("transit", 2)
    reader = _Reader(BB)
    try:
        with remote(address) as c:
            ns = c.open_namespace("bulk/transit", LAY)
            c.put(ns, keys, data)
            lent = c._unary("BulkGet", pb.BulkGetRequest(namespace_id=ns.id, keys=keys))
            target = lent.engine.address
            where = [blk.remote_address for blk in lent.blocks]
            assert reader.read(target, where[1], BB) == data[1].tobytes()
            c._unary("Release", pb.ReleaseRequest(lease_id=lent.lease_id))
            for w in where:
                assert reader.read(target, w, BB) in (bytes(BB), None)
            assert c.get(ns, keys).blocks.tobytes() == data.tobytes()  # still cached
    finally:
        reader.close()


def test_calls_beyond_the_exchange_area_go_in_band_and_slots_come_back() -> None:
    """A 4 MiB exchange area holds two 2 MiB blocks in transit: a BulkGet of three is
    RESOURCE_EXHAUSTED on `exchange` (the client makes that call in-band, the next one
    through the engine again); slots held by a lease come back when it is released or
    expires."""
    with tempfile.TemporaryDirectory(prefix="bulk-") as d:
        proc, address = _serve(Path(d), bulk=True, peers_extra='bulk_exchange = "4MiB"\n')
        try:
            data, keys = blocks(3, 8), keys_of("small", 3)
            with remote(address, bulk="auto") as c, remote(address, bulk="engine") as e:
                ns = c.open_namespace("bulk/small", LAY)
                assert c.put(ns, keys, data) == ["stored"] * 3  # one call in-band
                with pytest.raises(ResourceExhausted) as err:
                    c._unary("BulkGet", pb.BulkGetRequest(namespace_id=ns.id, keys=keys))
                assert err.value.field == "exchange"
                assert c.get(ns, keys).blocks.tobytes() == data.tobytes()
                assert c.get(ns, keys[:2]).blocks.tobytes() == data[:2].tobytes()
                assert ns.transport == "engine" and c._bulk._broken is None
                nse = e.open_namespace("bulk/small", LAY)
                with pytest.raises(Unavailable):
                    e.get(nse, keys)
                # Two slots held by a lease: nothing else fits until it ends.
                two = pb.BulkGetRequest(namespace_id=ns.id, keys=keys[:2], lease_ttl_ms=300)
                c._unary("BulkGet", two)
                with pytest.raises(ResourceExhausted):
                    c._unary("BulkGet", pb.BulkGetRequest(namespace_id=ns.id, keys=keys[2:]))
                poll(lambda: c.stats()["active_leases"] == 0, "the lease expires")
                lent = c._unary("BulkGet", two)
                c._unary("Release", pb.ReleaseRequest(lease_id=lent.lease_id))
                assert e.get(nse, keys[:2]).blocks.tobytes() == data[:2].tobytes()
        finally:
            proc.terminate()
            proc.wait(30)
            for seg in segments_of(Path(d) / "data"):
                seg.unlink(missing_ok=True)
