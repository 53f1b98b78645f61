"""`tierctl fsck --repair` on a damaged or missing catalog: rebuild it from the tiers.

Primitives: `Rebuilt` (what came back and what could not), `rebuild_catalog(data_dir,
chain) -> Rebuilt`.

The damaged file (with its WAL) is moved aside as `index.sqlite3.damaged-<time>`, never
deleted. Blocks and their namespaces come from the header each block carries in every
NVMe tier of the chain (a copy per tier holding the block's newest bytes); every block's
data is checked against its header's checksum, and a corrupt one is skipped and reported
(its header zeroed, like an older duplicate of one block left by a crash). Namespaces also
come from the damaged file where it still yields them, and the copies local CSD workers
hold come from their own shard catalogs. What cannot come back: blocks that were only in
host memory, NVMe blocks written before blocks carried headers (the previous release), and
blocks of remote CSD workers.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tierctl.fsck_csd import in_shard, locked_shard, read_shard, shard_rows, shard_size
from tierctl.fsck_tiers import TierPlace, local_shards, places
from tierd.core.catalog import BlockRow, CopyRow, NamespaceRow
from tierd.core.catalog_check import create_catalog, move_aside
from tierd.tiers.block_header import BlockHeader, NamespaceMeta
from tierd.tiers.checksum import checksum
from tierd.tiers.io_backend import ALIGNMENT, PosixBackend
from tierd.tiers.nvme import DATA_FILE, NvmeStore
from tierd.tiers.nvme_files import KEY_FILE
from tierd_client.keys import namespace_id

CATALOG = "index.sqlite3"
NOT_RECOVERABLE = (
    "blocks that were only in host memory are not recovered (host segments carry no "
    "headers); NVMe blocks written by a tierd without block headers are not recovered"
)


_Ident = tuple[bytes, bytes]


@dataclass(frozen=True)
class _Found:
    """A block's header found in an NVMe tier's file."""

    place: TierPlace
    store: NvmeStore
    offset: int
    header: BlockHeader


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
            columns = {str(c[1]) for c in db.execute("PRAGMA table_info(namespaces)")}
            adapter = "adapter" if "adapter" in columns else "''"  # older catalogs: none
            for r in db.execute(f"SELECT ns_id, tenant, model, layout, extra, {adapter} "
                                "FROM namespaces"):  # fmt: skip
                meta = NamespaceMeta(str(r[1]), str(r[2]), json.loads(r[3]), json.loads(r[4]),
                                     str(r[5]))  # fmt: skip
                if (row := _from_meta(bytes(r[0]), meta)) is not None:
                    out[row.ns_id] = row
        finally:
            db.close()
    except (sqlite3.Error, ValueError, TypeError):
        pass  # as damaged as it looks: the headers must do
    return out


def _from_meta(ns_id: bytes, meta: NamespaceMeta | None) -> NamespaceRow | None:
    """The namespace `meta` describes, if its id is `ns_id`; a lossless one's id says so
    (the metadata does not)."""
    if meta is None:
        return None
    for lossless in (False, True):
        if namespace_id(meta.tenant, meta.model, meta.layout, meta.extra,
                        lossless=lossless, adapter=meta.adapter) == ns_id:  # fmt: skip
            return NamespaceRow(ns_id, meta.tenant, meta.model, list(meta.layout),
                                list(meta.extra), lossless, meta.adapter)  # fmt: skip
    return None


def _open_store(place: TierPlace, out: Rebuilt, stack: ExitStack) -> NvmeStore | None:
    assert place.path is not None
    path = place.path / DATA_FILE
    if not path.is_file():
        out.notes.append(f"{path} does not exist: no blocks of tier {place.name!r} to recover")
        return None
    size = path.stat().st_size // ALIGNMENT * ALIGNMENT
    if size == 0:
        return None
    store = NvmeStore(place.path, size, backend=PosixBackend(direct=True), headers=True)
    return stack.enter_context(store)


def _scan_nvme(
    place: TierPlace,
    store: NvmeStore,
    out: Rebuilt,
    namespaces: dict[bytes, NamespaceRow],
    found: dict[_Ident, list[_Found]],
) -> None:
    assert place.path is not None
    found_any = False
    for b in store.scan_headers():
        found_any = True
        h = b.header
        if not b.intact:
            out.corrupt.append(
                {
                    "tier": place.name,
                    "ns_id": h.ns_id.hex(),
                    "key": h.key.hex(),
                    "offset": b.offset,
                    "detail": "data fails its checksum",
                }
            )
            store.zero_header(b.offset)
            continue
        if h.ns_id not in namespaces and (row := _from_meta(h.ns_id, h.namespace)):
            namespaces[h.ns_id] = row
        found.setdefault((h.ns_id, h.key), []).append(_Found(place, store, b.offset, h))
    if not found_any and not (place.path / KEY_FILE).exists():
        out.notes.append(f"{place.path / DATA_FILE} has no block headers (written by an "
                         "earlier tierd)")  # fmt: skip


def _newest(found: dict[_Ident, list[_Found]], out: Rebuilt, order: dict[str, int],
            blocks: dict[_Ident, BlockRow]) -> None:  # fmt: skip
    """One row per block from its newest header; the copies in other tiers that hold the
    same bytes stay its copies. Every other header (an older write of the block left by a
    crash) is zeroed, so it cannot come back later."""
    now = time.time()
    for ident, headers in found.items():
        newest = max(headers, key=lambda f: f.header.generation)  # the first of equals
        h = newest.header
        copies: dict[str, _Found] = {}
        for f in headers:
            same = _block_of(f.header) == _block_of(h)
            have = copies.get(f.place.name)
            if same and (have is None or f.header.generation > have.header.generation):
                if have is not None:
                    out.duplicates += 1
                    have.store.zero_header(have.offset)
                copies[f.place.name] = f
            else:
                out.duplicates += 1
                f.store.zero_header(f.offset)
        kept = sorted(copies.values(), key=lambda f: order[f.place.name])
        rows = tuple(CopyRow(f.place.name, f.offset, f.header.nbytes, f.header.checksum,
                             f.header.encoding) for f in kept)  # fmt: skip
        nbytes, digest = _block_of(h)
        blocks[ident] = BlockRow(h.ns_id, h.key, nbytes, digest, False, now, copies=rows)


def _block_of(h: BlockHeader) -> tuple[int, int]:
    """The size and checksum of the block a header's copy holds (an encoded copy's header
    names them beside those of its stored bytes)."""
    if h.encoding == "raw":
        return h.nbytes, h.checksum
    return h.block_nbytes, h.block_checksum


_ShardRow = tuple[_Ident, tuple[int, int, int]]  # (ns_id, key), (offset, nbytes, checksum)


def _intact(place: TierPlace, worker: str, shard: Path, out: Rebuilt) -> list[_ShardRow]:
    """The rows of a worker's shard whose bytes match them; the others are reported."""

    def corrupt(row: _ShardRow, detail: str) -> None:
        (ns_id, key), (off, _, _) = row
        out.corrupt.append({"tier": place.name, "ns_id": ns_id.hex(), "key": key.hex(),
                            "offset": off, "detail": f"worker {worker}: {detail}"})  # fmt: skip

    with locked_shard(worker, shard):
        try:
            rows = list(shard_rows(shard).items())
        except sqlite3.Error as e:
            out.notes.append(f"CSD worker {worker} of tier {place.name!r}: cannot read its "
                             f"shard catalog: {e}")  # fmt: skip
            return []
        size = shard_size(shard)
        for r in rows:
            if not in_shard(r[1][0], r[1][1], size):
                corrupt(r, f"extent outside the {size}-byte data file")
        rows = [r for r in rows if in_shard(r[1][0], r[1][1], size)]
        intact = []
        extents = [(off, n) for _, (off, n, _) in rows]
        for i, got in read_shard(shard, extents, f"rebuild {place.name} {worker}"):
            if isinstance(got, OSError):
                corrupt(rows[i], f"read failed: {got}")
            elif checksum(got) != rows[i][1][2]:
                corrupt(rows[i], "data fails its checksum")
            else:
                intact.append(rows[i])
    return intact


def _scan_csd(place: TierPlace, out: Rebuilt, blocks: dict[_Ident, BlockRow]) -> None:
    """Copies held by the tier's local workers (<dir>/w<i>), from their own catalogs, each
    block's bytes checked against its row there."""
    now = time.time()
    for worker, shard in local_shards(place).items():
        for ident, (_, nbytes, digest) in _intact(place, worker, shard, out):
            copy = CopyRow(place.name, worker, nbytes, digest)
            have = blocks.get(ident)
            if have is None:
                blocks[ident] = BlockRow(ident[0], ident[1], nbytes, digest, False, now,
                                         copies=(copy,))  # fmt: skip
            elif (have.nbytes, have.checksum) == (nbytes, digest) and not any(
                c.tier == place.name for c in have.copies
            ):
                blocks[ident] = dataclasses.replace(have, copies=(*have.copies, copy))


def rebuild_catalog(data_dir: Path, chain: Sequence[TierPlace]) -> Rebuilt:
    """Move a damaged catalog aside (if any) and write a new one from the tiers of `chain`
    (`tierctl.fsck_tiers`). The caller holds the data dir (no daemon runs)."""
    out = Rebuilt()
    path = data_dir / CATALOG
    aside = move_aside(path) if path.exists() else None
    out.moved_aside = str(aside) if aside else None
    namespaces = _old_namespaces(aside)
    blocks: dict[_Ident, BlockRow] = {}
    with ExitStack() as stack:
        found: dict[_Ident, list[_Found]] = {}
        stores = []
        for place in places(chain, "nvme"):
            if (store := _open_store(place, out, stack)) is not None:
                stores.append(store)
                _scan_nvme(place, store, out, namespaces, found)
        _newest(found, out, {p.name: i for i, p in enumerate(chain)}, blocks)
        for store in stores:
            store.reset_legacy()  # the new catalog names no headerless extent
    csd = places(chain, "csd")
    for place in csd:
        _scan_csd(place, out, blocks)
    known = {ident: row for ident, row in blocks.items() if row.ns_id in namespaces}
    out.unknown_namespace = len(blocks) - len(known)
    kinds = {p.name: p.kind for p in chain}
    out.nvme_blocks = sum(1 for r in known.values()
                          if any(kinds.get(c.tier) == "nvme" for c in r.copies))  # fmt: skip
    out.csd_blocks = sum(1 for r in known.values()
                         if any(kinds.get(c.tier) == "csd" for c in r.copies))  # fmt: skip
    out.namespaces = len(namespaces)
    catalog = create_catalog(path)
    try:
        for row in namespaces.values():
            catalog.upsert_namespace(row)
        catalog.insert_blocks(known.values())
    finally:
        catalog.close()
    if any(p.path is not None and p.path.is_dir() for p in csd):
        out.notes.append("blocks of remote CSD workers are not recovered")
    out.notes.append(NOT_RECOVERABLE)
    return out
