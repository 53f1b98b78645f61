"""Attend over the shared-memory ring against a real daemon: the same bytes and the same
errors as the gRPC path, tenants kept apart at the handoff and per request, and hostile
clients (garbage, lengths past the ring, a header rewritten while the daemon reads it, a
client killed mid-call, one that never reads its answers) harming nobody else."""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tierd.tiers.host import segments_of
from tierd_client import (
    AttendItem,
    KVLayout,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TierdClient,
    Unauthenticated,
)
from tierd_client import attend_ring as wire
from tierd_client.fastpath import FastAttend, RingClosed, open_ring, request_ring

ANSWER_S = 30.0
STOP_S = 10.0  # a stop is prompt when it takes less, whatever clients do
TOKENS = {"alpha": "alpha-secret", "beta": "beta-secret"}
RING_LIMIT = 8  # tierd.server.fastpath.MAX_RINGS_PER_TENANT
INVALID = 3  # grpc.StatusCode.INVALID_ARGUMENT


def handoff_of(address: str) -> str:
    return address.removeprefix("unix:") + ".shm"


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def raw_call(ring: Any) -> Any:
    """Publish what is in the request area, wait, and read the answer as it lies there."""
    seq = ring.seq + 1
    ring.send(seq)
    ring.wait(seq, ANSWER_S)
    ring.seq = seq
    return wire.read_response(ring.response_area, as_torch=False)


def same_bytes(a: Any, b: Any) -> bool:
    return bool(np.asarray(a).tobytes() == np.asarray(b).tobytes())


def cached_sequence(c: TierdClient, model: str, layout: KVLayout, n_blocks: int, seed: int):
    ns = c.open_namespace(model, layout)
    keys = c.block_keys(ns, np.arange(n_blocks * layout.block_tokens) + seed)
    g = torch.Generator().manual_seed(seed)
    c.put(
        ns, keys, torch.randn(n_blocks, *layout.block_shape, generator=g).to(layout.torch_dtype())
    )
    return ns, keys


# -- same results, same errors ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ring_results_equal_grpc_byte_for_byte(daemon_address: str, dtype: str) -> None:
    """Appends over several steps and every layer, GQA (6 query heads on 2 KV heads),
    multi-token queries, two sequences per call, unary and stream, torch and numpy."""
    layout = KVLayout(3, 2, 16, dtype, 8)
    kv_dtype = layout.torch_dtype()
    g = torch.Generator().manual_seed(5)
    with (
        TierdClient(daemon_address) as fast,
        TierdClient(daemon_address, fast_attend=False) as slow,
    ):
        ns, keys = cached_sequence(fast, f"ring-equal-{dtype}", layout, 3, seed=100)
        seqs = {c: [c.open_sequence(ns, keys) for _ in range(2)] for c in (fast, slow)}
        streams = {c: c.attend_stream() for c in (fast, slow)}
        calls = 0
        for step, n in enumerate((1, 3, 1, 2, 1)):  # 8 tokens: the tails seal one block
            for layer in range(layout.num_layers):
                inputs = []
                for s in range(2):
                    q = torch.randn(n, 6, 16, generator=g)
                    kv = torch.randn(2, 2, n, 16, generator=g).to(kv_dtype)
                    tokens = [1000 * s + 10 * step + i for i in range(n)] if layer == 0 else []
                    inputs.append((q.to(kv_dtype) if step == 2 else q, kv, tokens))
                outs = {}
                for c in (fast, slow):
                    items = [AttendItem(seqs[c][s], layer, q, kv[0], kv[1], tokens,
                                        scale=0.3 if s else 0.0)
                             for s, (q, kv, tokens) in enumerate(inputs)]  # fmt: skip
                    outs[c] = streams[c].send(items) if step % 2 else c.attend(items)
                calls += 1
                assert len(outs[fast]) == len(outs[slow]) == 2
                for a, b in zip(outs[fast], outs[slow]):
                    assert a.out.dtype == b.out.dtype == torch.float32
                    assert a.out.shape == b.out.shape == (n, 6, 16)
                    assert same_bytes(a.out, b.out) and same_bytes(a.lse, b.lse)
        q = np.random.default_rng(1).standard_normal((1, 6, 16)).astype(np.float32)
        a, b = (c.attend([AttendItem(seqs[c][0], 1, q)], as_torch=False)[0] for c in (fast, slow))
        calls += 1
        assert isinstance(a.out, np.ndarray) and same_bytes(a.out, b.out)
        assert same_bytes(a.lse, b.lse)
        for c in (fast, slow):
            streams[c].close()
        assert fast.fast_attend_calls == calls
        assert slow.fast_attend_calls == 0


def test_ring_errors_equal_grpc(daemon_address: str) -> None:
    layout = KVLayout(2, 2, 16, "float32", 8)
    f32 = np.float32
    q, kv = np.ones((1, 4, 16), f32), np.ones((2, 1, 16), f32)
    q2, q64 = np.ones((2, 4, 16), f32), torch.ones(1, 4, 16, dtype=torch.float64)
    # name: (items for a fresh sequence s, whether the ring carries it to the daemon)
    cases: dict[str, tuple[Callable[[int], list[AttendItem]], bool]] = {
        "unknown sequence": (lambda s: [AttendItem(s + 7919, 0, q, kv, kv, [1])], True),
        "layer out of range": (lambda s: [AttendItem(s, 2, q, kv, kv, [])], True),
        "head dim": (lambda s: [AttendItem(s, 0, np.ones((1, 4, 8), f32), kv, kv, [1])], True),
        "heads not a multiple": (lambda s: [AttendItem(s, 0, np.ones((1, 3, 16), f32))], True),
        "k_new without v_new": (lambda s: [AttendItem(s, 0, q, kv, None, [1])], True),
        "k_new shape": (lambda s: [AttendItem(s, 0, q, np.ones((3, 1, 16), f32), kv, [1])], True),
        "token ids": (lambda s: [AttendItem(s, 0, q, kv, kv, [])], True),
        "query past the tail": (lambda s: [AttendItem(s, 0, q2, kv, kv, [1])], True),
        "no tokens yet": (lambda s: [AttendItem(s, 0, q)], True),
        "second item": (lambda s: [AttendItem(s, 0, q, kv, kv, [1]), AttendItem(s, 5, q)], True),
        "int32 query": (lambda s: [AttendItem(s, 0, q.astype(np.int32))], False),
        "float64 query": (lambda s: [AttendItem(s, 0, q64)], False),
        "five dimensions": (lambda s: [AttendItem(s, 0, q.reshape(1, 1, 4, 16, 1))], False),
        "negative layer": (lambda s: [AttendItem(s, -1, q)], False),
    }
    with (
        TierdClient(daemon_address) as fast,
        TierdClient(daemon_address, fast_attend=False) as slow,
    ):
        ns = fast.open_namespace("ring-errors", layout)
        for name, (make, carried) in cases.items():
            got = []
            for c in (fast, slow):
                before = c.fast_attend_calls
                with pytest.raises(Exception) as info:
                    c.attend(make(c.open_sequence(ns, [])))
                e = info.value
                got.append((type(e), getattr(e, "field", None), str(e)))
                if c is fast:
                    assert c.fast_attend_calls - before == int(carried), name
            assert got[0] == got[1], name


# -- tenants -----------------------------------------------------------------------------


def tenants_config(base: Path, tokens: dict[str, str]) -> Path:
    tenants = "".join(f'[[tenants]]\nname = "{n}"\n'
                      f'token_sha256 = "{hashlib.sha256(t.encode()).hexdigest()}"\n'
                      for n, t in tokens.items())  # fmt: skip
    cfg = base / "tierd.toml"
    listen = f'[server]\nlisten = ["unix:{base}/s.sock"]\n'
    sizes = '[host]\ncapacity = "16MiB"\n[nvme]\ncapacity = "64MiB"\n'
    cfg.write_text(f'data_dir = "{base}/data"\n{listen}{sizes}{tenants}')
    return cfg


@contextmanager
def tenants_daemon() -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """A daemon with tenants alpha and beta: its address, config file and process."""
    with tempfile.TemporaryDirectory(prefix="ring-") as d:
        base = Path(d)
        cfg = tenants_config(base, TOKENS)
        with open(base / "log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tierd", "serve", "--config", str(cfg)],
                                    stderr=log)  # fmt: skip
        address = f"unix:{base}/s.sock"
        try:
            with TierdClient(address, tenant="alpha", token=TOKENS["alpha"]) as c:
                c.stats()  # waits until the daemon answers
            yield address, cfg, proc
        finally:
            proc.terminate()
            proc.wait(30)
            for seg in segments_of(base / "data"):
                seg.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def tenant_daemon() -> Iterator[str]:
    with tenants_daemon() as (address, _, _):
        yield address


def test_another_tenants_sequence_is_not_found_over_the_ring(tenant_daemon: str) -> None:
    layout = KVLayout(1, 1, 8, "float32", 8)
    q, kv = np.ones((1, 1, 8), np.float32), np.ones((1, 1, 8), np.float32)
    with TierdClient(tenant_daemon, tenant="beta", token=TOKENS["beta"]) as beta:
        seq = beta.open_sequence(beta.open_namespace("ring-tenants", layout), [])
        beta.attend([AttendItem(seq, 0, q, kv, kv, [1])])
        assert beta.fast_attend_calls == 1
        errors = []
        for fast in (True, False):
            with TierdClient(tenant_daemon, tenant="alpha", token=TOKENS["alpha"],
                             fast_attend=fast) as alpha:  # fmt: skip
                with pytest.raises(NotFound) as info:
                    alpha.attend([AttendItem(seq, 0, q)])
                assert alpha.fast_attend_calls == int(fast)
                errors.append((info.value.field, str(info.value)))
        assert errors[0] == errors[1] == ("items[0].sequence_id", errors[0][1])
        assert len(beta.attend([AttendItem(seq, 0, q)])) == 1  # beta's own still attends


def test_the_handoff_refuses_a_ring_to_other_credentials(tenant_daemon: str) -> None:
    handoff = handoff_of(tenant_daemon)
    with pytest.raises(PermissionDenied):
        open_ring(handoff, "beta", TOKENS["alpha"])
    with pytest.raises(Unauthenticated):
        open_ring(handoff, "alpha", None)
    with pytest.raises(Unauthenticated):
        open_ring(handoff, "alpha", "not-a-token")
    open_ring(handoff, "alpha", TOKENS["alpha"]).close()
    # A client whose token is wrong gets gRPC's answer, never a ring.
    with TierdClient(tenant_daemon, tenant="alpha", token="wrong", max_retries=0) as c:
        with pytest.raises(Unauthenticated):
            c.attend([AttendItem(1, 0, np.ones((1, 1, 8), np.float32))])
        assert c.fast_attend_calls == 0


def test_a_token_revoked_by_a_reload_stops_its_ring() -> None:
    """The ring checks its token again on every request, as every RPC does."""
    layout = KVLayout(1, 1, 8, "float32", 8)
    q, kv = np.ones((1, 1, 8), np.float32), np.ones((1, 1, 8), np.float32)
    with (
        tenants_daemon() as (address, cfg, proc),
        TierdClient(address, tenant="alpha", token=TOKENS["alpha"]) as alpha,
    ):
        seq = alpha.open_sequence(alpha.open_namespace("ring-revoke", layout), [])
        alpha.attend([AttendItem(seq, 0, q, kv, kv, [1])])
        assert alpha.fast_attend_calls == 1
        tenants_config(cfg.parent, {**TOKENS, "alpha": "a-new-secret"})
        proc.send_signal(signal.SIGHUP)

        def refused() -> bool:
            try:
                alpha.attend([AttendItem(seq, 0, q)])
            except Unauthenticated:
                return True
            return False

        wait_for(refused, 30, "the reload to revoke the ring's token")
        assert alpha.fast_attend_calls >= 2  # refused over the ring itself


def test_a_daemon_without_rings_leaves_attend_on_grpc() -> None:
    """An older daemon answers a ring request with the tenant's segment descriptors."""
    with tempfile.TemporaryDirectory(prefix="old-") as d:
        path = f"{d}/old.shm"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(4)

        def answer_like_an_old_daemon() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)
                fds = [os.memfd_create("seg"), os.memfd_create("staging")]
                reply = b'{"ok": true, "size": 1, "staging_size": 1, "instance": "00"}\n'
                socket.send_fds(conn, [reply], fds)
                for fd in fds:
                    os.close(fd)

        t = threading.Thread(target=answer_like_an_old_daemon)
        t.start()
        fast = FastAttend(lambda: path, "default", None)
        item = AttendItem(1, 0, np.ones((1, 1, 8), np.float32))
        assert fast.attend([item], True, 5) is None  # None: the caller uses gRPC
        t.join()
        assert fast.why_not is not None and "offers no attend rings" in fast.why_not
        # No new try for a while: the next call goes to gRPC without connecting again.
        assert fast.attend([item], True, 5) is None
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
        fast.close()
        server.close()


# -- hostile clients -------------------------------------------------------------------------

# The layout of a request (tierd_client.attend_ring): header, then per item its fixed
# fields and the q, k_new, v_new specs (dtype, ndim, 4 dims, offset, nbytes).
HEADER = struct.calcsize("<IIQ")
ITEM = struct.calcsize("<QIfIIQ")
TENSOR = struct.calcsize("<II4QQQ")
Q = HEADER + ITEM  # the first item's q spec
Q_DIMS, Q_OFFSET, Q_NBYTES = Q + 8, Q + 40, Q + 48


def hostile_setup(c: TierdClient, model: str) -> tuple[int, np.ndarray]:
    layout = KVLayout(1, 2, 16, "float32", 8)
    ns, keys = cached_sequence(c, model, layout, 2, seed=300)
    q = np.random.default_rng(2).standard_normal((1, 4, 16)).astype(np.float32)
    return c.open_sequence(ns, keys), q


def test_garbage_and_lengths_past_the_ring_are_refused(daemon_address: str) -> None:
    with TierdClient(daemon_address) as c:
        seq, q = hostile_setup(c, "ring-garbage")
        ring = open_ring(handoff_of(daemon_address), "default", None)
        try:
            area, n = ring.request_area, len(ring.request_area)
            area[:65536] = np.random.default_rng(3).bytes(65536)
            err = raw_call(ring)
            assert isinstance(err, wire.RingError) and (err.code, err.field) == (INVALID, "request")
            wire.encode_request(area, [AttendItem(seq, 0, q)])
            good = bytes(area[: Q + TENSOR])
            ref = raw_call(ring)
            assert not isinstance(ref, wire.RingError)
            patches = {  # name: (offset, format, value, the field the daemon names)
                "no items": (4, "<I", 0, "request"),
                "items past the ring": (4, "<I", 1 << 31, "request"),
                "magic": (0, "<I", 0xDEAD, "request"),
                "has_kv": (HEADER + 16, "<I", 7, "items[0].k_new"),
                "token ids past the end": (HEADER + 20, "<I", 1 << 30, "items[0].new_tokens"),
                "q bytes past the end": (Q_NBYTES, "<Q", n, "items[0].q.data"),
                "q bytes wrapping around": (Q_NBYTES, "<Q", 2**64 - 1, "items[0].q.data"),
                "q offset past the end": (Q_OFFSET, "<Q", n - 8, "items[0].q.data"),
                "q offset in the table": (Q_OFFSET, "<Q", 0, "items[0].q.data"),
                "q dims against its bytes": (Q_DIMS, "<Q", 5, "items[0].q.data"),
                "q dim past any bound": (Q_DIMS, "<Q", 2**63, "items[0].q.shape"),
                "q rank": (Q + 4, "<I", 9, "items[0].q.shape"),
                "q dtype": (Q, "<I", 77, "items[0].q.dtype"),
            }
            for name, (offset, fmt, value, field) in patches.items():
                area[: len(good)] = good
                struct.pack_into(fmt, area, offset, value)
                err = raw_call(ring)
                assert isinstance(err, wire.RingError), name
                assert (err.code, err.field) == (INVALID, field), (name, err)
            area[: len(good)] = good
            again = raw_call(ring)
            assert same_bytes(again[0][0], ref[0][0]) and same_bytes(again[0][1], ref[0][1])
        finally:
            ring.close()
        assert len(c.attend([AttendItem(seq, 0, q)])) == 1 and c.fast_attend_calls == 1


def test_a_request_rewritten_while_the_daemon_reads_it(daemon_address: str) -> None:
    """Another thread flips the item count and q's length between good and bad values
    while requests are in flight: each answer is the right result or a refusal."""
    with TierdClient(daemon_address) as c:
        seq, q = hostile_setup(c, "ring-rewrite")
        ring = open_ring(handoff_of(daemon_address), "default", None)
        area = ring.request_area
        wire.encode_request(area, [AttendItem(seq, 0, q)])
        ref = raw_call(ring)
        stop = threading.Event()

        def scribble() -> None:
            good_n, bad_n = struct.pack("<I", 1), struct.pack("<I", 4096)
            good_len, bad_len = struct.pack("<Q", q.nbytes), struct.pack("<Q", 2 * len(area))
            while not stop.is_set():
                area[4:8], area[Q_NBYTES : Q_NBYTES + 8] = bad_n, bad_len
                area[4:8], area[Q_NBYTES : Q_NBYTES + 8] = good_n, good_len

        t = threading.Thread(target=scribble)
        t.start()
        try:
            for _ in range(200):
                got = raw_call(ring)
                if isinstance(got, wire.RingError):
                    assert got.code == INVALID, got
                else:
                    assert same_bytes(got[0][0], ref[0][0]) and same_bytes(got[0][1], ref[0][1])
        finally:
            stop.set()
            t.join()
            ring.close()
        assert len(c.attend([AttendItem(seq, 0, q)])) == 1 and c.fast_attend_calls == 1


def test_a_client_cannot_shrink_or_write_the_ring_files(daemon_address: str) -> None:
    with TierdClient(daemon_address) as c:
        c.open_namespace("ring-seals", KVLayout(1, 1, 8, "float32", 8))
    sock, area, fds = request_ring(handoff_of(daemon_address), "default", None)
    req, resp = fds[0], fds[1]
    try:
        with pytest.raises(PermissionError):
            os.ftruncate(req, 0)  # the daemon's mapping would lose its pages
        with pytest.raises(PermissionError):
            os.ftruncate(req, 4 * area)
        with pytest.raises(OSError):
            os.write(resp, b"x")  # handed over read-only
        rw = os.open(f"/proc/self/fd/{resp}", os.O_RDWR)  # reopened for writing: still sealed
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(rw, 0)
            with pytest.raises(PermissionError):
                os.pwrite(rw, b"x", 0)
            with pytest.raises(PermissionError):
                mmap.mmap(rw, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(rw)
        assert fcntl.fcntl(resp, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SEAL  # and cannot unseal
    finally:
        sock.close()
        for fd in fds:
            os.close(fd)


CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from tierd_client import AttendItem, KVLayout, TierdClient
    from tierd_client import attend_ring as wire
    from tierd_client.fastpath import open_ring

    address, handoff, n_rings = sys.argv[1], sys.argv[2], int(sys.argv[3])
    layout = KVLayout(1, 4, 64, "float32", 64)
    with TierdClient(address, tenant="victim", fast_attend=False) as c:
        ns = c.open_namespace("ring-victim", layout)
        keys = c.block_keys(ns, np.arange(32 * 64))
        blocks = np.random.default_rng(0).standard_normal((32, *layout.block_shape))
        c.put(ns, keys, blocks.astype(np.float32))
        seq = c.open_sequence(ns, keys)
        rings = [open_ring(handoff, "victim", None) for _ in range(n_rings)]
        q = np.ones((1, 4, 64), np.float32)
        # 600 queries over 2k tokens each: the daemon is busy with it for a while.
        wire.encode_request(rings[0].request_area, [AttendItem(seq, 0, q)] * 600)
        rings[0].send(1)
        print("sent", flush=True)
        sys.stdin.read()
""")


def test_a_client_killed_mid_call_frees_its_rings(spawn_daemon: Callable[..., Any]) -> None:
    d = spawn_daemon()
    handoff = handoff_of(d.address)
    child = subprocess.Popen([sys.executable, "-c", CHILD, d.address, handoff, str(RING_LIMIT)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert child.stdout is not None and child.stderr is not None
        line = child.stdout.readline()  # the child has its rings and a request in flight
        assert line == b"sent\n", child.stderr.read().decode(errors="replace")
        with pytest.raises(ResourceExhausted):  # the tenant holds as many as it may
            open_ring(handoff, "victim", None)
        with TierdClient(d.address, tenant="other") as other:  # served meanwhile
            seq, q = hostile_setup(other, "ring-other")
            assert len(other.attend([AttendItem(seq, 0, q)])) == 1
            child.kill()
            child.wait()

            def reopened() -> bool:
                try:
                    open_ring(handoff, "victim", None).close()
                except ResourceExhausted:
                    return False
                return True

            wait_for(reopened, 30, "the killed client's rings to be freed")
            assert len(other.attend([AttendItem(seq, 0, q)])) == 1
            assert other.fast_attend_calls == 2
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_a_client_that_never_reads_stalls_nobody(spawn_daemon: Callable[..., Any]) -> None:
    """One ring publishes request after request and reads nothing (its doorbell full),
    another never sends one: others are answered, and the daemon still stops at once."""
    d = spawn_daemon()
    handoff = handoff_of(d.address)
    with TierdClient(d.address) as c:
        seq, q = hostile_setup(c, "ring-stall")
        idle = open_ring(handoff, "default", None)
        stalled = open_ring(handoff, "default", None)
        os.eventfd_write(stalled._resp_efd, 2**64 - 2)  # nothing more fits: never blocks it
        wire.encode_request(stalled.request_area, [AttendItem(seq, 0, q)])
        stop = threading.Event()

        def hammer() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                stalled.send(n)

        t = threading.Thread(target=hammer)
        t.start()
        try:
            for _ in range(20):
                assert len(c.attend([AttendItem(seq, 0, q)])) == 1
            assert c.fast_attend_calls == 20
        finally:
            stop.set()
            t.join()
        assert d.proc is not None
        started = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.proc.wait(timeout=3 * STOP_S)
        assert time.monotonic() - started < STOP_S
        assert d.proc.returncode == 0
        # Told they were closed, not left waiting. The stalled ring may have been answered
        # for any of the numbers its hammer sent, so wait for one nobody sent.
        never_sent = 2**64 - 1
        for ring in (idle, stalled):
            with pytest.raises(RingClosed):
                ring.wait(never_sent, ANSWER_S)
            ring.close()
