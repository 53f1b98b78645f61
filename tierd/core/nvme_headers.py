"""The header each block carries on NVMe (format: `tierd.tiers.block_header`), built from
what the index knows of it, so `tierctl fsck --repair` can rebuild the catalog.

Primitives: `nvme_header(entry) -> BlockHeader`.
"""

from __future__ import annotations

from tierd.core.index import BlockEntry, layout_to_list
from tierd.tiers.block_header import BlockHeader, NamespaceMeta


def nvme_header(entry: BlockEntry) -> BlockHeader:
    ns = entry.ns
    meta = NamespaceMeta(ns.tenant, ns.model, layout_to_list(ns.layout), list(ns.extra_keys))
    return BlockHeader(ns.id, entry.key, entry.nbytes, entry.checksum, meta)
