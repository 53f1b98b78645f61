"""Attend over a shared-memory ring when the daemon runs on this host.

Primitives: `open_ring(handoff, tenant, token) -> Ring` (`call(items, as_torch, timeout)`,
`close()`; for tests of the daemon, `request_area`, `send(seq)`, `wait(seq, timeout)`,
`response_area`), `request_ring(...)` (the handoff alone: raw descriptors), and
`FastAttend(handoff, tenant, token)`: `attend(items, as_torch, timeout) -> [AttendOutput]
| None`, `served`, `close()`, which `TierdClient.attend` and `AttendStream.send` try
before gRPC.

Why: per decode step a model calls attend once per layer; over gRPC each call is a
stream message each way (0.6-1.3 ms per layer on the development machine), over a ring a
few copies and a doorbell (the daemon's side: `tierd.server.fastpath`; the bytes:
`tierd_client.attend_ring`).

None from `FastAttend.attend` means "use gRPC": no ring could be opened (the daemon is
older, remote, out of rings, or refused the credentials: then no new ring is tried for
`RETRY_S`), the items hold something the ring does not carry (a dtype, rank or value
that the RPC path refuses or converts, or more bytes than the ring holds), every ring of
this client is busy with another thread's call, or the daemon closed the ring without
serving the request (it is stopping). A ring whose state is unknown (a deadline passed,
the daemon vanished mid-call, an interrupt) is closed, never reused.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import numpy as np

from . import attend_ring as wire
from . import errors
from .attend import AttendOutput
from .shm import exchange
from .status import ERROR_OF

HANDOFF_TIMEOUT = 5.0
RETRY_S = 2.0  # after a ring could not be opened, gRPC only for this long
MAX_RINGS = 4  # per client: concurrent calls beyond this go over gRPC
SPIN_S = 50e-6  # how long a caller watches for its response before sleeping
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class RingClosed(Exception):
    """The daemon stopped serving this ring before it took the request."""


def _error(err: wire.RingError) -> errors.TierdError:
    """The exception the RPC path raises for the same status (`rpc.error_from_rpc`)."""
    code = _CODES.get(err.code)
    cls = ERROR_OF.get(code) if code is not None else None
    message, field = err.message, err.field
    if field and message.startswith(f"{field}: "):
        message = message[len(field) + 2 :]
    if cls is None:
        name = code.name if code is not None else "UNKNOWN"
        return errors.TierdError(f"{name}: {message or 'call failed'}", field=field)
    return cls(message or code.name, field=field)  # type: ignore[union-attr]


class Ring:
    def __init__(self, sock: socket.socket, req: mmap.mmap, resp: mmap.mmap, req_efd: int,
                 resp_efd: int) -> None:  # fmt: skip
        self._sock, self._req, self._resp = sock, req, resp
        self._req_efd, self._resp_efd = req_efd, resp_efd
        self._req_ctl = np.frombuffer(req, dtype=np.uint64, count=1)
        self._resp_ctl = np.frombuffer(resp, dtype=np.uint64, count=2)
        self.request_area = memoryview(req)[wire.CTL_BYTES :]
        self.response_area = memoryview(resp)[wire.CTL_BYTES :]
        self._poll = select.poll()
        self._poll.register(resp_efd, select.POLLIN)
        self._poll.register(sock.fileno(), select.POLLIN)
        self.pid = os.getpid()
        self.seq = 0
        self.broken = False

    def call(self, items: Sequence[Any], as_torch: bool,
             timeout: float | None) -> list[AttendOutput] | None:  # fmt: skip
        """Attend over the ring; None when the items are not ones it carries."""
        try:
            q_shapes = [tuple(item.q.shape) for item in items]
        except AttributeError:
            return None
        if wire.response_bytes(q_shapes) > len(self.response_area):
            return None
        if wire.encode_request(self.request_area, items) is None:
            return None
        seq = (self.seq + 1) & ((1 << 64) - 1)
        self.broken = True  # until the response is read: a failure leaves it unknown
        self.send(seq)
        self.wait(seq, timeout)
        try:
            got = wire.read_response(self.response_area, as_torch)
        except (ValueError, errors.TierdError) as e:
            raise errors.Internal(f"the daemon wrote a malformed ring response: {e}") from e
        self.seq, self.broken = seq, False
        if isinstance(got, wire.RingError):
            raise _error(got)
        return [AttendOutput(out, lse) for out, lse in got]

    def send(self, seq: int) -> None:
        """Publish the request in the area as number `seq` and ring the doorbell."""
        self._req_ctl[wire.SEQ] = seq  # after the request: x86 keeps stores in order
        try:
            os.eventfd_write(self._req_efd, 1)
        except BlockingIOError:
            pass  # full: the daemon has a wakeup pending

    def wait(self, seq: int, timeout: float | None) -> None:
        """Until response `seq` is written; RingClosed, Unavailable, or a deadline."""
        ctl = self._resp_ctl
        end = time.perf_counter() + SPIN_S
        while int(ctl[wire.SEQ]) != seq and time.perf_counter() < end:
            os.sched_yield()
        deadline = None if timeout is None else time.monotonic() + timeout
        while int(ctl[wire.SEQ]) != seq:
            if ctl[wire.CLOSED]:
                raise RingClosed()
            wait_ms = -1
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.TierdError(f"DEADLINE_EXCEEDED: the attend ring did not "
                                            f"answer within {timeout} s")  # fmt: skip
                wait_ms = max(1, int(left * 1000))
            for fd, _ in self._poll.poll(wait_ms):
                if fd == self._resp_efd:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                elif int(ctl[wire.SEQ]) != seq and not ctl[wire.CLOSED]:
                    raise errors.Unavailable("the daemon went away during an attend over "
                                             "shared memory", field="rings")  # fmt: skip

    def close(self) -> None:
        self._sock.close()
        for fd in (self._req_efd, self._resp_efd):
            os.close(fd)
        del self._req_ctl, self._resp_ctl
        self.request_area.release()
        self.response_area.release()
        for mm in (self._req, self._resp):
            try:
                mm.close()
            except BufferError:
                pass  # a view is alive somewhere: it unmaps with that view


def _map(fd: int, size: int, prot: int) -> mmap.mmap:
    if os.fstat(fd).st_size < size:  # past the end would SIGBUS on first touch
        raise errors.Internal(f"the ring has {os.fstat(fd).st_size} bytes, not {size}",
                              field="rings")  # fmt: skip
    return mmap.mmap(fd, size, mmap.MAP_SHARED, prot)


def request_ring(
    handoff: str, tenant: str, token: str | None, timeout: float = HANDOFF_TIMEOUT
) -> tuple[socket.socket, int, list[int]]:
    """The handoff of a ring: the connection (its lifeline), the area size, and the four
    descriptors (request file, response file, request and response doorbells). The
    caller owns all of them."""

    def parse(reply: dict[str, Any], fds: list[int]) -> tuple[int, list[int]]:
        if reply.get("kind") != "ring" or reply.get("version") != 1:
            # An older daemon answers every request with the tenant's segment.
            raise errors.FailedPrecondition("the daemon offers no attend rings", field="rings")
        if len(fds) != 4:
            raise errors.Internal(f"the daemon handed over {len(fds)} descriptors, not 4",
                                  field="rings")  # fmt: skip
        return int(reply["area_bytes"]), list(fds)

    (area, fds), sock = exchange(handoff, {"tenant": tenant, "token": token, "kind": "ring"},
                                 max_fds=4, timeout=timeout, what="attend ring", field="rings",
                                 parse=parse, keep=True)  # fmt: skip
    assert sock is not None
    return sock, area, fds


def open_ring(handoff: str, tenant: str, token: str | None,
              timeout: float = HANDOFF_TIMEOUT) -> Ring:  # fmt: skip
    """Ask the daemon at `handoff` for an attend ring, proving `tenant` as for its segment."""
    sock, area, fds = request_ring(handoff, tenant, token, timeout)
    size = wire.CTL_BYTES + area
    try:
        req = _map(fds[0], size, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            resp = _map(fds[1], size, mmap.PROT_READ)
        except BaseException:
            req.close()
            raise
    except BaseException as e:
        sock.close()
        for fd in fds[2:]:
            os.close(fd)
        if isinstance(e, OSError):
            raise errors.Unavailable(f"cannot map the attend ring: {e!r}", field="rings") from e
        raise
    finally:
        for fd in fds[:2]:  # the mappings keep the files
            os.close(fd)
    return Ring(sock, req, resp, fds[2], fds[3])


class FastAttend:
    def __init__(self, handoff: Callable[[], str | None], tenant: str,
                 token: str | None) -> None:  # fmt: skip
        self._handoff, self._tenant, self._token = handoff, tenant, token
        self._lock = threading.Lock()
        self._idle: list[Ring] = []
        self._open = 0
        self._retry_at = 0.0
        self._closed = False
        self.served = 0  # calls the daemon answered over a ring (results or errors)
        self.why_not: str | None = None  # why the last ring could not be opened

    def attend(self, items: Sequence[Any], as_torch: bool,
               timeout: float | None) -> list[AttendOutput] | None:  # fmt: skip
        ring = self._take()
        if ring is None:
            return None
        try:
            outs = ring.call(items, as_torch, timeout)
        except RingClosed:
            self._drop(ring)
            return None  # not served: the caller sends it over gRPC
        except BaseException as e:
            if ring.broken:
                self._drop(ring)
            else:  # a TierdError here is the daemon's answer, as the RPC would give it
                self._give(ring, answered=isinstance(e, errors.TierdError))
            raise
        self._give(ring, answered=outs is not None)
        return outs

    def _take(self) -> Ring | None:
        with self._lock:
            while self._idle:
                ring = self._idle.pop()
                if ring.pid == os.getpid():
                    return ring
                self._open -= 1  # inherited across fork: the parent's, never used here
            if self._closed or self._open >= MAX_RINGS or time.monotonic() < self._retry_at:
                return None
            self._open += 1
        try:
            handoff = self._handoff()
            if handoff is None:
                raise errors.FailedPrecondition("no shared-memory socket is known")
            return open_ring(handoff, self._tenant, self._token)
        except errors.TierdError as e:
            with self._lock:
                self._open -= 1
                self._retry_at = time.monotonic() + RETRY_S
            self.why_not = str(e)
            return None
        except BaseException:
            with self._lock:
                self._open -= 1
            raise

    def _give(self, ring: Ring, answered: bool) -> None:
        with self._lock:
            self.served += answered
            if not self._closed:
                self._idle.append(ring)
                return
        self._drop(ring)

    def _drop(self, ring: Ring) -> None:
        with self._lock:
            self._open -= 1
        ring.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for ring in idle:
            ring.close()
