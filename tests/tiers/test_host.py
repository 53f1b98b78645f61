"""Host arena: every extent is backed when it is allocated, so a full /dev/shm fails an
allocation cleanly instead of killing the daemon with SIGBUS when the page is touched."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierd.tiers.host import HostArena


@pytest.fixture
def small_shm() -> Iterator[Path]:
    """A 1 MiB tmpfs standing in for /dev/shm (needs root, as CI has)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    with tempfile.TemporaryDirectory(prefix="tshm-") as d:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d],
                                 capture_output=True, text=True, check=False)  # fmt: skip
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        try:
            yield Path(d)
        finally:
            subprocess.run(["umount", d], check=False)


def test_full_shared_memory_fails_the_allocation_not_the_process(small_shm: Path) -> None:
    arena = HostArena(16 << 20, "t", shm_dir=small_shm)  # budget far above what fits
    try:
        got = []
        while (off := arena.allocate("a", 64 << 10)) is not None:
            arena.view("a", off, 64 << 10)[:] = b"\x01" * (64 << 10)  # would SIGBUS unbacked
            got.append(off)
            assert len(got) <= 16, "the filesystem holds at most 1 MiB"
        assert 8 <= len(got) <= 16
        arena.free("a", got.pop(), 64 << 10)
        assert arena.allocate("a", 64 << 10) is not None  # room again after a free
    finally:
        arena.destroy()
