"""Durability of committed blocks across SIGTERM, kill -9 and restart, and a clean drain.

Each test starts its own daemon subprocess on its own data dir (the session daemon of
conftest.py cannot be killed or restarted), so the small helper below is separate from it.
Block contents are derived from the block key, so any block can be checked after a restart
without keeping its bytes around, and a block served under the wrong key is caught.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierd.tiers.host import segment_tag
from tierd_client import KEY_BYTES, KVLayout, TierdClient, TierdError
from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc

START_DEADLINE_S = 30.0
STOP_DEADLINE_S = 30.0

# 2 x 4 layers x 2 heads x 32 tokens x 64 dim x bf16 = 64 KiB per block.
LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_tokens=32)
# 512 KiB blocks, so an in-band get of a few dozen is far bigger than gRPC's flow-control
# windows and is still streaming when the signal arrives.
BIG = KVLayout(num_layers=8, num_kv_heads=4, head_dim=64, dtype="bfloat16", block_tokens=64)


# -- the daemon under test -----------------------------------------------------------------


class DaemonProc:
    """One `python -m tierd serve` on a fixed data dir; restartable, killable."""

    def __init__(self, base: Path, host: str, nvme: str) -> None:
        self.base = base
        self.data_dir = base / "data"
        self.address = f"unix:{base / 'tierd.sock'}"
        self.host, self.nvme = host, nvme
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def tag(self) -> str:
        # Same derivation as CacheService: the host segments are named after the data dir.
        return segment_tag(self.data_dir)

    def log_path(self, run: int | None = None) -> Path:
        return self.base / f"daemon.{self.runs if run is None else run}.log"

    def log_tail(self, limit: int = 8000) -> str:
        try:
            return self.log_path().read_text(errors="replace")[-limit:]
        except OSError:
            return "<no daemon log>"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        self.runs += 1
        config = self.base / "tierd.toml"
        # Page-locking the host arena only matters with CUDA, and its probe imports torch on
        # the first OpenNamespace (seconds on a CPU-only machine), which is not what these
        # tests measure.
        config.write_text("[host]\npin_memory = false\n")
        cmd = [
            sys.executable, "-m", "tierd", "serve",
            "--listen", self.address,
            "--data-dir", str(self.data_dir),
            "--host-capacity", self.host,
            "--nvme-capacity", self.nvme,
            "--log-level", "INFO",
            "--config", str(config),
        ]  # fmt: skip
        with open(self.log_path(), "wb") as err:
            # A file, not a pipe: a chatty daemon must never block on a full pipe.
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        self._wait_serving()

    def _wait_serving(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"tierd exited with {self.proc.returncode} while starting:\n"
                            f"{self.log_tail()}", pytrace=False)  # fmt: skip
            # wait_for_ready on the first call: the probe blocks until the socket answers
            # or its 1 s timeout passes; no fixed sleep stands in for readiness.
            with TierdClient(self.address, timeout=1.0, max_retries=0) as probe:
                try:
                    probe.stats()
                    return
                except TierdError as e:
                    last = e
        self.kill9()
        pytest.fail(f"tierd did not answer within {START_DEADLINE_S}s ({last}):\n"
                    f"{self.log_tail()}", pytrace=False)  # fmt: skip

    def terminate(self) -> int:
        """SIGTERM and wait; the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.kill9()
            pytest.fail(f"tierd ignored SIGTERM for {STOP_DEADLINE_S}s:\n{self.log_tail()}",
                        pytrace=False)  # fmt: skip

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def recovered(self) -> tuple[int, int] | None:
        """(blocks, dropped) from the last run's recovery log line."""
        m = re.search(r"recovered (\d+) blocks \((\d+) dropped\)", self.log_tail(1 << 20))
        return (int(m.group(1)), int(m.group(2))) if m else None

    def cleanup(self) -> None:
        self.kill9()
        for seg in Path("/dev/shm").glob(f"tierd.{self.tag}.*"):
            seg.unlink(missing_ok=True)


@pytest.fixture
def make_daemon() -> Iterator[Callable[..., DaemonProc]]:
    made: list[tuple[DaemonProc, Path]] = []

    def make(host: str = "16MiB", nvme: str = "256MiB") -> DaemonProc:
        # A short base: unix socket paths are limited to 107 bytes.
        base = Path(tempfile.mkdtemp(prefix="tierd-dur-"))
        d = DaemonProc(base, host, nvme)
        made.append((d, base))
        return d

    yield make
    for d, base in made:
        d.cleanup()
        shutil.rmtree(base, ignore_errors=True)


# -- blocks derived from keys --------------------------------------------------------------


def key_for(*parts: object) -> bytes:
    return hashlib.blake2b(repr(parts).encode(), digest_size=KEY_BYTES).digest()


def block_for(key: bytes, layout: KVLayout = LAYOUT) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    raw = rng.integers(0, 256, layout.block_bytes, dtype=np.uint8)
    return raw.view(layout.numpy_dtype).reshape(layout.block_shape)


def blocks_for(keys: list[bytes], layout: KVLayout = LAYOUT) -> np.ndarray:
    return np.stack([block_for(k, layout) for k in keys])


def check_all(
    client: TierdClient, ns: object, keys: list[bytes], batch: int = 32
) -> tuple[set[bytes], set[bytes]]:
    """(found, corrupt) among `keys`: corrupt ones were served with the wrong bytes."""
    found: set[bytes] = set()
    corrupt: set[bytes] = set()
    for i in range(0, len(keys), batch):
        part = keys[i : i + batch]
        res = client.get(ns, part)  # type: ignore[arg-type]
        for key, ok, row in zip(part, res.found, res.blocks):
            if ok:
                found.add(key)
                if row.tobytes() != block_for(key).tobytes():
                    corrupt.add(key)
    return found, corrupt


# -- (a) restart after SIGTERM -----------------------------------------------------------


def test_restart_keeps_every_block_byte_exact(make_daemon: Callable[..., DaemonProc]) -> None:
    d = make_daemon(host="4MiB", nvme="64MiB")
    d.start()
    keys = [key_for("restart", i) for i in range(192)]  # 12 MiB: three host tiers' worth
    with TierdClient(d.address, max_retries=0) as c:
        ns = c.open_namespace("durability-restart", LAYOUT)
        inband = TierdClient(d.address, transport="inband", max_retries=0)
        ns_in = inband.open_namespace("durability-restart", LAYOUT)
        # Both transports write, in batches, so demotion runs between the puts.
        for i in range(0, len(keys), 16):
            part = keys[i : i + 16]
            if (i // 16) % 2:
                assert inband.put(ns_in, part, blocks_for(part)) == ["stored"] * len(part)
            else:
                assert c.put(ns, part, blocks_for(part)) == ["stored"] * len(part)
        inband.close()
        before = c.stats()
    assert before["tiers"]["nvme"]["blocks"] > 0, "nothing was demoted; the test proves less"
    assert d.terminate() == 0, d.log_tail()
    assert list(Path("/dev/shm").glob(f"tierd.{d.tag}.*")), "host segment gone after SIGTERM"

    d.start()
    recovered = d.recovered()
    assert recovered == (len(keys), 0), f"recovery: {recovered}\n{d.log_tail()}"
    with TierdClient(d.address, max_retries=0) as c:
        ns = c.open_namespace("durability-restart", LAYOUT)
        found, corrupt = check_all(c, ns, keys)
        after = c.stats()
    assert not corrupt, f"{len(corrupt)} blocks came back with wrong bytes"
    assert found == set(keys), f"{len(keys) - len(found)} of {len(keys)} blocks lost"
    assert after["corrupt_reads"] == 0
    assert d.terminate() == 0


# -- (b) kill -9 in the middle of a put storm ----------------------------------------------

STORM_THREADS = 4
STORM_BATCHES = 60  # per thread
STORM_BATCH = 4  # blocks per put: 4 threads x 60 x 4 x 64 KiB = 60 MiB at most
KILL_AFTER = 320  # acknowledged blocks (a third of the storm)


def test_kill9_during_put_storm_loses_nothing_acknowledged(
    make_daemon: Callable[..., DaemonProc],
) -> None:
    # The NVMe tier holds the whole storm, so no acknowledged block may be evicted.
    d = make_daemon(host="8MiB", nvme="128MiB")
    d.start()
    cond = threading.Condition()
    attempted: list[bytes] = []
    acked: list[bytes] = []
    failures: list[BaseException] = []
    running = [0]

    def storm(t: int) -> None:
        transport = "shm" if t % 2 == 0 else "inband"
        try:
            with TierdClient(d.address, transport=transport, timeout=10.0, max_retries=0) as c:
                ns = c.open_namespace("durability-storm", LAYOUT)
                for b in range(STORM_BATCHES):
                    keys = [key_for("storm", t, b, j) for j in range(STORM_BATCH)]
                    with cond:
                        attempted.extend(keys)
                    c.put(ns, keys, blocks_for(keys))
                    with cond:
                        acked.extend(keys)
                        cond.notify_all()
        except TierdError as e:  # the daemon died under this thread
            with cond:
                failures.append(e)
        finally:
            with cond:
                running[0] -= 1
                cond.notify_all()

    threads = [threading.Thread(target=storm, args=(t,), daemon=True)
               for t in range(STORM_THREADS)]  # fmt: skip
    running[0] = len(threads)
    for th in threads:
        th.start()
    with cond:
        assert cond.wait_for(lambda: len(acked) >= KILL_AFTER or running[0] == 0, timeout=40)
        still_running = running[0]
    d.kill9()
    for th in threads:
        th.join(timeout=30)
        assert not th.is_alive(), "a client thread hung after the daemon died"
    assert still_running > 0, "the storm ended before the kill; nothing was mid-flight"
    committed = list(acked)
    unacked = [k for k in attempted if k not in set(committed)]

    d.start()
    recovered = d.recovered()
    with TierdClient(d.address, max_retries=0) as c:
        ns = c.open_namespace("durability-storm", LAYOUT)
        found, corrupt = check_all(c, ns, committed + unacked)
        stats = c.stats()
    lost = set(committed) - found
    print(
        f"\nkill -9 storm: {len(committed)} blocks acknowledged "
        f"({len(attempted)} attempted, {len(failures)} threads cut off); after restart "
        f"{len(found & set(committed))} of them found, {len(found - set(committed))} "
        f"unacknowledged ones also present, {len(corrupt)} corrupt; recovery log {recovered}; "
        f"tiers {[(n, t['blocks']) for n, t in stats['tiers'].items()]}"
    )
    assert not corrupt, f"{len(corrupt)} blocks came back with wrong bytes"
    assert not lost, f"{len(lost)} of {len(committed)} acknowledged blocks lost"
    assert stats["corrupt_reads"] == 0
    assert d.terminate() == 0


# -- (c) SIGTERM drains an in-flight get -------------------------------------------------


def _draining(address: str, deadline_s: float) -> bool:
    """True once the daemon shows it has begun draining: its health check says
    NOT_SERVING or a fresh connection is refused (so the signal has been handled)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with grpc.insecure_channel(address) as ch:
            try:
                resp = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=0.5
                )
            except grpc.RpcError:
                return True
            if resp.status != health_pb2.HealthCheckResponse.SERVING:
                return True
    return False


def test_sigterm_finishes_an_inflight_get_and_exits_zero(
    make_daemon: Callable[..., DaemonProc],
) -> None:
    d = make_daemon(host="64MiB", nvme="64MiB")
    d.start()
    keys = [key_for("drain", i) for i in range(64)]  # 32 MiB
    with TierdClient(d.address, max_retries=0) as c:
        ns = c.open_namespace("durability-drain", BIG)
        for i in range(0, len(keys), 8):
            c.put(ns, keys[i : i + 8], blocks_for(keys[i : i + 8], BIG))

    proc = d.proc
    assert proc is not None
    with grpc.insecure_channel(d.address, [("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.TierdStub(ch)
        stream = stub.Get(pb.GetRequest(namespace_id=ns.id, keys=keys), timeout=60)
        header = next(stream)
        assert list(header.found) == [True] * len(keys)
        chunks = [next(stream).data]  # the server is now inside the stream, holding a lease
        proc.send_signal(signal.SIGTERM)
        assert _draining(d.address, 10.0), f"no sign of draining after SIGTERM:\n{d.log_tail()}"
        assert proc.poll() is None, f"daemon exited with a get still streaming:\n{d.log_tail()}"
        chunks.extend(c.data for c in stream)  # the rest arrives despite the drain
    data = b"".join(chunks)
    assert len(data) == len(keys) * BIG.block_bytes
    for i, key in enumerate(keys):
        got = data[i * BIG.block_bytes : (i + 1) * BIG.block_bytes]
        assert got == block_for(key, BIG).tobytes(), f"block {i} differs"
    assert proc.wait(timeout=STOP_DEADLINE_S) == 0, d.log_tail()
