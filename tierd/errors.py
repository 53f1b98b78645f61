"""The daemon's error hierarchy: the shared one from `tierd_client.errors`, plus config and
the daemon's own internal errors.

Core and tiers raise these; only `tierd.server.status` knows about gRPC codes. A client's
bad input is `InvalidArgument`, raised where it is validated; a broken invariant inside
the daemon is `Internal` (or a subclass naming what broke), which the client sees only as
INTERNAL with a reference into the daemon's log.
"""

from __future__ import annotations

from tierd_client.errors import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    TierdError,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "ConfigError",
    "DataLoss",
    "ExtentError",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "TierdError",
    "Unauthenticated",
    "Unavailable",
]


class ConfigError(TierdError):
    """A configuration file or flag is wrong; `field` names the file and key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason, field=key)


class ExtentError(Internal):
    """An extent that does not fit a tier's books: misaligned, past the end, overlapping
    one in use, or never allocated. The daemon computes every extent itself, so this is a
    bug, except while recovering, where a catalog row naming such an extent is dropped."""
