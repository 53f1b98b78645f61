"""The daemon process: a gRPC server around one CacheService, with a clean drain.

Primitives: `Daemon(config)`, `start()`, `wait()`, `stop()`; `serve(config)` runs one
until SIGTERM/SIGINT and returns the exit status.

On SIGTERM: health turns NOT_SERVING, the server stops accepting, in-flight calls get up
to `server.drain_seconds` to finish, then the core closes (the catalog and the host
segments stay, so a restart finds every committed block).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc

from tierd.config import Config, format_size
from tierd.core.service import CacheService
from tierd.server.servicer import TierdServicer

log = logging.getLogger("tierd")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tierd"].full_name


def _bind_address(addr: str) -> tuple[str, Path | None]:
    """gRPC's form of a listen address, and the socket path for unix ones."""
    if addr.startswith("unix:"):
        path = Path(addr.removeprefix("unix:").removeprefix("//"))
        return f"unix:{path}", path
    return addr, None


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.service = CacheService(config)
        opts = [
            ("grpc.max_send_message_length", config.server.max_message_bytes),
            ("grpc.max_receive_message_length", config.server.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(config.server.workers, thread_name_prefix="tierd-rpc"),
            options=opts,
        )
        pb_grpc.add_TierdServicer_to_server(TierdServicer(self.service), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self._sockets: list[Path] = []
        for addr in config.server.listen:
            target, path = _bind_address(addr)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                path.unlink(missing_ok=True)  # a stale socket from a crashed daemon
                self._sockets.append(path)
            if self.server.add_insecure_port(target) == 0:
                raise OSError(f"cannot listen on {addr}")
        self._stopped = threading.Event()

    def start(self) -> None:
        self.service.start()
        self.server.start()
        for path in self._sockets:
            os.chmod(path, 0o660)  # owner and group: the inference workers' group
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        cfg = self.config
        log.info(
            "ready: listening on %s; host tier %s, nvme tier %s at %s (%s)",
            ", ".join(cfg.server.listen), format_size(cfg.host.capacity_bytes),
            format_size(cfg.nvme.capacity_bytes), cfg.nvme_path, self.service.nvme.backend_name,
        )  # fmt: skip

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        started = time.monotonic()
        self.server.stop(grace=self.config.server.drain_seconds).wait()
        self.service.close()
        for path in self._sockets:
            path.unlink(missing_ok=True)
        log.info("stopped after draining for %.2f s", time.monotonic() - started)

    def wait(self) -> None:
        self._stopped.wait()


def serve(config: Config) -> int:
    daemon = Daemon(config)
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; draining", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.start()
    stop_requested.wait()
    daemon.stop()
    return 0
