"""Handing a tenant's shared memory to its clients: descriptors over a unix socket, after
the client proved its tenant. Clients never open shared memory by path.

Primitives: `HandoffServer(path, fds_for, authorize, rings=None)`, `start()`, `stop()`,
`instance_of(staging_generation) -> bytes`; `handoff_path(socket_path)`.

One exchange per connection (the client side is `tierd_client.shm.receive_fds`):
  client -> one JSON line, at most 4 KiB: {"tenant": "...", "token": "..." | null}
  daemon -> one JSON line: {"ok": true, "size": N, "staging_size": M, "instance": "hex"}
            with two descriptors attached (SCM_RIGHTS): the tenant's block segment opened
            read-only, and its sealed staging area read-write;
            or {"ok": false, "code": "...", "error": "..."} and nothing attached.
`instance` names this daemon process and the staging area's generation, so a client
knows when what it mapped is no longer what the daemon uses.

A request may name its kind: `"kind": "segment"` is the above (and the default, so older
clients are served as before); `"kind": "ring"` asks for an attend ring
(`tierd.server.fastpath`), authorized alike, answered {"ok": true, "kind": "ring",
"version": 1, "area_bytes": N} with four descriptors, after which the connection stays
open as the ring's lifeline and leaves this server's connection slots. An older daemon
ignores the kind and answers with the segment, which tells the client it has no rings.

`"kind": "weights"` with `"model": "<name or fingerprint>"` asks for a model's weights
area (`tierd.weights`): `weights(tenant, token, model)` authorizes (as the RPCs do; no
namespace is needed) and returns a read-only descriptor, answered {"ok": true, "kind":
"weights", "size": N, "fingerprint": "hex"} with that one descriptor attached.

`authorize(tenant, token)` returns the tenant the caller may map, or raises a TierdError
(the RPCs' rules: with tenants configured the token names the tenant; in open mode the
caller names it, and the socket's permissions are the guard). Every connection has one
deadline for the whole exchange; at most `MAX_CONNECTIONS` are served at once, and at most
`MAX_CONNECTIONS_PER_USER` for one peer OS user (more are closed at once); the accept loop
outlives transient failures such as running out of descriptors. So neither a flood nor a
slow client takes shared memory away from other users' clients for longer than the
deadline. The peer's credentials are logged with refusals.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tierd.core.results import ClientFds
from tierd.errors import FailedPrecondition, InvalidArgument, TierdError

if TYPE_CHECKING:
    from tierd.server.fastpath import AttendRings

log = logging.getLogger("tierd.handoff")

MAX_REQUEST_BYTES = 4096
DEADLINE_SECONDS = 2.0
MAX_CONNECTIONS = 32
MAX_CONNECTIONS_PER_USER = 8  # one OS user cannot take every slot
_UNIX_PATH_MAX = 107


def handoff_path(socket_path: Path) -> Path:
    """Where the handoff socket of a daemon listening on `socket_path` lives."""
    return socket_path.with_name(socket_path.name + ".shm")


class HandoffServer:
    def __init__(
        self, path: Path, fds_for: Callable[[str], ClientFds],
        authorize: Callable[[str, str | None], str], rings: AttendRings | None = None,
        weights: Callable[[str, str | None, str], tuple[int, int, str]] | None = None,
    ) -> None:  # fmt: skip
        if len(os.fsencode(path)) > _UNIX_PATH_MAX:
            raise OSError(f"the shared-memory socket {path} is longer than a unix socket path "
                          "may be; choose a shorter server.listen path")  # fmt: skip
        self.path = path
        self.instance = os.urandom(8)
        self._fds_for = fds_for
        self._authorize = authorize
        self._rings = rings
        self._weights = weights
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._open: set[socket.socket] = set()
        self._by_uid: dict[int, int] = {}  # connections being served, per peer user
        self._open_lock = threading.Lock()
        self._stopping = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            path.unlink(missing_ok=True)  # the daemon owns this path (its socket is live)
            self._sock.bind(str(path))
            os.chmod(path, 0o660)  # as the gRPC socket: owner and the inference workers' group
            self._sock.listen(64)
        except BaseException:
            self._sock.close()
            raise
        self._thread = threading.Thread(target=self._accept, name="tierd-handoff", daemon=True)

    def instance_of(self, staging_generation: int) -> bytes:
        return self.instance + staging_generation.to_bytes(8, "little")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected or closed already: closing below is what matters
        self._sock.close()
        with self._open_lock:
            for conn in self._open:  # wake threads blocked on a slow client
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # the peer hung up already: its thread is ending anyway
        self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError as e:
                if self._stopping.is_set():
                    return
                # Out of descriptors (a flood) or a transient error: keep serving.
                log.warning("shared-memory socket: accept failed: %s", e)
                self._stopping.wait(0.05)
                continue
            uid = _peer_uid(conn)
            with self._open_lock:
                crowded = self._by_uid.get(uid, 0) >= MAX_CONNECTIONS_PER_USER
                if not crowded:
                    self._by_uid[uid] = self._by_uid.get(uid, 0) + 1
            if crowded or not self._slots.acquire(blocking=False):
                if not crowded:
                    self._forget(uid)
                conn.close()  # too many at once: the client retries or falls back in-band
                continue
            with self._open_lock:
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn, uid), name="tierd-handoff-conn",
                             daemon=True).start()  # fmt: skip

    def _forget(self, uid: int) -> None:
        with self._open_lock:
            self._by_uid[uid] -= 1
            if not self._by_uid[uid]:
                del self._by_uid[uid]

    def _serve(self, conn: socket.socket, uid: int) -> None:
        adopted = False
        try:
            adopted = self._exchange(conn, uid)
        except OSError as e:  # the peer went away while it was answered
            log.info("shared-memory handoff: peer gone: %s", e)
        except Exception:  # a bug here must not take the accept loop with it
            log.exception("shared-memory handoff failed")
        finally:
            with self._open_lock:
                self._open.discard(conn)
            if not adopted:
                conn.close()
            self._slots.release()
            self._forget(uid)

    def _exchange(self, conn: socket.socket, uid: int) -> bool:
        """Answer one request; True when an attend ring now owns the connection."""
        peer = _peer(conn)
        deadline = time.monotonic() + DEADLINE_SECONDS
        try:
            request = _read_request(conn, deadline)
            token = request.get("token")
            token = token if isinstance(token, str) and token else None
            kind = request.get("kind", "segment")
            if kind not in ("segment", "ring", "weights"):
                raise InvalidArgument(f"unknown kind {kind!r} (segment, ring, weights)",
                                      field="kind")  # fmt: skip
            if kind == "weights":
                return self._hand_weights(conn, peer, deadline, request, token)
            tenant = self._authorize(request.get("tenant") or "", token)
            if kind == "ring":
                if self._rings is None:
                    raise FailedPrecondition("this daemon offers no attend rings", field="kind")
                return self._hand_ring(conn, peer, deadline, tenant, token, uid)
            fds = self._fds_for(tenant)
        except TierdError as e:
            log.warning("shared memory refused to %s: %s", peer, e)
            _reply(conn, deadline, {"ok": False, "code": type(e).__name__, "error": str(e)})
            return False
        except OSError as e:  # the peer went away, said nothing in time, or no memory
            log.warning("shared-memory handoff with %s failed: %s", peer, e)
            return False
        try:
            reply = {"ok": True, "size": fds.segment_size, "staging_size": fds.staging_size,
                     "instance": self.instance_of(fds.staging_generation).hex()}  # fmt: skip
            _reply(conn, deadline, reply, [fds.segment_fd, fds.staging_fd])
        except OSError as e:
            log.warning("shared-memory handoff to %s failed: %s", peer, e)
        finally:
            os.close(fds.segment_fd)
            os.close(fds.staging_fd)
        return False

    def _hand_weights(self, conn: socket.socket, peer: str, deadline: float, request: dict,
                      token: str | None) -> bool:  # fmt: skip
        if self._weights is None:
            raise FailedPrecondition("this daemon holds no models", field="kind")
        model = request.get("model")
        if not isinstance(model, str):
            raise InvalidArgument("name the model", field="model")
        fd, size, fingerprint = self._weights(request.get("tenant") or "", token, model)
        # After a restart the area is read back and verified first, which is the daemon's
        # time, not the client's: the client's deadline starts again for the reply.
        deadline = max(deadline, time.monotonic() + DEADLINE_SECONDS)
        try:
            reply = {"ok": True, "kind": "weights", "size": size, "fingerprint": fingerprint}
            _reply(conn, deadline, reply, [fd])
        except OSError as e:
            log.warning("weights handoff to %s failed: %s", peer, e)
        finally:
            os.close(fd)
        return False

    def _hand_ring(self, conn: socket.socket, peer: str, deadline: float, tenant: str,
                   token: str | None, uid: int) -> bool:  # fmt: skip
        """Make an attend ring, hand its descriptors over, and give it the connection."""
        from tierd.server.fastpath import AREA_BYTES

        assert self._rings is not None
        ring = self._rings.open(tenant, token, uid)  # a TierdError is answered by the caller
        try:
            fds = ring.client_fds()
        except BaseException:
            self._rings.discard(ring)
            raise
        try:
            reply = {"ok": True, "kind": "ring", "version": 1, "area_bytes": AREA_BYTES}
            _reply(conn, deadline, reply, fds)
        except BaseException:
            self._rings.discard(ring)
            raise
        finally:
            os.close(fds[1])  # the read-only opening made for the client
        with self._open_lock:
            self._open.discard(conn)  # a ring's connection is no longer this server's to stop
        self._rings.adopt(ring, conn)
        log.info("attend ring %d for tenant %r opened by %s", ring.id, tenant, peer)
        return True


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the client took longer than the handoff deadline")
    return left


def _read_request(conn: socket.socket, deadline: float) -> dict:
    data = b""
    while b"\n" not in data:
        conn.settimeout(_remaining(deadline))
        chunk = conn.recv(MAX_REQUEST_BYTES + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise InvalidArgument(f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        request = json.loads(data.split(b"\n", 1)[0])
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise InvalidArgument(f"request is not JSON: {type(e).__name__}") from None
    if not isinstance(request, dict) or not isinstance(request.get("tenant", ""), str):
        raise InvalidArgument('request is not {"tenant": "...", "token": "..."}')
    return request


def _reply(conn: socket.socket, deadline: float, doc: dict, fds: list[int] | None = None) -> None:
    line = json.dumps(doc).encode() + b"\n"
    conn.settimeout(_remaining(deadline))
    if fds:
        socket.send_fds(conn, [line], fds)
    else:
        conn.sendall(line)


def _peer_uid(conn: socket.socket) -> int:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    except OSError:
        return -1


def _peer(conn: socket.socket) -> str:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return f"pid {pid} uid {uid} gid {gid}"
    except OSError:
        return "an unknown peer"
