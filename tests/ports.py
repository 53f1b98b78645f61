"""Free loopback ports for the servers tests start (Redis, Valkey, Mooncake, tierd on TCP).

A port from `bind(port 0)` comes from the kernel's ephemeral range, the same range every
outgoing connection takes its source port from: between the probe closing it and the server
binding it, a client connection elsewhere in the run can take it, and the server fails to
start ("Address already in use"). Ports are therefore drawn below that range, where only an
explicit bind can land, and each is checked free before it is handed out.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_LOWEST = 10_000  # clear of the well-known and registered ports services commonly hold


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


def free_port(offset: int = 0) -> int:
    """A free loopback port outside the ephemeral range; with `offset`, `port + offset` is
    free too and also outside it (a Redis cluster node's bus port is its port + 10000)."""
    top = _ephemeral_start() - offset
    if top - _LOWEST < 100:
        raise RuntimeError(f"no port range below the ephemeral range for offset {offset}")
    rng = random.SystemRandom()
    for _ in range(500):
        port = rng.randrange(_LOWEST, top)
        if _bindable(port) and (offset == 0 or _bindable(port + offset)):
            return port
    raise RuntimeError("no free loopback port found below the ephemeral range")
