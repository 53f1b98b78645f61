"""Unix socket paths a daemon is about to listen on: take over a stale one, never a live one.

Primitives: `unix_socket_path(addr) -> Path | None`, `bind_address(addr) -> (target, path)`,
`claim_unix_socket(path)`, `refuse_live_sockets(listen)`.

gRPC unlinks whatever is at a unix path before binding, so without a look first a second
daemon would silently steal the socket of a running one (whose clients then talk to the
newcomer). A connect tells them apart: refused (or no file) means the daemon that made
the socket is gone; accepted means someone serves there.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterable
from pathlib import Path

from tierd.errors import ConfigError
from tierd_client.address import unix_socket_path as socket_path_of

_PROBE_TIMEOUT_S = 1.0
_STALE = (errno.ECONNREFUSED, errno.ENOENT)


def unix_socket_path(addr: str) -> Path | None:
    path = socket_path_of(addr)
    return Path(path) if path is not None else None


def bind_address(addr: str) -> tuple[str, Path | None]:
    """gRPC's form of a listen address, and the socket path for unix ones."""
    path = unix_socket_path(addr)
    return (f"unix:{path}", path) if path is not None else (addr, None)


def _check(path: Path) -> bool:
    """True when a stale socket is there to remove; raises if a live one is."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ConfigError("server.listen", f"cannot inspect {path}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError("server.listen", f"{path} exists and is not a socket; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(_PROBE_TIMEOUT_S)
        try:
            s.connect(str(path))
        except OSError as e:
            if e.errno in _STALE:
                return True
            # A full backlog (EAGAIN) or a slow accept (timeout) is a live listener too;
            # anything else (EACCES) leaves us unable to tell, so leave the path alone.
            reason = e.strerror or type(e).__name__
            raise ConfigError("server.listen", f"{path} may be in use ({reason}); stop the "
                                               "daemon there or listen elsewhere") from None  # fmt: skip
    raise ConfigError("server.listen", f"another process (a running tierd?) answers on {path}; "
                                       "stop it or listen elsewhere")  # fmt: skip


def claim_unix_socket(path: Path) -> None:
    """Make `path` free to bind: remove the socket of a dead daemon, refuse a live one's."""
    if _check(path):
        path.unlink(missing_ok=True)


def refuse_live_sockets(listen: Iterable[str]) -> None:
    """Before building anything: refuse if a live daemon owns one of the unix addresses."""
    for addr in listen:
        path = unix_socket_path(addr)
        if path is not None:
            _check(path)
