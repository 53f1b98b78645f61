"""Identity of the machine, to decide whether a client may map the daemon's segments."""

from __future__ import annotations

import socket
from functools import cache
from pathlib import Path


@cache
def host_id() -> str:
    """Hostname plus kernel boot id: equal only for processes on the same running OS."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "unknown-boot"
    return f"{socket.gethostname()}:{boot}"
