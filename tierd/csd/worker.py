"""The CSD worker process: one shard directory behind the CsdWorker gRPC service.

Primitives:
  `CsdWorkerServicer(shard)`           the service; translates only, the shard decides
  `CsdWorkerServer(directory, listen, capacity_bytes)`  `.start()`, `.stop()`, `.address`
  `run_worker(directory, listen, capacity_bytes) -> int`  serve until SIGTERM/SIGINT

Health (grpc.health.v1) says SERVING once the shard is open and the port bound. On
SIGTERM health turns NOT_SERVING, new calls are refused, calls in flight get
`drain_seconds` to finish, then the shard closes (its catalog keeps every stored block).

torch is imported on the first PartialAttend (or by a warm-up thread right after start),
not before SERVING: a worker restarted after a crash can serve reads and stores about
a second after it was spawned instead of after torch's several-second import.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tierd.csd.shard import CsdShard, StoreItem
from tierd.csd.supervisor import MAX_MESSAGE_BYTES, PARENT_ENV
from tierd.errors import InvalidArgument, TierdError
from tierd.server.listeners import bind_address
from tierd.server.status import translate_errors
from tierd_client._proto import csd_pb2 as cpb
from tierd_client._proto import csd_pb2_grpc as cpb_grpc
from tierd_client.layout import KVLayout

log = logging.getLogger("tierd.csd")

SERVICE_NAME = cpb.DESCRIPTOR.services_by_name["CsdWorker"].full_name
PARENT_CHECK_S = 1.0


def _layout(msg: object, field: str = "layout") -> KVLayout:
    try:
        return KVLayout.from_proto(msg)  # type: ignore[arg-type]
    except ValueError as exc:
        raise InvalidArgument(str(exc), field=field) from None


class CsdWorkerServicer(cpb_grpc.CsdWorkerServicer):
    def __init__(self, shard: CsdShard) -> None:
        self.shard = shard

    @translate_errors
    def StoreBlocks(self, request: cpb.StoreBlocksRequest, context: grpc.ServicerContext
                    ) -> cpb.StoreBlocksResponse:  # fmt: skip
        layout = _layout(request.layout)
        items = [StoreItem(b.namespace_id, b.key, b.checksum, b.data, b.encoding or "raw")
                 for b in request.blocks]  # fmt: skip
        return cpb.StoreBlocksResponse(stored=self.shard.store(layout, items))

    @translate_errors
    def ReadBlocks(self, request: cpb.CsdKeys, context: grpc.ServicerContext
                   ) -> Iterator[cpb.CsdBlock]:  # fmt: skip
        ns = request.namespace_id
        for key, sum_, data, encoding in self.shard.read_blocks(ns, list(request.keys)):
            yield cpb.CsdBlock(namespace_id=ns, key=key, checksum=sum_, data=data,
                               encoding="" if encoding == "raw" else encoding)  # fmt: skip

    @translate_errors
    def DropBlocks(self, request: cpb.CsdKeys, context: grpc.ServicerContext
                   ) -> cpb.DropBlocksResponse:  # fmt: skip
        return cpb.DropBlocksResponse(
            dropped=self.shard.drop(request.namespace_id, list(request.keys))
        )

    @translate_errors
    def PartialAttend(self, request: cpb.PartialAttendRequest, context: grpc.ServicerContext
                      ) -> cpb.PartialAttendResponse:  # fmt: skip
        from tierd.csd.attend import attend_runs, check_query  # torch: see module doc
        from tierd_client.tensors import to_message as tensor_to_proto
        from tierd_client.tensors import to_torch as tensor_from_proto

        layout = _layout(request.layout)
        q = tensor_from_proto(request.q, "q")
        check_query(q, layout)  # before any I/O: a bad query costs no reads
        runs = self.shard.read_layer_runs(request.namespace_id, layout, list(request.keys),
                                          request.layer)  # fmt: skip
        out, lse = attend_runs(runs, layout, q, request.scale)
        return cpb.PartialAttendResponse(out=tensor_to_proto(out), lse=tensor_to_proto(lse),
                                         missing=runs[0].missing)  # fmt: skip

    @translate_errors
    def ListBlocks(self, request: cpb.ListBlocksRequest, context: grpc.ServicerContext
                   ) -> cpb.ListBlocksResponse:  # fmt: skip
        return cpb.ListBlocksResponse(namespaces=[
            cpb.CsdKeys(namespace_id=ns, keys=keys) for ns, keys in self.shard.list_blocks().items()
        ])  # fmt: skip

    @translate_errors
    def Stats(self, request: cpb.WorkerStatsRequest, context: grpc.ServicerContext
              ) -> cpb.WorkerStatsResponse:  # fmt: skip
        s = self.shard.stats()
        return cpb.WorkerStatsResponse(blocks=s.blocks, used_bytes=s.used_bytes,
                                       capacity_bytes=s.capacity_bytes,
                                       corrupt_reads=s.corrupt_reads)  # fmt: skip


class CsdWorkerServer:
    def __init__(
        self,
        directory: Path,
        listen: str,
        capacity_bytes: int,
        *,
        rpc_threads: int = 8,
        drain_seconds: float = 5.0,
    ) -> None:
        self.shard = CsdShard(directory, capacity_bytes)
        self.listen = listen
        self.drain_seconds = drain_seconds
        self.server = grpc.server(
            futures.ThreadPoolExecutor(rpc_threads, thread_name_prefix="csd-rpc"),
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        cpb_grpc.add_CsdWorkerServicer_to_server(CsdWorkerServicer(self.shard), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        target, self._socket = bind_address(listen)
        if self._socket is not None:
            self._socket.parent.mkdir(parents=True, exist_ok=True)
            self._socket.unlink(missing_ok=True)  # stale socket of a killed worker
        try:
            self.port = self.server.add_insecure_port(target)
        except RuntimeError:  # newer grpcio raises where older ones returned 0
            self.port = 0
        if self.port == 0:
            self.shard.close()
            raise OSError(f"cannot listen on {listen}")
        self._stopped = threading.Event()

    def start(self) -> None:
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        stats = self.shard.stats()
        log.info("csd worker ready on %s: %s, %d blocks, %d of %d bytes used (%s)",
                 self.listen, self.shard.directory, stats.blocks, stats.used_bytes,
                 stats.capacity_bytes, self.shard.backend_name)  # fmt: skip

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        started = time.monotonic()
        self.server.stop(grace=self.drain_seconds).wait()
        self.shard.close()
        if self._socket is not None:
            self._socket.unlink(missing_ok=True)
        log.info("csd worker stopped after draining for %.2f s", time.monotonic() - started)


def _warm_up() -> None:
    try:
        import tierd.csd.attend  # noqa: F401 - pays torch's import before the first attend
    except Exception:
        log.exception("importing the attention path failed")


def _watch_parent(parent_pid: int, stop_requested: threading.Event) -> None:
    """Drain when the daemon that spawned us is gone (we were re-parented).

    A worker orphaned by a daemon killed with -9 would keep its shard locked and the
    restarted daemon's own worker for that directory could never start.
    """
    while not stop_requested.wait(PARENT_CHECK_S):
        if os.getppid() != parent_pid:
            log.warning("parent process %d is gone; draining", parent_pid)
            stop_requested.set()


def run_worker(directory: Path, listen: str, capacity_bytes: int) -> int:
    """Serve one shard until SIGTERM or SIGINT; returns the exit status.

    Spawned by a CsdPool, the environment names the daemon (PARENT_ENV) and the worker
    also stops when that process dies; workers started otherwise ignore their parent.
    """
    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s; draining", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server = CsdWorkerServer(directory, listen, capacity_bytes)
    except (TierdError, OSError) as exc:
        # Shard locked by another worker, unreadable directory, port taken: say so once;
        # a supervising pool retries with backoff.
        log.error("csd worker cannot start: %s", exc)
        return 1
    server.start()
    threading.Thread(target=_warm_up, name="csd-warm-up", daemon=True).start()
    parent = os.environ.get(PARENT_ENV)
    if parent and parent.isdigit():
        threading.Thread(target=_watch_parent, args=(int(parent), stop_requested),
                         name="csd-parent-watch", daemon=True).start()  # fmt: skip
    stop_requested.wait()
    server.stop()
    return 0
