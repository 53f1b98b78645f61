"""A real Mooncake Store master for tests, on free loopback ports, started and stopped by
the tests themselves (the `mooncake_master` the package installs beside the venv's
Python, with its HTTP metadata server in the same process).

Primitives: `HAVE_MOONCAKE` (the package imports: it needs the system's libibverbs1),
`needs_mooncake`, `Master(base)` (`start`, `kill`, `stop`, `address`, `metadata`,
`client()`: a store client of the test's own, for looking behind the daemon's back).

A master keeps its objects in memory only: one killed and started again comes back
empty, on the same ports. Readiness is polled (the port accepts, a client sets up), never
assumed after a fixed sleep.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.ports import free_port

try:
    from mooncake.store import MooncakeDistributedStore
except ImportError:  # the mooncake extra, and libibverbs1, bring it; without: skipped
    MooncakeDistributedStore = None

MASTER_BIN = Path(sys.executable).with_name("mooncake_master")
HAVE_MOONCAKE = MooncakeDistributedStore is not None and MASTER_BIN.is_file()
needs_mooncake = pytest.mark.skipif(
    not HAVE_MOONCAKE, reason="needs mooncake-transfer-engine-non-cuda and libibverbs1"
)
READY_DEADLINE_S = 20.0
LEASE_MS = 300  # short, so a deletion after a read is not refused for long


class Master:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metadata(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/metadata"

    def start(self) -> None:
        log = open(self.base / "master.log", "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [str(MASTER_BIN), f"--port={self.port}", "--enable_http_metadata_server=true",
             "--http_metadata_server_host=127.0.0.1",
             f"--http_metadata_server_port={self.http_port}",
             f"--metrics_port={self.metrics_port}", f"--default_kv_lease_ttl={LEASE_MS}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + READY_DEADLINE_S
        for port in (self.port, self.http_port):
            while True:
                assert self.proc.poll() is None, self.log_tail()
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"master not up:\n{self.log_tail()}"
                    time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    stop = kill  # it keeps nothing on disk: stopping is killing

    def log_tail(self) -> str:
        path = self.base / "master.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def client(self) -> Any:
        """A store client lending 16 MiB to the pool; close it when done."""
        store = MooncakeDistributedStore()
        rc = store.setup("127.0.0.1", self.metadata, 16 << 20, 16 << 20, "tcp", "",
                         self.address)  # fmt: skip
        assert rc == 0, f"test client setup: {rc}"
        return store
