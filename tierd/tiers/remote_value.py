"""Self-describing values for remote tiers: the header in front of each block's bytes.

Primitives: `header_bytes(num_layers, encoding) -> int`, `max_header_bytes(num_layers)`,
`stated_header_bytes(value) -> int`, `encode(ns_id, key, data, checksum, layer_sums,
num_layers, encoding, block_nbytes, block_checksum) -> bytes` (header + data, one buffer),
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

Encoded values (a tier's codec, `tierd.transfer.encoding`) are version 2: after the
namespace id and key come

    encoding name, UTF-8 zero-padded 64 | block length u64 | xxh3-64 of the block u64

and the data length, data checksum and layer checksums are of the stored codes; the block
fields say what the codes decode to. Raw values stay version 1, byte for byte, so daemons
of either version share raw blocks; a daemon that knows only version 1 finds an encoded
value not intact (a miss, never codes served as raw bytes), and a value naming an
encoding this build cannot read is refused the same way. The two header lengths are
fixed per layer count, so a reader that knows the copy's encoding asks for exactly its
header, and a lookup asks for the longer one.
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
VERSION = 1  # raw values
VERSION_ENCODED = 2
ID_BYTES = 16  # namespace ids and block keys (tierd_client.keys.KEY_BYTES)
_FIXED = struct.Struct("<8sHHIIQQ16s16s")
_ENCODED = struct.Struct("<64sQQ")
_SUM = struct.Struct("<Q")
RAW = "raw"


@dataclass(frozen=True)
class RemoteHeader:
    nbytes: int  # of the stored bytes
    checksum: int  # xxh3-64 of the stored bytes
    layer_sums: tuple[int, ...]  # of the stored bytes' layer spans
    encoding: str = RAW
    block_nbytes: int = 0  # what the stored bytes decode to (raw: nbytes, checksum)
    block_checksum: int = 0
    size: int = 0  # of the header itself


def header_bytes(num_layers: int, encoding: str = RAW) -> int:
    extra = 0 if encoding == RAW else _ENCODED.size
    return _FIXED.size + extra + 8 * num_layers + _SUM.size


def max_header_bytes(num_layers: int) -> int:
    """What a reader that does not know a value's encoding asks for (a lookup)."""
    return header_bytes(num_layers, "encoded")


def stated_header_bytes(value: bytes | memoryview) -> int:
    """The header length a value of `encode` states (0 if too short to say): for stores
    that keep the header under a key of its own."""
    if len(value) < _FIXED.size:
        return 0
    return int(struct.unpack_from("<I", value, 12)[0])


def encode(ns_id: bytes, key: bytes, data: Any, checksum: int,
           layer_sums: Sequence[int] | None, num_layers: int, encoding: str = RAW,
           block_nbytes: int = 0, block_checksum: int = 0) -> bytes:  # fmt: skip
    """Header and data as one value. `layer_sums` None: computed here from `data`. An
    encoded value (`encoding` not raw) also names the block its codes decode to."""
    if len(ns_id) != ID_BYTES or len(key) != ID_BYTES:
        raise Internal(f"remote values name {ID_BYTES}-byte namespace ids and keys")
    view = memoryview(data).cast("B")
    sums = tuple(layer_sums) if layer_sums is not None else layer_checksums(view, num_layers)
    if len(sums) != num_layers:
        raise Internal(f"{len(sums)} layer checksums for {num_layers} layers")
    size = header_bytes(num_layers, encoding)
    version = VERSION if encoding == RAW else VERSION_ENCODED
    head = _FIXED.pack(MAGIC, version, 0, size, num_layers, len(view), checksum, ns_id, key)
    if encoding != RAW:
        name = encoding.encode()
        if not 0 < len(name) <= _ENCODED.size - 16:
            raise Internal(f"encoding name {encoding!r} does not fit a remote header")
        head += _ENCODED.pack(name, block_nbytes, block_checksum)
    head += struct.pack(f"<{num_layers}Q", *sums)
    head += _SUM.pack(xxhash.xxh3_64_intdigest(head))
    return b"".join((head, view))


def decode(head: bytes | memoryview, ns_id: bytes, key: bytes,
           num_layers: int) -> RemoteHeader | None:  # fmt: skip
    """The header at the start of `head` if it is an intact one of this block, in a
    version and encoding this build reads; else None."""
    if len(head) < _FIXED.size:
        return None
    magic, version, _, hlen, layers, nbytes, checksum, ns, k = _FIXED.unpack_from(head)
    if magic != MAGIC or version not in (VERSION, VERSION_ENCODED):
        return None
    size = header_bytes(num_layers, RAW if version == VERSION else "encoded")
    if (len(head) < size or hlen != size or layers != num_layers or ns != ns_id
            or k != key):  # fmt: skip
        return None
    head = memoryview(head)[:size]
    (stamp,) = _SUM.unpack_from(head, size - _SUM.size)
    if xxhash.xxh3_64_intdigest(head[: size - _SUM.size]) != stamp:
        return None
    at = _FIXED.size
    encoding, block_nbytes, block_checksum = RAW, nbytes, checksum
    if version == VERSION_ENCODED:
        name, block_nbytes, block_checksum = _ENCODED.unpack_from(head, at)
        at += _ENCODED.size
        readable = _readable(name.rstrip(b"\0"))
        if readable is None:
            return None
        encoding = readable
    sums = struct.unpack_from(f"<{num_layers}Q", head, at)
    return RemoteHeader(nbytes, checksum, sums, encoding, block_nbytes, block_checksum, size)


def _readable(name: bytes) -> str | None:
    """The encoding a header names, if this build can decode it (else None: refused)."""
    from tierd.transfer.encoding import codec_of

    try:
        encoding = name.decode()
        if encoding == RAW:
            return None  # a raw value is version 1; this header is not one we wrote
        codec_of(encoding)
    except (UnicodeDecodeError, ValueError, TypeError):
        return None
    return encoding
