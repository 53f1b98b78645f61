"""Turning domain errors into gRPC statuses: the only place that knows both.

Primitives: `translate_errors` (decorator for servicer methods, unary and streaming).
The code table itself is `tierd_client.status.STATUS_OF`, shared with the client.

Bad input is rejected where it is validated, as `InvalidArgument` naming its field; any
other exception reaching here (an `Internal` a tier raised on a broken invariant, or an
unexpected ValueError, KeyError, ...) is a bug of the daemon. It is logged with its
traceback under a short reference, and the client gets INTERNAL with that reference only:
the details can name other tenants' offsets and the daemon's paths.
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import Callable
from typing import Any, NoReturn

import grpc

from tierd.errors import Internal, TierdError
from tierd_client.status import FIELD_METADATA_KEY, status_of

log = logging.getLogger("tierd.server")


def abort(context: grpc.ServicerContext, err: TierdError) -> NoReturn:
    if err.field:
        context.set_trailing_metadata(((FIELD_METADATA_KEY, err.field),))
    context.abort(status_of(err), err.message)
    raise AssertionError("unreachable: context.abort raises")


def _as_tierd_error(exc: Exception, method: str) -> TierdError:
    if isinstance(exc, TierdError) and not isinstance(exc, Internal):
        return exc
    ref = secrets.token_hex(4)
    log.error("internal error %s in %s", ref, method, exc_info=exc)
    return Internal(f"internal error {ref} ({type(exc).__name__}); the daemon's log has "
                    "the details")  # fmt: skip


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
                abort(context, _as_tierd_error(exc, method.__name__))

        return stream

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            if isinstance(exc, grpc.RpcError) or context.code() is not None:
                raise
            abort(context, _as_tierd_error(exc, method.__name__))

    return unary
