from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from tierd.errors import ExtentError, Internal
from tierd.tiers.block_header import BlockHeader, NamespaceMeta, encode
from tierd.tiers.checksum import checksum
from tierd.tiers.io_backend import ALIGNMENT, IOBackend, PosixBackend
from tierd.tiers.nvme import DATA_FILE, NvmeStore, StoreInUse

A = ALIGNMENT
MiB = 1 << 20
REPO = Path(__file__).resolve().parents[2]


def _random(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _store(directory: Path, capacity: int = 32 * MiB, **kw: object) -> NvmeStore:
    return NvmeStore(directory, capacity, backend=PosixBackend(), **kw)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NvmeStore]:
    s = _store(tmp_path / "nvme", chunk_bytes=256 * 1024)
    yield s
    s.close()


def test_layout_and_facts(tmp_path: Path) -> None:
    d = tmp_path / "a" / "nvme"
    with _store(d, capacity=10 * A + 5) as s:
        assert s.capacity == 10 * A
        assert (d / DATA_FILE).stat().st_size == 10 * A
        assert (d.stat().st_mode & 0o777) == 0o700
        assert s.backend_name == "posix"
        assert s.direct is True  # tmp_path is on ext4 here: O_DIRECT is exercised
        assert s.used_bytes == 0
    with pytest.raises(ValueError):
        _store(tmp_path / "tiny", capacity=A - 1)


# 1 byte; under a page; page + tail; aligned; several MiB with chunking and a tail.
LENGTHS = [1, 100, A - 1, A, A + 1, 3 * A + 17, 2 * MiB, 5 * MiB + 123]


@pytest.mark.parametrize("nbytes", LENGTHS)
@pytest.mark.parametrize("kind", ["bytes", "bytearray+1", "numpy"])
def test_round_trip(store: NvmeStore, nbytes: int, kind: str) -> None:
    data = _random(nbytes, seed=nbytes)
    off = store.allocate(nbytes)
    assert off is not None
    assert store.used_bytes == store.extent_bytes(nbytes)
    if kind == "bytes":
        src: object = data  # read-only and unaligned: the backend bounces it
        dst_owner = bytearray(nbytes)
        dst = memoryview(dst_owner)
    elif kind == "bytearray+1":
        src = memoryview(bytearray(b"x" + data))[1:]
        dst = memoryview(bytearray(nbytes + 1))[1:]
    else:
        src = np.frombuffer(data, dtype=np.uint8).copy()
        dst = np.zeros(nbytes, dtype=np.uint8).data
    store.write(off, src)
    store.read_into(off, dst)
    assert bytes(dst) == data
    store.free(off, nbytes)
    assert store.used_bytes == 0


def test_read_writes_exactly_len_dst(store: NvmeStore) -> None:
    off = store.allocate(A + 10)
    assert off is not None
    store.write(off, _random(A + 10, seed=1))
    buf = bytearray(b"\xee" * (A + 30))
    store.read_into(off, memoryview(buf)[10 : A + 20])
    assert buf[:10] == b"\xee" * 10 and buf[A + 20 :] == b"\xee" * 10
    assert bytes(buf[10 : A + 20]) == _random(A + 10, seed=1)


def test_tail_padding_is_zeroed(store: NvmeStore) -> None:
    off = store.allocate(A)
    assert off is not None
    store.write(off, b"\xff" * A)
    store.write(off, b"\x01" * 10)  # a shorter block in the same extent
    page = bytearray(A)
    store.read_into(off, page)
    assert page == b"\x01" * 10 + bytes(A - 10)


def test_async_round_trip(store: NvmeStore) -> None:
    blocks = {}
    futs: list[Future[None]] = []
    for i in range(12):
        n = (i + 1) * 300 * 1024 + i
        off = store.allocate(n)
        assert off is not None
        blocks[off] = _random(n, seed=i)
        futs.append(store.write_async(off, blocks[off]))
    for f in futs:
        assert f.result(timeout=30) is None
        assert not f.cancel()
    outs = {off: bytearray(len(d)) for off, d in blocks.items()}
    for f in [store.read_async(off, outs[off]) for off in blocks]:
        f.result(timeout=30)
    assert all(outs[off] == d for off, d in blocks.items())
    assert store.write_async(0, b"").result() is None


def test_bad_requests(store: NvmeStore) -> None:
    with pytest.raises(ExtentError, match="multiple"):
        store.write(100, b"x")
    with pytest.raises(ExtentError, match="capacity"):
        store.write(store.capacity - A, bytes(A + 1))
    with pytest.raises(Internal, match="writable"):
        store.read_into(0, b"abc")
    with pytest.raises(ExtentError):
        store.free(0, A)  # never allocated


def test_full_then_free_makes_room(tmp_path: Path) -> None:
    with _store(tmp_path / "n", capacity=8 * 64 * 1024) as s:
        offs = []
        while (off := s.allocate(64 * 1024)) is not None:
            offs.append(off)
        assert len(offs) == 8 and s.used_bytes == s.capacity
        assert not s.can_allocate(1)
        assert s.allocate(1) is None
        s.free(offs[3], 64 * 1024)
        assert s.can_allocate(64 * 1024)
        assert s.allocate(64 * 1024) == offs[3]


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    s = _store(tmp_path / "n", capacity=64 * MiB, io_threads=4, chunk_bytes=128 * 1024)
    errors: list[BaseException] = []

    def worker(tid: int) -> None:
        try:
            rng = random.Random(tid)
            mine: dict[int, bytes] = {}
            for step in range(40):
                if mine and rng.random() < 0.3:
                    old = rng.choice(list(mine))
                    data = mine.pop(old)
                    out = bytearray(len(data))
                    s.read_into(old, out)
                    assert out == data, f"thread {tid} step {step}: corrupted block"
                    s.free(old, len(data))
                    continue
                n = rng.choice([1, 5000, 64 * 1024, 300 * 1024 + 7])
                off = s.allocate(n)
                if off is None:
                    continue
                data = rng.randbytes(n)
                if rng.random() < 0.5:
                    s.write(off, data)
                else:
                    s.write_async(off, data).result()
                mine[off] = data
            for off, data in mine.items():
                out = bytearray(len(data))
                s.read_async(off, out).result()
                assert out == data, f"thread {tid}: corrupted block at the end"
        except BaseException as exc:  # noqa: BLE001 - the main thread reports it
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.close()
    assert not errors, errors[0]


def test_reopen_keeps_data(tmp_path: Path) -> None:
    d = tmp_path / "n"
    written: dict[int, bytes] = {}
    with _store(d, capacity=16 * MiB) as first:
        for i, n in enumerate([10, A, 3 * MiB + 1, 70000]):
            off = first.allocate(n)
            assert off is not None
            written[off] = _random(n, seed=100 + i)
            first.write(off, written[off])
        dropped = next(iter(written))
        first.free(dropped, len(written.pop(dropped)))
        used = first.used_bytes
    with _store(d, capacity=16 * MiB) as second:
        for off, data in written.items():
            second.reserve(off, len(data))
        assert second.used_bytes == used
        for off, data in written.items():
            out = bytearray(len(data))
            second.read_into(off, out)
            assert out == data
        # New allocations never land on a reserved extent.
        new = second.allocate(MiB)
        assert new is not None
        for off, data in written.items():
            assert new + MiB <= off or new >= off + second.extent_bytes(len(data))


def test_write_survives_kill_9(tmp_path: Path) -> None:
    d = tmp_path / "n"
    data = _random(300 * 1024 + 5, seed=42)
    src = tmp_path / "block"
    src.write_bytes(data)
    script = f"""
import os, signal
from pathlib import Path
from tierd.tiers.io_backend import PosixBackend
from tierd.tiers.nvme import NvmeStore
s = NvmeStore(Path({str(d)!r}), 4 << 20, backend=PosixBackend())
s.write(8192, Path({str(src)!r}).read_bytes())
os.kill(os.getpid(), signal.SIGKILL)
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], check=False, env=env, timeout=60)
    assert proc.returncode == -9
    with _store(d, capacity=4 * MiB) as s:
        out = bytearray(len(data))
        s.read_into(8192, out)
        assert out == data


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
@pytest.mark.parametrize("direct", [True, False])
def test_tmpfs_store(tmp_path: Path, direct: bool) -> None:
    d = Path("/dev/shm") / f"tierd-test-{os.getpid()}-{tmp_path.name}-{direct}"
    try:
        with NvmeStore(d, 4 * MiB, backend=PosixBackend(direct=direct)) as s:
            if not direct:
                assert s.direct is False
            data = _random(MiB + 3, seed=5)
            off = s.allocate(len(data))
            assert off is not None
            s.write(off, data)
            out = bytearray(len(data))
            s.read_into(off, out)
            assert out == data
    finally:
        (d / DATA_FILE).unlink(missing_ok=True)
        if d.exists():
            d.rmdir()


class _FailingBackend(PosixBackend):
    def pwrite(self, handle, src, offset):  # type: ignore[no-untyped-def, override]
        if offset >= 64 * 1024:
            raise OSError(5, "injected EIO")
        return super().pwrite(handle, src, offset)


def test_failed_piece_fails_the_request_after_all_pieces(tmp_path: Path) -> None:
    backend: IOBackend = _FailingBackend()
    with NvmeStore(tmp_path / "n", 4 * MiB, backend=backend, chunk_bytes=A) as s:
        fut = s.write_async(0, bytes(256 * 1024))
        with pytest.raises(OSError, match="injected"):
            fut.result(timeout=30)
        with pytest.raises(OSError, match="injected"):
            s.write(0, bytes(128 * 1024))
        s.write(0, bytes(A))  # the store is still usable


def test_close_is_idempotent_and_final(tmp_path: Path) -> None:
    s = _store(tmp_path / "n", capacity=MiB)
    s.close()
    s.close()
    with pytest.raises(Internal, match="closed"):
        s.write(0, b"x")
    with pytest.raises(Internal, match="closed"):
        s.read_async(0, bytearray(1))


# -- one owner, self-describing blocks ----------------------------------------------------


def _header(key: bytes, data: bytes, tenant: str = "t") -> BlockHeader:
    meta = NamespaceMeta(tenant, "m", [1, 1, 8, "uint8", 1], [])
    return BlockHeader(b"N" * 16, key, len(data), checksum(data), meta)


def _headed(directory: Path, capacity: int = 8 * MiB, **kw: object) -> NvmeStore:
    return NvmeStore(directory, capacity, backend=PosixBackend(), headers=True, **kw)  # type: ignore[arg-type]


def test_a_second_store_on_one_data_file_is_refused(tmp_path: Path) -> None:
    with (
        _store(tmp_path / "n", capacity=MiB),
        pytest.raises(StoreInUse, match=str(tmp_path / "n" / DATA_FILE)),
    ):
        _store(tmp_path / "n", capacity=MiB)
    with _store(tmp_path / "n", capacity=MiB):  # closing released it: opening succeeds
        assert (tmp_path / "n" / DATA_FILE).exists()


def test_headers_describe_blocks_and_a_scan_finds_them(tmp_path: Path) -> None:
    blocks: dict[int, bytes] = {}
    with _headed(tmp_path / "n") as s:
        for i, n in enumerate([100, A, 3 * A + 5, MiB + 7]):
            data = _random(n, seed=i)
            off = s.allocate(n)
            assert off is not None and off >= A  # the header page is in front
            assert s.used_bytes == sum(s.extent_bytes(len(d)) for d in blocks.values()) + (
                s.extent_bytes(n)
            )
            if i % 2:
                s.write(off, data, header=_header(bytes([i]) * 16, data))
            else:
                s.write_async(off, data, header=_header(bytes([i]) * 16, data)).result()
            blocks[off] = data
        assert s.extent_bytes(100) == 2 * A
        first = next(iter(blocks))
        h = s.read_header(first)
        assert h is not None and h.nbytes == 100 and h.checksum == checksum(blocks[first])
        assert h.namespace is not None and h.namespace.tenant == "t"
        found = list(s.scan_headers())
        assert [(b.offset, b.header.key, b.intact) for b in found] == [
            (off, bytes([i]) * 16, True) for i, off in enumerate(blocks)
        ]
        # A freed block's header is zeroed: it cannot come back from a scan.
        s.free(first, 100)
    with _headed(tmp_path / "n") as s:
        assert [b.offset for b in s.scan_headers()] == list(blocks)[1:]
        assert s.read_header(first) is None


def test_scan_reports_damaged_data_and_ignores_forged_headers(tmp_path: Path) -> None:
    with _headed(tmp_path / "n") as s:
        good = _random(3 * A, seed=1)
        off_good = s.allocate(len(good))
        assert off_good is not None
        s.write(off_good, good, header=_header(b"g" * 16, good))
        # A tenant's bytes shaped like headers, made without the store's key.
        forged_block = _random(A, seed=9)
        forged = encode(_header(b"f" * 16, forged_block, tenant="victim"), b"k" * 32)
        data = forged + forged_block + forged
        off = s.allocate(len(data))
        assert off is not None
        s.write(off, data, header=_header(b"d" * 16, data))
        assert [b.header.key for b in s.scan_headers()] == [b"g" * 16, b"d" * 16]
        s.free(off, len(data))  # its data stays; its header goes
    with open(tmp_path / "n" / DATA_FILE, "r+b") as f:
        f.seek(off_good + 10)
        f.write(b"\x00\xff")
    with _headed(tmp_path / "n") as s:
        assert [(b.header.key, b.intact) for b in s.scan_headers()] == [(b"g" * 16, False)]


class _SlowZeroing(PosixBackend):
    """A disk on which the zeroing of a freed header takes a while."""

    def pwrite(self, handle, src, offset):  # type: ignore[no-untyped-def, override]
        if len(src) == A and not any(bytes(src)):
            threading.Event().wait(0.3)
        return super().pwrite(handle, src, offset)


def test_reusing_a_freed_extent_waits_for_its_header_to_be_zeroed(tmp_path: Path) -> None:
    d = tmp_path / "n"
    with NvmeStore(d, MiB, backend=_SlowZeroing(), headers=True) as s:
        old, new = _random(A, seed=1), _random(A, seed=2)
        off = s.allocate(A)
        assert off is not None
        s.write(off, old, header=_header(b"o" * 16, old))
        s.free(off, A)
        assert s.allocate(A) == off  # the same extent, handed out once its header is zero
        s.write(off, new, header=_header(b"n" * 16, new))
    with _headed(d, capacity=MiB) as s:
        assert [(b.header.key, b.intact) for b in s.scan_headers()] == [(b"n" * 16, True)]


def test_a_file_of_the_previous_format_stays_readable(tmp_path: Path) -> None:
    d = tmp_path / "n"
    legacy: dict[int, bytes] = {}
    with _store(d, capacity=4 * MiB) as old:  # no header pages, no key file
        for i in range(4):
            off = old.allocate(A + 1)
            assert off is not None
            legacy[off] = _random(A + 1, seed=i)
            old.write(off, legacy[off])
    assert min(legacy) == 0
    with _headed(d, capacity=4 * MiB) as s:
        for off, data in legacy.items():
            s.reserve(off, len(data))
        s.finish_recovery()
        used = s.used_bytes
        assert used == 4 * 2 * A
        new = _random(A, seed=7)
        off_new = s.allocate(A)
        assert off_new is not None and off_new - A >= max(legacy) + 2 * A
        s.write(off_new, new, header=_header(b"x" * 16, new))
        with pytest.raises(ExtentError, match="no header page"):
            s.write_header(0, _header(b"y" * 16, new))
        gone = next(iter(legacy))
        s.free(gone, A + 1)
        del legacy[gone]
    with _headed(d, capacity=4 * MiB) as s:
        for off, data in legacy.items():
            s.reserve(off, len(data))
        s.reserve(off_new, A)
        s.finish_recovery()
        assert s.used_bytes == used - 2 * A + 2 * A
        for off, data in legacy.items():
            out = bytearray(len(data))
            s.read_into(off, out)
            assert out == data
        # Only the headed block is self-describing.
        assert [b.header.key for b in s.scan_headers()] == [b"x" * 16]
        s.free(off_new, A)
        for off, data in legacy.items():
            s.free(off, len(data))
        assert s.used_bytes == 0


def test_header_needs_a_headed_store(store: NvmeStore) -> None:
    off = store.allocate(A)
    assert off is not None
    with pytest.raises(Internal, match="without block headers"):
        store.write(off, bytes(A), header=_header(b"k" * 16, bytes(A)))
