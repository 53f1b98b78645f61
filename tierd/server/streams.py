"""Streaming calls within bounds: who may open one, how many, and how long one may idle.

Primitives: `StreamGuard(limits, workers, identify)` (a server interceptor), `close()`.

gRPC's sync server runs each call on one thread of a fixed pool, and a streaming call keeps
its thread for as long as its client makes it wait (for the next request, or for room to
send a response). Unbounded, a few dozen silent streams hold every thread and nothing else
is answered. So every streaming call, before anything is read from it:
- is authenticated from its metadata (tierd's own methods: a stream without a valid token
  or certificate ends at once, UNAUTHENTICATED);
- is admitted only while fewer than `server.workers - limits.stream_reserve_workers`
  streams hold threads (else UNAVAILABLE, which clients retry), fewer than
  `limits.max_streams_per_tenant` of its tenant and `limits.max_streams_per_peer` of its
  TCP peer address (else RESOURCE_EXHAUSTED naming the limit). The reserve always serves unary calls: health, Stats, Lookup, the
  shared-memory puts and gets;
- is cancelled when its client keeps the daemon waiting longer than
  `limits.stream_first_message_ms` for the first message or `limits.stream_idle_ms` for a
  later one (or to take a response). One reaper thread cancels it; the cancel wakes the
  thread blocked on the client, which then ends the call.

Admission runs on the call's pool thread (a refusal costs microseconds), with its counts
taken and given back in one try/finally there, so a call that ends by any path, or never
runs, cannot leak a slot. Unix-socket peers all look alike to gRPC ("unix:"), so on a
socket the tenant is the unit; in open mode (no tenants) only the global cap applies.
Streams of other services (health Watch, reflection) need no credentials: at most
`OTHER_STREAMS` are open at once, they count against the global and per-peer caps, and
they are cancelled after `limits.stream_idle_ms` without a message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from tierd.config import LimitsConfig
from tierd.errors import ResourceExhausted, TierdError, Unavailable
from tierd.server.status import abort

log = logging.getLogger("tierd.streams")

TIERD_METHODS = "/tierd.v1.Tierd/"
# Streams of other services (health Watch, reflection) need no credentials, so they get a
# small share of their own: nobody can fill the stream slots with them.
OTHER_STREAMS = 2


def peer_address(peer: str) -> str | None:
    """The address a TCP peer's connections share ("ipv4:10.0.0.7"); None for unix ones."""
    kind, _, rest = peer.partition(":")
    if kind not in ("ipv4", "ipv6") or not rest:
        return None
    host, sep, port = rest.rpartition(":")
    return f"{kind}:{host}" if sep and port.isdigit() else peer


@dataclass(eq=False)
class _Stream:
    context: grpc.ServicerContext
    method: str
    peer: str | None
    tenant: str | None
    deadline: float = float("inf")  # armed while the daemon waits on the client
    expired: bool = False
    why: str = ""
    held: bool = field(default=False)  # counted in the guard's tallies


class StreamGuard(grpc.ServerInterceptor):
    def __init__(
        self,
        limits: Callable[[], LimitsConfig],
        workers: int,
        identify: Callable[[grpc.ServicerContext], str | None],
    ) -> None:
        self._limits = limits
        self._workers = workers
        self._identify = identify
        self._cond = threading.Condition()
        self._streams: set[_Stream] = set()
        self._by_peer: Counter[str] = Counter()
        self._by_tenant: Counter[str] = Counter()
        self._stop = False
        self._reaper = threading.Thread(target=self._reap, name="tierd-streams", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._reaper.join()

    # -- interception -------------------------------------------------------------------

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None or not (handler.request_streaming or handler.response_streaming):
            return handler
        method = details.method
        des, ser = handler.request_deserializer, handler.response_serializer
        if handler.stream_unary is not None:
            su = handler.stream_unary

            def stream_unary(requests: Iterator[Any], ctx: grpc.ServicerContext) -> Any:
                stream = self._admit(ctx, method)
                try:
                    return su(self._watch(requests, stream), ctx)
                finally:
                    self._release(stream)

            return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
        if handler.stream_stream is not None:
            ss = handler.stream_stream

            def stream_stream(requests: Iterator[Any], ctx: grpc.ServicerContext) -> Any:
                stream = self._admit(ctx, method)
                try:
                    yield from self._paced(ss(self._watch(requests, stream), ctx), stream)
                finally:
                    self._release(stream)

            return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)
        us = handler.unary_stream

        def unary_stream(request: Any, ctx: grpc.ServicerContext) -> Any:
            stream = self._admit(ctx, method)
            try:
                yield from self._paced(us(request, ctx), stream)
            finally:
                self._release(stream)

        return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)

    # -- admission ----------------------------------------------------------------------

    def _admit(self, ctx: grpc.ServicerContext, method: str) -> _Stream:
        """Authenticate and count the stream, or end the call (aborts raise)."""
        tierd = method.startswith(TIERD_METHODS)
        try:
            tenant = self._identify(ctx) if tierd else None
        except TierdError as e:  # no valid credentials: end before reading a byte
            abort(ctx, e)
        stream = _Stream(ctx, method, peer_address(ctx.peer() or ""), tenant)
        lim = self._limits()
        with self._cond:
            refusal = self._refusal(stream, lim)
            if refusal is None:
                self._streams.add(stream)
                if stream.peer is not None:
                    self._by_peer[stream.peer] += 1
                if tenant is not None:
                    self._by_tenant[tenant] += 1
                stream.held = True
                if not tierd:  # health Watch, reflection: bounded in time as a whole
                    self._arm(stream, lim.stream_idle_ms, "no message")
        if refusal is not None:
            abort(ctx, refusal)
        return stream

    def _refusal(self, s: _Stream, lim: LimitsConfig) -> TierdError | None:
        """Why this stream may not hold a thread now (None: it may). Caller holds `_cond`."""
        cap = max(1, self._workers - lim.stream_reserve_workers)  # a reload cannot starve them
        if len(self._streams) >= cap:
            # The daemon is busy, not the caller over a quota: UNAVAILABLE, which clients
            # retry with backoff.
            return Unavailable(
                f"{len(self._streams)} streams hold RPC threads; server.workers - "
                f"limits.stream_reserve_workers is {cap} (the rest serve unary calls): retry "
                "later", field="limits.stream_reserve_workers",
            )  # fmt: skip
        if not s.method.startswith(TIERD_METHODS):
            others = sum(1 for t in self._streams if not t.method.startswith(TIERD_METHODS))
            if others >= OTHER_STREAMS:  # health Watch, reflection: no token to limit them by
                return ResourceExhausted(
                    f"{others} health or reflection streams are open; at most "
                    f"{OTHER_STREAMS} at once", field="streams",
                )
        if s.tenant is not None and self._by_tenant[s.tenant] >= lim.max_streams_per_tenant:
            return ResourceExhausted(
                f"the tenant has {self._by_tenant[s.tenant]} open streams; "
                f"limits.max_streams_per_tenant is {lim.max_streams_per_tenant}",
                field="limits.max_streams_per_tenant",
            )
        if s.peer is not None and self._by_peer[s.peer] >= lim.max_streams_per_peer:
            return ResourceExhausted(
                f"{s.peer} has {self._by_peer[s.peer]} open streams; "
                f"limits.max_streams_per_peer is {lim.max_streams_per_peer}",
                field="limits.max_streams_per_peer",
            )
        return None

    def _release(self, s: _Stream) -> None:
        with self._cond:
            if not s.held:
                return
            s.held = False
            self._streams.discard(s)
            if s.peer is not None:
                self._by_peer[s.peer] -= 1
                if not self._by_peer[s.peer]:
                    del self._by_peer[s.peer]
            if s.tenant is not None:
                self._by_tenant[s.tenant] -= 1
                if not self._by_tenant[s.tenant]:
                    del self._by_tenant[s.tenant]

    # -- deadlines ----------------------------------------------------------------------

    def _arm(self, s: _Stream, ms: int, why: str) -> None:
        """Caller holds `_cond`."""
        s.deadline = time.monotonic() + ms / 1000.0
        s.why = why
        self._cond.notify_all()

    def _disarm(self, s: _Stream) -> None:
        with self._cond:
            s.deadline = float("inf")

    def _rearm(self, s: _Stream, first: bool) -> None:
        lim = self._limits()
        with self._cond:
            if first:
                self._arm(s, lim.stream_first_message_ms, "no first message")
            else:
                self._arm(s, lim.stream_idle_ms, "no message")

    def _check(self, s: _Stream) -> None:
        if s.expired:
            s.context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, s.why)

    def _watch(self, requests: Iterator[Any], s: _Stream) -> Iterator[Any]:
        """The client's messages, each awaited under its deadline."""
        tierd = s.method.startswith(TIERD_METHODS)
        first = True
        while True:
            if tierd:
                self._rearm(s, first)
            try:
                item = next(requests)
            except StopIteration:
                self._check(s)  # a cancelled call can look like a closed one
                return
            finally:
                if tierd:
                    self._disarm(s)
            self._check(s)
            first = False
            if not tierd:
                self._rearm(s, first=False)
            yield item

    def _paced(self, responses: Iterator[Any], s: _Stream) -> Iterator[Any]:
        """The call's responses; while one waits for the client to take it, the idle
        deadline runs."""
        tierd = s.method.startswith(TIERD_METHODS)
        try:
            for response in responses:
                if tierd:
                    self._rearm(s, first=False)
                yield response
                if tierd:
                    self._disarm(s)
                self._check(s)
        finally:
            close = getattr(responses, "close", None)
            if close is not None:
                close()

    def _reap(self) -> None:
        while True:
            with self._cond:
                if self._stop:
                    return
                now = time.monotonic()
                due = [s for s in self._streams if s.deadline <= now and not s.expired]
                for s in due:
                    s.expired = True
                if not due:
                    soonest = min((s.deadline for s in self._streams if not s.expired),
                                  default=float("inf"))  # fmt: skip
                    self._cond.wait(None if soonest == float("inf") else soonest - now)
                    continue
            for s in due:  # outside the lock: a cancel runs gRPC's own callbacks
                log.info("cancelling %s from %s (tenant %s): %s within the deadline",
                         s.method, s.peer or "a local peer", s.tenant or "-", s.why)  # fmt: skip
                s.context.cancel()
