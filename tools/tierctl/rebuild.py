"""`tierctl fsck --repair` on a damaged or missing catalog: rebuild it from the tiers.

Primitives: `Rebuilt` (what came back and what could not), `rebuild_catalog(data_dir,
nvme_dir) -> Rebuilt`.

The damaged file (with its WAL) is moved aside as `index.sqlite3.damaged-<time>`, never
deleted. Blocks and their namespaces come from the header each block carries on the NVMe
tier; every block's data is checked against its header's checksum, and a corrupt one is
skipped and reported (its header zeroed, like an older duplicate of one block left by a
crash). Namespaces also come from the damaged file where it still yields them, and the
blocks local CSD workers hold come from their own shard catalogs. What cannot come back:
blocks that were only in host memory, NVMe blocks written before blocks carried headers
(the previous release), and blocks of remote CSD workers.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tierd.core.catalog import BlockRow, NamespaceRow
from tierd.core.catalog_check import create_catalog, move_aside
from tierd.sqlite_rows import from_sql_u64
from tierd.tiers.block_header import NamespaceMeta
from tierd.tiers.io_backend import ALIGNMENT, PosixBackend
from tierd.tiers.nvme import DATA_FILE, NvmeStore
from tierd_client.keys import namespace_id

CATALOG = "index.sqlite3"
NOT_RECOVERABLE = (
    "blocks that were only in host memory are not recovered (host segments carry no "
    "headers); NVMe blocks written by a tierd without block headers are not recovered"
)


@dataclass
class Rebuilt:
    moved_aside: str | None = None
    namespaces: int = 0
    nvme_blocks: int = 0
    csd_blocks: int = 0
    corrupt: list[dict[str, object]] = field(default_factory=list)  # skipped: bad data
    duplicates: int = 0  # older headers of a block found twice (a crash between writes)
    unknown_namespace: int = 0  # blocks whose namespace no source describes
    notes: list[str] = field(default_factory=list)


def _old_namespaces(path: Path | None) -> dict[bytes, NamespaceRow]:
    """Whatever namespace rows a damaged catalog still yields (often nothing)."""
    if path is None or not path.is_file():
        return {}
    out: dict[bytes, NamespaceRow] = {}
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        try:
            for r in db.execute("SELECT ns_id, tenant, model, layout, extra FROM namespaces"):
                row = NamespaceRow(bytes(r[0]), str(r[1]), str(r[2]), json.loads(r[3]),
                                   json.loads(r[4]))  # fmt: skip
                if namespace_id(row.tenant, row.model, row.layout, row.extra) == row.ns_id:
                    out[row.ns_id] = row
        finally:
            db.close()
    except (sqlite3.Error, ValueError, TypeError):
        pass  # as damaged as it looks: the headers must do
    return out


def _from_meta(ns_id: bytes, meta: NamespaceMeta | None) -> NamespaceRow | None:
    if meta is None or namespace_id(meta.tenant, meta.model, meta.layout, meta.extra) != ns_id:
        return None
    return NamespaceRow(ns_id, meta.tenant, meta.model, list(meta.layout), list(meta.extra))


def _scan_nvme(nvme_dir: Path, out: Rebuilt, namespaces: dict[bytes, NamespaceRow],
               blocks: dict[tuple[bytes, bytes], BlockRow]) -> None:  # fmt: skip
    path = nvme_dir / DATA_FILE
    if not path.is_file():
        out.notes.append(f"{path} does not exist: no NVMe blocks to recover")
        return
    size = path.stat().st_size // ALIGNMENT * ALIGNMENT
    if size == 0:
        return
    now = time.time()
    newest: dict[tuple[bytes, bytes], tuple[int, int]] = {}  # -> (generation, offset)
    with NvmeStore(nvme_dir, size, backend=PosixBackend(direct=True), headers=True) as store:
        found_any = False
        for b in store.scan_headers():
            found_any = True
            h = b.header
            if not b.intact:
                out.corrupt.append({"ns_id": h.ns_id.hex(), "key": h.key.hex(),
                                    "offset": b.offset, "detail": "data fails its checksum"})  # fmt: skip
                store.zero_header(b.offset)
                continue
            if h.ns_id not in namespaces and (row := _from_meta(h.ns_id, h.namespace)):
                namespaces[h.ns_id] = row
            ident = (h.ns_id, h.key)
            if ident in newest:
                out.duplicates += 1
                if newest[ident][0] >= h.generation:
                    store.zero_header(b.offset)
                    continue
                store.zero_header(newest[ident][1])
            newest[ident] = (h.generation, b.offset)
            blocks[ident] = BlockRow(h.ns_id, h.key, h.nbytes, h.checksum, None, b.offset,
                                     False, now)  # fmt: skip
        if not found_any and not (nvme_dir / "blocks.key").exists():
            out.notes.append(f"{path} has no block headers (written by an earlier tierd)")
        store.reset_legacy()  # the new catalog names no headerless extent


def _scan_csd(data_dir: Path, out: Rebuilt, blocks: dict[tuple[bytes, bytes], BlockRow]) -> None:
    """Blocks of the local workers (<data_dir>/csd/w<i>), from their own catalogs."""
    now = time.time()
    for shard in sorted((data_dir / "csd").glob("w*/shard.sqlite3")):
        worker = shard.parent.name
        try:
            db = sqlite3.connect(f"file:{quote(str(shard))}?mode=ro", uri=True)
            try:
                rows = db.execute("SELECT ns_id, key, nbytes, checksum FROM blocks").fetchall()
            finally:
                db.close()
        except sqlite3.Error as e:
            out.notes.append(f"CSD worker {worker}: cannot read {shard}: {e}")
            continue
        for ns_id, key, nbytes, digest in rows:
            ident = (bytes(ns_id), bytes(key))
            have = blocks.get(ident)
            if have is None:
                blocks[ident] = BlockRow(ident[0], ident[1], int(nbytes), from_sql_u64(digest),
                                         None, None, False, now, csd=worker)  # fmt: skip
            elif have.checksum == from_sql_u64(digest) and have.csd is None:
                blocks[ident] = BlockRow(have.ns_id, have.key, have.nbytes, have.checksum,
                                         None, have.nvme_off, False, now, csd=worker)  # fmt: skip


def rebuild_catalog(data_dir: Path, nvme_dir: Path) -> Rebuilt:
    """Move a damaged catalog aside (if any) and write a new one from the tiers. The
    caller holds the data dir (no daemon runs)."""
    out = Rebuilt()
    path = data_dir / CATALOG
    aside = move_aside(path) if path.exists() else None
    out.moved_aside = str(aside) if aside else None
    namespaces = _old_namespaces(aside)
    blocks: dict[tuple[bytes, bytes], BlockRow] = {}
    _scan_nvme(nvme_dir, out, namespaces, blocks)
    _scan_csd(data_dir, out, blocks)
    known = {ident: row for ident, row in blocks.items() if row.ns_id in namespaces}
    out.unknown_namespace = len(blocks) - len(known)
    out.nvme_blocks = sum(1 for r in known.values() if r.nvme_off is not None)
    out.csd_blocks = sum(1 for r in known.values() if r.csd is not None)
    out.namespaces = len(namespaces)
    catalog = create_catalog(path)
    try:
        for row in namespaces.values():
            catalog.upsert_namespace(row)
        catalog.insert_blocks(known.values())
    finally:
        catalog.close()
    if (data_dir / "csd").is_dir():
        out.notes.append("blocks of remote CSD workers are not recovered")
    out.notes.append(NOT_RECOVERABLE)
    return out
