"""Operator traps, against real daemons: a second daemon on a live socket or on a held NVMe
file, a read-only data dir, a damaged catalog (refused, then rebuilt by `tierctl fsck
--repair` with every NVMe block back byte-exact), and an unreachable CSD worker (its blocks
are unavailable, not corrupt)."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from tests.integration.conftest import START_DEADLINE_S, DaemonProcess
from tierctl.cli import main as tierctl
from tierd.core.catalog import BlockRow, Catalog, NamespaceRow
from tierd_client import KVLayout, TierdClient, TierdError

LAY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
EXIT_DEADLINE_S = 60.0


def block_for(key: bytes) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 1 << 16, LAY.block_shape, dtype=np.uint16).view(np.float16)


def keys(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(16) for _ in range(n)]


def put(address: str, name: str, ks: list[bytes]) -> None:
    with TierdClient(address, tenant="it") as c:
        ns = c.open_namespace(name, LAY)
        assert c.put(ns, ks, np.stack([block_for(k) for k in ks])) == ["stored"] * len(ks)


def get(address: str, name: str, ks: list[bytes]) -> list[np.ndarray | None]:
    with TierdClient(address, tenant="it") as c:
        ns = c.open_namespace(name, LAY)
        res = c.get(ns, ks)
    return [res.blocks[i] if f else None for i, f in enumerate(res.found)]


def exact(got: np.ndarray | None, key: bytes) -> bool:
    return got is not None and got.tobytes() == block_for(key).tobytes()


def refused(daemon: DaemonProcess) -> str:
    """Start `daemon`, expect a clean refusal (exit 2, no traceback); its stderr."""
    daemon.start(wait=False)
    assert daemon.proc is not None
    try:
        rc = daemon.proc.wait(timeout=EXIT_DEADLINE_S)
    except subprocess.TimeoutExpired:
        daemon.stop()
        pytest.fail(f"the daemon started instead of refusing:\n{daemon.log.read_text()}")
    daemon.proc = None
    err = daemon.log.read_text()
    assert rc == 2, err
    assert "Traceback" not in err, err
    return err


def with_args(daemon: DaemonProcess, **flags: str) -> DaemonProcess:
    """Replace or add `--flag value` pairs of the daemon's command line."""
    for flag, value in flags.items():
        opt = "--" + flag.replace("_", "-")
        if opt in daemon.cmd:
            daemon.cmd[daemon.cmd.index(opt) + 1] = value
        else:
            daemon.cmd += [opt, value]
        if flag == "listen":
            daemon.address = value
    return daemon


def serves(daemon: DaemonProcess, name: str) -> None:
    ks = keys(3, seed=hash(name) & 0xFFFF)
    put(daemon.address, name, ks)
    assert all(exact(g, k) for g, k in zip(get(daemon.address, name, ks), ks))


# -- one daemon per socket, per NVMe file ----------------------------------------------------


def test_a_live_socket_is_refused_and_a_dead_ones_taken_over(
    spawn_daemon: Callable[..., DaemonProcess],
) -> None:
    first = spawn_daemon()
    second = with_args(spawn_daemon(start=False), listen=first.address)
    err = refused(second)
    sock = first.address.removeprefix("unix:")
    assert "server.listen" in err and sock in err and "answers on" in err
    serves(first, "ops/socket")  # untouched: the newcomer did not steal its socket
    assert first.proc is not None
    first.proc.kill()  # kill -9: the socket file stays behind
    first.proc.wait()
    first.proc = None
    assert Path(sock).exists()
    second.start()  # a stale socket is taken over
    serves(second, "ops/socket")


def test_two_daemons_cannot_share_an_nvme_file(
    spawn_daemon: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    shared = tmp_path / "nvme"
    first = with_args(spawn_daemon(start=False), nvme_path=str(shared))
    first.start()
    second = with_args(spawn_daemon(start=False), nvme_path=str(shared))
    err = refused(second)
    assert "nvme.path" in err and str(shared / "blocks.dat") in err and "in use" in err
    serves(first, "ops/nvme")


# -- data dirs that cannot be used -----------------------------------------------------------


@pytest.fixture
def read_only_dir() -> Iterator[Path]:
    """A read-only mount (root ignores permission bits, not a read-only filesystem)."""
    where = Path(tempfile.mkdtemp(prefix="tierd-ro-"))
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)],
                              capture_output=True, check=False)  # fmt: skip
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.decode().strip()}")
        yield where
        subprocess.run(["umount", str(where)], check=True)
    finally:
        where.rmdir()


@pytest.mark.parametrize("which", ["data dir", "missing data dir", "nvme path"])
def test_an_unwritable_dir_is_a_clean_error(
    spawn_daemon: Callable[..., DaemonProcess], read_only_dir: Path, which: str
) -> None:
    daemon = spawn_daemon(start=False)
    if which == "data dir":
        with_args(daemon, data_dir=str(read_only_dir))
        key = "data_dir"
    elif which == "missing data dir":
        with_args(daemon, data_dir=str(read_only_dir / "sub" / "dir"))
        key = "data_dir"
    else:
        with_args(daemon, nvme_path=str(read_only_dir / "nvme"))
        key = "nvme.path"
    err = refused(daemon)
    assert f"configuration error: {key}:" in err and "Read-only file system" in err, err


# -- a damaged catalog -----------------------------------------------------------------------


def _catalog(data_dir: Path) -> Path:
    return data_dir / "index.sqlite3"


def _damage(path: Path, kind: str) -> None:
    if kind == "deleted":
        path.unlink()
        for side in ("-wal", "-shm"):
            Path(f"{path}{side}").unlink(missing_ok=True)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(3).bytes(64 * 1024))
    elif kind == "other schema":
        path.unlink(missing_ok=True)
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE notes (body TEXT)")
    elif kind == "quick_check":
        # Enough rows for a multi-page b-tree, then a scribble over a page in its middle.
        with closing(Catalog(path)) as cat:
            cat.upsert_namespace(NamespaceRow(b"n" * 16, "t", "m", [1, 1, 8, "uint8", 1], []))
            cat.insert_blocks(BlockRow(b"n" * 16, k, 8, 1, False, 0.0)
                              for k in keys(2000, seed=4))  # fmt: skip
        pages = path.stat().st_size // 4096
        with open(path, "r+b") as f:
            f.seek((pages // 2) * 4096 + 200)
            f.write(b"\xa5" * 1000)


@pytest.mark.parametrize("kind", ["empty", "garbage", "other schema", "quick_check"])
def test_a_damaged_catalog_is_refused_with_what_to_run(
    spawn_daemon: Callable[..., DaemonProcess], kind: str
) -> None:
    daemon = spawn_daemon(start=False)
    data_dir = daemon.base / "data"
    data_dir.mkdir()
    _damage(_catalog(data_dir), kind)
    before = _catalog(data_dir).read_bytes()
    err = refused(daemon)
    assert "is damaged" in err and f"tierctl fsck --repair --data-dir {data_dir}" in err, err
    assert _catalog(data_dir).read_bytes() == before  # refused, not "repaired" to empty


@pytest.mark.parametrize("kind", ["deleted", "garbage"])
def test_fsck_rebuilds_the_catalog_and_the_daemon_serves_every_nvme_block(
    spawn_daemon: Callable[..., DaemonProcess], kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = spawn_daemon()
    on_nvme, host_only = keys(12, seed=1), keys(2, seed=2)
    put(daemon.address, "ops/rebuild", on_nvme + host_only)
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("ops/rebuild", LAY)
        assert c.move(ns, on_nvme, "nvme") == len(on_nvme)
        assert c.locate(ns, on_nvme) == ["nvme"] * len(on_nvme)
    daemon.stop()
    data_dir = daemon.base / "data"
    _damage(_catalog(data_dir), kind)
    if kind != "deleted":
        assert "tierctl fsck --repair" in refused(daemon)

    assert tierctl(["fsck", "--data-dir", str(data_dir)]) == 1  # found, not touched
    assert "run with --repair" in capsys.readouterr().out
    assert tierctl(["fsck", "--data-dir", str(data_dir), "--repair", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    rebuilt = report["rebuilt"]
    assert (rebuilt["namespaces"], rebuilt["nvme_blocks"], rebuilt["corrupt"]) == (1, 12, [])
    assert any("only in host memory are not recovered" in n for n in rebuilt["notes"])
    assert report["problems"][0]["tier"] == "catalog"
    if kind == "garbage":
        assert list(data_dir.glob("index.sqlite3.damaged-*")), "the damaged file is kept"
    assert tierctl(["fsck", "--data-dir", str(data_dir)]) == 0  # the new catalog is clean

    daemon.start()
    got = get(daemon.address, "ops/rebuild", on_nvme + host_only)
    assert all(exact(g, k) for g, k in zip(got, on_nvme)), "an NVMe block did not come back"
    assert got[len(on_nvme) :] == [None, None]  # host-only blocks are lost, as reported
    with TierdClient(daemon.address, tenant="it") as c:
        assert c.stats()["corrupt_reads"] == 0


# -- an unreachable CSD worker ---------------------------------------------------------------


class Worker:
    """`tierd csd-worker` run by the test, outside any daemon's supervision."""

    def __init__(self, base: Path) -> None:
        self.address = f"unix:{base}/worker.sock"
        self.cmd = [sys.executable, "-m", "tierd", "csd-worker", "--dir", str(base / "shard"),
                    "--listen", self.address, "--capacity", "64MiB"]  # fmt: skip
        self.log = base / "worker.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None


def test_an_unreachable_csd_worker_is_unavailable_not_corrupt(
    spawn_daemon: Callable[..., DaemonProcess],
) -> None:
    base = Path(tempfile.mkdtemp(prefix="tierd-csd-"))
    worker = Worker(base)
    try:
        worker.start()
        daemon = spawn_daemon(start=False)
        config = daemon.base / "tierd.toml"
        config.write_text(f'[csd]\nremote = ["{worker.address}"]\n')
        with_args(daemon, config=str(config))
        daemon.start()
        ks = keys(4, seed=7)
        put(daemon.address, "ops/csd", ks)
        with TierdClient(daemon.address, tenant="it") as c:
            ns = c.open_namespace("ops/csd", LAY)
            deadline = time.monotonic() + START_DEADLINE_S
            while True:  # the worker may still be starting
                try:
                    assert c.move(ns, ks, "csd") == len(ks)
                    break
                except TierdError:
                    assert time.monotonic() < deadline, worker.log.read_text()
                    time.sleep(0.2)
            assert c.locate(ns, ks) == ["csd"] * len(ks)
            worker.kill()
            res = c.get(ns, ks)
            assert res.found == [False] * len(ks)  # a miss: the client recomputes
            assert c.stats()["corrupt_reads"] == 0
            assert c.locate(ns, ks) == ["csd"] * len(ks)  # kept for when it is back
            worker.start()
            deadline = time.monotonic() + START_DEADLINE_S
            while not (res := c.get(ns, ks)).all_found:
                assert time.monotonic() < deadline, "the worker's blocks never came back"
                time.sleep(0.2)
            assert all(res.blocks[i].tobytes() == block_for(k).tobytes() for i, k in enumerate(ks))
            assert c.stats()["corrupt_reads"] == 0
    finally:
        worker.kill()
        shutil.rmtree(base, ignore_errors=True)
