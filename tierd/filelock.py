"""Exclusive file locks: one process per data dir, per NVMe data file, per CSD shard.

Primitives: `lock_file(path, flags) -> fd` (raises `FileLocked`),
`lock_data_dir(data_dir) -> IO[bytes]` (the daemon's, a `ConfigError` when taken),
`DATA_DIR_LOCK` (the lock file's name, also taken by `tierctl`).

flock(LOCK_EX | LOCK_NB) on a descriptor the holder keeps open for its life. The kernel
drops the lock when the holder dies, kill -9 included, so a crash never leaves a stale
lock behind. Two descriptors of one process conflict too: a process takes each lock once.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import IO

from tierd.errors import ConfigError

DATA_DIR_LOCK = "tierd.lock"


class FileLocked(Exception):
    """Another process holds the lock on `path`."""

    def __init__(self, path: Path, why: str = "is locked by another process") -> None:
        super().__init__(f"{path} {why}")
        self.path = path


def lock_file(path: Path, flags: int = os.O_RDWR | os.O_CREAT, mode: int = 0o600) -> int:
    """A descriptor of `path` holding its exclusive lock; closing it releases the lock.
    Errors opening the file are the OS's."""
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise FileLocked(path) from None
        raise
    return fd


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """One daemon per data dir: two would hand out the same extents. `tierctl fsck` takes
    the same lock, so it never checks a catalog a daemon is writing."""
    path = data_dir / DATA_DIR_LOCK
    try:
        # Readable by others: a tierctl run by another user may take it read-only.
        fd = lock_file(path, mode=0o644)
    except FileLocked:
        raise ConfigError("data_dir", f"{data_dir} is in use by another tierd process") from None
    except OSError as e:
        raise ConfigError("data_dir", f"cannot open {path}: {e.strerror or e}") from None
    return os.fdopen(fd, "rb", buffering=0)
