"""Host tier: a shared-memory arena, one segment per tenant, bounded by one budget, plus a
staging area per tenant where clients write the blocks they put.

Primitives: `HostArena(capacity, tag, staging_bytes=...)`, `segment(tenant)`,
`allocate(tenant, n) -> off | None`, `free(tenant, off, n)`, `reserve(tenant, off, n)`,
`view(tenant, off, n) -> memoryview`, `release_unused()`, `used_bytes`, `capacity`,
`close()`; staging: `allocate_staging(tenant, n) -> off | None`, `free_staging(...)`,
`staging_view(tenant, off, n)`; `client_fds(tenant) -> ClientFds` (what a client maps).

Each tenant's segment is a file under /dev/shm with owner-only permissions. It outlives
the daemon process: after a crash or restart, the committed blocks the catalog names are
still there. Clients never open it by path: an authenticated client receives a read-only
descriptor of it (see `tierd.server.handoff`) and reads blocks in place with one memcpy;
it can neither write nor truncate what it maps. Segments are sparse; what counts against
the budget is memory that holds blocks plus freed extents kept warm for reuse. When the
budget is hit, warm extents of any tenant are released to the kernel (MADV_REMOVE).

Puts go through staging: an anonymous memory file (memfd) per tenant, sealed so nobody can
shrink or grow it, handed to the tenant's clients read-write. A put lease owns staging
slots; on commit the daemon copies each slot into the segment and checksums the copy, so
a client that keeps writing after its lease ended damages at worst its own tenant's
uncommitted slots, and no client can make the daemon touch a page that is not there
(SIGBUS). Staging holds only uncommitted bytes, so it needs no durability.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from tierd.tiers.extents import ExtentAllocator, align_up

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
    mm: mmap.mmap
    alloc: ExtentAllocator


@dataclass
class Staging:
    tenant: str
    fd: int  # the sealed memfd; duplicated for each client that maps it
    size: int
    mm: mmap.mmap
    alloc: ExtentAllocator


@dataclass(frozen=True)
class ClientFds:
    """Descriptors a client maps: the segment read-only, staging read-write. The caller
    owns (closes) both after handing them over."""

    segment_fd: int
    segment_size: int
    staging_fd: int
    staging_size: int


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
        self, capacity: int, tag: str, *, shm_dir: Path = SHM_DIR, pin: bool = False,
        staging_bytes: int = 0,
    ) -> None:
        self.capacity = capacity
        self.tag = tag
        self._dir = shm_dir
        self._pin = pin
        # Uncommitted bytes one tenant's leases may hold (0: as much as the tier holds).
        self.staging_bytes = align_up(staging_bytes or max(capacity, 4096), 4096)
        self._segments: dict[str, Segment] = {}
        self._staging: dict[str, Staging] = {}
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
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            size = max(os.fstat(fd).st_size, want)
            os.ftruncate(fd, size)  # sparse: no memory is used until written
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        # 2 MiB pages where the kernel allows them for shared memory (shmem_enabled=advise):
        # attention streams whole blocks, and 4 KiB pages cost it TLB misses and faults.
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except (AttributeError, OSError):
            pass
        if self._pin:
            _cuda_host_register(mm, size)
        return Segment(tenant, path, size, mm, ExtentAllocator(size))

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
            return seg.alloc.allocate(nbytes)

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
            except ValueError:
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

    # -- staging --------------------------------------------------------------------------

    def staging(self, tenant: str) -> Staging:
        with self._lock:
            st = self._staging.get(tenant)
            if st is None:
                # Address space beyond the budget, as for segments: fragmentation between
                # block sizes must not fail a lease the budget has room for.
                size = self.staging_bytes * _ADDRESS_SLACK
                st = self._staging[tenant] = _open_staging(tenant, size)
            return st

    def allocate_staging(self, tenant: str, nbytes: int) -> int | None:
        st = self.staging(tenant)
        with self._lock:
            if st.alloc.used_bytes + st.alloc.extent_bytes(nbytes) > self.staging_bytes:
                return None
            return st.alloc.allocate(nbytes)

    def free_staging(self, tenant: str, offset: int, nbytes: int) -> None:
        st = self.staging(tenant)
        with self._lock:
            st.alloc.free(offset, nbytes)
            # Keep a quarter of the budget warm for the next puts; release the rest.
            excess = st.alloc.cached_free_bytes - self.staging_bytes // 4
            if excess > 0:
                for off, length in st.alloc.release_cached(excess):
                    st.mm.madvise(mmap.MADV_REMOVE, off, length)

    def staging_view(self, tenant: str, offset: int, nbytes: int) -> memoryview:
        st = self.staging(tenant)
        return memoryview(st.mm)[offset : offset + nbytes]

    def staging_used_bytes(self, tenant: str) -> int:
        with self._lock:
            st = self._staging.get(tenant)
            return st.alloc.used_bytes if st is not None else 0

    def client_fds(self, tenant: str) -> ClientFds:
        """Fresh descriptors for one client of `tenant`: its segment read-only (a write or
        a truncation through it fails), its staging area read-write (sealed: a truncation
        fails)."""
        seg = self.segment(tenant)
        st = self.staging(tenant)
        seg_fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            staging_fd = os.dup(st.fd)
        except BaseException:
            os.close(seg_fd)
            raise
        return ClientFds(seg_fd, seg.size, staging_fd, st.size)

    def close(self) -> None:
        with self._lock:
            for st in self._staging.values():
                try:
                    st.mm.close()
                except BufferError:
                    pass
                os.close(st.fd)
            self._staging.clear()
            for seg in self._segments.values():
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


_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _open_staging(tenant: str, size: int) -> Staging:
    """A sealed anonymous memory file of `size` bytes (sparse until written)."""
    name = "tierd-staging-" + hashlib.blake2b(tenant.encode(), digest_size=6).hexdigest()
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return Staging(tenant, fd, size, mm, ExtentAllocator(size))


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
