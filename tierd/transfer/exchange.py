"""The exchange area: the only memory the client-facing transfer engine exposes.

Primitives: `ExchangeArea(engine, capacity)`; `take(nbytes) -> offset | None`,
`give(offset, nbytes)` (zeroes it), `view(offset, nbytes)`, `address(offset)`,
`capacity`, `used_bytes`, `close()` (a slot given after it is forgotten: nothing is
mapped to zero).

A Mooncake engine checks no identity: whoever reaches its port can read, and write,
every byte registered with it. So the engine remote clients use (`[peers] bulk`) is not
the peer daemons' engine and has none of the memory tier registered, only this area: a
get copies its blocks in here for the client to read, a put's bytes land here and are
copied into the memory tier before they are checked. What a stranger on the port can
reach is therefore the blocks in transit at that moment (each slot is zeroed when its
transfer ends), never the tenants' cached KV, and a write into a slot is caught by the
checksum the reader compares (the client on a get, the daemon on a put, after the copy
out of the slot).

Space comes from an `ExtentAllocator` over one anonymous mapping registered once; the
caller serialises `take` and `give` (the service's lock).
"""

from __future__ import annotations

import mmap

import numpy as np

from tierd.tiers.extents import ExtentAllocator
from tierd.transfer.p2p import PeerEngine


class ExchangeArea:
    def __init__(self, engine: PeerEngine, capacity: int) -> None:
        self._alloc = ExtentAllocator(capacity)
        self._map = mmap.mmap(-1, max(self._alloc.capacity, mmap.PAGESIZE))
        self._bytes = np.frombuffer(self._map, dtype=np.uint8)
        self.engine = engine
        self._base = engine.expose(memoryview(self._map))
        self._closed = False

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def used_bytes(self) -> int:
        return self._alloc.used_bytes

    def take(self, nbytes: int) -> int | None:
        """A slot of `nbytes`; None when the area has no room for it now."""
        return self._alloc.allocate(nbytes)

    def give(self, offset: int, nbytes: int) -> None:
        """Zero the slot (nothing of a finished transfer stays readable) and free it."""
        if self._closed:  # a lease that outlived the area: its bytes went with the mapping
            return
        self._bytes[offset : offset + nbytes] = 0
        self._alloc.free(offset, nbytes)

    def view(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self._map)[offset : offset + nbytes]

    def address(self, offset: int) -> int:
        """Where the slot at `offset` is in the engine's address space."""
        return self._base + offset

    def close(self) -> None:
        """Unregister (with the engine's other buffers) before the mapping goes. The
        caller makes sure no copy or engine read is using the area any more."""
        if self._closed:
            return
        self._closed = True
        self.engine.close()
        if self._alloc.used_bytes:
            # Slots lent to clients: one may be reading through the engine right now (the
            # engine refuses new reads only); the mapping goes with the last reference.
            return
        del self._bytes
        try:
            self._map.close()
        except BufferError:  # a view still held somewhere: the mapping goes with it
            pass
