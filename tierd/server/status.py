"""Turning domain errors into gRPC statuses: the only place that knows both.

Primitives: `translate_errors` (decorator for servicer methods, unary and streaming).
The code table itself is `tierd_client.status.STATUS_OF`, shared with the client.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from tierd.errors import Internal, InvalidArgument, TierdError
from tierd_client.status import FIELD_METADATA_KEY, status_of

log = logging.getLogger("tierd.server")


def abort(context: grpc.ServicerContext, err: TierdError) -> NoReturn:
    if err.field:
        context.set_trailing_metadata(((FIELD_METADATA_KEY, err.field),))
    context.abort(status_of(err), err.message)
    raise AssertionError("unreachable: context.abort raises")


def _as_tierd_error(exc: Exception) -> TierdError:
    if isinstance(exc, TierdError):
        return exc
    if isinstance(exc, (ValueError, OverflowError)):
        # Raised by message decoding and dataclass validation on client-supplied values.
        return InvalidArgument(str(exc))
    log.exception("unexpected error in a call")
    return Internal(f"internal error: {type(exc).__name__}: {exc}")


def translate_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a servicer method; a raised TierdError becomes its status code, others INTERNAL."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                if isinstance(exc, grpc.RpcError) or context.code() is not None:
                    raise
                abort(context, _as_tierd_error(exc))

        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) or context.code() is not None:
                raise
            abort(context, _as_tierd_error(exc))

    return unary
