"""Staging: where clients write the blocks they put, before the daemon copies them in.

Primitives: `StagingAreas(per_tenant, total)`; `allocate(tenant, n) -> (area, off) | None`,
`free(area, off, n)`, `view(area, off, n) -> memoryview`, `retire(area)`,
`client_fd(tenant) -> (fd, size, generation)`, `used_bytes(tenant)`, `trim()`, `close()`.

A tenant's staging area is an anonymous memory file (memfd) sealed so that nobody can
shrink or grow it, mapped by the daemon and by the tenant's clients (handed over as a
descriptor). A put lease owns slots in it; on commit the daemon copies each slot into the
host tier and checksums its copy, so what a client writes there afterwards reaches no
block.

Fencing. A client whose lease expired may still be writing into its slots (a stalled
process wakes up). Were those slots handed to the next lease, its bytes would land in
another put. So when a shared-memory put lease expires, the tenant's area is *retired*:
it takes no new leases (those go to a fresh area, a new generation that clients map
anew), it lives on only until the leases already in it end, and the slots of the expired
lease are never reused. A late writer can then only scribble on memory nobody reads.

Bounds. Each tenant's leases hold at most `per_tenant` bytes and all tenants together at
most `total`, so staging never holds more than the host tier could commit. Every slot is
backed (fallocate) before it is handed out: a full /dev/shm makes a put fail cleanly
instead of a later touch of the page killing the daemon with SIGBUS. `trim()` returns the
pages of never-allocated space, which a client can fault in by merely reading its mapping.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import mmap
import os
import threading
from dataclasses import dataclass, field

from tierd.tiers.extents import ExtentAllocator, align_up

# Address space per area, as a multiple of the budget: fragmentation between block sizes
# must not fail a lease the budget has room for.
_ADDRESS_SLACK = 2
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


@dataclass(eq=False)
class StagingArea:
    tenant: str
    generation: int
    fd: int
    size: int
    mm: mmap.mmap = field(repr=False)
    alloc: ExtentAllocator = field(repr=False)
    retired: bool = False


class StagingAreas:
    def __init__(self, per_tenant: int, total: int) -> None:
        self.per_tenant = align_up(max(per_tenant, 4096), 4096)
        self.total = max(total, self.per_tenant)
        self._current: dict[str, StagingArea] = {}
        self._retired: list[StagingArea] = []
        self._generation = 0
        self._lock = threading.Lock()

    # -- areas ------------------------------------------------------------------------------

    def current(self, tenant: str) -> StagingArea:
        with self._lock:
            return self._current_locked(tenant)

    def _current_locked(self, tenant: str) -> StagingArea:
        area = self._current.get(tenant)
        if area is None:
            self._generation += 1
            area = _open_area(tenant, self._generation, self.per_tenant * _ADDRESS_SLACK)
            self._current[tenant] = area
        return area

    def retire(self, area: StagingArea) -> None:
        """A shared-memory lease in `area` expired: new leases go to a fresh area."""
        with self._lock:
            if self._current.get(area.tenant) is not area:
                return  # retired already
            del self._current[area.tenant]
            area.retired = True
            if area.alloc.used_bytes:
                self._retired.append(area)
            else:
                _close_area(area)

    def client_fd(self, tenant: str) -> tuple[int, int, int]:
        """A new descriptor of the tenant's current area: (fd, size, generation)."""
        with self._lock:
            area = self._current_locked(tenant)
            return os.dup(area.fd), area.size, area.generation

    # -- slots ------------------------------------------------------------------------------

    def allocate(self, tenant: str, nbytes: int) -> tuple[StagingArea, int] | None:
        """A backed slot of `nbytes` in the tenant's current area; None over a budget or
        when the memory cannot be backed (/dev/shm full)."""
        with self._lock:
            area = self._current_locked(tenant)
            size = area.alloc.extent_bytes(nbytes)
            if (self._used_locked(tenant) + size > self.per_tenant
                    or self._used_locked(None) + size > self.total):  # fmt: skip
                return None
            offset = area.alloc.allocate(nbytes)
            if offset is None:
                return None
            try:
                os.posix_fallocate(area.fd, offset, size)
            except OSError as e:
                area.alloc.free(offset, nbytes)
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    return None
                raise
            return area, offset

    def free(self, area: StagingArea, offset: int, nbytes: int) -> None:
        with self._lock:
            if area.retired:
                # Counted free, never handed out again: a retired area takes no leases.
                area.alloc.free(offset, nbytes)
                if area.alloc.used_bytes == 0:
                    self._retired.remove(area)
                    _close_area(area)
                return
            area.alloc.free(offset, nbytes)
            # Keep an eighth of the budget warm for the next puts; release the rest.
            excess = area.alloc.cached_free_bytes - self.per_tenant // 8
            if excess > 0:
                for off, length in area.alloc.release_cached(excess):
                    area.mm.madvise(mmap.MADV_REMOVE, off, length)

    def view(self, area: StagingArea, offset: int, nbytes: int) -> memoryview:
        return memoryview(area.mm)[offset : offset + nbytes]

    def used_bytes(self, tenant: str | None = None) -> int:
        """Bytes leased in staging: one tenant's (all its areas), or everyone's."""
        with self._lock:
            return self._used_locked(tenant)

    def _used_locked(self, tenant: str | None) -> int:
        areas = [*self._current.values(), *self._retired]
        return sum(a.alloc.used_bytes for a in areas if tenant is None or a.tenant == tenant)

    # -- memory -----------------------------------------------------------------------------

    def trim(self) -> None:
        """Give back the pages of never-allocated space in every current area (a client
        reading its mapping faults pages in there)."""
        with self._lock:
            for area in self._current.values():
                for off, length in area.alloc.holes():
                    area.mm.madvise(mmap.MADV_REMOVE, off, length)

    def close(self) -> None:
        with self._lock:
            for area in [*self._current.values(), *self._retired]:
                _close_area(area)
            self._current.clear()
            self._retired.clear()


def _open_area(tenant: str, generation: int, size: int) -> StagingArea:
    """A sealed anonymous memory file of `size` bytes (sparse until backed)."""
    name = "tierd-staging-" + hashlib.blake2b(tenant.encode(), digest_size=6).hexdigest()
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return StagingArea(tenant, generation, fd, size, mm, ExtentAllocator(size))


def _close_area(area: StagingArea) -> None:
    try:
        area.mm.close()
    except BufferError:
        pass  # a view is still exported (a copy in flight); it unmaps with the last view
    os.close(area.fd)
