from __future__ import annotations

import errno
import fcntl
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from tierd.errors import Internal
from tierd.tiers import io_backend
from tierd.tiers.io_backend import (
    ALIGNMENT,
    KvikioBackend,
    PosixBackend,
    is_aligned,
    kvikio_available,
    select_backend,
)

A = ALIGNMENT
SHM = Path("/dev/shm")


def _random(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _aligned(n: int) -> memoryview:
    return memoryview(mmap.mmap(-1, max(n, A)))[:n]


def _unaligned(n: int) -> memoryview:
    # A bytearray one byte into its storage is never page-aligned.
    view = memoryview(bytearray(n + 1))[1:]
    assert not is_aligned(view) or n == 0
    return view


def test_open_creates_preallocates_and_never_shrinks(tmp_path: Path) -> None:
    backend = PosixBackend()
    path = tmp_path / "data"
    h = backend.open(path, 16 * A)
    assert h.size == 16 * A and path.stat().st_size == 16 * A
    assert path.stat().st_blocks * 512 >= 16 * A  # blocks really reserved, not sparse
    assert (path.stat().st_mode & 0o777) == 0o600
    backend.pwrite(h, memoryview(_random(A)), 15 * A)
    backend.close(h)
    h = backend.open(path, 4 * A)  # smaller request: the file keeps its size and data
    assert h.size == 16 * A
    out = _aligned(A)
    backend.pread(h, out, 15 * A)
    assert bytes(out) == _random(A)
    backend.close(h)
    h = backend.open(path, 32 * A)  # larger: grows
    assert h.size == 32 * A
    backend.close(h)
    backend.close(h)  # idempotent
    with pytest.raises(Internal, match="closed"):
        backend.pread(h, _aligned(A), 0)


def test_direct_on_ext4(tmp_path: Path) -> None:
    backend = PosixBackend(direct=True)
    h = backend.open(tmp_path / "d", 4 * A)
    assert h.direct and backend.direct
    assert os.O_DIRECT & fcntl.fcntl(h.fd, fcntl.F_GETFL)
    backend.close(h)


@pytest.mark.parametrize("aligned_buf", [True, False])
@pytest.mark.parametrize("nbytes", [A, 3 * A, 5 << 20])
def test_round_trip_direct(tmp_path: Path, aligned_buf: bool, nbytes: int) -> None:
    backend = PosixBackend()
    h = backend.open(tmp_path / "d", 8 << 20)
    data = _random(nbytes, seed=nbytes)
    src = _aligned(nbytes) if aligned_buf else _unaligned(nbytes)
    src[:] = data
    assert backend.pwrite(h, src, A) == nbytes
    dst = _aligned(nbytes) if aligned_buf else _unaligned(nbytes)
    assert backend.pread(h, dst, A) == nbytes
    assert bytes(dst) == data
    backend.close(h)


def test_bytes_source_goes_through_bounce(tmp_path: Path) -> None:
    backend = PosixBackend()
    h = backend.open(tmp_path / "d", 8 * A)
    data = _random(2 * A, seed=7)
    backend.pwrite(h, memoryview(data), 2 * A)  # read-only, unaligned source
    out = bytearray(2 * A)
    backend.pread(h, memoryview(out), 2 * A)
    assert out == data
    with pytest.raises(Internal, match="writable"):
        backend.pread(h, memoryview(bytes(A)), 0)
    backend.close(h)


def test_direct_rejects_unaligned_offset_or_length(tmp_path: Path) -> None:
    backend = PosixBackend()
    h = backend.open(tmp_path / "d", 8 * A)
    with pytest.raises(Internal, match="aligned"):
        backend.pwrite(h, _aligned(100), 0)
    with pytest.raises(Internal, match="aligned"):
        backend.pread(h, _aligned(A), 512)
    backend.close(h)


def test_read_past_end_raises(tmp_path: Path) -> None:
    backend = PosixBackend()
    h = backend.open(tmp_path / "d", 2 * A)
    with pytest.raises(OSError):
        backend.pread(h, _aligned(2 * A), A)
    backend.close(h)


@pytest.mark.parametrize("nbytes", [1, 100, A + 1, 3 * A - 7])
def test_buffered_any_length_and_offset(tmp_path: Path, nbytes: int) -> None:
    backend = PosixBackend(direct=False)
    h = backend.open(tmp_path / "b", 8 * A)
    assert not h.direct and not backend.direct
    data = _random(nbytes, seed=nbytes)
    backend.pwrite(h, memoryview(data), 13)
    out = bytearray(nbytes)
    backend.pread(h, memoryview(out), 13)
    assert out == data
    backend.sync(h)
    backend.close(h)


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_tmpfs_works(tmp_path: Path) -> None:
    # Kernels >= 6.6 give tmpfs O_DIRECT; older ones refuse it. Either way I/O must work.
    backend = PosixBackend()
    path = SHM / f"tierd-test-{os.getpid()}-{tmp_path.name}"
    try:
        h = backend.open(path, 4 * A)
        data = _random(2 * A, seed=3)
        backend.pwrite(h, memoryview(data), A)
        out = bytearray(2 * A)
        backend.pread(h, memoryview(out), A)
        assert out == data
        backend.close(h)
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm")
def test_fallback_to_buffered_when_o_direct_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def refuse_direct(path: str | os.PathLike[str], flags: int, mode: int = 0o777) -> int:
        if flags & os.O_DIRECT:  # what tmpfs before 6.6 (and some FUSE) answer
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(io_backend.os, "open", refuse_direct)
    backend = PosixBackend(direct=True)
    path = SHM / f"tierd-test-fb-{os.getpid()}-{tmp_path.name}"
    try:
        h = backend.open(path, 4 * A)
        assert not h.direct and not backend.direct
        data = _random(A + 5, seed=4)
        backend.pwrite(h, memoryview(data), 3)  # buffered: no alignment rules
        out = bytearray(A + 5)
        backend.pread(h, memoryview(out), 3)
        assert out == data
        backend.close(h)
    finally:
        path.unlink(missing_ok=True)


def test_short_transfers_are_looped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def short_preadv(fd: int, bufs: list[memoryview], off: int) -> int:
        return real_preadv(fd, [bufs[0][: min(len(bufs[0]), A)]], off)

    def short_pwritev(fd: int, bufs: list[memoryview], off: int) -> int:
        return real_pwritev(fd, [bufs[0][: min(len(bufs[0]), A)]], off)

    monkeypatch.setattr(io_backend.os, "preadv", short_preadv)
    monkeypatch.setattr(io_backend.os, "pwritev", short_pwritev)
    backend = PosixBackend()
    h = backend.open(tmp_path / "d", 8 * A)
    data = _random(5 * A, seed=5)
    src = _aligned(5 * A)
    src[:] = data
    assert backend.pwrite(h, src, A) == 5 * A
    dst = _aligned(5 * A)
    assert backend.pread(h, dst, A) == 5 * A
    assert bytes(dst) == data
    backend.close(h)


def test_select_backend_auto_is_posix_without_cuda() -> None:
    if kvikio_available():
        pytest.skip("kvikio works here")
    backend = select_backend("auto")
    assert isinstance(backend, PosixBackend) and backend.name == "posix"
    assert select_backend("posix", direct=False).direct is False


def test_select_kvikio_without_cuda_says_why() -> None:
    if kvikio_available():
        pytest.skip("kvikio works here")
    reason = io_backend.kvikio_unavailable_reason()
    assert reason
    with pytest.raises(ValueError, match="kvikio backend unavailable") as info:
        select_backend("kvikio")
    assert reason in str(info.value)
    with pytest.raises(ValueError):
        KvikioBackend()


def test_select_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown I/O backend"):
        select_backend("spdk")


@pytest.mark.gpu
@pytest.mark.skipif(not kvikio_available(), reason="kvikio needs CUDA")
def test_kvikio_round_trip(tmp_path: Path) -> None:
    backend = select_backend("kvikio")
    h = backend.open(tmp_path / "k", 4 << 20)
    data = _random(3 << 20, seed=9)
    assert backend.pwrite(h, memoryview(data), A) == len(data)
    out = bytearray(len(data))
    assert backend.pread(h, memoryview(out), A) == len(data)
    assert out == data
    backend.close(h)
