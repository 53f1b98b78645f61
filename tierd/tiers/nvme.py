"""NVMe tier, data half: one preallocated file, extents in it, bytes in and out.

The index (which key lives at which offset) is kept elsewhere; this store only manages
space and moves bytes. Primitives:

  space:  `can_allocate(n)` -> `allocate(n) -> offset | None` -> `free(offset, n)`;
          `reserve(offset, n)` re-marks a known extent when rebuilding after a restart
  bytes:  `write(offset, src)`, `read_into(offset, dst)` (blocking);
          `write_async`, `read_async` -> concurrent.futures.Future[None] (kvikio habit)
  life:   `close()` (also a context manager); `sync()` for power-loss durability
  facts:  `capacity`, `used_bytes`, `backend_name`, `direct`

A block of n bytes takes a 4096-aligned extent of align_up(n, 4096) bytes. Its length
need not be a multiple of 4096: the last partial page goes through a small aligned
bounce buffer (zero-padded on write), so direct I/O still works and `dst` receives
exactly len(dst) bytes. Buffers larger than `chunk_bytes` are split into chunks run in
parallel on the store's thread pool, because the disk only reaches its bandwidth with
several requests in flight. A write that has returned survives a crash of the daemon
(the kernel holds it); `sync()` is for power loss.

Thread safety: space bookkeeping is under a lock; reads and writes of distinct extents
run concurrently. Reading and writing one extent at once is the caller's race.
"""

from __future__ import annotations

import mmap
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

from tierd.tiers.extents import ExtentAllocator, align_up
from tierd.tiers.io_backend import ALIGNMENT, IOBackend, IOHandle, as_bytes_view

DATA_FILE = "blocks.dat"

# A piece of one request: (offset into the caller's buffer, length, is the partial tail).
_Piece = tuple[int, int, bool]


class _TailBounce(threading.local):
    """One aligned page per thread for the partial last page of a block."""

    def get(self) -> memoryview:
        view: memoryview | None = getattr(self, "view", None)
        if view is None:
            self.mm = mmap.mmap(-1, ALIGNMENT)
            self.view = view = memoryview(self.mm)
        return view


class NvmeStore:
    def __init__(
        self,
        directory: Path | str,
        capacity_bytes: int,
        *,
        backend: IOBackend,
        io_threads: int = 8,
        chunk_bytes: int = 1 << 20,
    ) -> None:
        capacity = capacity_bytes // ALIGNMENT * ALIGNMENT
        if capacity <= 0:
            raise ValueError(f"capacity_bytes must be at least {ALIGNMENT}, got {capacity_bytes}")
        if io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {io_threads}")
        if chunk_bytes < ALIGNMENT:
            raise ValueError(f"chunk_bytes must be at least {ALIGNMENT}, got {chunk_bytes}")
        self.directory = Path(directory)
        if not self.directory.exists():
            self.directory.mkdir(mode=0o700, parents=True)
            # mkdir's mode is filtered by the umask; KV of other tenants is in here.
            os.chmod(self.directory, 0o700)
        self._backend = backend
        self._chunk = chunk_bytes // ALIGNMENT * ALIGNMENT
        self._handle: IOHandle = backend.open(self.directory / DATA_FILE, capacity)
        self._alloc = ExtentAllocator(capacity, ALIGNMENT)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="tierd-nvme")
        self._tail = _TailBounce()
        self._closed = False

    # -- facts ------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def used_bytes(self) -> int:
        return self._alloc.used_bytes

    @property
    def backend_name(self) -> str:
        return self._backend.name

    @property
    def direct(self) -> bool:
        return self._handle.direct

    @property
    def path(self) -> Path:
        return self._handle.path

    def extent_bytes(self, nbytes: int) -> int:
        return self._alloc.extent_bytes(nbytes)

    # -- space ------------------------------------------------------------------------------

    def can_allocate(self, nbytes: int) -> bool:
        with self._lock:
            return self._alloc.can_allocate(nbytes)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a fresh extent for `nbytes`, or None when the file is full."""
        with self._lock:
            return self._alloc.allocate(nbytes)

    def reserve(self, offset: int, nbytes: int) -> None:
        with self._lock:
            self._alloc.reserve(offset, nbytes)

    def free(self, offset: int, nbytes: int) -> None:
        with self._lock:
            self._alloc.free(offset, nbytes)

    # -- bytes ------------------------------------------------------------------------------

    def write(self, offset: int, src: Any) -> None:
        src = as_bytes_view(src)
        pieces = self._plan(offset, len(src))
        if len(pieces) == 1:
            # One piece: a hop through the pool would only add latency.
            self._write_piece(offset, src, pieces[0])
            return
        self._submit(pieces, lambda p: self._write_piece(offset, src, p)).result()

    def read_into(self, offset: int, dst: Any) -> None:
        dst = self._writable(dst)
        pieces = self._plan(offset, len(dst))
        if len(pieces) == 1:
            self._read_piece(offset, dst, pieces[0])
            return
        self._submit(pieces, lambda p: self._read_piece(offset, dst, p)).result()

    def write_async(self, offset: int, src: Any) -> Future[None]:
        """Start writing; `src` must stay unchanged until the future is done."""
        src = as_bytes_view(src)
        pieces = self._plan(offset, len(src))
        return self._submit(pieces, lambda p: self._write_piece(offset, src, p))

    def read_async(self, offset: int, dst: Any) -> Future[None]:
        """Start reading; `dst` is complete when the future is done."""
        dst = self._writable(dst)
        pieces = self._plan(offset, len(dst))
        return self._submit(pieces, lambda p: self._read_piece(offset, dst, p))

    def sync(self) -> None:
        self._check_open()
        self._backend.sync(self._handle)

    # -- life -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Let I/O in flight finish before the file goes away under it.
        self._pool.shutdown(wait=True)
        self._backend.close(self._handle)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("NvmeStore is closed")

    @staticmethod
    def _writable(dst: Any) -> memoryview:
        view = as_bytes_view(dst)
        if view.readonly:
            raise ValueError("read destination must be a writable buffer")
        return view

    def _plan(self, offset: int, length: int) -> list[_Piece]:
        """Split [0, length) into aligned chunks plus an optional partial last page."""
        self._check_open()
        if offset < 0 or offset % ALIGNMENT:
            raise ValueError(f"offset must be a non-negative multiple of {ALIGNMENT}: {offset}")
        if offset + align_up(length, ALIGNMENT) > self.capacity:
            raise ValueError(
                f"extent [{offset}, +{length}) runs past the store's capacity {self.capacity}"
            )
        body = length // ALIGNMENT * ALIGNMENT
        pieces: list[_Piece] = [
            (start, min(self._chunk, body - start), False) for start in range(0, body, self._chunk)
        ]
        if length > body:
            pieces.append((body, length - body, True))
        return pieces

    def _write_piece(self, base: int, src: memoryview, piece: _Piece) -> None:
        start, n, tail = piece
        if not tail:
            self._backend.pwrite(self._handle, src[start : start + n], base + start)
            return
        page = self._tail.get()
        page[:n] = src[start : start + n]
        # Zero the padding so stale bytes of a previous owner never reach the disk here.
        page[n:] = bytes(ALIGNMENT - n)
        self._backend.pwrite(self._handle, page, base + start)

    def _read_piece(self, base: int, dst: memoryview, piece: _Piece) -> None:
        start, n, tail = piece
        if not tail:
            self._backend.pread(self._handle, dst[start : start + n], base + start)
            return
        page = self._tail.get()
        self._backend.pread(self._handle, page, base + start)
        dst[start : start + n] = page[:n]

    def _submit(self, pieces: list[_Piece], run: Callable[[_Piece], None]) -> Future[None]:
        """Run every piece on the pool; one future that completes when all have."""
        out: Future[None] = Future()
        # Running means cancel() is refused: pieces already queued could not be recalled.
        out.set_running_or_notify_cancel()
        if not pieces:
            out.set_result(None)
            return out
        state_lock = threading.Lock()
        remaining = [len(pieces)]
        errors: list[BaseException] = []

        def finished(f: Future[None]) -> None:
            exc = f.exception()
            with state_lock:
                if exc is not None:
                    errors.append(exc)
                remaining[0] -= 1
                last = remaining[0] == 0
            # Complete only when every piece is done, so no I/O still touches the
            # caller's buffer after it has been told the request failed.
            if last:
                if errors:
                    out.set_exception(errors[0])
                else:
                    out.set_result(None)

        for piece in pieces:
            try:
                fut = self._pool.submit(run, piece)
            except RuntimeError as exc:  # pool shut down by a concurrent close()
                fut = Future()
                fut.set_exception(exc)
            fut.add_done_callback(finished)
        return out
