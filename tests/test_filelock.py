"""One lock per data dir, NVMe file and CSD shard, taken the same way by the daemon, its CSD
workers and tierctl."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tierctl.datalock import DataDirBusy, DataDirLock
from tierd.csd.files import lock_directory
from tierd.errors import ConfigError, FailedPrecondition
from tierd.filelock import DATA_DIR_LOCK, FileLocked, lock_data_dir, lock_file
from tierd.tiers.nvme_files import StoreInUse, lock_data_file


def test_daemon_and_tierctl_take_one_lock(tmp_path: Path) -> None:
    held = lock_data_dir(tmp_path)
    try:
        with pytest.raises(DataDirBusy, match="is locked"):
            DataDirLock(tmp_path).acquire()
    finally:
        held.close()
    with DataDirLock(tmp_path):
        with pytest.raises(ConfigError, match="in use by another tierd process") as info:
            lock_data_dir(tmp_path)
        assert info.value.field == "data_dir"
    lock_data_dir(tmp_path).close()  # released by both


_PROBE = (
    "import sys; from pathlib import Path; from tierd.filelock import FileLocked, lock_file\n"
    "try:\n    lock_file(Path(sys.argv[1]))\nexcept FileLocked:\n    sys.exit(3)\n"
)


def _locked_for_another_process(path: Path) -> bool:
    return subprocess.run([sys.executable, "-c", _PROBE, str(path)], check=False).returncode == 3


def test_lock_is_held_against_other_processes_until_closed(tmp_path: Path) -> None:
    path = tmp_path / "x.lock"
    fd = lock_file(path)
    try:
        assert _locked_for_another_process(path)
    finally:
        os.close(fd)
    assert not _locked_for_another_process(path)
    assert path.stat().st_mode & 0o777 == 0o600


def test_each_holder_names_its_own_error(tmp_path: Path) -> None:
    fd = lock_data_file(tmp_path / "blocks.dat")
    try:
        with pytest.raises(StoreInUse) as info:
            lock_data_file(tmp_path / "blocks.dat")
        assert isinstance(info.value, FileLocked) and info.value.path == tmp_path / "blocks.dat"
    finally:
        os.close(fd)
    fd = lock_directory(tmp_path)
    try:
        with pytest.raises(FailedPrecondition, match="in use by another process"):
            lock_directory(tmp_path)
    finally:
        os.close(fd)


def test_data_dir_lock_file_is_readable_by_a_read_only_tierctl(tmp_path: Path) -> None:
    lock_data_dir(tmp_path).close()
    assert (tmp_path / DATA_DIR_LOCK).stat().st_mode & 0o044 == 0o044
