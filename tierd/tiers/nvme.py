"""NVMe tier, data half: one preallocated file, extents in it, bytes in and out.

The index (which key lives at which offset) is kept elsewhere; this store only manages
space and moves bytes. Primitives:

  space:  `can_allocate(n)` -> `allocate(n) -> offset | None` -> `free(offset, n)`;
          `reserve(offset, n)` re-marks a known extent when rebuilding after a restart,
          then `finish_recovery()`
  bytes:  `write(offset, src, header=None)`, `read_into(offset, dst)` (blocking);
          `write_async`, `read_async` -> concurrent.futures.Future[None] (kvikio habit)
  headers (stores opened with headers=True): `write_header(offset, header)`,
          `read_header(offset)`, `scan_headers()`, `zero_header(offset)`, `reset_legacy()`
  life:   `close()` (also a context manager); `sync()` for power loss durability
  facts:  `capacity`, `used_bytes`, `backend_name`, `direct`, `headers`

A block of n bytes takes a 4096-aligned extent of align_up(n, 4096) bytes. Its length
need not be a multiple of 4096: the last partial page goes through a small aligned
bounce buffer (zero-padded on write), so direct I/O still works and `dst` receives
exactly len(dst) bytes. Buffers larger than `chunk_bytes` are split into chunks run in
parallel on the store's thread pool, because the disk only reaches its bandwidth with
several requests in flight. A write that has returned survives a crash of the daemon
(the kernel holds it); `sync()` is for power loss.

One process at a time: the data file is flock'ed for the store's life (`StoreInUse`
otherwise), since two daemons sharing it would hand out the same extents.

With headers=True (the daemon's tier) every extent starts with one header page
(`tierd.tiers.block_header`) describing the block, so the catalog can be rebuilt from the
file. Offsets stay those of the data (header at offset - 4096); `free` zeroes the header
before the space can be handed out again, so a freed block never comes back. The header's
MAC key is `blocks.key` beside the data file. A data file written before headers existed
(no key file) is adopted as is: the extents reserved while recovering it are "legacy"
(no header page), remembered in `blocks.legacy` until freed; they stay readable but a
rebuild cannot find them.

Thread safety: space bookkeeping is under a lock; reads and writes of distinct extents
run concurrently. Reading and writing one extent at once is the caller's race.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self

from tierd.errors import ExtentError, Internal
from tierd.tiers.block_header import (
    HEADER_BYTES,
    MAGIC,
    BlockHeader,
    ScannedBlock,
    decode,
    encode,
)
from tierd.tiers.checksum import checksum
from tierd.tiers.extents import ExtentAllocator, align_up
from tierd.tiers.io_backend import ALIGNMENT, IOBackend, IOHandle, as_bytes_view
from tierd.tiers.nvme_files import (
    DATA_FILE,
    KEY_FILE,
    LEGACY_FILE,
    StoreInUse,
    append_legacy,
    create_mac_key,
    load_mac_key,
    lock_data_file,
    read_legacy,
    write_legacy,
)

__all__ = ["DATA_FILE", "NvmeStore", "ScannedBlock", "StoreInUse"]
# How long allocate() waits for a freed extent's header to be zeroed before giving up.
_ZERO_WAIT_SECONDS = 5.0
_SCAN_CHUNK = 8 << 20

log = logging.getLogger("tierd.nvme")

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
        headers: bool = False,
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
        data_path = self.directory / DATA_FILE
        self._hdr = HEADER_BYTES if headers else 0
        self._mac_key: bytes | None = None
        self._upgrading = False  # a file of the previous format: what recovery finds is legacy
        self._legacy_known: set[int] = set()  # legacy offsets on record, until recovered
        self._legacy: set[int] = set()  # legacy extents reserved now
        existed = data_path.exists()
        self._lock_fd = lock_data_file(data_path)  # first: the key files are ours to write
        try:
            if headers:
                self._mac_key = load_mac_key(self.directory / KEY_FILE)
                if self._mac_key is None and existed:
                    self._upgrading = True
                elif self._mac_key is None:
                    # Before the first header is written, so every header's key is on disk.
                    self._mac_key = create_mac_key(self.directory / KEY_FILE)
                else:
                    self._legacy_known = read_legacy(self.directory / LEGACY_FILE)
            self._handle: IOHandle = backend.open(data_path, capacity)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._alloc = ExtentAllocator(capacity, ALIGNMENT)
        self._lock = threading.Lock()
        self._zeroed = threading.Condition(self._lock)
        self._zeroing: set[int] = set()  # header pages of freed extents not yet zeroed
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="tierd-nvme")
        # Header zeroing has its own thread: an allocation may wait for it, and must not
        # queue behind megabytes of block I/O.
        self._hdr_pool = ThreadPoolExecutor(1, thread_name_prefix="tierd-nvme-hdr")
        self._tail = _TailBounce()
        self._page = _TailBounce()  # header pages, apart from the tail bounce in use
        self._zero_page = mmap.mmap(-1, ALIGNMENT)
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

    @property
    def headers(self) -> bool:
        return self._hdr > 0

    def extent_bytes(self, nbytes: int) -> int:
        return self._alloc.extent_bytes(nbytes + self._hdr)

    # -- space ------------------------------------------------------------------------------

    def can_allocate(self, nbytes: int) -> bool:
        with self._lock:
            return self._alloc.can_allocate(nbytes + self._hdr)

    def allocate(self, nbytes: int) -> int | None:
        """Offset of a fresh extent for `nbytes`, or None when the file is full."""
        with self._lock:
            if self._upgrading:
                self._finish_recovery_locked()
            start = self._alloc.allocate(nbytes + self._hdr)
            if start is None:
                return None
            self._wait_zeroed(start, self._alloc.extent_bytes(nbytes + self._hdr))
            return start + self._hdr

    def reserve(self, offset: int, nbytes: int) -> None:
        with self._lock:
            if self._hdr and (self._upgrading or offset in self._legacy_known):
                self._alloc.reserve(offset, nbytes)
                self._legacy.add(offset)
            else:
                self._alloc.reserve(offset - self._hdr, nbytes + self._hdr)

    def finish_recovery(self) -> None:
        """Every known extent is reserved: record which are legacy (headerless) ones."""
        with self._lock:
            self._finish_recovery_locked()

    def free(self, offset: int, nbytes: int) -> None:
        with self._lock:
            if offset in self._legacy:
                self._alloc.free(offset, nbytes)
                self._legacy.discard(offset)
                append_legacy(self.directory / LEGACY_FILE, f"-{offset}")
                return
            self._alloc.free(offset - self._hdr, nbytes + self._hdr)
            if not self._hdr:
                return
            page = offset - self._hdr
            self._zeroing.add(page)
        fut: Future[Any]
        try:
            fut = self._hdr_pool.submit(self._backend.pwrite, self._handle,
                                        memoryview(self._zero_page), page)  # fmt: skip
        except RuntimeError:  # closed under us: nothing will reuse the space now
            fut = Future()
            fut.set_result(None)
        fut.add_done_callback(lambda f: self._zeroed_page(page, f))

    def reset_legacy(self) -> None:
        """Forget every legacy extent (a rebuilt catalog names none of them)."""
        with self._lock:
            self._legacy_known.clear()
            self._upgrading = False
            if self._hdr:
                write_legacy(self.directory / LEGACY_FILE, self._legacy)

    # -- bytes ------------------------------------------------------------------------------

    def write(self, offset: int, src: Any, header: BlockHeader | None = None) -> None:
        """Write a block; with `header`, also the header page in front of it."""
        src = as_bytes_view(src)
        pieces = self._plan(offset, len(src))
        if header is not None:
            self.write_header(offset, header)
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

    def write_async(self, offset: int, src: Any, header: BlockHeader | None = None) -> Future[None]:
        """Start writing; `src` must stay unchanged until the future is done."""
        src = as_bytes_view(src)
        pieces: list[_Piece | None] = list(self._plan(offset, len(src)))
        if header is not None:
            self._check_headed(offset)
            pieces.append(None)  # the header page, in the same request

        def run(p: _Piece | None) -> None:
            if p is None:
                assert header is not None
                self.write_header(offset, header)
            else:
                self._write_piece(offset, src, p)

        return self._submit(pieces, run)

    def read_async(self, offset: int, dst: Any) -> Future[None]:
        """Start reading; `dst` is complete when the future is done."""
        dst = self._writable(dst)
        pieces = self._plan(offset, len(dst))
        return self._submit(pieces, lambda p: self._read_piece(offset, dst, p))

    def sync(self) -> None:
        self._check_open()
        self._backend.sync(self._handle)

    # -- headers ----------------------------------------------------------------------------

    def write_header(self, offset: int, header: BlockHeader) -> None:
        """Describe the block whose data is at `offset` (blocking; one page)."""
        self._check_headed(offset)
        assert self._mac_key is not None
        page = self._page.get()
        page[:] = encode(header, self._mac_key)
        self._backend.pwrite(self._handle, page, offset - self._hdr)

    def read_header(self, offset: int) -> BlockHeader | None:
        """The header of the block at `offset`, None if there is no valid one."""
        self._check_headed(offset)
        if self._mac_key is None:
            return None
        page = self._page.get()
        self._backend.pread(self._handle, page, offset - self._hdr)
        return decode(page, self._mac_key)

    def zero_header(self, offset: int) -> None:
        """Invalidate the header of a block not in use (a rebuild's stale duplicates)."""
        self._check_headed(offset)
        self._backend.pwrite(self._handle, memoryview(self._zero_page), offset - self._hdr)

    def scan_headers(self) -> Iterator[ScannedBlock]:
        """Every block with a valid header, in file order, its data checked.

        The data of an intact block is skipped (a tenant's bytes are never parsed as
        headers); after a header whose data does not match, the scan goes on page by page.
        Reads the whole file once, in `_SCAN_CHUNK` pieces. Nothing without a MAC key
        (a file of the previous format) has headers to find.
        """
        self._check_open()
        key = None if self._upgrading else self._mac_key
        if not self._hdr or key is None:
            return
        # Page-aligned for O_DIRECT; left to the collector, as slices of it are handed out.
        chunk = mmap.mmap(-1, _SCAN_CHUNK)
        view = memoryview(chunk)
        pos = 0
        while pos + self._hdr <= self.capacity:
            n = min(_SCAN_CHUNK, self.capacity - pos)
            self.read_into(pos, view[:n])
            i, nxt = 0, pos + n
            while i + self._hdr <= n:
                found = chunk.find(MAGIC, i, n)  # free space is zeroes: one search skips it
                if found < 0:
                    break
                if found % self._hdr:
                    i = align_up(found, self._hdr)
                    continue
                i = found
                header = decode(view[i : i + self._hdr], key)
                if header is None or header.nbytes <= 0:
                    i += self._hdr
                    continue
                data_off = pos + i + self._hdr
                end = data_off + align_up(header.nbytes, ALIGNMENT)
                intact = end <= self.capacity and self._data_matches(
                    view, pos, n, data_off, header)  # fmt: skip
                yield ScannedBlock(data_off, header, intact)
                if not intact:
                    i += self._hdr
                elif end <= pos + n:
                    i = end - pos
                else:
                    nxt = end
                    break
            pos = nxt

    # -- life -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Let I/O in flight finish before the file goes away under it.
        self._hdr_pool.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        self._backend.close(self._handle)
        os.close(self._lock_fd)  # the next process may have the file now

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise Internal("NvmeStore is closed")

    def _check_headed(self, offset: int) -> None:
        if not self._hdr:
            raise Internal("this store was opened without block headers")
        if offset < self._hdr or offset in self._legacy:
            raise ExtentError(f"no header page in front of offset {offset}")

    def _finish_recovery_locked(self) -> None:
        if not self._hdr:
            return
        write_legacy(self.directory / LEGACY_FILE, self._legacy)
        if self._upgrading:
            # Last: until the key is on disk, a restart treats the file as legacy again.
            self._mac_key = create_mac_key(self.directory / KEY_FILE)
            self._upgrading = False
        self._legacy_known = set()

    def _wait_zeroed(self, start: int, size: int) -> None:
        """Caller holds the lock: wait until no freed header in [start, start+size) is
        still to be zeroed, or that zero would land on the new owner's bytes."""
        deadline = time.monotonic() + _ZERO_WAIT_SECONDS

        def clear() -> bool:
            if size // ALIGNMENT < len(self._zeroing):
                return not any(p in self._zeroing for p in range(start, start + size, ALIGNMENT))
            return not any(start <= p < start + size for p in self._zeroing)

        while not clear():
            if not self._zeroed.wait(deadline - time.monotonic()):
                # The zeroing write is stuck: its page would be overwritten by ours later.
                raise OSError(errno.EIO, f"zeroing a freed header at {start} does not finish")

    def _zeroed_page(self, page: int, fut: Future[Any]) -> None:
        if fut.exception() is not None:
            log.error("zeroing the header of a freed block failed: %s", fut.exception())
        with self._lock:
            self._zeroing.discard(page)
            self._zeroed.notify_all()

    def _data_matches(self, view: memoryview, pos: int, n: int, data_off: int,
                      header: BlockHeader) -> bool:  # fmt: skip
        """Whether the block's bytes match its header (from the scan chunk if there)."""
        start = data_off - pos
        if start + header.nbytes <= n:
            return checksum(view[start : start + header.nbytes]) == header.checksum
        data = memoryview(mmap.mmap(-1, align_up(header.nbytes, ALIGNMENT)))[: header.nbytes]
        try:
            self.read_into(data_off, data)
        except OSError:
            return False
        return checksum(data) == header.checksum

    @staticmethod
    def _writable(dst: Any) -> memoryview:
        view = as_bytes_view(dst)
        if view.readonly:
            raise Internal("read destination must be a writable buffer")
        return view

    def _plan(self, offset: int, length: int) -> list[_Piece]:
        """Split [0, length) into aligned chunks plus an optional partial last page."""
        self._check_open()
        if offset < 0 or offset % ALIGNMENT:
            raise ExtentError(f"offset must be a non-negative multiple of {ALIGNMENT}: {offset}")
        if offset + align_up(length, ALIGNMENT) > self.capacity:
            raise ExtentError(
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

    def _submit(self, pieces: list[Any], run: Callable[[Any], None]) -> Future[None]:
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
