"""The rig of the chaos run (tools/chaos.py): a small tmpfs, a daemon on it, and the faults.

Primitives:
  `Mount(path, size)`       `.mount()`, `.fill()` (a ballast file up to ENOSPC), `.clear()`,
                            `.unmount()`; a tmpfs, so it needs root
  `Daemon(base, data_dir)`  `tierd serve` with 2 local CSD workers: `.start()`, `.kill9()`,
                            `.terminate()`, `.worker_pids()`, `.wait_workers()`, `.cleanup()`
  `nvme_extents(data_dir)`, `csd_extents(data_dir)`  where blocks lie in the tier files, from
                            their SQLite catalogs opened read-only
  `flip(path, extent, rng) -> offsets`, `keys_over(extents, path, offsets) -> keys`

Catalog rows are written right after a block's bytes, so a row may lag the file by an
instant; callers map a flip through a snapshot taken before it and others taken after.
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierd.tiers.host import segments_of
from tierd_client import TierdClient, TierdError

START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 15.0
NVME_FILE = Path("nvme") / "blocks.dat"
CATALOG_FILE = "index.sqlite3"
SHARD_FILE, SHARD_CATALOG = "blocks.dat", "shard.sqlite3"
_CHUNK = 1 << 20


class RigError(Exception):
    """The rig itself failed (mount, daemon start): the run cannot go on."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


class Mount:
    """A size-limited tmpfs under which the daemon's data dir lives."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size_bytes = size_bytes
        self.mounted = False
        self.ballast = path / "ballast"

    def mount(self) -> None:
        if os.geteuid() != 0:
            raise RigError("mounting the run's tmpfs needs root")
        self.path.mkdir(parents=True, exist_ok=True)
        res = _run(["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes},mode=0700",
                    "tmpfs", str(self.path)])  # fmt: skip
        if res.returncode != 0:
            raise RigError(f"cannot mount a tmpfs on {self.path}: {res.stderr.strip()}")
        self.mounted = True

    def fill(self) -> int:
        """Write a ballast file until the filesystem is full; the bytes written (0: the
        disk never said ENOSPC)."""
        written, piece = 0, bytes(_CHUNK)
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:  # 1 MiB pieces, then pages for the last partial MiB
                try:
                    written += os.write(fd, piece)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    if len(piece) == 4096:
                        return written
                    piece = bytes(4096)
        finally:
            os.close(fd)

    def clear(self) -> None:
        self.ballast.unlink(missing_ok=True)

    def unmount(self) -> None:
        if not self.mounted:
            return
        self.clear()
        res = _run(["umount", str(self.path)])
        if res.returncode != 0:  # something still holds a file: detach it anyway
            res = _run(["umount", "-l", str(self.path)])
        if res.returncode != 0:
            print(f"chaos: could not unmount {self.path}: {res.stderr.strip()}", file=sys.stderr)
            return
        self.mounted = False
        try:
            self.path.rmdir()
        except OSError:
            pass  # something was left inside: keep the directory rather than fail cleanup


class Daemon:
    """One `tierd serve` on `data_dir`, restartable after kill -9; its log outside the mount
    (a full disk must not silence it)."""

    def __init__(self, base: Path, data_dir: Path, *, host: str, nvme: str, csd: str,
                 workers: int) -> None:  # fmt: skip
        self.base = base
        self.data_dir = data_dir
        self.address = f"unix:{base}/tierd.sock"
        self.log = base / "tierd.log"
        self.workers = workers
        self.config = base / "tierd.toml"
        # Page-locking the arena only matters with CUDA; its probe costs seconds here.
        self.config.write_text(
            f'[host]\npin_memory = false\n[csd]\nworkers = {workers}\ncapacity = "{csd}"\n'
        )
        self.cmd = [sys.executable, "-m", "tierd", "serve", "--config", str(self.config),
                    "--listen", self.address, "--data-dir", str(data_dir),
                    "--host-capacity", host, "--nvme-capacity", nvme]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.seen_workers: set[int] = set()
        self.stop_timeouts = 0  # SIGTERMs the daemon did not exit on in time

    def log_tail(self, limit: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return "<no daemon log>"

    def start(self) -> None:
        with open(self.log, "ab") as err:
            err.write(f"---- chaos: start {self.starts + 1}\n".encode())
            err.flush()
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err)
        self.starts += 1
        deadline = time.monotonic() + START_DEADLINE_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RigError(f"tierd exited with {self.proc.returncode} while starting:\n"
                               f"{self.log_tail()}")  # fmt: skip
            with TierdClient(self.address, timeout=1.0, max_retries=0) as probe:
                try:
                    probe.stats()
                    return
                except TierdError as e:  # not listening yet; the probe waited up to 1 s
                    last = e
        self.kill9()
        raise RigError(f"tierd did not answer within {START_DEADLINE_S:.0f}s ({last}):\n"
                       f"{self.log_tail()}")  # fmt: skip

    def kill9(self, *, workers: bool = False) -> None:
        """SIGKILL the daemon; with `workers`, its CSD workers in the same instant."""
        pids = self.worker_pids()  # remembered: they outlive a killed daemon for a while
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_DEADLINE_S)
        if workers:
            _kill_all(pids)

    def terminate(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.worker_pids()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=STOP_DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.stop_timeouts += 1
            print(f"chaos: tierd ignored SIGTERM:\n{self.log_tail()}", file=sys.stderr)
            self.kill9()

    def worker_pids(self) -> list[int]:
        """The live CSD worker processes of the running daemon."""
        if self.proc is None or self.proc.poll() is not None:
            return []
        pids = []
        try:
            for child in psutil.Process(self.proc.pid).children():
                if "csd-worker" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                    pids.append(child.pid)
        except psutil.Error:
            return []
        self.seen_workers.update(pids)
        return pids

    def wait_workers(self, deadline_s: float) -> bool:
        """Every local worker answers its health check (the daemon restarts dead ones)."""
        deadline = time.monotonic() + deadline_s
        socks = [self.data_dir / "csd" / f"w{i}.sock" for i in range(self.workers)]
        while time.monotonic() < deadline:
            if all(_serving(s) for s in socks):
                return True
            time.sleep(0.2)  # the supervisor's restart backoff runs in the daemon
        return False

    def cleanup(self) -> None:
        """Stop the daemon, then every worker any of its runs started, then its segments."""
        self.terminate()
        self.kill9()
        _kill_all(self.seen_workers)
        for seg in segments_of(self.data_dir):
            seg.unlink(missing_ok=True)


def _kill_all(worker_pids: Iterable[int]) -> None:
    """SIGKILL the CSD workers among `worker_pids` still alive, and reap them."""
    left = []
    for pid in worker_pids:
        try:
            p = psutil.Process(pid)
            # Not a recycled pid, and not a zombie (those are dead already, waiting on init).
            if "csd-worker" in p.cmdline() and p.status() != psutil.STATUS_ZOMBIE:
                p.kill()
                left.append(p)
        except psutil.Error:
            pass  # it exited while we looked: nothing to kill
    psutil.wait_procs(left, timeout=STOP_DEADLINE_S)


def _serving(sock: Path) -> bool:
    if not sock.exists():
        return False
    try:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=1.0)  # fmt: skip
    except grpc.RpcError:
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


# -- where blocks lie, and flipping their bytes ----------------------------------------------


@dataclass(frozen=True)
class Extent:
    file: Path  # the data file holding the block
    key: bytes
    offset: int
    nbytes: int


def _query(catalog: Path, sql: str) -> list[tuple[Any, ...]]:
    if not catalog.exists():
        return []
    try:
        # Read-only, and never the daemon's connection: the rig only looks.
        db = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=2.0)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []  # mid-restart, or the disk is full: no targets this time


def nvme_extents(data_dir: Path, *, only_copy: bool = False) -> list[Extent]:
    """Blocks with an NVMe copy; `only_copy`: those without a host copy besides, which a
    flip is sure to hurt."""
    host = (" AND NOT EXISTS (SELECT 1 FROM copies h WHERE h.ns_id = c.ns_id AND h.key = c.key"
            " AND h.tier = 'host')") if only_copy else ""  # fmt: skip
    rows = _query(data_dir / CATALOG_FILE, "SELECT c.key, c.location, c.length FROM copies c "
                                           f"WHERE c.tier = 'nvme'{host}")  # fmt: skip
    return [Extent(data_dir / NVME_FILE, k, off, n) for k, off, n in rows]


def csd_extents(data_dir: Path, *, only_copy: bool = False) -> list[Extent]:
    """Blocks held by the local CSD workers; `only_copy`: those the daemon's catalog knows
    no host or NVMe copy of."""
    out = []
    for shard in sorted((data_dir / "csd").glob("w*")):
        if shard.is_dir():
            rows = _query(shard / SHARD_CATALOG, "SELECT key, offset, nbytes FROM blocks")
            out += [Extent(shard / SHARD_FILE, k, off, n) for k, off, n in rows]
    if only_copy:
        sql = ("SELECT key FROM copies GROUP BY ns_id, key "
               "HAVING MIN(tier) = 'csd' AND MAX(tier) = 'csd'")  # fmt: skip
        alone = {k for (k,) in _query(data_dir / CATALOG_FILE, sql)}
        out = [e for e in out if e.key in alone]
    return out


def catalog_rows(data_dir: Path, keys: Iterable[bytes]) -> dict[bytes, str]:
    """Where the daemon's catalog says each key lives ("no row" when it has none, "no
    copy" when its row names none)."""
    rows = _query(data_dir / CATALOG_FILE, "SELECT b.key, c.tier, c.location FROM blocks b "
                  "LEFT JOIN copies c ON c.ns_id = b.ns_id AND c.key = b.key")  # fmt: skip
    where: dict[bytes, list[str]] = {}
    for k, tier, loc in rows:
        where.setdefault(k, []).extend([f"{tier}={loc}"] if tier is not None else [])
    return {k: " ".join(sorted(where[k])) or "no copy" if k in where else "no row" for k in keys}


def recoveries(log: str) -> list[tuple[int, int]]:
    """(blocks, dropped) of every start's recovery, from the daemon's log."""
    return [
        (int(a), int(b)) for a, b in re.findall(r"recovered (\d+) blocks \((\d+) dropped\)", log)
    ]


def flip(extent: Extent, rng: random.Random, count: int = 3) -> list[int]:
    """XOR `count` random bytes inside the extent with random non-zero values."""
    offsets = sorted({extent.offset + rng.randrange(extent.nbytes) for _ in range(count)})
    fd = os.open(extent.file, os.O_RDWR)
    try:
        for off in offsets:
            old = os.pread(fd, 1, off)
            if len(old) == 1:
                os.pwrite(fd, bytes([old[0] ^ rng.randrange(1, 256)]), off)
    finally:
        os.close(fd)
    return offsets


def keys_over(extents: list[Extent], file: Path, offsets: list[int]) -> set[bytes]:
    """Keys of the blocks whose extent in `file` holds one of `offsets`."""
    return {e.key for e in extents if e.file == file
            and any(e.offset <= o < e.offset + e.nbytes for o in offsets)}  # fmt: skip
