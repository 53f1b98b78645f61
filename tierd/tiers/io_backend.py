"""I/O backends for the NVMe tier: positional, whole-buffer reads and writes of one file.

Primitives (every backend):
  `open(path, size_bytes) -> handle`  create if missing, preallocate up to `size_bytes`
                                      (never shrinks a larger file)
  `pread(handle, dst, offset) -> n`   fill all of `dst` from `offset`; blocks
  `pwrite(handle, src, offset) -> n`  write all of `src` at `offset`; blocks; survives a
                                      crash of this process once it returns
  `sync(handle)`                      make written data durable against power loss
  `close(handle)`
  `name`, `supports_direct`, `direct`

Direct (page-cache bypassing) I/O wants the file offset, the length and the buffer
address 4096-aligned. Callers align offsets and lengths; a backend copes with an
unaligned buffer address itself (bounce buffer), so callers can pass `bytes`. A misaligned
request, a read-only destination or a closed file is the caller's bug: `Internal`.

Backends: `PosixBackend` (O_DIRECT where the filesystem allows it, buffered otherwise)
and `KvikioBackend` (GPU-direct storage through kvikio; needs a working CUDA driver).
`select_backend(name)` picks one; `kvikio_available()` says whether kvikio can work here.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import importlib.util
import mmap
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tierd.errors import Internal

ALIGNMENT = 4096
# Unaligned buffers go through the bounce buffer in pieces of at most this size, so a
# thread never pins more than this much extra memory.
_BOUNCE_MAX = 4 << 20


@dataclass
class IOHandle:
    """An open data file. `direct` tells whether I/O on it bypasses the page cache."""

    path: Path
    size: int
    direct: bool


@dataclass
class PosixHandle(IOHandle):
    fd: int = -1


@dataclass
class KvikioHandle(IOHandle):
    cufile: Any = None


class IOBackend(ABC):
    name: str = "abstract"
    # Whether this backend can do I/O that bypasses the page cache at all.
    supports_direct: bool = False
    # Whether it really does for the files opened so far (False after any fallback).
    direct: bool = False

    @abstractmethod
    def open(self, path: Path | str, size_bytes: int) -> IOHandle: ...

    @abstractmethod
    def pread(self, handle: IOHandle, dst: memoryview, offset: int) -> int: ...

    @abstractmethod
    def pwrite(self, handle: IOHandle, src: memoryview, offset: int) -> int: ...

    @abstractmethod
    def sync(self, handle: IOHandle) -> None: ...

    @abstractmethod
    def close(self, handle: IOHandle) -> None: ...


def as_bytes_view(buf: Any) -> memoryview:
    """A flat byte view of any C-contiguous buffer (bytes, bytearray, numpy, mmap...)."""
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def buffer_address(mv: memoryview) -> int:
    # numpy reads the address of read-only buffers too, which ctypes.from_buffer cannot.
    return int(np.frombuffer(mv, dtype=np.uint8).ctypes.data) if len(mv) else 0


def is_aligned(mv: memoryview, alignment: int = ALIGNMENT) -> bool:
    return buffer_address(mv) % alignment == 0


def _preallocate(fd: int, size_bytes: int) -> None:
    current = os.fstat(fd).st_size
    if current >= size_bytes:
        return
    try:
        # Reserving the blocks now means a full disk shows up here, not as a failed
        # write of a block that the index already promised.
        os.posix_fallocate(fd, current, size_bytes - current)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size_bytes)  # filesystem without fallocate: sparse is the best


class _Bounce(threading.local):
    """A page-aligned scratch buffer per thread (anonymous mmaps are page-aligned)."""

    def get(self, nbytes: int) -> memoryview:
        view: memoryview | None = getattr(self, "view", None)
        if view is None or len(view) < nbytes:
            size = max(nbytes, 1 << 20)
            self.mm = mmap.mmap(-1, size)
            self.view = view = memoryview(self.mm)
        return view[:nbytes]


class PosixBackend(IOBackend):
    """pread/pwrite through os.preadv/os.pwritev (which release the GIL)."""

    name = "posix"
    supports_direct = hasattr(os, "O_DIRECT")

    def __init__(self, direct: bool = True) -> None:
        self.direct_requested = direct and self.supports_direct
        self.direct = self.direct_requested
        self._bounce = _Bounce()

    def open(self, path: Path | str, size_bytes: int) -> PosixHandle:
        path = Path(path)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd, direct = -1, False
        if self.direct_requested:
            try:
                fd = os.open(path, flags | os.O_DIRECT, 0o600)
                direct = True
            except OSError as exc:
                # Filesystems without O_DIRECT (older tmpfs, some FUSE) say EINVAL.
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
        if fd < 0:
            fd = os.open(path, flags, 0o600)
        try:
            _preallocate(fd, size_bytes)
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return PosixHandle(path=path, size=size, direct=direct, fd=fd)

    def pread(self, handle: IOHandle, dst: memoryview, offset: int) -> int:
        h = _posix(handle)
        dst = as_bytes_view(dst)
        if dst.readonly:
            raise Internal("pread needs a writable buffer")
        if not h.direct:
            return _read_full(h.fd, dst, offset)
        _check_direct(offset, len(dst))
        if is_aligned(dst):
            return _read_full(h.fd, dst, offset)
        done = 0
        while done < len(dst):
            n = min(len(dst) - done, _BOUNCE_MAX)
            scratch = self._bounce.get(n)
            _read_full(h.fd, scratch, offset + done)
            dst[done : done + n] = scratch
            done += n
        return done

    def pwrite(self, handle: IOHandle, src: memoryview, offset: int) -> int:
        h = _posix(handle)
        src = as_bytes_view(src)
        if not h.direct:
            return _write_full(h.fd, src, offset)
        _check_direct(offset, len(src))
        if is_aligned(src):
            return _write_full(h.fd, src, offset)
        done = 0
        while done < len(src):
            n = min(len(src) - done, _BOUNCE_MAX)
            scratch = self._bounce.get(n)
            scratch[:] = src[done : done + n]
            _write_full(h.fd, scratch, offset + done)
            done += n
        return done

    def sync(self, handle: IOHandle) -> None:
        os.fdatasync(_posix(handle).fd)

    def close(self, handle: IOHandle) -> None:
        if isinstance(handle, PosixHandle) and handle.fd >= 0:
            fd, handle.fd = handle.fd, -1
            os.close(fd)


def _kvikio_whole(op: Any, buf: memoryview, offset: int, what: str) -> int:
    """Run a kvikio pread/pwrite until the whole buffer is done (they may stop short)."""
    done = 0
    while done < len(buf):
        n = op(buf[done:], file_offset=offset + done).get()
        if n <= 0:
            raise OSError(errno.EIO, f"kvikio short {what} at {offset + done}")
        done += n
    return done


def _posix(handle: IOHandle) -> PosixHandle:
    if not isinstance(handle, PosixHandle):
        raise TypeError(f"not a posix handle: {handle!r}")
    if handle.fd < 0:
        raise Internal(f"I/O on a closed file: {handle.path}")
    return handle


def _check_direct(offset: int, length: int) -> None:
    if offset % ALIGNMENT or length % ALIGNMENT:
        raise Internal(
            f"direct I/O needs {ALIGNMENT}-aligned offset and length, got {offset}, {length}"
        )


def _read_full(fd: int, dst: memoryview, offset: int) -> int:
    done, total = 0, len(dst)
    while done < total:
        n = os.preadv(fd, [dst[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short read: end of file at {offset + done}")
        done += n
    return done


def _write_full(fd: int, src: memoryview, offset: int) -> int:
    done, total = 0, len(src)
    while done < total:
        n = os.pwritev(fd, [src[done:]], offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"short write: nothing written at {offset + done}")
        done += n
    return done


# -- kvikio ---------------------------------------------------------------------------------


@functools.cache
def kvikio_unavailable_reason() -> str | None:
    """Why kvikio cannot do I/O here, or None when it can. Probed once, on first use."""
    if importlib.util.find_spec("kvikio") is None:
        return "the kvikio package is not installed (pip install 'tierd[gpu]')"
    try:
        # kvikio loads the CUDA driver even for host buffers.
        ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return f"the CUDA driver libcuda.so.1 cannot be loaded ({exc})"
    if importlib.util.find_spec("torch") is not None:
        import torch

        if not torch.cuda.is_available():
            return "torch.cuda.is_available() is False (no usable GPU)"
    try:
        import kvikio  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install raises all sorts
        return f"importing kvikio failed: {exc!r}"
    return None


def kvikio_available() -> bool:
    return kvikio_unavailable_reason() is None


class KvikioBackend(IOBackend):
    """kvikio.CuFile: GPU-direct storage where the driver has it, kvikio's own POSIX
    compatibility mode otherwise. kvikio handles alignment and splits large requests
    over its own thread pool."""

    name = "kvikio"
    supports_direct = True

    def __init__(self) -> None:
        reason = kvikio_unavailable_reason()
        if reason is not None:
            raise ValueError(f"kvikio backend unavailable: {reason}")
        self.direct = True

    def open(self, path: Path | str, size_bytes: int) -> KvikioHandle:
        import kvikio

        path = Path(path)
        # kvikio's "w" truncates, so create and size the file ourselves and open "r+".
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            _preallocate(fd, size_bytes)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        return KvikioHandle(path=path, size=size, direct=True, cufile=kvikio.CuFile(path, "r+"))

    def pread(self, handle: IOHandle, dst: memoryview, offset: int) -> int:
        return _kvikio_whole(_kvikio(handle).pread, as_bytes_view(dst), offset, "read")

    def pwrite(self, handle: IOHandle, src: memoryview, offset: int) -> int:
        return _kvikio_whole(_kvikio(handle).pwrite, as_bytes_view(src), offset, "write")

    def sync(self, handle: IOHandle) -> None:
        os.fdatasync(_kvikio(handle).fileno())

    def close(self, handle: IOHandle) -> None:
        if isinstance(handle, KvikioHandle) and handle.cufile is not None:
            f, handle.cufile = handle.cufile, None
            f.close()


def _kvikio(handle: IOHandle) -> Any:
    if not isinstance(handle, KvikioHandle):
        raise TypeError(f"not a kvikio handle: {handle!r}")
    if handle.cufile is None:
        raise Internal(f"I/O on a closed file: {handle.path}")
    return handle.cufile


def select_backend(name: str = "auto", direct: bool = True) -> IOBackend:
    """Backend by name: "auto" (kvikio where CUDA and kvikio work, else posix), "posix", "kvikio"."""
    if name == "auto":
        return KvikioBackend() if kvikio_available() else PosixBackend(direct=direct)
    if name == "posix":
        return PosixBackend(direct=direct)
    if name == "kvikio":
        return KvikioBackend()  # raises ValueError naming the reason when unavailable
    raise ValueError(f"unknown I/O backend {name!r}: expected 'auto', 'posix' or 'kvikio'")
