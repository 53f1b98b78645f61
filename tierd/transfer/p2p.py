"""One-sided reads between daemons: a Mooncake transfer engine (package
`mooncake-transfer-engine-non-cuda`, the `mooncake` extra, or a CUDA build) over TCP or
RDMA, with no metadata server (peers name each other's engine as HOST:PORT).

Primitives: `PeerEngine.open(hostname, protocol)`, `address`, `protocol`,
`expose(view)` (register memory peers may read, or read into; once per buffer),
`address_of(view) -> int`, `read(target, [(local, remote, length)]) -> bool`, `close()`.

Only registered memory can be read: a peer asking for an address outside every
registered buffer is refused by the engine itself. A daemon registers its memory tier's
segments (one per tenant, mapped for the daemon's life), so its engine's port must be
reachable by peer daemons only; the `Peer` calls that hand out addresses are guarded by
the group's secret, the port itself by the network.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from tierd.errors import ConfigError
from tierd_client.bulk import engine_read, start_engine

log = logging.getLogger("tierd.p2p")


def address_of(view: memoryview) -> int:
    """The address of a buffer's first byte (the buffer stays the caller's)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class PeerEngine:
    def __init__(self, engine: Any, address: str, protocol: str) -> None:
        self._engine = engine
        self.protocol = protocol
        self.address = address
        self._lock = threading.Lock()
        self._exposed: dict[int, int] = {}  # registered buffers: address -> length

    @classmethod
    def open(cls, hostname: str, protocol: str) -> PeerEngine:
        try:
            engine, address = start_engine(hostname, protocol)
        except ImportError as e:  # the extra, or the system's libibverbs1, is missing
            raise ConfigError("peers", f"needs the mooncake extra (and libibverbs1): {e}") from e
        except OSError as e:
            raise ConfigError("peers.engine_hostname", str(e)) from None
        return cls(engine, address, protocol)

    def expose(self, view: memoryview) -> int:
        """Register `view` with the engine (idempotent); returns its address."""
        addr = address_of(view)
        with self._lock:
            if self._exposed.get(addr, -1) >= len(view):
                return addr
            if addr in self._exposed:
                self._engine.unregister_memory(addr)
            rc = self._engine.register_memory(addr, len(view))
            if rc != 0:
                raise OSError(f"the transfer engine refused {len(view)} bytes at {addr:#x}: {rc}")
            self._exposed[addr] = len(view)
        return addr

    def read(self, target: str, reads: list[tuple[int, int, int]]) -> bool:
        """Copy each (local address, remote address, length) from `target`'s registered
        memory into ours; True if every read completed."""
        return engine_read(self._engine, target, reads)

    def close(self) -> None:
        """Unregister everything (before the memory is unmapped); the engine goes with the
        last reference."""
        with self._lock:
            for addr in self._exposed:
                self._engine.unregister_memory(addr)
            self._exposed.clear()
