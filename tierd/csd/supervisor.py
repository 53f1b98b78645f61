"""Keeping CSD workers alive: spawn local ones, watch all, restart the dead with backoff.

Primitives: `CsdWorkerSpec` (frozen), `CsdWorkerInfo` (a snapshot),
`WorkerHandle` (one worker's channel, process and state; `.stub()` raises Unavailable
while the worker is down), `Supervisor(handles)`: `.start()`, `.stop()`.

A local worker (spawn=True) runs `python -m tierd csd-worker` with its stderr appended to
`<dir>/worker.log`. The monitor thread notices its death by `poll()` within one tick and
restarts it after an exponential backoff (reset once it has stayed up a while); every
worker, local or remote, counts as healthy only after grpc.health says SERVING. Calls
that see UNAVAILABLE or DEADLINE_EXCEEDED mark their worker down at once, so later calls
fail fast instead of each waiting for the monitor's next probe.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierd.errors import Unavailable
from tierd_client._proto import csd_pb2_grpc as cpb_grpc

log = logging.getLogger("tierd.csd")

LOG_FILE = "worker.log"
# Set for the workers we spawn: the daemon's pid, so a worker outliving it drains.
PARENT_ENV = "TIERD_CSD_PARENT_PID"
# Whole blocks travel in-band; a StoreBlocks batch may hold many of them.
MAX_MESSAGE_BYTES = 256 << 20

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # gRPC's default reconnect backoff starts at 1 s and grows to 2 min: a worker back
    # from a restart would look dead long after it listens again.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class CsdWorkerSpec:
    """One worker. spawn=True: the daemon runs it locally on `directory`; False: it is
    remote, already running at `listen` (directory and capacity are then informative)."""

    name: str
    directory: Path | None
    listen: str
    capacity_bytes: int
    spawn: bool

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a csd worker needs a name")
        if not self.listen:
            raise ValueError(f"csd worker {self.name!r} needs a listen address")
        if self.spawn and self.directory is None:
            raise ValueError(f"csd worker {self.name!r} is spawned locally: it needs a directory")
        if self.spawn and self.capacity_bytes <= 0:
            raise ValueError(f"csd worker {self.name!r} needs a positive capacity")


@dataclass(frozen=True)
class CsdWorkerInfo:
    name: str
    healthy: bool
    spawned: bool
    pid: int | None
    restarts: int  # processes started after the first
    last_exit: int | None  # return code of the last process that died


@dataclass(frozen=True)
class Timing:
    monitor_interval_s: float = 0.1
    probe_up_interval_s: float = 1.0  # a healthy worker is probed this often
    health_timeout_s: float = 1.0
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 10.0
    backoff_reset_s: float = 10.0  # up this long: the next crash restarts without delay
    hang_s: float = 30.0  # a local worker that was serving, then unhealthy this long: killed
    start_s: float = 120.0  # a local worker not serving this long after its spawn: killed
    stop_timeout_s: float = 10.0


class WorkerHandle:
    def __init__(self, spec: CsdWorkerSpec, timing: Timing) -> None:
        self.spec = spec
        self.timing = timing
        self.lock = threading.Lock()
        self.up = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = -1 if spec.spawn else 0  # the first spawn is not a restart
        self.failures = 0
        self.restart_at = 0.0
        self.up_since = 0.0
        self.next_probe = 0.0
        self.last_ok = 0.0  # last good probe, or the spawn
        self.last_exit: int | None = None
        self._channel: grpc.Channel | None = None
        self._stub: cpb_grpc.CsdWorkerStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None
        if not spec.spawn:
            self._connect()

    @property
    def name(self) -> str:
        return self.spec.name

    def info(self) -> CsdWorkerInfo:
        with self.lock:
            pid = self.proc.pid if self.proc is not None and self.proc.poll() is None else None
            return CsdWorkerInfo(self.name, self.up, self.spec.spawn, pid,
                                 max(self.restarts, 0), self.last_exit)  # fmt: skip

    def stub(self) -> cpb_grpc.CsdWorkerStub:
        with self.lock:
            if not self.up or self._stub is None:
                how = "restarting" if self.spec.spawn else "not answering health checks"
                raise Unavailable(f"csd worker {self.name!r} is down ({how})")
            return self._stub

    def mark_down(self, stub: cpb_grpc.CsdWorkerStub, why: str) -> None:
        """A call through `stub` failed at the transport: stop routing to it until a probe
        succeeds. A stub of an older process generation does not mark the new one down."""
        with self.lock:
            if stub is self._stub and self.up:
                self.up = False
                log.warning("csd worker %r marked down: %s", self.name, why)

    # -- supervision (monitor thread) -------------------------------------------------------

    def _connect(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = grpc.insecure_channel(self.spec.listen, options=_CHANNEL_OPTIONS)
        self._stub = cpb_grpc.CsdWorkerStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def spawn(self) -> None:
        spec = self.spec
        assert spec.directory is not None
        spec.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "tierd", "csd-worker", "--dir", str(spec.directory),
               "--listen", spec.listen, "--capacity", str(spec.capacity_bytes)]  # fmt: skip
        env = dict(os.environ, **{PARENT_ENV: str(os.getpid())})
        # stderr to a file, never a pipe: a chatty worker must not block on a full pipe.
        with open(spec.directory / LOG_FILE, "ab") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, env=env)  # fmt: skip
        with self.lock:
            self.proc = proc
            self.up = False
            self.up_since = 0.0
            self.restarts += 1
            # A fresh channel: the old one's reconnect backoff belongs to the dead process.
            self._connect()
        self.next_probe = 0.0
        self.last_ok = time.monotonic()
        log.info("csd worker %r started (pid %d)", self.name, proc.pid)

    def tick(self, now: float) -> None:
        if self.spec.spawn:
            proc = self.proc
            if proc is None:
                if now >= self.restart_at:
                    self.spawn()
                return
            code = proc.poll()
            if code is not None:
                self._died(code, now)
                return
            # Start-up gets its own, longer limit: on a loaded machine a worker may need
            # seconds to serve, and killing it for that would only make a crash loop.
            limit = self.timing.hang_s if self.up_since else self.timing.start_s
            if not self.up and now - self.last_ok > limit:
                # Alive but deaf (deadlock, stuck I/O): only a restart brings it back. The
                # next tick sees it dead and restarts it with the usual backoff.
                log.warning("csd worker %r unhealthy for %.0f s; killing pid %d",
                            self.name, now - self.last_ok, proc.pid)  # fmt: skip
                proc.kill()
                self.last_ok = now
                return
        if now >= self.next_probe:
            self._probe(now)

    def _died(self, code: int, now: float) -> None:
        if self.up_since and now - self.up_since >= self.timing.backoff_reset_s:
            self.failures = 0  # it had been fine for a while: not a crash loop
        self.failures += 1
        t = self.timing
        delay = min(t.backoff_cap_s, t.backoff_base_s * 2 ** (self.failures - 1))
        with self.lock:
            self.up = False
            self.proc = None
            self.last_exit = code
        self.restart_at = now + delay
        log.warning("csd worker %r exited with %s; restarting in %.2f s (see %s)",
                    self.name, code, delay, self.spec.directory / LOG_FILE  # type: ignore[operator]
                    )  # fmt: skip

    def _probe(self, now: float) -> None:
        ok = False
        health = self._health
        if health is not None:
            try:
                resp = health.Check(health_pb2.HealthCheckRequest(service=""),
                                    timeout=self.timing.health_timeout_s)  # fmt: skip
                ok = resp.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                ok = False
        with self.lock:
            if health is not self._health:
                return  # reconnected meanwhile: this answer is about an old channel
            if ok:
                self.last_ok = now
            if ok and not self.up:
                self.up_since = now
                log.info("csd worker %r is serving", self.name)
            elif not ok and self.up:
                log.warning("csd worker %r failed its health check", self.name)
            self.up = ok
        t = self.timing
        self.next_probe = now + (t.probe_up_interval_s if ok else t.monitor_interval_s)

    def stop(self) -> None:
        """SIGTERM the local process (it drains), then close the channel."""
        with self.lock:
            proc, self.proc, self.up = self.proc, None, False
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=self.timing.stop_timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("csd worker %r ignored SIGTERM; killing it", self.name)
                proc.kill()
                proc.wait()
        if proc is not None:
            with self.lock:
                self.last_exit = proc.returncode
        if self._channel is not None:
            self._channel.close()


class Supervisor:
    """The monitor thread: one tick per `monitor_interval_s` over every worker."""

    def __init__(self, handles: list[WorkerHandle], timing: Timing) -> None:
        self.handles = handles
        self.timing = timing
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="csd-monitor", daemon=True)

    def start(self) -> None:
        for h in self.handles:
            if h.spec.spawn:
                h.spawn()  # all at once: their start-up overlaps
        self._thread.start()

    def wait_healthy(self, timeout_s: float) -> list[str]:
        """Wait until every worker is healthy or `timeout_s` passes; names still down."""
        deadline = time.monotonic() + timeout_s
        while True:
            down = [h.name for h in self.handles if not h.info().healthy]
            if not down or time.monotonic() >= deadline:
                return down
            self._stop.wait(self.timing.monitor_interval_s / 2)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for h in self.handles:
            if h.spec.spawn and h.proc is not None and h.proc.poll() is None:
                h.proc.terminate()  # all drain in parallel; stop() below waits for each
        for h in self.handles:
            h.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.timing.monitor_interval_s):
            now = time.monotonic()
            for h in self.handles:
                try:
                    h.tick(now)
                except Exception:
                    log.exception("supervising csd worker %r failed", h.name)
