"""Small file and buffer helpers of a CSD shard.

Primitives: `aligned_buffer(n)`, `wait_all(futures)`, `lock_directory(dir) -> fd`.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from tierd.errors import FailedPrecondition
from tierd.filelock import FileLocked, lock_file
from tierd.tiers.io_backend import ALIGNMENT


def aligned_buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 array, so O_DIRECT reads land in it without a bounce copy."""
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    return raw[start : start + nbytes]


def wait_all(futures: Sequence[Future[None]]) -> None:
    """Wait for every future, then raise the first error: no I/O outlives the call."""
    first: BaseException | None = None
    for f in futures:
        exc = f.exception()
        if exc is not None and first is None:
            first = exc
    if first is not None:
        raise first


def lock_directory(directory: Path, name: str = "shard.lock") -> int:
    """An exclusive lock on the shard: two workers on one directory would corrupt it. A
    killed worker's lock goes with it, so its restart gets the lock at once."""
    try:
        return lock_file(directory / name)
    except FileLocked:
        raise FailedPrecondition(
            f"csd shard {directory} is in use by another process", field="dir"
        ) from None
