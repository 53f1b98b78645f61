"""Free loopback ports for the servers tests start (Redis, Valkey, Mooncake, tierd on TCP).

A port from `bind(port 0)` comes from the kernel's ephemeral range, the same range every
outgoing connection takes its source port from: between the probe closing it and the server
binding it, a client connection elsewhere in the run can take it, and the server fails to
start ("Address already in use"). Ports are therefore drawn below that range, where only an
explicit bind can land, and each is checked free before it is handed out.

A port is handed out once, though its server may start only after several more are drawn (a
Redis cluster's nodes, a Mooncake master's three ports). Test processes running at once (two
pytest runs in one checkout) draw from disjoint sets: each claims one of `_SHARES` residues
of the port number, held by an abstract Unix socket the kernel releases when the process
ends, so no two live processes probe the same port and then both start a server on it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 10_000  # clear of the well-known and registered ports services commonly hold
# Residue classes, one per concurrent test process; 10000 (a Redis cluster node's bus port
# offset) is a multiple, so a port and its bus port are both the claiming process's.
_SHARES = 16

_handed: set[int] = set()
_share: tuple[int, socket.socket | None] | None = None  # (residue, its claim); None: unclaimed


def _ephemeral_start() -> int:
    try:
        low = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]
        return int(low)
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _residue() -> int | None:
    """This process's residue class, claimed on first use (None: all are claimed, and
    ports come from the whole range, unshared with no other process)."""
    global _share
    if _share is None:
        _share = (-1, None)
        for k in random.SystemRandom().sample(range(_SHARES), _SHARES):
            claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                claim.bind(f"\0tierd-tests-ports-{k}")
            except OSError:
                claim.close()
                continue
            _share = (k, claim)
            break
    return _share[0] if _share[1] is not None else None


def free_port(offset: int = 0) -> int:
    """A free loopback port outside the ephemeral range, never handed out before in this
    process nor in any other running one; with `offset`, `port + offset` is free too and
    also outside it (a Redis cluster node's bus port is its port + 10000)."""
    top = _ephemeral_start() - offset
    if top - _LOWEST < 100:
        raise RuntimeError(f"no port range below the ephemeral range for offset {offset}")
    residue = _residue() if offset % _SHARES == 0 else None
    first = _LOWEST if residue is None else _LOWEST + (residue - _LOWEST) % _SHARES
    step = 1 if residue is None else _SHARES
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(first, top, step)
        if port in _handed or (offset and port + offset in _handed):
            continue
        if _bindable(port) and (offset == 0 or _bindable(port + offset)):
            _handed.update({port, port + offset})
            return port
    raise RuntimeError("no free loopback port found below the ephemeral range")
