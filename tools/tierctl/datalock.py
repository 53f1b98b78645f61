"""Is a tierd daemon using this data dir? A lock file, open-file scan and socket probe.

Primitives: `DataDirLock(data_dir)` (context manager; raises `DataDirBusy`),
`processes_using(paths) -> list[str]`, `socket_answers(path) -> bool`,
`ensure_offline(data_dir, files, sockets)` (all three, holding the lock on success).

The lock is the one the daemon holds for its life (`tierd.filelock.lock_data_dir`), so
a daemon of this data dir is caught by the lock alone; the scan and the probe catch what
the lock cannot: a daemon of another data dir sharing the NVMe file or the socket.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Self

import psutil

from tierd.filelock import DATA_DIR_LOCK, FileLocked, lock_file


class DataDirBusy(Exception):
    """Something else (a daemon, another fsck) is using the data dir."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / DATA_DIR_LOCK
        self._fd = -1
        self.held = False

    def acquire(self) -> None:
        if self.held:
            return  # flock conflicts between two descriptors of one process: take it once
        try:
            try:
                fd = lock_file(self.path)
            except PermissionError:
                # A read-only look by someone who cannot create it: use it if it exists.
                try:
                    fd = lock_file(self.path, os.O_RDONLY)
                except FileNotFoundError:
                    self.held = True  # nothing to lock: nobody who honours the lock holds it
                    return
        except FileLocked:
            raise DataDirBusy(f"{self.path} is locked: a tierd daemon (or another "
                              "tierctl) is using this data dir") from None  # fmt: skip
        self._fd = fd
        self.held = True

    def release(self) -> None:
        self.held = False
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)  # closing the last descriptor drops the flock

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def processes_using(paths: list[Path]) -> list[str]:
    """'pid (name)' of every process we may inspect that has one of `paths` open."""
    wanted = {os.path.realpath(p) for p in paths if p.exists()}
    if not wanted:
        return []
    found: list[str] = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if any(f.path in wanted for f in proc.open_files()):
                # The command line tells "python -m tierd serve" from any other python.
                cmd = " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])
                found.append(f"{proc.info['pid']} ({cmd[:80]})")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # another user's process: only the lock or the socket can tell
    return found


def socket_answers(path: Path, timeout: float = 0.5) -> bool:
    """True if something accepts connections on this unix socket."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
        except OSError:
            return False  # a stale socket file of a crashed daemon
        return True


def ensure_offline(data_dir: Path, files: list[Path], sockets: list[Path]) -> DataDirLock:
    """The acquired lock, or DataDirBusy naming what is using the data dir."""
    lock = DataDirLock(data_dir)
    lock.acquire()
    try:
        if users := processes_using(files):
            raise DataDirBusy(f"{', '.join(users)} has {data_dir}'s files open: stop the "
                              "daemon first")  # fmt: skip
        for sock in sockets:
            if socket_answers(sock):
                raise DataDirBusy(f"a daemon answers on {sock}: stop it first")
    except BaseException:
        lock.release()
        raise
    return lock
