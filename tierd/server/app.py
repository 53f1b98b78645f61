"""The daemon process: a gRPC server around one CacheService, with a clean drain.

Primitives: `Daemon(config)`, `start()`, `reload(config)`, `stop()`;
`serve(config, config_path)` runs one until SIGTERM/SIGINT and returns the exit status.

systemd sees READY once the listeners accept, RELOADING/READY around a SIGHUP, WATCHDOG
while the placement thread lives and a health call through the daemon's own listener
answers, and STOPPING on SIGTERM. The drain: health turns
NOT_SERVING, the server stops accepting, in-flight calls get up to
`server.drain_seconds` to finish, host-only blocks are written to NVMe if
`server.flush_on_stop`, then the core closes (the catalog and the host segments stay, so
a restart finds every committed block).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tierd.config import Config, format_size
from tierd.config_checks import anonymous_listeners
from tierd.core.service import CacheService
from tierd.errors import ConfigError
from tierd.metrics import Metrics
from tierd.server.decoding import DecodeGuard
from tierd.server.fastpath import AttendRings
from tierd.server.handoff import HandoffServer, handoff_path
from tierd.server.listeners import bind_address, claim_unix_socket, refuse_live_sockets
from tierd.server.liveness import RpcProbe
from tierd.server.peers import PeerNode
from tierd.server.sdnotify import Notifier
from tierd.server.servicer import TierdServicer
from tierd.server.streams import StreamGuard
from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc

log = logging.getLogger("tierd")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Tierd"].full_name


def _tls_credentials(config: Config) -> grpc.ServerCredentials:
    """TLS for TCP listeners; with a client CA, clients must present a certificate."""
    srv = config.server
    assert srv.tls_cert is not None and srv.tls_key is not None  # checked by validate()
    ca = srv.tls_client_ca.read_bytes() if srv.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(srv.tls_key.read_bytes(), srv.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _connection_options(config: Config) -> list[tuple[str, int]]:
    """Dead peers found by keepalive pings (even on a quiet stream); idle connections
    closed, so a peer cannot hold connections it does not use."""
    lim = config.limits
    return [
        ("grpc.keepalive_time_ms", lim.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", lim.keepalive_timeout_ms),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_connection_idle_ms", lim.connection_idle_ms),
    ]


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        refuse_live_sockets(config.server.listen)  # before anything is built or locked
        self.service = CacheService(config)
        self.metrics = Metrics(self.service, tenant_labels=config.metrics.tenant_labels)
        self.notifier = Notifier.from_env()
        opts = [
            ("grpc.max_send_message_length", config.server.max_message_bytes),
            ("grpc.max_receive_message_length", config.server.max_message_bytes),
            ("grpc.so_reuseport", 0),
            *_connection_options(config),
        ]
        pool = futures.ThreadPoolExecutor(config.server.workers, thread_name_prefix="tierd-rpc")
        self.streams = StreamGuard(lambda: self.config.limits, config.server.workers,
                                   lambda ctx: self.servicer.auth.identify(ctx))  # fmt: skip
        self.server = grpc.server(
            pool, options=opts,
            interceptors=[self.metrics.interceptor(), self.streams, DecodeGuard()],
        )  # fmt: skip
        self.servicer = TierdServicer(self.service)
        pb_grpc.add_TierdServicer_to_server(self.servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self._sockets: list[Path] = []
        for addr in config.server.listen:
            target, path = bind_address(addr)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                claim_unix_socket(path)  # a stale socket of a dead daemon goes; a live one stays
                self._sockets.append(path)
            bound = (
                self.server.add_insecure_port(target)
                if path is not None
                else self.server.add_secure_port(target, _tls_credentials(config))
            )
            if bound == 0:
                raise OSError(f"cannot listen on {addr}")
        # Same-host clients get their tenant's shared memory beside the first unix socket,
        # and attend rings through the same handoff.
        self.rings = AttendRings(self.servicer)
        self.handoff = (
            HandoffServer(handoff_path(self._sockets[0]), self.service.client_fds,
                          self.servicer.authorize_shared_memory, self.rings,
                          weights=self.servicer.weights_fd)
            if self._sockets else None
        )  # fmt: skip
        self.servicer.handoff = self.handoff
        self.peer_node = PeerNode.build(config, self.service)  # None unless [peers] is set
        self._probe = RpcProbe(f"unix:{self._sockets[0]}" if self._sockets else None, pool)
        self._stopped = threading.Event()

    def start(self) -> None:
        self.service.start()
        self.server.start()
        if self.peer_node is not None:
            self.peer_node.start()
        if self.handoff is not None:
            self.handoff.start()
        for path in self._sockets:
            os.chmod(path, 0o660)  # owner and group: the inference workers' group
        if self.config.metrics.listen:
            port = self.metrics.serve(self.config.metrics.listen)
            log.info("metrics on http://%s:%d/metrics",
                     self.config.metrics.listen.rpartition(":")[0] or "127.0.0.1", port)
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.notifier.ready(self._status())
        self.notifier.start_watchdog(alive=self._alive)
        cfg = self.config
        tiers = "; ".join(
            f"{t.name} ({t.kind}, {t.backend}) {format_size(t.capacity)}"
            + (f" at {where}" if (where := t.details().get("path")) else "")
            for t in self.service.tiers
        )
        log.info("ready: listening on %s; tiers: %s", ", ".join(cfg.server.listen), tiers)
        if anonymous := anonymous_listeners(cfg):  # validation let it through only on purpose
            log.warning("server.allow_anonymous: %s admit any peer that completes TLS "
                        "(no tenants, no client CA)", ", ".join(anonymous))  # fmt: skip

    def _alive(self) -> bool:
        """The watchdog's sign of life: placement runs and the RPC path answers in time."""
        timeout = min(2.0, max(0.05, self.notifier.watchdog_interval))
        return self.service.placer.alive() and self._probe.answers(timeout)

    def _status(self) -> str:
        s = self.service.stats()
        return ", ".join(f"{t.name} {format_size(t.used_bytes)}/{format_size(t.capacity_bytes)}"
                         for t in s.tiers)  # fmt: skip

    def reload(self, new: Config) -> list[str]:
        """Apply what can change live; returns the keys that need a restart."""
        self.notifier.reloading()
        live, restart = self.config.reload_changes(new)
        self.config = live
        self.service.reconfigure(live)
        self.servicer.reload()
        if restart:
            log.warning("reloaded; these keys change only on restart: %s", ", ".join(restart))
        else:
            log.info("reloaded configuration")
        self.notifier.ready(self._status())
        return restart

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.notifier.stopping()
        self.health.enter_graceful_shutdown()
        started = time.monotonic()
        deadline = started + self.config.server.drain_seconds
        # Rings first: an idle one closes, a busy one once it answered; their clients go on
        # over gRPC, which serves until the drain ends.
        self.rings.stop()
        # Clients between prepare and commit/release may finish (their calls still land);
        # new leases are refused with UNAVAILABLE, which clients retry on the successor.
        if not self.service.begin_drain(started + self.config.server.drain_seconds / 2):
            log.warning("%d leases still open at shutdown; they expire with the process",
                        len(self.service.leases))
        self.server.stop(grace=max(0.0, deadline - time.monotonic())).wait()
        if self.peer_node is not None:  # no lookup pulls from peers now; peers pull no more
            self.peer_node.stop()
        self.rings.join(deadline)  # rings answering, like calls in flight, until the deadline
        self.streams.close()
        if self.config.server.flush_on_stop:
            n = self.service.placer.flush(deadline)
            log.info("flushed %d host blocks to NVMe", n)
        if self.handoff is not None:
            self.handoff.stop()
        self.metrics.close()
        self.service.close()
        for path in self._sockets:
            path.unlink(missing_ok=True)
        self.notifier.close()
        self._probe.close()
        log.info("stopped after draining for %.2f s", time.monotonic() - started)

    def wait(self) -> None:
        self._stopped.wait()


def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT; SIGHUP re-reads the configuration via `reload_config`."""
    daemon = Daemon(config)
    stop_requested = threading.Event()
    reload_requested = threading.Event()
    wake = threading.Event()

    def on_stop(signum: int, _frame: object) -> None:
        log.info("received %s; draining", signal.Signals(signum).name)
        stop_requested.set()
        wake.set()

    def on_hup(_signum: int, _frame: object) -> None:
        reload_requested.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    daemon.start()
    while not stop_requested.is_set():
        # With a timeout: a signal delivered to another thread only runs its Python handler
        # when the main thread next executes bytecode; an untimed wait could hold it forever.
        wake.wait(0.5)
        wake.clear()
        if reload_requested.is_set() and not stop_requested.is_set():
            reload_requested.clear()
            new: Config | None = None
            try:
                new = reload_config() if reload_config else daemon.config
                daemon.reload(new)
            except ConfigError as e:  # a bad edit must not take a running daemon down
                log.error("reload refused, keeping the running configuration: %s", e)
                daemon.notifier.ready(daemon._status())
            except Exception:
                if new is not None:
                    raise  # failed while applying: the running state is no longer known
                # Reading is not applying: a bug there must not take the daemon down either.
                log.exception("reload failed, keeping the running configuration")
                daemon.notifier.ready(daemon._status())
    daemon.stop()
    return 0
