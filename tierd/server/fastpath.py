"""Attend over shared memory for same-host clients: one ring per client connection.

Primitives: `AttendRings(servicer)`; `open(tenant, token, uid) -> Ring` (after the
handoff authenticated the client), `Ring.client_fds()`, `adopt(ring, conn)`, `stop()`,
`join(deadline)`, `__len__`. The wire format is `tierd_client.attend_ring`.

Why: a decode step calls attend once per layer, and each call over gRPC costs a stream
message each way (0.6-1.3 ms per layer on the development machine, tools/BENCHMARKS.md),
often more than the attention itself. Over a ring the query is copied into shared
memory, a doorbell rings, and the daemon answers in shared memory: tens of microseconds
of copies and checks plus the attention.

A client asks for a ring on the handoff socket (`{"kind": "ring", ...}`), proving its
tenant as for its segment, and receives four descriptors: the request file (read-write;
sealed against shrinking and growing, so the daemon's mapping never loses its pages),
the response file (read-only, and sealed against any new writer, so only the daemon's
mapping writes it), and two eventfds, request and response doorbells. Both files are
backed (fallocate) when made: no memory means a refused ring, never a SIGBUS later. The
connection stays open: it is how the daemon learns that the client died (the ring is
then freed), and how the client learns that the daemon did.

Each ring is served by its own thread, which copies a request's header and table out of
shared memory before checking them (the client can rewrite them at any time), checks the
tenant of each sequence, converts the tensors as the RPC path does, and calls the same
attention service as `Attend`. It never waits on its client: a response is written and
the doorbell rung without blocking (a doorbell whose counter the client let fill is
skipped: it was ringing already), so a client that never reads holds only its own
thread. After answering, the thread watches the request word for a while before it
sleeps on the doorbell (yielding the CPU and the GIL in between), so back-to-back layers
do not pay a wakeup. Spinning on a word in shared memory needs stores seen in program
order (x86-64); elsewhere rings are not offered and clients use gRPC.

Bounds: `MAX_RINGS` in all, `MAX_RINGS_PER_TENANT`, `MAX_RINGS_PER_USER` (peer OS user).
A ring is freed when its client's connection closes. `stop()` wakes every ring thread
(one shared eventfd); each marks its ring closed (the client then knows that a request
it finds unanswered was not served, and sends it over gRPC) and frees it, a busy one once
its attend returns; `join(deadline)` waits for those until the drain's deadline, as gRPC
waits for calls in flight, except for rings whose client already left.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import mmap
import os
import platform
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from tierd.attention.attend import AttendCall
from tierd.errors import (
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from tierd.server.status import _as_tierd_error
from tierd_client import attend_ring as wire
from tierd_client.status import status_of

if TYPE_CHECKING:
    from tierd.server.servicer import TierdServicer

log = logging.getLogger("tierd.rings")

MAX_RINGS = 64
MAX_RINGS_PER_TENANT = 8
MAX_RINGS_PER_USER = 16
AREA_BYTES = 1 << 20  # each of request and response: a 256-token SmolLM2 query fits
SPIN_S = 200e-6  # how long a ring thread watches for the next request before sleeping
ORDERED_STORES = platform.machine() in ("x86_64", "AMD64")
_F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # Linux >= 5.1
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_SEQ_MASK = (1 << 64) - 1
_EFD_FLAGS = os.EFD_CLOEXEC | os.EFD_NONBLOCK


@dataclass(eq=False)
class Ring:
    id: int
    tenant: str
    token: str | None
    uid: int
    req_fd: int
    resp_fd: int
    req_efd: int
    resp_efd: int
    req_mm: mmap.mmap = field(repr=False)
    resp_mm: mmap.mmap = field(repr=False)
    conn: socket.socket | None = None
    served: int = 0

    def __post_init__(self) -> None:
        self.req_seq = np.frombuffer(self.req_mm, dtype=np.uint64, count=1)
        self.resp_ctl = np.frombuffer(self.resp_mm, dtype=np.uint64, count=2)
        self.req_area = memoryview(self.req_mm)[wire.CTL_BYTES :]
        self.resp_area = memoryview(self.resp_mm)[wire.CTL_BYTES :]

    def client_fds(self) -> list[int]:
        """Descriptors to hand over: request file, a read-only opening of the response
        file (the caller closes that one), request and response doorbells."""
        ro = os.open(f"/proc/self/fd/{self.resp_fd}", os.O_RDONLY | os.O_CLOEXEC)
        return [self.req_fd, ro, self.req_efd, self.resp_efd]

    def release(self) -> None:
        """Close every descriptor and unmap (views first: an exported buffer pins a map)."""
        for fd in (self.req_fd, self.resp_fd, self.req_efd, self.resp_efd):
            os.close(fd)
        if self.conn is not None:
            self.conn.close()
        del self.req_seq, self.resp_ctl
        self.req_area.release()
        self.resp_area.release()
        for mm in (self.req_mm, self.resp_mm):
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive: it unmaps with the last view


def _memfd(name: str, size: int, prot: int, seals: int) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    mm: mmap.mmap | None = None
    try:
        os.posix_fallocate(fd, 0, size)  # backed now: a later touch cannot SIGBUS
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)  # before the seals: ours may write
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        except OSError:
            if not seals & _F_SEAL_FUTURE_WRITE:
                raise
            # A kernel before 5.1: the client could write the response file, which only
            # lets it garble its own responses.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals & ~_F_SEAL_FUTURE_WRITE)
    except BaseException:
        if mm is not None:
            mm.close()
        os.close(fd)
        raise
    return fd, mm


def _bell(efd: int) -> None:
    try:
        os.eventfd_write(efd, 1)
    except BlockingIOError:
        pass  # the counter is full: the peer has a wakeup pending already


def _drain(efd: int) -> None:
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        pass


def _connected(ring: Ring) -> bool:
    """Whether the client of a ring still holds its connection. Caller holds the lock
    (under which a registered ring's connection is open)."""
    if ring.conn is None:
        return False
    p = select.poll()
    p.register(ring.conn.fileno(), select.POLLIN)
    return not p.poll(0)  # readable: hung up (a client never writes on it)


class AttendRings:
    def __init__(self, servicer: TierdServicer) -> None:
        self._servicer = servicer
        self._lock = threading.Lock()
        self._rings: dict[int, Ring] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._ids = itertools.count(1)
        self._stop_efd = os.eventfd(0, _EFD_FLAGS)
        self._stopping = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._rings)

    # -- lifecycle ---------------------------------------------------------------------

    def open(self, tenant: str, token: str | None, uid: int) -> Ring:
        """A new ring for an authenticated client, counted against the bounds."""
        if not ORDERED_STORES:
            raise FailedPrecondition(f"attend rings need x86-64 (this is {platform.machine()})",
                                     field="kind")  # fmt: skip
        with self._lock:
            if self._stopping:
                raise Unavailable("the daemon is stopping")
            rings = list(self._rings.values())
            for count, limit, what in (
                (len(rings), MAX_RINGS, "the daemon"),
                (sum(r.tenant == tenant for r in rings), MAX_RINGS_PER_TENANT, "this tenant"),
                (sum(r.uid == uid for r in rings), MAX_RINGS_PER_USER, "this OS user"),
            ):
                if count >= limit:
                    raise ResourceExhausted(f"{what} has {count} attend rings open, the most "
                                            f"it may (use gRPC)", field="rings")  # fmt: skip
            ring = self._make(next(self._ids), tenant, token, uid)
            self._rings[ring.id] = ring
        return ring

    def _make(self, ring_id: int, tenant: str, token: str | None, uid: int) -> Ring:
        size = wire.CTL_BYTES + AREA_BYTES
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        made: list[tuple[int, mmap.mmap]] = []
        efds: list[int] = []
        try:
            made.append(_memfd("tierd-ring-request", size, mmap.PROT_READ, _SEALS))
            made.append(_memfd("tierd-ring-response", size, rw, _SEALS | _F_SEAL_FUTURE_WRITE))
            for _ in range(2):
                efds.append(os.eventfd(0, _EFD_FLAGS))
        except OSError as e:  # no memory, or no descriptors left
            for fd, mm in made:
                mm.close()
                os.close(fd)
            for efd in efds:
                os.close(efd)
            raise ResourceExhausted(f"cannot make an attend ring: {e}", field="rings") from e
        (req_fd, req_mm), (resp_fd, resp_mm) = made
        return Ring(ring_id, tenant, token, uid, req_fd, resp_fd, efds[0], efds[1],
                    req_mm, resp_mm)  # fmt: skip

    def discard(self, ring: Ring) -> None:
        """Free a ring that was never adopted (its handoff failed)."""
        with self._lock:
            self._rings.pop(ring.id, None)
        ring.release()

    def adopt(self, ring: Ring, conn: socket.socket) -> None:
        """Serve `ring` from its own thread; `conn` (the handoff connection) is its life."""
        conn.settimeout(None)
        ring.conn = conn
        thread = threading.Thread(target=self._serve, args=(ring,), daemon=True,
                                  name=f"tierd-ring-{ring.id}")  # fmt: skip
        with self._lock:
            if self._stopping:
                self._rings.pop(ring.id, None)
                ring.release()
                return
            self._threads[ring.id] = thread
        thread.start()

    def stop(self) -> None:
        """Wake every ring thread: an idle ring closes at once, a busy one after its answer."""
        with self._lock:
            self._stopping = True
        os.eventfd_write(self._stop_efd, 1)  # level-triggered: wakes every ring thread

    def join(self, deadline: float) -> None:
        """Wait, until `deadline` (the drain's), for rings still answering a client that is
        still there, as gRPC waits for calls in flight. A ring whose client left is not
        waited for: nobody will read its answer (a cancelled call, over gRPC)."""
        with self._lock:
            waited = [t for rid, t in self._threads.items()
                      if _connected(self._rings[rid])]  # fmt: skip
        for t in waited:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            busy = [t.name for t in self._threads.values()]
        if busy:  # each closes its ring when its attend returns
            log.warning("attend rings still answering at shutdown: %s", ", ".join(busy))
        else:
            os.close(self._stop_efd)

    # -- serving ---------------------------------------------------------------------

    def _serve(self, ring: Ring) -> None:
        assert ring.conn is not None
        poller = select.poll()
        poller.register(ring.req_efd, select.POLLIN)
        poller.register(ring.conn.fileno(), select.POLLIN)
        poller.register(self._stop_efd, select.POLLIN)
        expected = 1
        try:
            while self._wait(ring, poller, expected):
                self._answer(ring)
                ring.resp_ctl[wire.SEQ] = expected  # after the response: stores stay ordered
                _bell(ring.resp_efd)
                ring.served += 1
                expected = (expected + 1) & _SEQ_MASK
        except Exception:  # a bug here must not leave the ring open with nobody serving it
            log.exception("attend ring %d failed", ring.id)
        finally:
            ring.resp_ctl[wire.CLOSED] = 1
            _bell(ring.resp_efd)
            with self._lock:
                self._rings.pop(ring.id, None)
                self._threads.pop(ring.id, None)
            ring.release()

    def _wait(self, ring: Ring, poller: select.poll, expected: int) -> bool:
        """Until request `expected` is written (True), or the client left or the daemon
        stops (False)."""
        end = time.perf_counter() + SPIN_S
        while int(ring.req_seq[0]) != expected:
            if time.perf_counter() >= end or self._stopping:
                break
            os.sched_yield()  # lets the client (and other Python threads) run meanwhile
        while not self._stopping:
            if int(ring.req_seq[0]) == expected:
                return True
            for fd, _events in poller.poll():
                if fd == ring.req_efd:
                    _drain(ring.req_efd)
                elif fd != self._stop_efd:
                    return False  # the client hung up, or wrote on a socket it must not
        return False

    def _answer(self, ring: Ring) -> None:
        area = ring.resp_area
        try:
            results = self._attend(ring)
            wire.write_results(area, results)
        except Exception as exc:  # noqa: BLE001 - answered in the ring, as translate_errors does
            err = _as_tierd_error(exc, "AttendRing")
            wire.write_error(area, status_of(err).value[0], err.field, err.message)

    def _attend(self, ring: Ring) -> list:
        """One request: copied out, checked, attended exactly as `Attend` does."""
        src = ring.req_area
        size = len(src)
        n_bytes = wire.table_bytes(bytes(src[:16]))
        if n_bytes > size:
            raise InvalidArgument(f"the request's table ({n_bytes} bytes) is larger than the "
                                  f"ring ({size})", field="request")  # fmt: skip
        table = bytes(src[:n_bytes])  # what is checked is what is used
        if wire.table_bytes(table) != n_bytes:
            raise InvalidArgument("the request changed while it was read", field="request")
        items = wire.read_request(table, size)
        principal = self._principal(ring)
        for i, item in enumerate(items):
            self._servicer.check_sequence_owner(principal, item.sequence_id,
                                                f"items[{i}].sequence_id")  # fmt: skip
        calls = []
        for i, item in enumerate(items):
            f = f"items[{i}]"
            calls.append(AttendCall(
                sequence_id=item.sequence_id,
                layer=item.layer,
                q=wire.wire_tensor(item.q, src, f"{f}.q"),
                k_new=wire.wire_tensor(item.k_new, src, f"{f}.k_new") if item.has_kv else None,
                v_new=wire.wire_tensor(item.v_new, src, f"{f}.v_new") if item.has_kv else None,
                new_tokens=wire.wire_tokens(item, src),
                scale=item.scale or None,
            ))  # fmt: skip
        need = wire.response_bytes([tuple(c.q.shape) for c in calls])
        if need > len(ring.resp_area):
            raise InvalidArgument(f"the response would take {need} bytes; the ring has "
                                  f"{len(ring.resp_area)}", field="request")  # fmt: skip
        return self._servicer.svc.attend.attend(calls)

    def _principal(self, ring: Ring) -> str | None:
        """The tenant this ring acts for, checked again per request: a reload may have
        revoked the token it was opened with."""
        auth = self._servicer.auth
        if auth.open:
            return None
        if ring.token is None or auth.tenant_of_token(ring.token) != ring.tenant:
            raise Unauthenticated("the token this attend ring was opened with is no longer "
                                  "valid")  # fmt: skip
        return ring.tenant
