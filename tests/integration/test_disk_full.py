"""A small filesystem under the NVMe tier: a start that cannot reserve its space is refused
with the key to change; a full tier answers RESOURCE_EXHAUSTED while host keeps serving."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierd.tiers.host import segments_of
from tierd_client import KVLayout, ResourceExhausted, TierdClient

LAYOUT = KVLayout(4, 2, 64, "float16", 64)  # 128 KiB blocks
BB = LAYOUT.block_bytes


@pytest.fixture
def small_fs() -> Iterator[Path]:
    """An 8 MiB tmpfs, mounted for this test (needs root, as CI has)."""
    with tempfile.TemporaryDirectory(prefix="tdf-") as d:
        mnt = Path(d) / "nvme"
        mnt.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a small filesystem needs root")
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
                                 capture_output=True, text=True, check=False)  # fmt: skip
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        try:
            yield mnt
        finally:
            subprocess.run(["umount", str(mnt)], check=False)


def serve_cmd(base: Path, nvme: Path, nvme_capacity: str) -> list[str]:
    return [sys.executable, "-m", "tierd", "serve", "--listen", f"unix:{base}/s.sock",
            "--data-dir", str(base / "data"), "--nvme-path", str(nvme),
            "--host-capacity", "2MiB", "--nvme-capacity", nvme_capacity]  # fmt: skip


def catalog_on_small_fs_cmd(base: Path, data: Path) -> list[str]:
    """A daemon whose data dir (its catalog) is on the small filesystem, NVMe elsewhere."""
    return [sys.executable, "-m", "tierd", "serve", "--listen", f"unix:{base}/s.sock",
            "--data-dir", str(data), "--nvme-path", str(base / "nvme-elsewhere"),
            "--host-capacity", "64MiB", "--nvme-capacity", "16MiB"]  # fmt: skip


def fill(small_fs: Path) -> Path:
    """Fill the small filesystem to the brim with a ballast file; returns it."""
    ballast = small_fs / "ballast"
    with open(ballast, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return ballast


def test_start_refused_when_the_disk_cannot_hold_the_tier(small_fs: Path) -> None:
    base = small_fs.parent
    run = subprocess.run(serve_cmd(base, small_fs, "64MiB"), capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert run.returncode == 2
    assert "nvme.capacity" in run.stderr and "No space left" in run.stderr


def test_full_nvme_tier_is_resource_exhausted_and_host_keeps_serving(small_fs: Path) -> None:
    base = small_fs.parent
    proc = subprocess.Popen(serve_cmd(base, small_fs, "6MiB"), stderr=subprocess.PIPE, text=True)
    try:
        with TierdClient(f"unix:{base}/s.sock", timeout=60) as c:
            ns = c.open_namespace("m", LAYOUT)
            rng = np.random.default_rng(0)
            stored: dict[bytes, np.ndarray] = {}
            refused = 0
            for i in range(120):  # 15 MiB of pinned blocks against 2 MiB host + 6 MiB NVMe
                key = hashlib.blake2b(i.to_bytes(4, "little"), digest_size=16).digest()
                block = rng.standard_normal((1, *LAYOUT.block_shape)).astype(np.float16)
                try:
                    c.put(ns, [key], block)
                except ResourceExhausted:
                    refused += 1
                    continue
                c.pin(ns, [key])
                stored[key] = block[0]
            assert refused > 0, "a full tier must refuse, not overwrite"
            assert len(stored) * BB <= (2 + 6) * 2**20
            # Everything accepted is still there and still served; pinned blocks were never
            # dropped, and blocks in host are read while NVMe is full.
            tiers = c.stats()["tiers"]
            assert tiers["nvme"]["used_bytes"] <= tiers["nvme"]["capacity_bytes"]
            where = c.locate(ns, list(stored))
            assert None not in where  # pinned: never dropped
            host_keys = [k for k, t in zip(stored, where) if t == "host"]
            assert host_keys
            got = c.get(ns, host_keys)
            assert all(got.found)
            for k, row in zip(host_keys, got.blocks):
                assert np.array_equal(row, stored[k])
            # Room again once the operator unpins and deletes: puts succeed.
            victims = list(stored)[:8]
            c.unpin(ns, victims)
            c.delete(ns, victims)
            fresh = rng.standard_normal((1, *LAYOUT.block_shape)).astype(np.float16)
            assert c.put(ns, [b"f" * 16], fresh) == ["stored"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        for seg in segments_of(base / "data"):
            seg.unlink()
    assert proc.returncode == 0, err[-2000:]


def test_full_catalog_disk_refuses_puts_and_leaves_no_trace(small_fs: Path) -> None:
    """The catalog's disk fills up: puts answer RESOURCE_EXHAUSTED and none of their blocks
    becomes visible; with room again, puts succeed, and a restart finds every block that
    was acknowledged."""
    base = small_fs.parent
    data = small_fs / "data"
    cmd = catalog_on_small_fs_cmd(base, data)
    small = KVLayout(1, 1, 64, "float16", 16)  # 2 KiB blocks: many rows, little memory
    rng = np.random.default_rng(1)
    acked: dict[bytes, np.ndarray] = {}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        with TierdClient(f"unix:{base}/s.sock", timeout=60, max_retries=0) as c:
            ns = c.open_namespace("m", small)
            ballast = fill(small_fs)
            refused = []
            for i in range(2000):
                key = hashlib.blake2b(b"c" + i.to_bytes(4, "little"), digest_size=16).digest()
                block = rng.standard_normal((1, *small.block_shape)).astype(np.float16)
                try:
                    c.put(ns, [key], block)
                    acked[key] = block[0]
                except ResourceExhausted:
                    refused.append(key)
                    if len(refused) >= 5:
                        break
            assert refused, "a full catalog disk must refuse puts"
            assert c.locate(ns, refused) == [None] * len(refused)  # no visible trace
            assert not any(c.get(ns, refused).found)
            ballast.unlink()
            assert c.put(ns, [refused[0]], np.zeros((1, *small.block_shape), np.float16)) == [
                "stored"
            ]
            acked[refused[0]] = np.zeros(small.block_shape, np.float16)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        with TierdClient(f"unix:{base}/s.sock", timeout=60) as c:
            ns = c.open_namespace("m", small)
            got = c.get(ns, list(acked))
            assert all(got.found)
            for row, want in zip(got.blocks, acked.values()):
                assert np.array_equal(row, want)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
        for seg in segments_of(data):
            seg.unlink()


def test_move_answered_while_the_catalog_disk_is_full_is_on_record(small_fs: Path) -> None:
    """A move answers only once it is on record: with the catalog's disk full it is
    refused and the blocks stay where they were; with room again it succeeds, and a clean
    restart finds every block in the tier each answered move put it in."""
    base = small_fs.parent
    data = small_fs / "data"
    cmd = catalog_on_small_fs_cmd(base, data)
    small = KVLayout(1, 1, 64, "float16", 16)
    rng = np.random.default_rng(2)
    keys = [hashlib.blake2b(b"m" + bytes([i]), digest_size=16).digest() for i in range(8)]
    blocks = rng.standard_normal((len(keys), *small.block_shape)).astype(np.float16)
    moved: list[bytes] = []
    refused: list[bytes] = []
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        with TierdClient(f"unix:{base}/s.sock", timeout=60, max_retries=0) as c:
            ns = c.open_namespace("m", small)
            c.put(ns, keys, blocks)
            ballast = fill(small_fs)
            for key in keys[:4]:
                try:
                    if c.move(ns, [key], "nvme") == 1:
                        moved.append(key)
                except ResourceExhausted:
                    refused.append(key)
            assert refused, f"moves answered with nothing on record: {len(moved)}"
            assert c.locate(ns, refused) == ["host"] * len(refused)  # left where they were
            ballast.unlink()
            assert c.move(ns, keys[4:], "nvme") == 4
            moved += keys[4:]
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        with TierdClient(f"unix:{base}/s.sock", timeout=60) as c:
            ns = c.open_namespace("m", small)
            assert c.locate(ns, moved) == ["nvme"] * len(moved)
            got = c.get(ns, keys)
            assert all(got.found)
            for row, want in zip(got.blocks, blocks):
                assert np.array_equal(row, want)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
        for seg in segments_of(data):
            seg.unlink()
