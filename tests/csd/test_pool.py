"""CsdPool over real worker processes: placement, attend + LSE merge, kill -9 and restart."""

from __future__ import annotations

import itertools
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tierd.csd.drops import DeferredDrops
from tierd.csd.pool import CsdPool, CsdWorkerSpec, Timing
from tierd.csd.worker import CsdWorkerServer
from tierd.errors import InvalidArgument, NotFound, Unavailable
from tierd.tiers.checksum import checksum
from tierd_client.layout import KVLayout

NS = b"p" * 16
MiB = 1 << 20
LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=64, dtype="float32", block_tokens=16)
RESTART_DEADLINE_S = 30.0


def _raw(t: torch.Tensor) -> memoryview:
    return t.contiguous().view(torch.uint8).numpy().reshape(-1).data


def _key(i: int) -> bytes:
    return b"blk-%04d" % i


def _dense(q: torch.Tensor, blocks: list[torch.Tensor], layer: int) -> torch.Tensor:
    """float64 attention over every block's `layer` at once: the answer a merge must give."""
    k = torch.cat([b[layer, 0] for b in blocks], dim=1).double()  # [Hkv, N, D]
    v = torch.cat([b[layer, 1] for b in blocks], dim=1).double()
    group = q.shape[1] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    s = torch.einsum("thd,hnd->thn", q.double(), k) / math.sqrt(q.shape[-1])
    return torch.einsum("thn,hnd->thd", torch.softmax(s, dim=-1), v)


def _merge(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    lses = torch.stack([lse for _, lse in parts])  # [P, Tq, H]
    lse = torch.logsumexp(lses, dim=0)
    w = torch.exp(lses - lse)  # weight of each partial
    return sum(w[i].unsqueeze(-1) * o for i, (o, _) in enumerate(parts))  # type: ignore[return-value]


def _wait(cond: object, what: str, deadline_s: float = RESTART_DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not cond():  # type: ignore[operator]
        if time.monotonic() > end:
            pytest.fail(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(0.05)


def _log_tails(base: Path, names: list[str]) -> str:
    """The end of each named worker's stderr log, for a failed start."""
    parts = []
    for n in names:
        log = base / n / "worker.log"
        text = log.read_text(errors="replace")[-4000:] if log.exists() else "<no log>"
        parts.append(f"--- {n} ---\n{text}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="csd-p-"))  # short: unix socket paths are <= 107 bytes
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def pool(base: Path) -> Iterator[CsdPool]:
    specs = [
        CsdWorkerSpec(n, base / n, f"unix:{base / n}.sock", 16 * MiB, spawn=True)
        for n in ("a", "b")
    ]
    p = CsdPool(specs, rpc_timeout_s=30.0, start_timeout_s=60.0)
    try:
        down = p.start()
        assert down == [], _log_tails(base, down)
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def stored(pool: CsdPool) -> dict[str, dict[int, torch.Tensor]]:
    """10 blocks placed round-robin over both workers: {worker: {index: block}}."""
    g = torch.Generator().manual_seed(11)
    blocks = [torch.randn(LAYOUT.block_shape, generator=g) for _ in range(10)]
    placement = pool.pick(len(blocks))
    by_worker: dict[str, dict[int, torch.Tensor]] = {}
    for i, name in enumerate(placement):
        by_worker.setdefault(name, {})[i] = blocks[i]
    for name, mine in by_worker.items():
        items = [(_key(i), checksum(_raw(b)), _raw(b)) for i, b in mine.items()]
        assert pool.store(name, LAYOUT, NS, items) == len(items)
    return by_worker


def test_pick_is_round_robin(pool: CsdPool) -> None:
    first = pool.pick(3)
    second = pool.pick(3)
    seq = first + second
    assert set(seq) == {"a", "b"}
    assert all(x != y for x, y in itertools.pairwise(seq))  # alternates, across calls too
    with pytest.raises(NotFound):
        pool.stats("zzz")


def test_partials_merge_to_dense_attention(pool: CsdPool, stored: dict[str, dict[int, torch.Tensor]]
                                           ) -> None:  # fmt: skip
    assert sorted(stored) == ["a", "b"] and [len(v) for v in stored.values()] == [5, 5]
    every = {i: b for mine in stored.values() for i, b in mine.items()}
    g = torch.Generator().manual_seed(12)
    for layer in range(LAYOUT.num_layers):
        q = torch.randn(2, 6, 64, generator=g)
        parts = []
        for name, mine in stored.items():
            out, lse, missing = pool.partial_attend(name, NS, LAYOUT, [_key(i) for i in mine],
                                                    layer, q)  # fmt: skip
            assert missing == []
            parts.append((out, lse))
        merged = _merge(parts)
        ref = _dense(q, [every[i] for i in sorted(every)], layer)
        assert float((merged.double() - ref).norm() / ref.norm()) < 1e-5
    st = pool.stats("a")
    assert (st.blocks, st.corrupt_reads) == (5, 0)
    with pytest.raises(InvalidArgument) as e:  # the worker's error, rebuilt with its field
        pool.partial_attend("a", NS, LAYOUT, [_key(0)], 7, torch.randn(1, 6, 64))
    assert e.value.field == "layer" and "'a'" in str(e.value)


def test_kill_9_unavailable_then_restarted_intact(
    pool: CsdPool, stored: dict[str, dict[int, torch.Tensor]]
) -> None:
    victim, other = "a", "b"
    keys = [_key(i) for i in stored[victim]]
    expect = {_key(i): _raw(b).tobytes() for i, b in stored[victim].items()}
    assert pool.read(victim, NS, keys) == expect
    before = pool.info(victim)
    assert before.pid is not None and before.healthy
    os.kill(before.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(Unavailable) as e:
        pool.read(victim, NS, keys)
    assert time.monotonic() - t0 < 2.0 and "'a'" in str(e.value)
    assert pool.read(other, NS, [_key(i) for i in stored[other]])  # the other one serves on
    # Restarted: a new process, healthy, and its shard as it was.
    _wait(lambda: pool.info(victim).restarts >= 1 and pool.healthy(victim), "the restart")
    after = pool.info(victim)
    assert after.pid not in (None, before.pid) and after.last_exit == -signal.SIGKILL
    assert pool.read(victim, NS, keys) == expect
    assert sorted(pool.list_blocks(victim)[NS]) == sorted(keys)
    _out, lse, missing = pool.partial_attend(victim, NS, LAYOUT, keys, 1, torch.randn(1, 6, 64))
    assert missing == [] and torch.isfinite(lse).all()


def test_close_drains_workers(base: Path) -> None:
    spec = CsdWorkerSpec("c", base / "c", f"unix:{base / 'c'}.sock", 4 * MiB, spawn=True)
    p = CsdPool([spec])
    assert p.start() == [], _log_tails(base, ["c"])
    pid = p.info("c").pid
    assert pid is not None
    p.close()
    assert p.info("c").last_exit == 0  # drained on SIGTERM, exited cleanly
    with pytest.raises(ProcessLookupError):  # and reaped
        os.kill(pid, 0)
    assert not (base / "c.sock").exists()  # the worker drained and cleaned up (SIGTERM path)


def test_remote_worker_down_and_back(base: Path) -> None:
    d, sock = base / "remote", base / "r.sock"
    spec = CsdWorkerSpec("r", None, f"unix:{sock}", 0, spawn=False)
    p = CsdPool([spec], timing=Timing(probe_up_interval_s=0.2))
    try:
        assert p.start(wait_s=0.3) == ["r"]  # nothing listens yet
        with pytest.raises(Unavailable) as e:
            p.stats("r")
        assert "'r'" in str(e.value)
        with pytest.raises(Unavailable):
            p.pick(1)
        server = CsdWorkerServer(d, f"unix:{sock}", 4 * MiB, drain_seconds=0.5)
        server.start()
        try:
            _wait(lambda: p.healthy("r"), "the remote worker to be seen")
            assert p.pick(2) == ["r", "r"]
            assert p.stats("r").capacity_bytes == 4 * MiB
        finally:
            server.stop()
        with pytest.raises(Unavailable):
            p.stats("r")
        assert not p.healthy("r")
    finally:
        p.close()


def test_drop_later_reaches_the_worker(pool: CsdPool) -> None:
    g = torch.Generator().manual_seed(13)
    blocks = {_key(100 + i): torch.randn(LAYOUT.block_shape, generator=g) for i in range(3)}
    items = [(k, checksum(_raw(b)), _raw(b)) for k, b in blocks.items()]
    assert pool.store("b", LAYOUT, NS, items) == 3
    pool.drop_later("b", NS, [_key(100), _key(101)])
    _wait(lambda: pool.pending_drops() == 0, "the queued drops", deadline_s=10)
    assert sorted(pool.read("b", NS, list(blocks))) == [_key(102)]
    # Stored again right after a queued drop: the store cancels it, the copy stays.
    pool.drop_later("b", NS, [_key(102)])
    assert pool.store("b", LAYOUT, NS, items[2:]) == 1
    _wait(lambda: pool.pending_drops() == 0, "the queued drops", deadline_s=10)
    assert sorted(pool.read("b", NS, list(blocks))) == [_key(102)]


class _FlakySend:
    """A drop RPC that is Unavailable `down` times, and can be held on the wire."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.sent: list[tuple[str, bytes, list[bytes]]] = []
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()

    def __call__(self, name: str, ns_id: bytes, keys: list[bytes]) -> int:
        self.entered.set()
        self.release.wait()
        if self.down > 0:
            self.down -= 1
            raise Unavailable(f"csd worker {name!r} is down")
        self.sent.append((name, ns_id, keys))
        return len(keys)


def test_deferred_drops_retry_and_cancel() -> None:
    send = _FlakySend(down=2)
    drops = DeferredDrops(send, retry_s=0.01)
    try:
        drops.add("a", NS, [b"k1", b"k2"])
        _wait(lambda: drops.pending() == 0, "the retried drop", deadline_s=5)
        assert send.sent == [("a", NS, [b"k1", b"k2"])]
        # A drop held on the wire fails; the store's cancel waits for it and then takes
        # the re-queued key out, so the key is never dropped after the store.
        send.down, send.sent = 1, []
        send.release.clear()
        send.entered.clear()
        drops.add("a", NS, [b"k3", b"k4"])
        assert send.entered.wait(5)
        done = threading.Event()

        def store_k3() -> None:
            drops.cancel("a", NS, [b"k3"])
            done.set()

        threading.Thread(target=store_k3).start()
        assert not done.wait(0.1)  # waiting for the batch on the wire
        send.release.set()
        assert done.wait(5)
        _wait(lambda: drops.pending() == 0, "the rest", deadline_s=5)
        assert send.sent == [("a", NS, [b"k4"])]
    finally:
        send.release.set()
        drops.close()


def test_hung_worker_is_killed_and_restarted(base: Path) -> None:
    spec = CsdWorkerSpec("h", base / "h", f"unix:{base / 'h'}.sock", 4 * MiB, spawn=True)
    timing = Timing(probe_up_interval_s=0.2, health_timeout_s=0.3, hang_s=2.0)
    p = CsdPool([spec], timing=timing)
    try:
        assert p.start() == [], _log_tails(base, ["h"])
        pid = p.info("h").pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # alive, but answers nothing
        _wait(lambda: not p.healthy("h"), "the failed health checks", deadline_s=10)
        with pytest.raises(Unavailable):
            p.stats("h")
        _wait(lambda: p.info("h").restarts >= 1 and p.healthy("h"), "the restart")
        assert p.info("h").last_exit == -signal.SIGKILL
        assert p.stats("h").blocks == 0
    finally:
        p.close()
