"""The one table between tierd's error classes and gRPC status codes.

The daemon's servicer aborts with `STATUS_OF[type(err)]`; the client rebuilds the same
class from the code with `ERROR_OF`. The offending field travels in trailing metadata.
"""

from __future__ import annotations

import grpc

from . import errors

FIELD_METADATA_KEY = "tierd-field"

STATUS_OF: dict[type[errors.TierdError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Internal: grpc.StatusCode.INTERNAL,
}

ERROR_OF: dict[grpc.StatusCode, type[errors.TierdError]] = {
    code: cls for cls, code in STATUS_OF.items()
}


def status_of(err: errors.TierdError) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL
