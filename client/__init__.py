"""tierd_client: the thin client of the tierd KV-cache daemon.

Primitives: `TierdClient(address, ...)` with `open_namespace`, `block_keys`, `lookup`,
`put`, `get`, `delete`, `pin`, `unpin`, `stats`, `close`; `KVLayout`; the results
`Namespace`, `LookupResult`, `CachedBlock`, `GetResult`, `SegmentInfo`; the errors
(`TierdError` and its subclasses); `block_keys(namespace_id, tokens, block_tokens)`.

Depends on grpcio, protobuf and numpy; torch is imported only when tensors are given or
asked for. Nothing runs at import time beyond loading the protobuf stubs.
"""

from __future__ import annotations

from .attend import AttendItem, AttendOutput, AttendStream
from .client import TierdClient
from .errors import (
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
from .keys import KEY_BYTES, block_keys
from .layout import DTYPES, KVLayout
from .results import CachedBlock, GetResult, LookupResult, Namespace, SegmentInfo

__all__ = [
    "DTYPES",
    "KEY_BYTES",
    "AttendItem",
    "AttendOutput",
    "AttendStream",
    "CachedBlock",
    "DataLoss",
    "FailedPrecondition",
    "GetResult",
    "Internal",
    "InvalidArgument",
    "KVLayout",
    "LookupResult",
    "Namespace",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "SegmentInfo",
    "TierdClient",
    "TierdError",
    "Unauthenticated",
    "Unavailable",
    "block_keys",
]
