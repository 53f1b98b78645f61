"""The shipped unit file and config, driven the way systemd drives the daemon: a notify
socket, WATCHDOG_USEC, SIGHUP for reload, SIGTERM for stop."""

from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierd.tiers.host import segment_tag
from tierd_client import KVLayout, TierdClient

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "tools" / "systemd" / "tierd.service"
SAMPLE = ROOT / "tools" / "systemd" / "tierd.toml"


def unit_service_section() -> dict[str, str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keep systemd's key case
    parser.read(UNIT)
    return dict(parser["Service"])


def test_unit_file_has_what_operations_need() -> None:
    svc = unit_service_section()
    assert svc["Type"] == "notify"
    assert int(svc["WatchdogSec"]) > 0
    assert "-HUP" in svc["ExecReload"]
    assert svc["User"] == "tierd"
    for key, value in [("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes")]:  # fmt: skip
        assert svc[key] == value
    assert "serve --config /etc/tierd/tierd.toml" in svc["ExecStart"]


class NotifySocket:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(30)

    def next_matching(self, key: str) -> dict[str, str]:
        """The next message carrying `key` (watchdog pings in between are skipped)."""
        while True:
            raw = self.sock.recv(65536).decode()
            fields = dict(line.split("=", 1) for line in raw.splitlines() if "=" in line)
            if key in fields:
                return fields


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Unix socket paths are limited to ~107 bytes: keep the directory short.
    with tempfile.TemporaryDirectory(prefix="tsd-") as d:
        yield Path(d)
        for seg in Path("/dev/shm").glob("tierd.*"):
            if seg.stat().st_mtime and _owned_by(seg, Path(d)):
                seg.unlink(missing_ok=True)


def _owned_by(seg: Path, base: Path) -> bool:
    return seg.name.startswith(f"tierd.{segment_tag(base / 'data')}.")


def write_config(workdir: Path, high: float) -> Path:
    text = SAMPLE.read_text()
    text = text.replace('"/var/lib/tierd/nvme"', f'"{workdir}/data/nvme"')
    text = text.replace('"/var/lib/tierd"', f'"{workdir}/data"')
    text = text.replace("unix:/run/tierd/tierd.sock", f"unix:{workdir}/tierd.sock")
    text = re.sub(r'capacity = "16GiB"', 'capacity = "64MiB"', text)
    text = re.sub(r'capacity = "200GiB"', 'capacity = "128MiB"', text)
    text = re.sub(r"high_watermark = [0-9.]+", f"high_watermark = {high}", text)
    text = text.replace('listen = "127.0.0.1:9464"', 'listen = "127.0.0.1:0"')
    path = workdir / "tierd.toml"
    path.write_text(text)
    return path


def exec_start(config: Path) -> list[str]:
    """The unit's ExecStart, with this checkout's interpreter for the installed binary."""
    argv = shlex.split(unit_service_section()["ExecStart"])
    argv = [sys.executable, "-m", "tierd", *argv[1:]]
    return [str(config) if a == "/etc/tierd/tierd.toml" else a for a in argv]


def test_ready_watchdog_reload_drain_under_the_shipped_unit(workdir: Path) -> None:
    config = write_config(workdir, high=0.9)
    notify = NotifySocket(workdir / "notify")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="200000")
    log = (workdir / "daemon.log").open("w+")
    proc = subprocess.Popen(exec_start(config), env=env, stderr=log)
    try:
        ready = notify.next_matching("READY")
        assert ready["READY"] == "1" and int(ready["MAINPID"]) == proc.pid
        assert "host" in ready["STATUS"]
        assert notify.next_matching("WATCHDOG")["WATCHDOG"] == "1"

        layout = KVLayout(2, 2, 64, "float16", 16)
        with TierdClient(f"unix:{workdir}/tierd.sock") as client:
            ns = client.open_namespace("m", layout)
            keys = client.block_keys(ns, np.arange(64))
            blocks = np.random.default_rng(0).standard_normal((4, *layout.block_shape))
            assert client.put(ns, keys, blocks.astype(np.float16)) == ["stored"] * 4

        write_config(workdir, high=0.8)
        proc.send_signal(signal.SIGHUP)
        assert notify.next_matching("RELOADING")["RELOADING"] == "1"
        assert notify.next_matching("READY")["READY"] == "1"

        proc.send_signal(signal.SIGTERM)
        assert notify.next_matching("STOPPING")["STOPPING"] == "1"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.seek(0)
    lines = log.read()
    assert '"reloaded configuration"' in lines
    assert "flushed 4 host blocks to NVMe" in lines
    # flush_on_stop: every block now has an NVMe copy, so a reboot (empty /dev/shm) keeps it.
    nvme_copies = ("SELECT c.location FROM blocks b LEFT JOIN copies c ON c.ns_id = b.ns_id "
                   "AND c.key = b.key AND c.tier = 'nvme'")  # fmt: skip
    with sqlite3.connect(workdir / "data" / "index.sqlite3") as db:
        rows = db.execute(nvme_copies).fetchall()
    assert len(rows) == 4 and all(r[0] is not None for r in rows)


def test_bad_config_is_refused_with_file_key_and_reason(workdir: Path) -> None:
    bad = workdir / "bad.toml"
    bad.write_text('[host]\ncapacity = "lots"\n')
    run = subprocess.run([sys.executable, "-m", "tierd", "serve", "--config", str(bad)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 2
    assert str(bad) in run.stderr and "host.capacity" in run.stderr and "lots" in run.stderr
    bad.write_text("[host]\nhigh_watermark = 0.5\nlow_watermark = 0.9\n")
    run = subprocess.run([sys.executable, "-m", "tierd", "check-config", str(bad)],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 2 and "low_watermark" in run.stderr
