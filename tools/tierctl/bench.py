"""Measured bandwidths: a directory's disk with O_DIRECT, host memory, GPU memory.

Primitives: `measure_disk(directory, size_bytes) -> DiskBench`, `measure_memory() -> float`,
`measure_gpu(index) -> float | None` (bytes per second).

The disk is measured through tierd's own NVMe store (`NvmeStore` on `PosixBackend`): the
same O_DIRECT path, chunking and in-flight depth as the daemon's NVMe tier, so the figure
is what that tier can reach there. The temporary file is preallocated before timing
(allocation is not bandwidth), filled with random bytes (a compressing filesystem would
flatter zeros), and removed afterwards.
"""

from __future__ import annotations

import mmap
import shutil
import tempfile
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tierctl.errors import UsageError
from tierctl.progress import Progress

CHUNK_BYTES = 1 << 20  # per request, as the daemon's default nvme.chunk_bytes
IO_THREADS = 8  # requests in flight, as the daemon's default nvme.io_threads
_BUFFER_BYTES = 16 << 20  # one source/destination buffer, reused for every request


@dataclass(frozen=True)
class DiskBench:
    directory: str
    size_bytes: int
    write_bps: float
    read_bps: float
    direct: bool  # False: the filesystem refused O_DIRECT; figures include the page cache


def measure_disk(directory: Path, size_bytes: int) -> DiskBench:
    from tierd.tiers.io_backend import ALIGNMENT, PosixBackend
    from tierd.tiers.nvme import NvmeStore

    size = max(size_bytes // _BUFFER_BYTES, 1) * _BUFFER_BYTES
    if not directory.is_dir():
        raise UsageError(f"bench directory {directory} does not exist")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".tierctl-bench-", dir=directory))
    except OSError as e:
        raise UsageError(f"cannot write a bench file in {directory}: {e.strerror}") from None
    buf = mmap.mmap(-1, _BUFFER_BYTES)  # anonymous mmaps are page-aligned: no bounce copy
    view = memoryview(buf)
    np.frombuffer(buf, dtype=np.uint8)[:] = np.random.default_rng(0).integers(
        0, 256, _BUFFER_BYTES, dtype=np.uint8
    )
    try:
        backend = PosixBackend(direct=True)
        try:
            store = NvmeStore(tmp, size, backend=backend, io_threads=IO_THREADS,
                              chunk_bytes=CHUNK_BYTES)  # fmt: skip
        except OSError as e:
            raise UsageError(f"cannot create a {size >> 20} MiB bench file in {directory}: "
                             f"{e.strerror}") from None  # fmt: skip
        with store, Progress(f"disk {directory}", 2 * size) as bar:
            assert size % ALIGNMENT == 0
            write_s = _timed_pass(store, size, view, bar, write=True)
            store.sync()  # the write figure should not hide data still in a volatile cache
            read_s = _timed_pass(store, size, view, bar, write=False)
            direct = store.direct
    finally:
        view.release()
        buf.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return DiskBench(str(directory), size, size / write_s, size / read_s, direct)


def _timed_pass(store: object, size: int, buf: memoryview, bar: Progress, *, write: bool) -> float:
    """Whole file in buffer-sized requests, two in flight (each splits into CHUNK_BYTES
    pieces on the store's pool, so the disk sees IO_THREADS requests at once)."""
    from tierd.tiers.nvme import NvmeStore

    assert isinstance(store, NvmeStore)
    start = time.perf_counter()
    pending: list[Future[None]] = []
    for off in range(0, size, _BUFFER_BYTES):
        op = store.write_async if write else store.read_async
        # Reads all land in the one buffer: the bytes are not looked at, only timed.
        pending.append(op(off, buf))
        if len(pending) >= 2:
            pending.pop(0).result()
            bar.advance(_BUFFER_BYTES)
    for fut in pending:
        fut.result()
        bar.advance(_BUFFER_BYTES)
    return max(time.perf_counter() - start, 1e-9)


def measure_memory(size_bytes: int = 256 << 20, min_seconds: float = 0.3) -> float:
    """Large-buffer copy rate (bytes copied per second). CPU decode attention over KV in
    host memory runs at about this rate (DESIGN.md: batched matmul ~13.9 GB/s next to
    memcpy's 13-15 GB/s on the development machine), so it stands in for attend's."""
    src = np.ones(size_bytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    copied, start = 0, time.perf_counter()
    while True:
        np.copyto(dst, src)
        copied += size_bytes
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return copied / elapsed


def measure_gpu(index: int, size_bytes: int = 512 << 20) -> float | None:
    """HBM bandwidth from a device-to-device copy, counting read plus write traffic: decode
    attention is a pure read of the KV and reaches about that on current GPUs."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        dev = torch.device("cuda", index)
        src = torch.empty(size_bytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        dst.copy_(src)
        torch.cuda.synchronize(dev)
        reps = 10
        start = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - start
        del src, dst
        torch.cuda.empty_cache()
        return 2 * reps * size_bytes / elapsed
    except Exception:  # noqa: BLE001 - a probe: no figure rather than a crash
        return None
