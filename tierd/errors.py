"""The daemon's error hierarchy: the shared one from `tierd_client.errors`, plus config.

Core and tiers raise these; only `tierd.server.status` knows about gRPC codes.
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
