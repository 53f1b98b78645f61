"""The checks of `tierctl fsck`: every catalog row against the bytes it names.

Primitives: `Problem`, `TierTally`, `Scan` (`rows`, `problems`, `tally`, `verdicts`),
`scan(data_dir, nvme_dir, shm_dir)`, `RowVerdict` (which copies of a row are bad).

Per row: its namespace exists and its size matches the namespace's layout; it names at
least one copy (host, NVMe, or a CSD worker's, which lives in that worker's own shard and
is not checked here). Per NVMe copy: offset 4096-aligned, extent inside the data file, no
overlap with another row's extent, xxh3-64 of the bytes (read with O_DIRECT through
tierd's NvmeStore, like the daemon) equal to the catalog's. Per host copy: the tenant's
/dev/shm segment exists, the extent is aligned, inside it and overlap-free, and its
checksum matches. A row whose copies are all bad is to be deleted; a row with one good
copy keeps it and loses the bad one.
"""

from __future__ import annotations

import json
import mmap
import os
import sqlite3
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from tierctl.errors import UsageError
from tierctl.progress import Progress
from tierd.core.catalog import BlockRow
from tierd.core.index import layout_from_list
from tierd.sqlite_rows import from_sql_u64
from tierd.tiers.checksum import checksum
from tierd.tiers.extents import align_up
from tierd.tiers.host import segment_name, segment_tag
from tierd.tiers.io_backend import ALIGNMENT, PosixBackend
from tierd.tiers.nvme import DATA_FILE, NvmeStore

CATALOG = "index.sqlite3"
_READ_BATCH_BYTES = 64 << 20  # bytes of NVMe reads in flight before checksumming them


@dataclass
class Problem:
    tier: str  # "nvme" | "host" | "row" | "catalog"
    kind: str  # checksum, misaligned, out-of-range, overlap, missing-file, orphan, size, ...
    detail: str
    ns_id: bytes | None = None
    key: bytes | None = None
    action: str = ""  # what --repair did about it

    def where(self) -> str:
        if self.key is None or self.ns_id is None:
            return "-"
        return f"{self.ns_id.hex()[:8]}/{self.key.hex()}"


@dataclass
class TierTally:
    rows: int = 0
    bytes: int = 0
    bad: int = 0


@dataclass
class RowVerdict:
    row: BlockRow
    host_bad: bool = False
    nvme_bad: bool = False
    row_bad: bool = False  # the row itself is wrong (orphan, size, no copy)

    @property
    def delete(self) -> bool:
        """No good copy is left: the whole row goes."""
        if self.row_bad:
            return True
        host_ok = self.row.host_off is not None and not self.host_bad
        nvme_ok = self.row.nvme_off is not None and not self.nvme_bad
        # A CSD worker's copy lives in the worker's own shard (checked by the worker at
        # its start, not here): it keeps the row alive.
        return not (host_ok or nvme_ok or self.row.csd is not None)


@dataclass
class Scan:
    namespaces: int = 0
    rows: int = 0
    csd_rows: int = 0  # rows with a copy on a CSD worker (not verifiable offline)
    tally: dict[str, TierTally] = field(default_factory=lambda: {"host": TierTally(),
                                                                 "nvme": TierTally()})  # fmt: skip
    problems: list[Problem] = field(default_factory=list)
    verdicts: dict[tuple[bytes, bytes], RowVerdict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def flag(self, v: RowVerdict, tier: str, kind: str, detail: str) -> None:
        """Record a problem with one copy (tier "host"/"nvme") or the row ("row")."""
        self.problems.append(Problem(tier, kind, detail, v.row.ns_id, v.row.key))
        if tier == "host" and not v.host_bad:
            v.host_bad = True
            self.tally["host"].bad += 1
        elif tier == "nvme" and not v.nvme_bad:
            v.nvme_bad = True
            self.tally["nvme"].bad += 1
        elif tier == "row":
            v.row_bad = True

    @property
    def bad_rows(self) -> list[RowVerdict]:
        return [v for v in self.verdicts.values() if v.row_bad or v.host_bad or v.nvme_bad]


def shm_tag(data_dir: Path) -> str:
    return segment_tag(data_dir)  # the daemon's own derivation


def _read_catalog(path: Path) -> tuple[dict[bytes, tuple[str, int]], list[BlockRow], str]:
    """(ns_id -> (tenant, block_bytes), rows, integrity verdict), opened read-only."""
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise UsageError(f"cannot open the catalog {path}: {e}") from None
    try:
        integrity = str(db.execute("PRAGMA quick_check").fetchone()[0])
        namespaces: dict[bytes, tuple[str, int]] = {}
        for ns_id, tenant, layout in db.execute("SELECT ns_id, tenant, layout FROM namespaces"):
            try:
                namespaces[bytes(ns_id)] = (
                    tenant,
                    layout_from_list(json.loads(layout)).block_bytes,
                )
            except (ValueError, TypeError):
                namespaces[bytes(ns_id)] = (tenant, -1)  # unreadable layout: sizes unchecked
        # Catalogs written before CSD workers existed have no csd column.
        columns = {r[1] for r in db.execute("PRAGMA table_info(blocks)")}
        csd = "csd" if "csd" in columns else "NULL"
        rows = [
            BlockRow(bytes(r[0]), bytes(r[1]), r[2], from_sql_u64(r[3]), r[4], r[5], bool(r[6]),
                     r[7], r[8])
            for r in db.execute("SELECT ns_id, key, nbytes, checksum, host_off, nvme_off, pinned,"
                                f" last_access, {csd} FROM blocks")
        ]  # fmt: skip
    except sqlite3.DatabaseError as e:
        raise UsageError(f"cannot read the catalog {path}: {e}") from None
    finally:
        db.close()
    return namespaces, rows, integrity


_Overlap = tuple["RowVerdict", "RowVerdict", int]  # (later, earlier, where the earlier ends)


def _check_extents(scan: Scan, tier: str, items: list[tuple[int, RowVerdict]], limit: int,
                   where: str) -> tuple[list[tuple[int, RowVerdict]], list[_Overlap]]:  # fmt: skip
    """Alignment and bounds of one region's extents: (the ones worth reading, overlaps)."""
    readable: list[tuple[int, RowVerdict]] = []
    for off, v in items:
        size = align_up(v.row.nbytes, ALIGNMENT)
        if off < 0 or off % ALIGNMENT:
            scan.flag(v, tier, "misaligned", f"offset {off} is not a multiple of {ALIGNMENT}")
        elif off + size > limit:
            scan.flag(v, tier, "out-of-range", f"extent [{off}, {off + size}) runs past the "
                                               f"{limit}-byte {where}")  # fmt: skip
        else:
            readable.append((off, v))
    readable.sort(key=lambda item: item[0])
    overlaps: list[_Overlap] = []
    end, owner = -1, None
    for off, v in readable:
        if off < end and owner is not None:
            overlaps.append((v, owner, end))
        if off + align_up(v.row.nbytes, ALIGNMENT) > end:
            end, owner = off + align_up(v.row.nbytes, ALIGNMENT), v
    return readable, overlaps


def _resolve_overlaps(scan: Scan, tier: str, overlaps: list[_Overlap]) -> None:
    """Blame an overlap on the copies whose checksum failed (the bytes are the other's);
    if both match (identical bytes), on the later one, which the daemon could not reserve
    at recovery anyway. A good copy is never blamed for its neighbour."""
    bad = (lambda v: v.host_bad) if tier == "host" else (lambda v: v.nvme_bad)
    for later, earlier, end in overlaps:
        culprits = [v for v in (later, earlier) if bad(v)] or [later]
        for v in culprits:
            other = earlier if v is later else later
            scan.flag(v, tier, "overlap", f"extent overlaps the block {other.row.key.hex()} "
                                          f"(which ends at {end})")  # fmt: skip


def _verify(scan: Scan, tier: str, v: RowVerdict, data: memoryview) -> None:
    got = checksum(data)
    if got != v.row.checksum:
        scan.flag(v, tier, "checksum", f"xxh3 {got:#018x}, catalog says {v.row.checksum:#018x}")


def _check_nvme(scan: Scan, nvme_dir: Path, items: list[tuple[int, RowVerdict]]) -> None:
    if not items:
        return
    path = nvme_dir / DATA_FILE
    if not path.is_file():
        for _, v in items:
            scan.flag(v, "nvme", "missing-file", f"{path} does not exist")
        return
    size = os.stat(path).st_size // ALIGNMENT * ALIGNMENT
    readable, overlaps = _check_extents(scan, "nvme", items, size, f"data file {path}")
    if not readable:
        return
    total = sum(v.row.nbytes for _, v in readable)
    # Same backend and store as the daemon: O_DIRECT reads, split and run in parallel.
    with NvmeStore(nvme_dir, size, backend=PosixBackend(direct=True), io_threads=8) as store, \
            Progress("fsck nvme", total) as bar:  # fmt: skip
        if not store.direct:
            scan.notes.append(f"{path}: O_DIRECT refused; read through the page cache")
        batch: list[tuple[RowVerdict, memoryview, Future[None]]] = []
        buf_size = max(
            _READ_BATCH_BYTES, max(align_up(v.row.nbytes, ALIGNMENT) for _, v in readable)
        )
        buf = mmap.mmap(-1, buf_size)  # page-aligned: O_DIRECT reads land without a bounce
        view, used = memoryview(buf), 0

        def drain() -> None:
            for v, dst, fut in batch:
                try:
                    fut.result()
                except OSError as e:
                    scan.flag(v, "nvme", "unreadable", f"read failed: {e}")
                else:
                    _verify(scan, "nvme", v, dst)
                bar.advance(len(dst))
                dst.release()
            batch.clear()

        try:
            for off, v in readable:
                size_aligned = align_up(v.row.nbytes, ALIGNMENT)
                if used + size_aligned > buf_size:
                    drain()
                    used = 0
                dst = view[used : used + v.row.nbytes]
                batch.append((v, dst, store.read_async(off, dst)))
                used += size_aligned
            drain()
        finally:
            view.release()
            buf.close()
    _resolve_overlaps(scan, "nvme", overlaps)


def _check_host(scan: Scan, shm_dir: Path, tag: str, tenant: str,
                items: list[tuple[int, RowVerdict]]) -> None:  # fmt: skip
    path = shm_dir / segment_name(tag, tenant)
    if not path.is_file():
        for _, v in items:
            scan.flag(v, "host", "missing-file", f"segment {path} of tenant {tenant!r} is gone")
        return
    size = os.stat(path).st_size
    readable, overlaps = _check_extents(scan, "host", items, size, f"segment {path}")
    if not readable:
        return
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm, \
            Progress(f"fsck host {tenant}", sum(v.row.nbytes for _, v in readable)) as bar:  # fmt: skip
        view = memoryview(mm)
        try:
            for off, v in readable:
                with view[off : off + v.row.nbytes] as data:
                    _verify(scan, "host", v, data)
                bar.advance(v.row.nbytes)
        finally:
            view.release()
    _resolve_overlaps(scan, "host", overlaps)


def scan(data_dir: Path, nvme_dir: Path, shm_dir: Path) -> Scan:
    catalog = data_dir / CATALOG
    if not catalog.is_file():
        raise UsageError(f"no catalog at {catalog}: not a tierd data dir")
    namespaces, rows, integrity = _read_catalog(catalog)
    result = Scan(namespaces=len(namespaces), rows=len(rows))
    if integrity != "ok":
        result.problems.append(Problem("catalog", "integrity", f"PRAGMA quick_check: {integrity}"))
    nvme_items: list[tuple[int, RowVerdict]] = []
    host_items: dict[str, list[tuple[int, RowVerdict]]] = {}
    for row in rows:
        v = result.verdicts[(row.ns_id, row.key)] = RowVerdict(row)
        ns = namespaces.get(row.ns_id)
        if ns is None:
            result.flag(v, "row", "orphan", "its namespace is not in the catalog")
            continue
        tenant, block_bytes = ns
        if block_bytes >= 0 and row.nbytes != block_bytes:
            result.flag(v, "row", "size", f"{row.nbytes} bytes; the namespace's blocks are "
                                          f"{block_bytes}")  # fmt: skip
            continue
        if row.host_off is None and row.nvme_off is None and row.csd is None:
            result.flag(v, "row", "no-copy", "names no host, NVMe or CSD copy")
            continue
        if row.csd is not None:
            result.csd_rows += 1
        if row.nvme_off is not None:
            result.tally["nvme"].rows += 1
            result.tally["nvme"].bytes += row.nbytes
            nvme_items.append((row.nvme_off, v))
        if row.host_off is not None:
            result.tally["host"].rows += 1
            result.tally["host"].bytes += row.nbytes
            host_items.setdefault(tenant, []).append((row.host_off, v))
    _check_nvme(result, nvme_dir, nvme_items)
    tag = shm_tag(data_dir)
    for tenant, items in host_items.items():
        _check_host(result, shm_dir, tag, tenant, items)
    known = {segment_name(tag, t) for t, _ in namespaces.values()}
    for seg in sorted(shm_dir.glob(f"tierd.{tag}.*")):
        if seg.name not in known:
            result.notes.append(f"{seg} belongs to no namespace in the catalog")
    return result
