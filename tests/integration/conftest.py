"""A real tierd daemon in a subprocess, for tests that talk to it through tierd_client.

`daemon_address`: one daemon for the session (small host tier, NVMe tier in a temporary
directory); tests keep out of each other's way by opening distinct namespaces.
`spawn_daemon`: extra daemons a test can start late, stop and restart.

The daemon keeps its shared-memory segments on purpose (a restart adopts them), so the
fixtures remove them after stopping it; the paths come from OpenNamespace, as a client
learns them, for every tenant the tests use.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tierd.tiers.host import segments_of
from tierd_client import TierdClient, TierdError

START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 15.0
TENANTS = ("default", "it")  # every tenant a test may use


def _log_tail(path: Path, limit: int = 20_000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "<no daemon log>"


class DaemonProcess:
    """`python -m tierd serve` on a unix socket under `base`."""

    def __init__(self, base: Path, name: str = "tierd") -> None:
        self.base = base
        self.address = f"unix:{base}/{name}.sock"
        self.log = base / f"{name}.stderr"
        self.cmd = [
            sys.executable, "-m", "tierd", "serve",
            "--listen", self.address,
            "--data-dir", str(base / "data"),
            "--host-capacity", "256MiB",
            "--nvme-capacity", "256MiB",
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> None:
        # stderr to a file, not a pipe: a chatty daemon must never block on a full pipe.
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=err)
        if wait:
            self.wait_serving()

    def wait_serving(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_DEADLINE_S
        last: Exception | None = None
        with TierdClient(self.address, timeout=1.0, max_retries=0) as probe:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    pytest.fail(
                        f"tierd exited with {self.proc.returncode} while starting; "
                        f"stderr:\n{_log_tail(self.log)}",
                        pytrace=False,
                    )
                try:
                    probe.stats()
                    return
                except TierdError as e:  # not listening yet: DEADLINE_EXCEEDED, UNAVAILABLE
                    last = e
                    time.sleep(0.1)
        self.stop()
        pytest.fail(
            f"tierd did not answer Stats within {START_DEADLINE_S}s (last error: {last}); "
            f"stderr:\n{_log_tail(self.log)}",
            pytrace=False,
        )

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"tierd ignored SIGTERM; stderr:\n{_log_tail(self.log)}", file=sys.stderr)
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"tierd exited with {proc.returncode}; stderr:\n{_log_tail(self.log)}",
                  file=sys.stderr)  # fmt: skip
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove_segments(self) -> None:
        for path in segments_of(self.base / "data"):
            path.unlink(missing_ok=True)

    def discard(self) -> None:
        """Stop it and remove what it leaves: its memory segments and its directory."""
        self.stop()
        self.remove_segments()
        shutil.rmtree(self.base, ignore_errors=True)


def _short_tmpdir() -> Path:
    # Not pytest's tmp_path: unix socket paths are limited to 107 bytes.
    return Path(tempfile.mkdtemp(prefix="tierd-it-"))


@pytest.fixture(scope="session")
def daemon_address() -> Iterator[str]:
    daemon = DaemonProcess(_short_tmpdir())
    try:
        daemon.start()
        yield daemon.address
    finally:
        daemon.discard()


@pytest.fixture
def spawn_daemon() -> Iterator[Callable[..., DaemonProcess]]:
    """`spawn_daemon(start=True, wait=True)`: another daemon in its own directory."""
    started: list[DaemonProcess] = []

    def spawn(*, start: bool = True, wait: bool = True) -> DaemonProcess:
        daemon = DaemonProcess(_short_tmpdir())
        started.append(daemon)
        if start:
            daemon.start(wait=wait)
        return daemon

    yield spawn
    for daemon in started:
        daemon.discard()


def weights_daemon(capacity: int | str) -> DaemonProcess:
    """A daemon (not started) whose `[weights] capacity` is `capacity`."""
    d = DaemonProcess(_short_tmpdir())
    path = d.base / "tierd.toml"
    cap = f'"{capacity}"' if isinstance(capacity, str) else str(capacity)
    path.write_text(f"[weights]\ncapacity = {cap}\n")
    d.cmd += ["--config", str(path)]
    return d


@pytest.fixture(scope="module")
def models_daemon() -> Iterator[DaemonProcess]:
    """A module's daemon for registered models and adapters (64 MiB of weights)."""
    d = weights_daemon("64MiB")
    try:
        d.start()
        yield d
    finally:
        d.discard()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failing test, attach the session daemon's stderr to the report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    address = getattr(item, "funcargs", {}).get("daemon_address")
    if report.failed and address:
        log = Path(address.removeprefix("unix:")).parent / "tierd.stderr"
        report.sections.append(("tierd stderr", _log_tail(log)))
