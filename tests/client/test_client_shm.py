"""Shared memory handed over as descriptors: what a client maps, what it can and cannot do
to it, and how a restarted daemon's memory replaces the old one's."""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierd.core.results import ClientFds
from tierd.errors import NotFound, Unauthenticated
from tierd.server.handoff import DEADLINE_SECONDS, MAX_CONNECTIONS, HandoffServer
from tierd.tiers.host import HostArena
from tierd.tiers.staging import StagingAreas
from tierd_client import KVLayout, SegmentInfo
from tierd_client.errors import Internal, Unavailable
from tierd_client.hostinfo import host_id
from tierd_client.shm import SegmentMaps, receive_fds, slot_view

LAY = KVLayout(1, 1, 8, "float32", 4)  # 256-byte blocks
CAPACITY = 1 << 20


class Daemonish:
    """A host arena, staging areas and a real handoff server on a unix socket (the parts
    of the daemon that clients touch), authorizing the tenants named in `known`."""

    def __init__(self, base: Path, known: set[str]) -> None:
        self.arena = HostArena(CAPACITY, f"test{os.getpid()}{base.name[-6:]}")
        self.staging = StagingAreas(CAPACITY, CAPACITY)
        self.known = known

        def authorize(tenant: str, token: str | None) -> str:
            if tenant not in self.known:
                raise NotFound("no namespace of this tenant", field="tenant")
            if token == "bad":
                raise Unauthenticated("bad token")
            return tenant

        def fds_for(tenant: str) -> ClientFds:
            seg_fd, seg_size = self.arena.client_fd(tenant)
            fd, size, gen = self.staging.client_fd(tenant)
            return ClientFds(seg_fd, seg_size, fd, size, gen)

        self.server = HandoffServer(base / "tierd.sock.shm", fds_for, authorize)
        self.server.start()

    def segment(self, tenant: str) -> SegmentInfo:
        seg, area = self.arena.segment(tenant), self.staging.current(tenant)
        return SegmentInfo(str(self.server.path), seg.size, host_id(), area.size,
                           self.server.instance_of(area.generation))  # fmt: skip

    def close(self) -> None:
        self.server.stop()
        self.staging.close()
        self.arena.destroy()


@pytest.fixture
def daemon() -> Iterator[Daemonish]:
    base = Path(tempfile.mkdtemp(prefix="tierd-shm-"))  # short: unix socket paths
    d = Daemonish(base, {"a", "b"})
    yield d
    d.close()
    os.rmdir(base)


def test_store_is_read_only_and_staging_is_shared(daemon: Daemonish) -> None:
    maps = SegmentMaps("a")
    seg = daemon.segment("a")
    m = maps.map(seg)
    assert maps.map(seg) is m  # mapped once
    # A block the daemon holds is visible through the read-only mapping...
    off = daemon.arena.allocate("a", LAY.block_bytes)
    want = np.arange(LAY.block_elems, dtype=np.float32).reshape(LAY.block_shape)
    daemon.arena.view("a", off, LAY.block_bytes)[:] = want.tobytes()
    assert (slot_view(m.store, off, LAY) == want).all()
    # ...and nothing can be written through it.
    with pytest.raises(ValueError):
        slot_view(m.store, off, LAY)[...] = 0
    with pytest.raises(TypeError):
        m.store[off] = 1
    # Staging is the daemon's staging memory.
    area, s_off = daemon.staging.allocate("a", LAY.block_bytes)
    slot_view(m.staging, s_off, LAY)[...] = want
    assert bytes(daemon.staging.view(area, s_off, LAY.block_bytes)) == want.tobytes()
    maps.close()


def test_handed_descriptors_cannot_truncate_or_write_the_store(daemon: Daemonish) -> None:
    seg = daemon.segment("a")
    fds = receive_fds(seg.handoff, "a", None)
    try:
        with pytest.raises(OSError) as e:
            os.ftruncate(fds.segment_fd, 4096)  # opened read-only
        assert e.value.errno in (errno.EINVAL, errno.EBADF)
        with pytest.raises(OSError):
            os.pwrite(fds.segment_fd, b"x", 0)
        with pytest.raises(PermissionError):  # no writable shared mapping of it either
            mmap.mmap(fds.segment_fd, 4096, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
        for size in (0, 4096, fds.staging_size * 2):  # sealed against shrinking and growing
            with pytest.raises(PermissionError):
                os.ftruncate(fds.staging_fd, size)
    finally:
        os.close(fds.segment_fd)
        os.close(fds.staging_fd)
    # The daemon's own mappings are intact: it reads its whole staging area without SIGBUS.
    area = daemon.staging.current("a")
    assert os.fstat(area.fd).st_size == area.size
    assert bytes(daemon.staging.view(area, area.size - 4096, 4096)) == bytes(4096)


def test_another_tenants_memory_is_refused(daemon: Daemonish) -> None:
    with pytest.raises(NotFound):
        receive_fds(str(daemon.server.path), "stranger", None)
    with pytest.raises(Unauthenticated):
        receive_fds(str(daemon.server.path), "a", "bad")
    # What tenant "b" receives is b's memory, not a's.
    a = SegmentMaps("a").map(daemon.segment("a"))
    b = SegmentMaps("b").map(daemon.segment("b"))
    _, off = daemon.staging.allocate("a", 4096)
    a.staging[off : off + 4] = b"AAAA"
    assert bytes(b.staging[off : off + 4]) != b"AAAA"


def test_garbage_requests_get_an_answer_not_a_crash(daemon: Daemonish) -> None:
    import socket

    for payload in (b"\xff\xfe not json\n", b"[1, 2]\n", b'{"tenant": 7}\n', b"x" * 5000):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(daemon.server.path))
            s.sendall(payload)
            reply = s.recv(4096)
            assert b'"ok": false' in reply
    assert SegmentMaps("a").unusable(daemon.segment("a")) is None  # still serving


def test_a_new_instance_is_mapped_again(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="tierd-shm-"))
    first = Daemonish(base, {"a"})
    maps = SegmentMaps("a")
    try:
        old = maps.map(first.segment("a"))
    finally:
        first.close()
    second = Daemonish(base, {"a"})  # what a restarted daemon announces
    try:
        new = maps.map(second.segment("a"))
        assert new is not old and new.instance == second.segment("a").instance
        # A segment announced with an instance the socket's daemon does not have: refused.
        stale = SegmentInfo(str(second.server.path), new.store.size(), host_id(),
                            len(new.staging), old.instance)  # fmt: skip
        maps2 = SegmentMaps("a")
        with pytest.raises(Unavailable):  # retried by the client's callers
            maps2.map(stale)
    finally:
        second.close()
        os.rmdir(base)


def test_unusable_reasons(daemon: Daemonish) -> None:
    maps = SegmentMaps("a")
    assert "no shared memory" in (maps.unusable(None) or "")
    seg = daemon.segment("a")
    elsewhere = SegmentInfo(seg.handoff, seg.size, "elsewhere:x", seg.staging_size, seg.instance)
    assert "another host" in (maps.unusable(elsewhere) or "")
    gone = SegmentInfo(seg.handoff + ".none", seg.size, host_id(), seg.staging_size,
                       seg.instance)  # fmt: skip
    assert "cannot map" in (maps.unusable(gone) or "")
    too_big = SegmentInfo(seg.handoff, seg.size * 4, host_id(), seg.staging_size, seg.instance)
    assert "cannot map" in (maps.unusable(too_big) or "")
    assert "cannot map" in (SegmentMaps("stranger").unusable(seg) or "")


def test_slot_outside_segment(daemon: Daemonish) -> None:
    m = SegmentMaps("a").map(daemon.segment("a"))
    with pytest.raises(Internal):
        slot_view(m.store, len(m.store) - 100, LAY)


def test_a_flood_of_idle_connections_delays_others_at_most_the_deadline(
    daemon: Daemonish,
) -> None:
    import socket
    import time

    flood = []
    for _ in range(MAX_CONNECTIONS + 8):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.server.path))
        flood.append(s)
    try:
        start = time.monotonic()
        while True:  # a real client retries; it gets through once the deadline passes
            try:
                fds = receive_fds(str(daemon.server.path), "a", None, timeout=1.0)
                break
            except Unavailable:
                assert time.monotonic() - start < 4 * DEADLINE_SECONDS + 5
        os.close(fds.segment_fd)
        os.close(fds.staging_fd)
        for s in flood:  # every idle connection was closed by the daemon
            s.settimeout(DEADLINE_SECONDS + 5)
            assert s.recv(1) == b""
    finally:
        for s in flood:
            s.close()


def test_stop_does_not_wait_for_a_slow_client(tmp_path: Path) -> None:
    import socket
    import time

    base = Path(tempfile.mkdtemp(prefix="tierd-shm-"))
    d = Daemonish(base, {"a"})
    slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    slow.connect(str(d.server.path))
    slow.sendall(b'{"ten')  # and nothing more
    start = time.monotonic()
    d.close()
    assert time.monotonic() - start < DEADLINE_SECONDS + 2
    slow.close()
    os.rmdir(base)


def test_retired_staging_is_never_handed_to_a_new_lease(daemon: Daemonish) -> None:
    """The fence for shared-memory puts: once a lease expired (its area retired), new
    leases get a new area and clients a new instance; old slots are never reused."""
    maps = SegmentMaps("a")
    old_seg = daemon.segment("a")
    old = maps.map(old_seg)
    area, off = daemon.staging.allocate("a", LAY.block_bytes)
    daemon.staging.retire(area)  # what the daemon does when that lease expires
    daemon.staging.free(area, off, LAY.block_bytes)
    new_seg = daemon.segment("a")
    assert new_seg.instance != old_seg.instance
    new_area, new_off = daemon.staging.allocate("a", LAY.block_bytes)
    assert new_area is not area
    slot_view(old.staging, off, LAY)[...] = 9.0  # the stalled client wakes up and writes
    assert bytes(daemon.staging.view(new_area, new_off, LAY.block_bytes)) == bytes(LAY.block_bytes)
    new = maps.map(new_seg)  # the client maps the new area on its next put
    assert new is not old
    slot_view(new.staging, new_off, LAY)[...] = 1.0
    assert bytes(daemon.staging.view(new_area, new_off, 4)) == np.float32(1.0).tobytes()


def test_pages_a_reader_faults_in_are_given_back(daemon: Daemonish) -> None:
    m = SegmentMaps("a").map(daemon.segment("a"))
    seg = daemon.arena.segment("a")
    before = os.fstat(seg.fd).st_blocks
    total = sum(m.store[i] for i in range(0, len(m.store), 4096))  # read every hole
    assert total == 0
    assert os.fstat(seg.fd).st_blocks >= before + len(m.store) // 2 // 512  # it cost memory
    daemon.arena.trim()
    assert os.fstat(seg.fd).st_blocks <= before


def test_one_user_flooding_leaves_room_for_others(daemon: Daemonish) -> None:
    """Connections of one OS user are capped, so a flood by one user leaves the handoff
    answering another user at once."""
    import json
    import socket
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("acting as another user needs root")
    flood = []
    try:
        for _ in range(MAX_CONNECTIONS):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(daemon.server.path))
            flood.append(s)
        os.chmod(daemon.server.path.parent, 0o755)
        os.chmod(daemon.server.path, 0o666)
        probe = (
            "import os, socket, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(1.5)\n"
            f"s.connect({str(daemon.server.path)!r})\n"
            's.sendall(b\'{"tenant": "stranger"}\\n\')\n'
            "sys.stdout.write(s.recv(4096).decode())\n"
        )
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                             timeout=30, check=True).stdout  # fmt: skip
        reply = json.loads(out)
        assert reply["ok"] is False and reply["code"] == "NotFound"  # served, and refused
    finally:
        for s in flood:
            s.close()
