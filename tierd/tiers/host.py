"""Host tier: a shared-memory arena, one segment per tenant, bounded by one budget.

Primitives: `HostArena(capacity, tag)`, `segment(tenant)`, `allocate(tenant, n) -> off |
None`, `free(tenant, off, n)`, `reserve(tenant, off, n)`, `view(tenant, off, n) ->
memoryview`, `client_fd(tenant) -> (fd, size)`, `release_unused()`, `trim()`,
`used_bytes`, `capacity`, `close()`.

Each tenant's segment is a file under /dev/shm with owner-only permissions. It outlives
the daemon process: after a crash or restart, the committed blocks the catalog names are
still there. Clients never open it by path: an authenticated client receives a read-only
descriptor of it (`client_fd`, handed over by `tierd.server.handoff`) and copies blocks
out with one memcpy; it can neither write nor truncate what it maps. Puts are written to
a staging area (`tierd.tiers.staging`) and copied in by the daemon.

Segments are sparse; what counts against the budget is memory that holds blocks plus
freed extents kept warm for reuse. When the budget is hit, warm extents of any tenant are
released to the kernel (MADV_REMOVE). Every extent is backed (fallocate) when it is
allocated, so a full /dev/shm fails the allocation instead of killing the daemon with
SIGBUS on first touch; and since a client can fault pages in by merely reading holes of
its read-only mapping, `trim()` gives the pages of never-allocated space back.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from tierd.errors import ExtentError
from tierd.tiers.extents import ExtentAllocator, align_up

log = logging.getLogger("tierd.host")

SHM_DIR = Path("/dev/shm")
# Address space per segment, as a multiple of the budget: slack so fragmentation between
# block sizes never makes an allocation fail while the budget still has room.
_ADDRESS_SLACK = 2
_SEGMENT_ALIGN = 2 << 20


@dataclass
class Segment:
    tenant: str
    path: Path
    size: int
    fd: int  # kept open to back extents (fallocate) as they are allocated
    mm: mmap.mmap
    alloc: ExtentAllocator


def segment_tag(data_dir: Path) -> str:
    """The name part shared by every segment of the daemon owning `data_dir`."""
    return hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=4).hexdigest()


def segments_of(data_dir: Path, shm_dir: Path = SHM_DIR) -> list[Path]:
    """Segment files of the daemon owning `data_dir` (to remove them with its data)."""
    return sorted(shm_dir.glob(f"tierd.{segment_tag(data_dir)}.*"))


def segment_name(tag: str, tenant: str) -> str:
    tenant_hash = hashlib.blake2b(tenant.encode(), digest_size=6).hexdigest()
    return f"tierd.{tag}.{tenant_hash}"


class HostArena:
    def __init__(
        self, capacity: int, tag: str, *, shm_dir: Path = SHM_DIR, pin: bool = False
    ) -> None:
        self.capacity = capacity
        self.tag = tag
        self._dir = shm_dir
        self._pin = pin
        self._segments: dict[str, Segment] = {}
        self._paths: set[Path] = set()  # every segment file opened, for destroy()
        self._lock = threading.Lock()

    # -- segments ---------------------------------------------------------------------

    def segment(self, tenant: str) -> Segment:
        with self._lock:
            seg = self._segments.get(tenant)
            if seg is None:
                seg = self._open_segment(tenant)
                self._segments[tenant] = seg
                self._paths.add(seg.path)
            return seg

    def _open_segment(self, tenant: str) -> Segment:
        path = self._dir / segment_name(self.tag, tenant)
        want = align_up(max(self.capacity * _ADDRESS_SLACK, _SEGMENT_ALIGN), _SEGMENT_ALIGN)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            size = max(os.fstat(fd).st_size, want)
            os.ftruncate(fd, size)  # sparse: no memory is used until written
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        # 2 MiB pages where the kernel allows them for shared memory (shmem_enabled=advise):
        # attention streams whole blocks, and 4 KiB pages cost it TLB misses and faults.
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        if self._pin:
            _cuda_host_register(mm, size)
        return Segment(tenant, path, size, fd, mm, ExtentAllocator(size))

    def segments(self) -> list[Segment]:
        with self._lock:
            return list(self._segments.values())

    # -- space ------------------------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        """Bytes holding blocks (what occupancy and watermarks are measured on)."""
        return sum(s.alloc.used_bytes for s in self.segments())

    def _resident_bytes(self) -> int:
        return sum(s.alloc.used_bytes + s.alloc.cached_free_bytes for s in self._segments.values())

    def can_allocate(self, nbytes: int) -> bool:
        return self.used_bytes + align_up(nbytes, 4096) <= self.capacity

    def allocate(self, tenant: str, nbytes: int) -> int | None:
        seg = self.segment(tenant)
        with self._lock:
            size = seg.alloc.extent_bytes(nbytes)
            if sum(s.alloc.used_bytes for s in self._segments.values()) + size > self.capacity:
                return None
            if not seg.alloc.has_cached(nbytes):
                excess = self._resident_bytes() + size - self.capacity
                if excess > 0:
                    self._release_warm(excess, keep=seg)
            offset = seg.alloc.allocate(nbytes)
            if offset is None:
                return None
            try:
                os.posix_fallocate(seg.fd, offset, size)
            except OSError as e:  # /dev/shm is full (or over its inode or memory limit)
                seg.alloc.free(offset, nbytes)
                log.warning("cannot back %d bytes of host memory: %s", size, e)
                return None
            return offset

    def _release_warm(self, need: int, keep: Segment) -> None:
        """Give `need` bytes of warm free extents back to the kernel, others' first."""
        for seg in sorted(self._segments.values(), key=lambda s: s is keep):
            for off, length in seg.alloc.release_cached(need):
                seg.mm.madvise(mmap.MADV_REMOVE, off, length)
                need -= length
            if need <= 0:
                return

    def free(self, tenant: str, offset: int, nbytes: int) -> None:
        seg = self.segment(tenant)
        with self._lock:
            seg.alloc.free(offset, nbytes)

    def reserve(self, tenant: str, offset: int, nbytes: int) -> bool:
        """Re-adopt a block found in a surviving segment; False if it cannot be there."""
        seg = self.segment(tenant)
        with self._lock:
            if offset + nbytes > seg.size:
                return False
            try:
                seg.alloc.reserve(offset, nbytes)
            except ExtentError:
                return False
            return True

    def release_unused(self) -> None:
        """Give back the pages of every free extent (left over from an earlier process)."""
        with self._lock:
            for seg in self._segments.values():
                for off, length in seg.alloc.free_extents():
                    seg.mm.madvise(mmap.MADV_REMOVE, off, length)

    def existing_segment(self, tenant: str) -> bool:
        return (self._dir / segment_name(self.tag, tenant)).exists()

    def view(self, tenant: str, offset: int, nbytes: int) -> memoryview:
        seg = self.segment(tenant)
        return memoryview(seg.mm)[offset : offset + nbytes]

    def client_fd(self, tenant: str) -> tuple[int, int]:
        """A new read-only descriptor of the tenant's segment, and its size: a write, a
        writable mapping or a truncation through it fails."""
        seg = self.segment(tenant)
        return os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC), seg.size

    def trim(self) -> None:
        """Give back the pages of never-allocated space (see the module docstring)."""
        with self._lock:
            for seg in self._segments.values():
                for off, length in seg.alloc.holes():
                    seg.mm.madvise(mmap.MADV_REMOVE, off, length)

    def close(self) -> None:
        with self._lock:
            for seg in self._segments.values():
                os.close(seg.fd)
                try:
                    seg.mm.close()
                except BufferError:
                    pass  # a view is still exported; the mapping goes with the process
            self._segments.clear()

    def destroy(self) -> None:
        """Remove the segment files (tests, and `tierd` data wipes)."""
        self.close()
        for p in self._paths:
            p.unlink(missing_ok=True)


def _cuda_host_register(mm: mmap.mmap, size: int) -> None:
    """Page-lock the segment for fast H2D/D2H copies where CUDA exists; no-op elsewhere."""
    if not Path("/dev/nvidiactl").exists():
        return  # no NVIDIA driver: do not pay for importing torch to learn that
    try:
        import ctypes

        import torch

        if not torch.cuda.is_available():
            return
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        torch.cuda.cudart().cudaHostRegister(addr, size, 0)
    except (ImportError, RuntimeError, OSError):  # pinning is an optimisation only
        return
