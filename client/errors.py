"""The one error hierarchy of tierd, shared by the daemon and the client.

The daemon raises these; `tierd.server.status` maps each class to a gRPC status code in one
table, and the client turns the status code back into the same class. They carry no gRPC
types so the core and tiers can raise them without importing grpc.
"""

from __future__ import annotations


class TierdError(Exception):
    """Base of every error tierd reports."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class InvalidArgument(TierdError):
    """The request is malformed; `field` names the offending field."""


class NotFound(TierdError):
    """A named thing (lease, sequence) does not exist. Missing blocks are not errors."""


class ResourceExhausted(TierdError):
    """A tier or a quota is full and nothing more can be evicted."""


class FailedPrecondition(TierdError):
    """The call is valid but the state does not allow it (lease expired, block in use)."""


class Unauthenticated(TierdError):
    """The caller presented no valid credentials (bearer token or client certificate)."""


class PermissionDenied(TierdError):
    """The caller may not touch this namespace."""


class Unavailable(TierdError):
    """The daemon is draining or not ready; retrying later may succeed."""


class DataLoss(TierdError):
    """Stored bytes failed their checksum and could not be served."""


class Internal(TierdError):
    """A bug or an unexpected failure inside the daemon."""
