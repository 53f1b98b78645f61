"""Namespace ids and block keys: the hash chain that makes prefixes findable.

Primitives: `namespace_id(...) -> bytes`, `block_keys(namespace_id, tokens, block_tokens)`
(and lazily, `iter_block_keys`), `chunk_key(namespace_id, tokens)`.

`key_i = H(namespace, key_{i-1}, tokens_i)`: a block's key names its whole prefix, so the
longest cached prefix of a token list is the longest run of leading keys the daemon holds.
The client and the daemon compute keys with this same module. BLAKE2b is in the standard
library (no extra dependency for the client) and keyed hashing binds every key to its
namespace, so equal token runs in two namespaces never collide.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

KEY_BYTES = 16
_ROOT_PARENT = bytes(KEY_BYTES)


def namespace_id(
    tenant: str,
    model: str,
    layout: Sequence[int | str],
    extra_keys: Iterable[str] = (),
    *,
    lossless: bool = False,
    adapter: str = "",
) -> bytes:
    """A stable 16-byte id for (tenant, model fingerprint, KV layout, extra keys) and, for a
    namespace whose blocks are kept exact, that choice, and for KV computed through a LoRA
    adapter, the adapter's fingerprint (each absent otherwise, so the ids of other
    namespaces are what they always were)."""
    doc: dict[str, object] = {"tenant": tenant, "model": model, "layout": list(layout),
                              "extra": list(extra_keys)}  # fmt: skip
    if lossless:
        doc["lossless"] = True
    if adapter:
        doc["adapter"] = adapter
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(canonical, digest_size=KEY_BYTES, person=b"tierd-ns-v1").digest()


def _token_bytes(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    arr = np.asarray(tokens, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError("tokens must be one-dimensional")
    return arr.astype("<i8", copy=False)


def next_block_key(ns_id: bytes, parent: bytes | None, tokens: Sequence[int] | np.ndarray) -> bytes:
    """Key of the block holding `tokens` right after the block keyed `parent` (None: first)."""
    h = hashlib.blake2b(parent or _ROOT_PARENT, digest_size=KEY_BYTES, key=ns_id)
    h.update(_token_bytes(tokens).tobytes())
    return h.digest()


def iter_block_keys(
    ns_id: bytes, tokens: Sequence[int] | np.ndarray, block_tokens: int
) -> Iterator[bytes]:
    """Keys of every full block of `tokens`, in order, each hashed only when asked for (a
    lookup stops at its first miss without hashing the rest)."""
    arr = _token_bytes(tokens)
    parent: bytes | None = None
    for start in range(0, len(arr) - block_tokens + 1, block_tokens):
        parent = next_block_key(ns_id, parent, arr[start : start + block_tokens])
        yield parent


def block_keys(ns_id: bytes, tokens: Sequence[int] | np.ndarray, block_tokens: int) -> list[bytes]:
    """Keys of every full block of `tokens`, in order (a partial tail block has no key)."""
    return list(iter_block_keys(ns_id, tokens, block_tokens))


def chunk_key(ns_id: bytes, tokens: Sequence[int] | np.ndarray) -> bytes:
    """Key of a position-independent chunk: its tokens alone, no parent."""
    h = hashlib.blake2b(b"chunk", digest_size=KEY_BYTES, key=ns_id)
    h.update(_token_bytes(tokens).tobytes())
    return h.digest()
