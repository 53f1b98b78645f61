"""Handing a tenant's shared memory to its clients: descriptors over a unix socket, after
the client proved its tenant. Clients never open shared memory by path.

Primitives: `HandoffServer(path, arena, authorize)`, `start()`, `stop()`, `instance`.

One exchange per connection (the client side is `tierd_client.shm.receive_fds`):
  client -> one JSON line, at most 4 KiB: {"tenant": "...", "token": "..." | null}
  daemon -> one JSON line: {"ok": true, "size": N, "staging_size": M, "instance": "hex"}
            with two descriptors attached (SCM_RIGHTS): the tenant's block segment opened
            read-only, and its sealed staging area read-write;
            or {"ok": false, "code": "...", "error": "..."} and nothing attached.

`authorize(tenant, token)` returns the tenant the caller may map, or raises a TierdError
(the same rules as the RPCs: with tenants configured the token names the tenant; in open
mode the caller names it, and the socket's permissions are the guard). Each connection
gets a short deadline, and a few threads serve them, so a client that connects and says
nothing holds one thread for at most that long. The peer's credentials (SO_PEERCRED) are
logged with every refusal.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tierd.errors import InvalidArgument, TierdError
from tierd.tiers.host import HostArena

log = logging.getLogger("tierd.handoff")

MAX_REQUEST_BYTES = 4096
DEADLINE_SECONDS = 2.0
_THREADS = 4


def handoff_path(socket_path: Path) -> Path:
    """Where the handoff socket of a daemon listening on `socket_path` lives."""
    return socket_path.with_name(socket_path.name + ".shm")


class HandoffServer:
    def __init__(
        self, path: Path, arena: HostArena, authorize: Callable[[str, str | None], str]
    ) -> None:
        self.path = path
        self.instance = os.urandom(8)
        self._arena = arena
        self._authorize = authorize
        self._pool = ThreadPoolExecutor(_THREADS, thread_name_prefix="tierd-handoff")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path.unlink(missing_ok=True)  # the caller made sure no live daemon owns the path
        self._sock.bind(str(path))
        os.chmod(path, 0o660)  # as the gRPC socket: owner and the inference workers' group
        self._sock.listen(64)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="tierd-handoff", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.path.unlink(missing_ok=True)

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed by stop()
            conn.settimeout(DEADLINE_SECONDS)
            self._pool.submit(self._serve, conn)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            peer = _peer(conn)
            try:
                request = _read_request(conn)
                token = request.get("token")
                tenant = self._authorize(request.get("tenant") or "",
                                         token if isinstance(token, str) and token else None)  # fmt: skip
                fds = self._arena.client_fds(tenant)
            except TierdError as e:
                log.warning("shared memory refused to %s: %s", peer, e)
                _reply(conn, {"ok": False, "code": type(e).__name__, "error": str(e)})
                return
            except OSError as e:  # the peer went away or said nothing in time
                log.warning("shared memory handoff with %s failed: %s", peer, e)
                return
            try:
                reply = {"ok": True, "size": fds.segment_size, "staging_size": fds.staging_size,
                         "instance": self.instance.hex()}  # fmt: skip
                _reply(conn, reply, [fds.segment_fd, fds.staging_fd])
            except OSError as e:
                log.warning("shared memory handoff to %s failed: %s", peer, e)
            finally:
                os.close(fds.segment_fd)
                os.close(fds.staging_fd)


def _read_request(conn: socket.socket) -> dict:
    data = b""
    while b"\n" not in data:
        chunk = conn.recv(MAX_REQUEST_BYTES + 1 - len(data))
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_REQUEST_BYTES:
            raise InvalidArgument(f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        request = json.loads(data.split(b"\n", 1)[0])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"request is not JSON: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("tenant", ""), str):
        raise InvalidArgument("request is not a JSON object")
    return request


def _reply(conn: socket.socket, doc: dict, fds: list[int] | None = None) -> None:
    line = json.dumps(doc).encode() + b"\n"
    if fds:
        socket.send_fds(conn, [line], fds)
    else:
        conn.sendall(line)


def _peer(conn: socket.socket) -> str:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        return f"pid {pid} uid {uid} gid {gid}"
    except OSError:
        return "an unknown peer"
