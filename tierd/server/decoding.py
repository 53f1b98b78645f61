"""Requests that are not valid protobuf get INVALID_ARGUMENT, not gRPC's INTERNAL.

Primitives: `DecodeGuard` (a server interceptor).

gRPC decodes a request before the servicer runs and answers a decode failure with
INTERNAL, which reads like a daemon bug. The guard decodes leniently: a message that
fails to parse becomes a marker, and the call is answered INVALID_ARGUMENT (for streams,
when the bad message is reached).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from tierd.errors import InvalidArgument
from tierd.server.status import abort


class _Undecodable:
    def __init__(self, why: str) -> None:
        self.why = why


def _lenient(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except (DecodeError, ValueError, TypeError, RuntimeError) as e:
            return _Undecodable(str(e) or type(e).__name__)

    return decode


def _refuse(context: grpc.ServicerContext, bad: _Undecodable) -> None:
    abort(context, InvalidArgument(f"the request is not a valid message: {bad.why}",
                                   field="request"))  # fmt: skip


def _checked_stream(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
    for req in requests:
        if isinstance(req, _Undecodable):
            _refuse(context, req)
        yield req


class DecodeGuard(grpc.ServerInterceptor):
    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        h = continuation(details)
        if h is None:
            return None
        des, ser = _lenient(h.request_deserializer), h.response_serializer
        if h.unary_unary is not None:
            fn = h.unary_unary

            def uu(req: Any, ctx: grpc.ServicerContext) -> Any:
                if isinstance(req, _Undecodable):
                    _refuse(ctx, req)
                return fn(req, ctx)

            return grpc.unary_unary_rpc_method_handler(uu, des, ser)
        if h.unary_stream is not None:
            gen = h.unary_stream

            def us(req: Any, ctx: grpc.ServicerContext) -> Iterator[Any]:
                if isinstance(req, _Undecodable):
                    _refuse(ctx, req)
                yield from gen(req, ctx)

            return grpc.unary_stream_rpc_method_handler(us, des, ser)
        if h.stream_unary is not None:
            su = h.stream_unary
            return grpc.stream_unary_rpc_method_handler(
                lambda it, ctx: su(_checked_stream(it, ctx), ctx), des, ser
            )
        ss = h.stream_stream
        return grpc.stream_stream_rpc_method_handler(
            lambda it, ctx: ss(_checked_stream(it, ctx), ctx), des, ser
        )
