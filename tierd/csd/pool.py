"""The daemon's side of computational storage: a pool of CSD workers behind one API.

Primitives:
  life:    `CsdPool(specs)`, `start(wait_s) -> names still down`, `close()`; a context manager
  facts:   `names`, `healthy(name)`, `info(name) -> CsdWorkerInfo`
  place:   `pick(n_blocks) -> [name]`   round-robin over the healthy workers
  blocks:  `store(name, layout, ns_id, items) -> stored`, `read(name, ns_id, keys) -> dict`,
           `read_encoded(name, ns_id, keys) -> {key: (encoding, bytes)}`,
           `drop(name, ns_id, keys) -> dropped`, `list_blocks(name) -> {ns_id: [key]}`,
           `drop_later(name, ns_id, keys)` (queued, never blocks; see tierd.csd.drops)
  attend:  `partial_attend(name, ns_id, layout, keys, layer, q, scale) -> Partial`
  stats:   `stats(name) -> ShardStats`

Every call names its worker. While that worker is down (restarting, or not answering its
health checks) calls raise `tierd.errors.Unavailable` naming it at once; a call that meets
UNAVAILABLE or DEADLINE_EXCEEDED raises the same and marks the worker down until its next
good probe. Other statuses come back as the tierd error the worker raised.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Self, TypeVar

import grpc

from tierd.csd.drops import DeferredDrops
from tierd.csd.shard import ShardStats
from tierd.csd.supervisor import CsdWorkerInfo, CsdWorkerSpec, Supervisor, Timing, WorkerHandle
from tierd.errors import NotFound, Unavailable
from tierd_client._proto import csd_pb2 as cpb
from tierd_client._proto import csd_pb2_grpc as cpb_grpc
from tierd_client.layout import KVLayout
from tierd_client.rpc import error_from_rpc

if TYPE_CHECKING:
    import torch

__all__ = ["CsdPool", "CsdWorkerInfo", "CsdWorkerSpec", "Partial", "Timing"]

T = TypeVar("T")
_TRANSPORT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class Partial(NamedTuple):
    """One worker's share of an attend: merge partials by log-sum-exp."""

    out: torch.Tensor  # [q_tokens, heads, dim] float32
    lse: torch.Tensor  # [q_tokens, heads] float32; -inf where no key was used
    missing: list[bytes]  # keys the worker does not hold, or that failed their checksum


class CsdPool:
    def __init__(
        self,
        specs: Sequence[CsdWorkerSpec],
        *,
        rpc_timeout_s: float = 30.0,
        start_timeout_s: float = 60.0,
        max_batch_bytes: int = 64 << 20,
        timing: Timing | None = None,
    ) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"csd worker names must be unique: {names}")
        self.rpc_timeout_s = rpc_timeout_s
        self.start_timeout_s = start_timeout_s
        self.max_batch_bytes = max_batch_bytes
        timing = timing or Timing()
        self._workers = {s.name: WorkerHandle(s, timing) for s in specs}
        self._supervisor = Supervisor(list(self._workers.values()), timing)
        self._rr = 0
        self._rr_lock = threading.Lock()
        self._started = False
        self._drops = DeferredDrops(self.drop)

    # -- life -------------------------------------------------------------------------------

    def start(self, wait_s: float | None = None) -> list[str]:
        """Spawn the local workers, start supervising, wait for health (`start_timeout_s`
        by default). Returns the workers still down; the monitor keeps trying them."""
        if not self._started:
            self._started = True
            self._supervisor.start()
        return self._supervisor.wait_healthy(self.start_timeout_s if wait_s is None else wait_s)

    def close(self) -> None:
        """Send queued drops (briefly), then SIGTERM the local workers (each drains and
        keeps its shard) and wait for them."""
        self._drops.close()
        self._supervisor.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- facts and placement ----------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._workers)

    def healthy(self, name: str) -> bool:
        return self._worker(name).info().healthy

    def info(self, name: str) -> CsdWorkerInfo:
        return self._worker(name).info()

    def pick(self, n_blocks: int) -> list[str]:
        """A worker for each of `n_blocks` new blocks, round-robin over the healthy ones."""
        healthy = [n for n, w in self._workers.items() if w.info().healthy]
        if not healthy:
            raise Unavailable("no csd worker is healthy")
        with self._rr_lock:
            # One cursor for the pool, advanced by n: consecutive calls continue the cycle.
            start, self._rr = self._rr, self._rr + n_blocks
        return [healthy[(start + i) % len(healthy)] for i in range(n_blocks)]

    # -- blocks -----------------------------------------------------------------------------

    def store(
        self,
        name: str,
        layout: KVLayout,
        ns_id: bytes,
        items: Sequence[tuple[bytes, int, memoryview]],
        encodings: Sequence[str] | None = None,
    ) -> int:
        """Store (key, checksum, data) blocks, item i encoded as `encodings[i]` (None:
        all raw; checksum and data are of the stored bytes); each request is
        all-or-nothing on the worker, and batches go in requests of at most
        `max_batch_bytes`."""
        # A queued drop of one of these keys would delete the copy stored now.
        self._drops.cancel(name, ns_id, [k for k, _, _ in items])
        stored = 0
        named = [(k, c, d, "" if e == "raw" else e)
                 for (k, c, d), e in zip(items, encodings or ["raw"] * len(items))]  # fmt: skip
        for batch in _batches(named, self.max_batch_bytes):
            req = cpb.StoreBlocksRequest(layout=layout.to_proto(), blocks=[
                cpb.CsdBlock(namespace_id=ns_id, key=k, checksum=c, data=bytes(d), encoding=e)
                for k, c, d, e in batch
            ])  # fmt: skip
            stored += self._store_request(name, req)
        return stored

    def _store_request(self, name: str, req: cpb.StoreBlocksRequest) -> int:
        return self._call(name, lambda s: s.StoreBlocks(req, timeout=self.rpc_timeout_s)).stored

    def read(self, name: str, ns_id: bytes, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """Bytes of the held, intact blocks among `keys` (the worker verified each)."""
        return {k: data for k, (_, data) in self.read_encoded(name, ns_id, keys).items()}

    def read_encoded(
        self, name: str, ns_id: bytes, keys: Sequence[bytes]
    ) -> dict[bytes, tuple[str, bytes]]:
        """(encoding, stored bytes) of the held, intact blocks among `keys`."""
        req = cpb.CsdKeys(namespace_id=ns_id, keys=list(keys))

        def run(stub: cpb_grpc.CsdWorkerStub) -> dict[bytes, tuple[str, bytes]]:
            return {b.key: (b.encoding or "raw", b.data)
                    for b in stub.ReadBlocks(req, timeout=self.rpc_timeout_s)}  # fmt: skip

        return self._call(name, run)

    def drop(self, name: str, ns_id: bytes, keys: Sequence[bytes]) -> int:
        req = cpb.CsdKeys(namespace_id=ns_id, keys=list(keys))
        return self._call(name, lambda s: s.DropBlocks(req, timeout=self.rpc_timeout_s)).dropped

    def drop_later(self, name: str, ns_id: bytes, keys: Sequence[bytes]) -> None:
        """Queue a drop; for callers holding a lock that must not wait on the network."""
        self._worker(name)
        self._drops.add(name, ns_id, keys)

    def pending_drops(self) -> int:
        return self._drops.pending()

    def list_blocks(self, name: str) -> dict[bytes, list[bytes]]:
        resp = self._call(name, lambda s: s.ListBlocks(cpb.ListBlocksRequest(),
                                                       timeout=self.rpc_timeout_s))  # fmt: skip
        return {ns.namespace_id: list(ns.keys) for ns in resp.namespaces}

    def stats(self, name: str) -> ShardStats:
        r = self._call(name, lambda s: s.Stats(cpb.WorkerStatsRequest(),
                                               timeout=self.rpc_timeout_s))  # fmt: skip
        return ShardStats(r.blocks, r.used_bytes, r.capacity_bytes, r.corrupt_reads)

    # -- attend -----------------------------------------------------------------------------

    def partial_attend(
        self,
        name: str,
        ns_id: bytes,
        layout: KVLayout,
        keys: Sequence[bytes],
        layer: int,
        q: torch.Tensor,
        scale: float = 0.0,
    ) -> Partial:
        """Attention of q [q_tokens, heads, dim] over `layer` of the worker's `keys` (no
        mask). scale 0 means 1/sqrt(dim)."""
        from tierd_client.tensors import to_message as tensor_to_proto
        from tierd_client.tensors import to_torch as tensor_from_proto

        req = cpb.PartialAttendRequest(
            namespace_id=ns_id, layout=layout.to_proto(), keys=list(keys), layer=layer,
            q=tensor_to_proto(q), scale=scale,
        )  # fmt: skip
        resp = self._call(name, lambda s: s.PartialAttend(req, timeout=self.rpc_timeout_s))
        return Partial(tensor_from_proto(resp.out, "out"), tensor_from_proto(resp.lse, "lse"),
                       list(resp.missing))  # fmt: skip

    # -- internals --------------------------------------------------------------------------

    def _worker(self, name: str) -> WorkerHandle:
        try:
            return self._workers[name]
        except KeyError:
            raise NotFound(f"no csd worker named {name!r}") from None

    def _call(self, name: str, fn: Callable[[cpb_grpc.CsdWorkerStub], T]) -> T:
        w = self._worker(name)
        stub = w.stub()  # Unavailable while down: no waiting on a dead worker
        try:
            return fn(stub)
        except grpc.RpcError as err:
            code = err.code() if callable(getattr(err, "code", None)) else None
            details = (err.details() if callable(getattr(err, "details", None)) else "") or ""
            if code in _TRANSPORT:
                w.mark_down(stub, f"{code.name}: {details}")  # type: ignore[union-attr]
                raise Unavailable(f"csd worker {name!r}: {details or code}") from None
            e = error_from_rpc(err)
            raise type(e)(f"csd worker {name!r}: {e.message}", field=e.field) from None


_Item = TypeVar("_Item", bound=tuple[object, ...])


def _batches(items: Iterable[_Item], max_bytes: int) -> Iterable[list[_Item]]:
    """Items (whose third field is the data) in batches of at most `max_bytes`."""
    batch: list[_Item] = []
    size = 0
    for it in items:
        n = memoryview(it[2]).nbytes  # type: ignore[arg-type]
        if batch and size + n > max_bytes:
            yield batch
            batch, size = [], 0
        batch.append(it)
        size += n
    if batch:
        yield batch
