"""SIGHUP with a malformed config file: a running daemon logs the refusal, keeps serving with
its old configuration, and still applies the next valid edit."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierd.tiers.host import segments_of
from tierd_client import InvalidArgument, KVLayout, TierdClient, TierdError

DEADLINE_S = 60.0
LAYOUT = KVLayout(1, 2, 64, "float16", 16)
LONG_LEASE_MS = 500_000  # allowed under the first max_ttl_ms, refused under the edited one

# (what the file holds, what the refusal names besides the file)
MALFORMED: list[tuple[bytes | str, str]] = [
    (b"[leases]\nmax_ttl_ms = 1000\n\xff\xfe\n", "not UTF-8 text"),
    ("[host]\ncapacity = 1e400\n", "host.capacity"),
    ("[host]\ncapacity = " + "9" * 5000 + "\n", "not valid TOML"),
    ("a = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ("[host]\nhigh_watermark = nan\n", "host.high_watermark"),
    ("[leases]\ndefault_ttl_ms = 0\n", "leases.default_ttl_ms"),
    ("[leases]\nmax_ttl_ms = -5\n", "leases.max_ttl_ms"),
    ('[[tenants]]\nname = "a"\ncert_cn = "a"\nweight = nan\n', "tenants[0].weight"),
]


class Daemon:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.address = f"unix:{base}/s.sock"
        self.config = base / "tierd.toml"
        self.log = base / "daemon.log"
        self.write(max_ttl_ms=600_000)
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tierd", "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip

    def write(self, *, max_ttl_ms: int) -> None:
        self.config.write_text(
            f'data_dir = "{self.base}/data"\n[server]\nlisten = ["{self.address}"]\n'
            f'[host]\ncapacity = "16MiB"\n[nvme]\ncapacity = "32MiB"\n'
            f"[leases]\ndefault_ttl_ms = 30000\nmax_ttl_ms = {max_ttl_ms}\n"
        )

    def log_lines(self, needle: str) -> list[str]:
        return [ln for ln in self.log.read_text(errors="replace").splitlines() if needle in ln]

    def wait_for_lines(self, needle: str, count: int) -> list[str]:
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"daemon died:\n{self.log.read_text()[-3000:]}"
            if len(lines := self.log_lines(needle)) >= count:
                return lines
            time.sleep(0.05)
        pytest.fail(f"no {count} lines with {needle!r}:\n{self.log.read_text()[-3000:]}")

    def wait_serving(self) -> None:
        deadline = time.monotonic() + DEADLINE_S
        with TierdClient(self.address, timeout=1.0, max_retries=0) as probe:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()[-3000:]
                try:
                    probe.stats()
                    return
                except TierdError:
                    time.sleep(0.05)
        pytest.fail(f"daemon not serving:\n{self.log.read_text()[-3000:]}")


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    base = Path(tempfile.mkdtemp(prefix="trl-"))  # short: unix socket paths are limited
    d = Daemon(base)
    try:
        d.wait_serving()
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            d.proc.wait(30)
        for seg in segments_of(base / "data"):
            seg.unlink(missing_ok=True)
        shutil.rmtree(base, ignore_errors=True)


def round_trip(address: str, i: int) -> None:
    """A put and get under a lease only the first configuration allows."""
    with TierdClient(address, lease_ttl_ms=LONG_LEASE_MS, timeout=10) as c:
        ns = c.open_namespace("reload", LAYOUT)
        keys = c.block_keys(ns, np.arange(16 * (i + 1)))[-1:]
        block = np.full((1, *LAYOUT.block_shape), i, dtype=np.float16)
        assert c.put(ns, keys, block) == ["stored"]
        got = c.get(ns, keys)
        assert got.found == [True] and np.array_equal(got.blocks, block)


def test_malformed_reloads_keep_the_daemon_and_its_config(daemon: Daemon) -> None:
    round_trip(daemon.address, 0)
    for i, (content, names) in enumerate(MALFORMED, start=1):
        data = content if isinstance(content, bytes) else content.encode()
        daemon.config.write_bytes(data)
        daemon.proc.send_signal(signal.SIGHUP)
        refused = daemon.wait_for_lines("reload refused", i)[-1]
        assert f"{daemon.config}: " in refused and names in refused, refused
        round_trip(daemon.address, i)  # alive, serving, and the old max_ttl_ms still holds
    assert not daemon.log_lines("Traceback")

    daemon.config.unlink()  # a file that vanished is refused the same way
    daemon.proc.send_signal(signal.SIGHUP)
    assert "cannot read" in daemon.wait_for_lines("reload refused", len(MALFORMED) + 1)[-1]

    daemon.write(max_ttl_ms=400_000)
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_for_lines("reloaded configuration", 1)
    with pytest.raises(InvalidArgument, match="400000"):
        round_trip(daemon.address, 99)
    with TierdClient(daemon.address, timeout=10) as c:
        assert c.stats()["tiers"]["host"]["blocks"] == len(MALFORMED) + 1
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
