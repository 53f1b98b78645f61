"""Is the RPC path answering? The probe behind the systemd watchdog.

Primitives: `RpcProbe(target, executor)`, `answers(timeout) -> bool`, `close()`.

A live placement thread says little if every RPC thread is stuck: the watchdog should fire
exactly when clients get no answers. So the probe makes a health Check through the daemon's
own unix listener, as a client would, and it answers only while gRPC polls, a pool thread
is free to run the call, and the reply gets out. A daemon without a unix listener (TCP with
TLS only, where the probe would need a client certificate) probes the RPC thread pool
itself: a no-op submitted to it must run in time.
"""

from __future__ import annotations

import logging
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("tierd.liveness")


class RpcProbe:
    def __init__(self, target: str | None, executor: futures.Executor) -> None:
        self._target = target
        self._executor = executor
        self._channel: grpc.Channel | None = None
        self._lock = threading.Lock()

    def answers(self, timeout: float) -> bool:
        try:
            if self._target is None:
                self._executor.submit(lambda: None).result(timeout)
                return True
            with self._lock:
                if self._channel is None:
                    self._channel = grpc.insecure_channel(self._target)
                stub = health_pb2_grpc.HealthStub(self._channel)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return True
        except (grpc.RpcError, futures.TimeoutError, RuntimeError) as e:
            log.warning("the RPC path did not answer within %.2f s: %s", timeout,
                        e.code().name if isinstance(e, grpc.RpcError) else type(e).__name__)  # fmt: skip
            return False

    def close(self) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
