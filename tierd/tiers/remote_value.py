"""Self-describing values for remote tiers: the header in front of each block's bytes.

Primitives: `header_bytes(num_layers) -> int`, `stated_header_bytes(value) -> int`,
`encode(ns_id, key, data, checksum, layer_sums) -> bytes` (header + data, one buffer),
`decode(head, ns_id, key, num_layers) -> RemoteHeader | None`.

A value in a store other daemons share must say what it is: a reader cannot trust its own
books alone, since another daemon may have replaced, evicted or damaged the key. So a
value is

    magic "TIERDRV1" | version u16 | flags u16 | header length u32 | layers u32 |
    data length u64 | xxh3-64 of the data u64 | namespace id 16 | block key 16 |
    xxh3-64 of each layer's K|V range (u64 each) | xxh3-64 of all the header before it u64
    | the block's bytes

little-endian. The header's length follows from the namespace's layer count, so a reader
asks for exactly the header (a lookup learns a block's checksum and per-layer sums from
it without reading the block) or for one layer's range behind it (attend). Its own
checksum catches a damaged header; the data checksum catches damaged data; the namespace
id and key catch a value stored under the wrong key. A header that fails any of these
makes the copy lost, never served.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

from tierd.errors import Internal
from tierd.tiers.checksum import layer_checksums

MAGIC = b"TIERDRV1"
VERSION = 1
ID_BYTES = 16  # namespace ids and block keys (tierd_client.keys.KEY_BYTES)
_FIXED = struct.Struct("<8sHHIIQQ16s16s")
_SUM = struct.Struct("<Q")


@dataclass(frozen=True)
class RemoteHeader:
    nbytes: int
    checksum: int  # xxh3-64 of the block's bytes
    layer_sums: tuple[int, ...]


def header_bytes(num_layers: int) -> int:
    return _FIXED.size + 8 * num_layers + _SUM.size


def stated_header_bytes(value: bytes | memoryview) -> int:
    """The header length a value of `encode` states (0 if too short to say): for stores
    that keep the header under a key of its own."""
    if len(value) < _FIXED.size:
        return 0
    return int(struct.unpack_from("<I", value, 12)[0])


def encode(ns_id: bytes, key: bytes, data: Any, checksum: int,
           layer_sums: Sequence[int] | None, num_layers: int) -> bytes:  # fmt: skip
    """Header and data as one value. `layer_sums` None: computed here from `data`."""
    if len(ns_id) != ID_BYTES or len(key) != ID_BYTES:
        raise Internal(f"remote values name {ID_BYTES}-byte namespace ids and keys")
    view = memoryview(data).cast("B")
    sums = tuple(layer_sums) if layer_sums is not None else layer_checksums(view, num_layers)
    if len(sums) != num_layers:
        raise Internal(f"{len(sums)} layer checksums for {num_layers} layers")
    size = header_bytes(num_layers)
    head = _FIXED.pack(MAGIC, VERSION, 0, size, num_layers, len(view), checksum, ns_id, key)
    head += struct.pack(f"<{num_layers}Q", *sums)
    head += _SUM.pack(xxhash.xxh3_64_intdigest(head))
    return b"".join((head, view))


def decode(head: bytes | memoryview, ns_id: bytes, key: bytes,
           num_layers: int) -> RemoteHeader | None:  # fmt: skip
    """The header at the start of `head` if it is an intact one of this block, else None."""
    size = header_bytes(num_layers)
    if len(head) < size:
        return None
    head = memoryview(head)[:size]
    magic, version, _, hlen, layers, nbytes, checksum, ns, k = _FIXED.unpack_from(head)
    if (magic != MAGIC or version != VERSION or hlen != size or layers != num_layers
            or ns != ns_id or k != key):  # fmt: skip
        return None
    (stamp,) = _SUM.unpack_from(head, size - _SUM.size)
    if xxhash.xxh3_64_intdigest(head[: size - _SUM.size]) != stamp:
        return None
    sums = struct.unpack_from(f"<{num_layers}Q", head, _FIXED.size)
    return RemoteHeader(nbytes, checksum, sums)
