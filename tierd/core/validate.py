"""Request checks shared by every core call: each failure names the offending field.

Primitives: `check_keys(keys, limit, unique)`, `check_shape(ns, dims, dtype)`,
`check_tokens(tokens, limit)`, `check_ttl(ttl_ms, leases)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tierd.config import LeaseConfig
from tierd.core.index import NamespaceInfo
from tierd.errors import InvalidArgument
from tierd_client.keys import KEY_BYTES
from tierd_client.shapes import check_block_shape

MAX_TOKENS = 1 << 24


def check_keys(keys: Sequence[bytes], limit: int, *, unique: bool = False) -> None:
    if len(keys) > limit:
        raise InvalidArgument(f"{len(keys)} keys in one call; the limit is {limit}", field="keys")
    seen: set[bytes] = set()
    for i, key in enumerate(keys):
        if len(key) != KEY_BYTES:
            raise InvalidArgument(
                f"a key is {KEY_BYTES} bytes, got {len(key)}", field=f"keys[{i}]"
            )
        if unique:
            if key in seen:
                raise InvalidArgument("key repeated in one call", field=f"keys[{i}]")
            seen.add(key)


def check_shape(ns: NamespaceInfo, dims: Sequence[int], dtype: str) -> None:
    check_block_shape(ns.layout, dims, "shape.dims")
    if dtype != ns.layout.dtype:
        raise InvalidArgument(
            f"blocks of this namespace are {ns.layout.dtype}, got {dtype or 'unspecified'}",
            field="shape.dtype",
        )


def check_tokens(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.size > MAX_TOKENS:
        raise InvalidArgument(f"{arr.size} tokens; the limit is {MAX_TOKENS}", field="tokens")
    if arr.size and int(arr.min()) < 0:
        raise InvalidArgument("token ids must not be negative", field="tokens")
    return arr


def check_ttl(ttl_ms: int, leases: LeaseConfig) -> float:
    """Lease length in seconds; 0 means the default."""
    if ttl_ms < 0 or ttl_ms > leases.max_ttl_ms:
        raise InvalidArgument(
            f"must be between 0 and {leases.max_ttl_ms} ms", field="lease_ttl_ms"
        )
    return (ttl_ms or leases.default_ttl_ms) / 1000.0
