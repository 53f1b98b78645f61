"""Self-describing NVMe blocks: the header page the daemon writes in front of each block.

Primitives: `BlockHeader` (namespace id and metadata, key, length, checksum, generation,
encoding),
`encode(header, mac_key) -> bytes` (one `HEADER_BYTES` page), `decode(page, mac_key) ->
BlockHeader | None`.

With a header on every block, the catalog is an index that can be rebuilt from the tier
itself (`tierctl fsck --repair`), so damage to it loses no intact block. A page is

    magic (8) | body length (u32) | 0 (u32) | body: UTF-8 JSON | MAC: keyed BLAKE2b-128

The MAC's key lives beside the data file, readable only by the daemon's user. Tenants
choose the bytes of their blocks, so a block's data can hold something shaped like a
header; without the key it cannot carry a valid one, and a rebuild never turns a
tenant's bytes into a block of another namespace. The generation (write time in ns)
orders two headers of one block left behind by a crash; the daemon zeroes a header when
it frees the extent, so a deleted block does not come back.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import time
from dataclasses import dataclass

HEADER_BYTES = 4096
MAGIC = b"TIERDHB1"
_FIXED = struct.Struct("<8sII")
_MAC_BYTES = 16
_MAX_BODY = HEADER_BYTES - _FIXED.size - _MAC_BYTES


@dataclass(frozen=True)
class NamespaceMeta:
    """What the catalog's namespaces table holds for one namespace."""

    tenant: str
    model: str
    layout: list[int | str]
    extra: list[str]
    adapter: str = ""  # the LoRA adapter's fingerprint its KV was computed through


@dataclass(frozen=True)
class BlockHeader:
    ns_id: bytes
    key: bytes
    nbytes: int
    checksum: int  # of the block's data, as the catalog records it
    # None when the metadata did not fit in one page (names of kilobytes): the block is
    # then recoverable only if another source names its namespace.
    namespace: NamespaceMeta | None = None
    generation: int = 0  # 0: stamped with the time of encoding
    # An encoded copy (a tier's codec): `nbytes` and `checksum` are of the stored bytes, so
    # a rebuild needs how they are encoded and what the block itself is to read them.
    encoding: str = "raw"
    block_nbytes: int = 0  # of the block as put (encoded copies only)
    block_checksum: int = 0


@dataclass(frozen=True)
class ScannedBlock:
    """A block found by scanning a data file for headers."""

    offset: int  # of the data, as the store's allocate() returns it
    header: BlockHeader
    intact: bool  # the data matches the header's checksum


def encode(header: BlockHeader, mac_key: bytes) -> bytes:
    doc: dict[str, object] = {
        "ns": header.ns_id.hex(),
        "key": header.key.hex(),
        "n": header.nbytes,
        "sum": header.checksum,
        "gen": header.generation or time.time_ns(),
    }
    if header.encoding != "raw":
        doc.update(enc=header.encoding, bn=header.block_nbytes, bsum=header.block_checksum)
    if header.namespace is not None:
        m = header.namespace
        nsmeta: dict[str, object] = {"tenant": m.tenant, "model": m.model, "layout": m.layout,
                                     "extra": m.extra}  # fmt: skip
        if m.adapter:  # absent otherwise: headers without adapters read as they always did
            nsmeta["adapter"] = m.adapter
        doc["nsmeta"] = nsmeta
    body = json.dumps(doc, separators=(",", ":")).encode()
    if len(body) > _MAX_BODY:
        doc.pop("nsmeta")
        body = json.dumps(doc, separators=(",", ":")).encode()
    head = _FIXED.pack(MAGIC, len(body), 0) + body
    return (head + _mac(head, mac_key)).ljust(HEADER_BYTES, b"\0")


def decode(page: bytes | memoryview, mac_key: bytes) -> BlockHeader | None:
    """The header in `page`, or None when it holds none (zeroes, data, forged, torn)."""
    if len(page) < HEADER_BYTES or bytes(page[:8]) != MAGIC:
        return None
    _, length, _ = _FIXED.unpack_from(page)
    if length > _MAX_BODY:
        return None
    end = _FIXED.size + length
    head = bytes(page[:end])
    if not secrets.compare_digest(bytes(page[end : end + _MAC_BYTES]), _mac(head, mac_key)):
        return None
    try:
        doc = json.loads(head[_FIXED.size :])
        meta = doc.get("nsmeta")
        return BlockHeader(
            bytes.fromhex(doc["ns"]), bytes.fromhex(doc["key"]), int(doc["n"]),
            int(doc["sum"]),
            NamespaceMeta(str(meta["tenant"]), str(meta["model"]), list(meta["layout"]),
                          [str(x) for x in meta["extra"]], str(meta.get("adapter", "")))
            if meta else None,
            int(doc["gen"]),
            str(doc.get("enc", "raw")), int(doc.get("bn", 0)), int(doc.get("bsum", 0)),
        )  # fmt: skip
    except (ValueError, KeyError, TypeError):
        return None  # authentic but unreadable: a format this code does not know


def _mac(data: bytes, mac_key: bytes) -> bytes:
    return hashlib.blake2b(data, key=mac_key, digest_size=_MAC_BYTES).digest()
