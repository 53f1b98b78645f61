"""The checksums every stored block carries: part of the on-disk format, so the daemon, the
CSD workers and `tierctl fsck` all compute them here.

Primitives: `checksum(buffer) -> int` (xxh3-64, ~15 GB/s, unsigned);
`layer_checksums(buffer, num_layers) -> tuple[int, ...]` (one per layer's K|V range);
`pack_layer_sums(sums) -> bytes` / `unpack_layer_sums(blob) -> tuple | None` (catalog form).

Attend reads one layer of a block at a time, so a whole-block checksum cannot vouch for
what it reads without widening every read num_layers times. The per-layer sums let attend
verify exactly the range it read; they are computed whenever a block is written to a tier
the daemon does not hold in its own memory (NVMe, CSD), from bytes already trusted.
"""

from __future__ import annotations

import struct
from typing import Any

import xxhash

from tierd.errors import Internal


def checksum(buf: Any) -> int:
    return xxhash.xxh3_64_intdigest(buf)


def layer_checksums(buf: Any, num_layers: int) -> tuple[int, ...]:
    """xxh3-64 of each of the `num_layers` equal ranges of a block (one layer's K|V each)."""
    view = memoryview(buf).cast("B")
    span, rest = divmod(len(view), num_layers)
    if rest or num_layers < 1:
        raise Internal(f"{len(view)} bytes do not split into {num_layers} layers")
    return tuple(xxhash.xxh3_64_intdigest(view[i * span : (i + 1) * span])
                 for i in range(num_layers))  # fmt: skip


def pack_layer_sums(sums: tuple[int, ...] | None) -> bytes | None:
    return None if sums is None else struct.pack(f"<{len(sums)}Q", *sums)


def unpack_layer_sums(blob: bytes | None) -> tuple[int, ...] | None:
    if not blob or len(blob) % 8:
        return None  # absent (written before per-layer sums) or unreadable: verify whole
    return struct.unpack(f"<{len(blob) // 8}Q", blob)
