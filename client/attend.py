"""Attend from the client: sequences, and decode attention computed inside tierd.

Primitives: `AttendItem`, `AttendOutput`, `AttendStream` (`send(items) -> outputs`,
`close()`), used through `TierdClient.open_sequence`, `close_sequence`, `attend`,
`attend_stream`.

Per decode step and layer only the query (and the step's new K/V) travels; one output per
query head comes back, so the bytes per step are O(heads x dim), whatever the length of
the sequence. `AttendStream` keeps one bidirectional call open, which saves the per-call
setup of a unary RPC on every layer of every step. When the daemon is on this host, both
`TierdClient.attend` and `AttendStream.send` go over a shared-memory ring instead
(`tierd_client.fastpath`), and over gRPC whenever the ring cannot carry a call.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import grpc

from ._proto import tierd_pb2 as pb
from .rpc import error_from_rpc
from .tensors import to_message, to_numpy, to_torch

if TYPE_CHECKING:
    from .fastpath import FastAttend


@dataclass(frozen=True)
class AttendItem:
    sequence_id: int
    layer: int
    q: Any  # [q_tokens, heads, dim]: torch tensor or numpy array
    k_new: Any = None  # [kv_heads, n, dim], appended to the sequence before attending
    v_new: Any = None
    new_tokens: Sequence[int] = ()  # token ids of the appended tokens, with layer 0
    scale: float = 0.0  # 0: 1/sqrt(dim)

    def to_message(self) -> pb.AttendItem:
        msg = pb.AttendItem(sequence_id=self.sequence_id, layer=self.layer,
                            q=to_message(self.q), new_tokens=list(self.new_tokens),
                            scale=self.scale)  # fmt: skip
        if self.k_new is not None:
            msg.k_new.CopyFrom(to_message(self.k_new))
        if self.v_new is not None:
            msg.v_new.CopyFrom(to_message(self.v_new))
        return msg


@dataclass(frozen=True)
class AttendOutput:
    out: Any  # [q_tokens, heads, dim] float32
    lse: Any  # [q_tokens, heads] float32


def request_of(items: Sequence[AttendItem]) -> pb.AttendRequest:
    return pb.AttendRequest(items=[item.to_message() for item in items])


def outputs_of(resp: pb.AttendResponse, as_torch: bool) -> list[AttendOutput]:
    conv = to_torch if as_torch else to_numpy
    return [AttendOutput(conv(r.out), conv(r.lse)) for r in resp.results]


class AttendStream:
    """An AttendStream call: each `send` is one request and its one response.

    The call opens at the first `send`, and opens again at the next `send` after it ended:
    the daemon cancels a stream that idles past its limits (before the first request, or
    between generations), and a request is never sent on a call that already ended.
    With `fast`, each send goes over the client's attend ring when that carries it."""

    def __init__(self, stub: Any, timeout: float | None, as_torch: bool,
                 metadata: Any = None, fast: FastAttend | None = None) -> None:  # fmt: skip
        self._stub, self._timeout, self._metadata = stub, timeout, metadata
        self._as_torch = as_torch
        self._fast = fast
        self._lock = threading.Lock()
        self._call: tuple[queue.Queue[pb.AttendRequest | None], Any] | None = None

    def _open(self) -> tuple[queue.Queue[pb.AttendRequest | None], Any]:
        requests: queue.Queue[pb.AttendRequest | None] = queue.Queue()

        def request_iter() -> Iterator[pb.AttendRequest]:
            while (req := requests.get()) is not None:
                yield req

        call = self._stub.AttendStream(request_iter(), timeout=self._timeout,
                                       metadata=self._metadata)  # fmt: skip
        return requests, call

    def send(self, items: Sequence[AttendItem]) -> list[AttendOutput]:
        if self._fast is not None:
            outs = self._fast.attend(items, self._as_torch, self._timeout)
            if outs is not None:
                return outs
        with self._lock:  # responses come back in order: one caller at a time
            if self._call is None or self._call[1].done():
                self._end_call()
                self._call = self._open()
            requests, responses = self._call
            requests.put(request_of(items))
            try:
                resp = next(responses)
            except grpc.RpcError as e:
                raise error_from_rpc(e) from e
        return outputs_of(resp, self._as_torch)

    def _end_call(self) -> None:
        if self._call is None:
            return
        requests, responses = self._call
        self._call = None
        requests.put(None)
        try:
            for _ in responses:  # drain the end of the stream
                pass
        except grpc.RpcError:
            pass  # it had ended already (cancelled while idle)

    def close(self) -> None:
        with self._lock:
            self._end_call()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
