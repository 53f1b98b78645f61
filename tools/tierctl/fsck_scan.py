"""The checks of `tierctl fsck`: every copy the catalog records against the bytes it names.

Primitives: `Problem`, `TierTally`, `Scan` (`rows`, `problems`, `tally`, `verdicts`),
`scan(data_dir, chain, shm_dir)`, `RowVerdict` (which copies of a row are bad),
`read_catalog(path)`.

Per row: its namespace exists and its size matches the namespace's layout; it names at
least one copy. Each copy is checked where its tier (by the chain's kind) keeps it:
  host  the tenant's /dev/shm segment exists; the extent is aligned, inside it and
        overlap-free; its xxh3-64 matches the copy's
  nvme  the extent (with the header page in front of it) is aligned, inside the tier's
        data file and overlap-free; the bytes (read with O_DIRECT through tierd's
        NvmeStore, like the daemon) match; the header page describes this block, or a
        rebuild would not find it (files written before headers existed have none)
  csd   a local worker's shard holds the block with the same checksum, and its bytes
        match it (`tierctl.fsck_csd`); copies on remote workers are not checked
A copy in a tier the chain does not have (or of a kind not checked offline) is reported
and left alone. A row whose checked copies are all bad and that has no other is to be
deleted; a row with a good copy keeps it and loses the bad ones.
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
from tierctl.fsck_tiers import TierPlace
from tierctl.progress import Progress
from tierd.core.catalog import BlockRow, CopyRow
from tierd.core.index import layout_from_list
from tierd.sqlite_rows import from_sql_u64
from tierd.tiers.block_header import HEADER_BYTES, NamespaceMeta
from tierd.tiers.checksum import checksum
from tierd.tiers.extents import align_up
from tierd.tiers.host import segment_name, segment_tag
from tierd.tiers.io_backend import ALIGNMENT, PosixBackend
from tierd.tiers.nvme import DATA_FILE, NvmeStore
from tierd.tiers.nvme_files import KEY_FILE, LEGACY_FILE, read_legacy

CATALOG = "index.sqlite3"
CHECKED_KINDS = ("host", "nvme", "csd")
_READ_BATCH_BYTES = 64 << 20  # bytes of NVMe reads in flight before checksumming them
# The release before copies kept one column per tier, always the shorthand's tiers.
_V1_COLUMNS = (("host_off", "host"), ("nvme_off", "nvme"), ("csd", "csd"))


@dataclass
class Problem:
    tier: str  # a tier's name, or "row" | "catalog"
    kind: str  # checksum, misaligned, out-of-range, overlap, missing-file, header, orphan, ...
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
    kind: str
    rows: int = 0  # copies recorded in this tier
    bytes: int = 0
    bad: int = 0
    unchecked: int = 0


@dataclass
class RowVerdict:
    row: BlockRow
    bad: set[str] = field(default_factory=set)  # tiers whose copy failed
    unchecked: set[str] = field(default_factory=set)  # tiers whose copy fsck cannot read
    headers: set[str] = field(default_factory=set)  # good NVMe copies with a wrong header
    row_bad: bool = False  # the row itself is wrong (orphan, size, no copy)

    @property
    def delete(self) -> bool:
        """No good copy is left: the whole row goes. A copy fsck cannot check (a remote
        worker's, a tier this configuration lacks) keeps it alive."""
        return self.row_bad or all(c.tier in self.bad for c in self.row.copies)

    def kept(self) -> tuple[CopyRow, ...]:
        return tuple(c for c in self.row.copies if c.tier not in self.bad)


@dataclass(frozen=True)
class NamespaceFacts:
    tenant: str
    block_bytes: int  # -1: the layout is unreadable, sizes are not checked
    meta: NamespaceMeta | None  # what a block's header page says of its namespace


@dataclass
class Scan:
    namespaces: int = 0
    rows: int = 0
    tally: dict[str, TierTally] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    verdicts: dict[tuple[bytes, bytes], RowVerdict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[bytes, NamespaceMeta | None] = field(default_factory=dict)

    def flag(self, v: RowVerdict, tier: str, kind: str, detail: str) -> None:
        """Record a problem with one copy (`tier` a tier's name) or the row ("row")."""
        self.problems.append(Problem(tier, kind, detail, v.row.ns_id, v.row.key))
        if tier == "row":
            v.row_bad = True
        elif tier not in v.bad:
            v.bad.add(tier)
            self.tally[tier].bad += 1

    def flag_header(self, v: RowVerdict, tier: str, detail: str) -> None:
        """A good copy whose header page is wrong: it stays, the header is rewritten."""
        self.problems.append(Problem(tier, "header", detail, v.row.ns_id, v.row.key))
        v.headers.add(tier)

    @property
    def bad_rows(self) -> list[RowVerdict]:
        return [v for v in self.verdicts.values() if v.row_bad or v.bad or v.headers]


@dataclass
class Extent:
    """One copy's bytes in a file: `head` header bytes in front of the data at `off`."""

    v: RowVerdict
    copy: CopyRow
    off: int
    head: int = 0

    @property
    def start(self) -> int:
        return self.off - self.head

    @property
    def end(self) -> int:
        return self.off + align_up(self.copy.length, ALIGNMENT)


def shm_tag(data_dir: Path) -> str:
    return segment_tag(data_dir)  # the daemon's own derivation


def read_catalog(path: Path) -> tuple[dict[bytes, NamespaceFacts], list[BlockRow], str]:
    """(namespaces, rows with their copies, integrity verdict), opened read-only. A catalog
    of the release before copies (a column per tier) reads as the daemon migrates it."""
    try:
        db = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise UsageError(f"cannot open the catalog {path}: {e}") from None
    try:
        integrity = str(db.execute("PRAGMA quick_check").fetchone()[0])
        namespaces: dict[bytes, NamespaceFacts] = {}
        adapter_col = "adapter" if "adapter" in _columns(db, "namespaces") else "''"
        for ns_id, tenant, model, layout, extra, adapter in db.execute(
            f"SELECT ns_id, tenant, model, layout, extra, {adapter_col} FROM namespaces"
        ):
            try:
                lay, ext = json.loads(layout), json.loads(extra)
                size = layout_from_list(lay).block_bytes
                meta: NamespaceMeta | None = NamespaceMeta(tenant, model, list(lay),
                                                           [str(x) for x in ext],
                                                           str(adapter))  # fmt: skip
            except (ValueError, TypeError):
                size, meta = -1, None  # unreadable layout: sizes unchecked
            namespaces[bytes(ns_id)] = NamespaceFacts(tenant, size, meta)
        rows = _v1_rows(db) if "host_off" in _columns(db, "blocks") else _rows(db)
    except sqlite3.DatabaseError as e:
        raise UsageError(f"cannot read the catalog {path}: {e}") from None
    finally:
        db.close()
    return namespaces, rows, integrity


def _columns(db: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in db.execute(f"PRAGMA table_info({table})")}


def _rows(db: sqlite3.Connection) -> list[BlockRow]:
    copies: dict[tuple[bytes, bytes], list[CopyRow]] = {}
    for ns, k, tier, loc, length, digest, enc in db.execute(
        "SELECT ns_id, key, tier, location, length, checksum, encoding FROM copies"
    ):
        copies.setdefault((bytes(ns), bytes(k)), []).append(
            CopyRow(str(tier), loc, int(length), from_sql_u64(digest), str(enc))
        )
    return [
        BlockRow(bytes(ns), bytes(k), int(n), from_sql_u64(s), bool(p), float(t),
                 copies=tuple(copies.get((bytes(ns), bytes(k)), ())))
        for ns, k, n, s, p, t in db.execute(
            "SELECT ns_id, key, nbytes, checksum, pinned, last_access FROM blocks")
    ]  # fmt: skip


def _v1_rows(db: sqlite3.Connection) -> list[BlockRow]:
    cols = _columns(db, "blocks")
    present = [(c, t) for c, t in _V1_COLUMNS if c in cols]
    select = ", ".join(c for c, _ in present)
    out = []
    for r in db.execute(f"SELECT ns_id, key, nbytes, checksum, pinned, last_access, {select} "
                        "FROM blocks"):  # fmt: skip
        digest = from_sql_u64(r[3])
        locations = zip(present, r[6:], strict=True)
        copies = tuple(CopyRow(tier, loc, int(r[2]), digest)
                       for (_, tier), loc in locations if loc is not None)  # fmt: skip
        out.append(BlockRow(bytes(r[0]), bytes(r[1]), int(r[2]), digest, bool(r[4]),
                            float(r[5]), copies=copies))  # fmt: skip
    return out


_Overlap = tuple[Extent, Extent, int]  # (later, earlier, where the earlier ends)


def check_extents(scan: Scan, tier: str, items: list[Extent], limit: int,
                  where: str) -> tuple[list[Extent], list[_Overlap]]:  # fmt: skip
    """Flag misaligned and out-of-range extents; (the ones worth reading, overlaps)."""
    readable: list[Extent] = []
    for e in items:
        if e.off < 0 or e.off % ALIGNMENT:
            scan.flag(e.v, tier, "misaligned", f"offset {e.off} is not a multiple of {ALIGNMENT}")
        elif e.start < 0 or e.end > limit:
            scan.flag(e.v, tier, "out-of-range", f"extent [{e.start}, {e.end}) is not inside "
                                                 f"the {limit}-byte {where}")  # fmt: skip
        else:
            readable.append(e)
    readable.sort(key=lambda e: e.start)
    overlaps: list[_Overlap] = []
    end, owner = -1, None
    for e in readable:
        if e.start < end and owner is not None:
            overlaps.append((e, owner, end))
        if e.end > end:
            end, owner = e.end, e
    return readable, overlaps


def resolve_overlaps(scan: Scan, tier: str, overlaps: list[_Overlap]) -> None:
    """Blame an overlap on the copies whose checksum failed (the bytes are the other's);
    if both match (identical bytes), on the later one, which the daemon could not reserve
    at recovery anyway. A good copy is never blamed for its neighbour."""
    for later, earlier, end in overlaps:
        culprits = [e for e in (later, earlier) if tier in e.v.bad] or [later]
        for e in culprits:
            other = earlier if e is later else later
            scan.flag(
                e.v,
                tier,
                "overlap",
                f"extent overlaps the block {other.v.row.key.hex()} (which ends at {end})",
            )


def verify(scan: Scan, tier: str, e: Extent, data: memoryview) -> None:
    got = checksum(data)
    if got != e.copy.checksum:
        scan.flag(e.v, tier, "checksum", f"xxh3 {got:#018x}, catalog says {e.copy.checksum:#018x}")


def _check_nvme(scan: Scan, place: TierPlace, items: list[Extent]) -> None:
    assert place.path is not None
    path = place.path / DATA_FILE
    if not path.is_file():
        for e in items:
            scan.flag(e.v, place.name, "missing-file", f"{path} does not exist")
        return
    # Blocks carry a header page once the file has a MAC key, except the extents written
    # before (recorded as legacy); a file without a key has none yet.
    headed = (place.path / KEY_FILE).is_file()
    legacy = read_legacy(place.path / LEGACY_FILE) if headed else set()
    for e in items:
        e.head = HEADER_BYTES if headed and e.off not in legacy else 0
    if n_legacy := sum(1 for e in items if not e.head):
        scan.notes.append(
            f"{place.name}: {n_legacy} copies were written before blocks carried "
            "headers: readable, but a rebuild of the catalog cannot find them"
        )
    size = os.stat(path).st_size // ALIGNMENT * ALIGNMENT
    readable, overlaps = check_extents(scan, place.name, items, size, f"data file {path}")
    if not readable:
        return
    # Same backend and store as the daemon: O_DIRECT reads, split and run in parallel.
    with NvmeStore(place.path, size, backend=PosixBackend(direct=True), io_threads=8,
                   headers=headed) as store:  # fmt: skip
        if not store.direct:
            scan.notes.append(f"{path}: O_DIRECT refused; read through the page cache")
        _read_and_verify(scan, place.name, store, readable)
        resolve_overlaps(scan, place.name, overlaps)
        for e in readable:
            if e.head and place.name not in e.v.bad:
                _check_header(scan, place.name, store, e)


def _read_and_verify(scan: Scan, tier: str, store: NvmeStore, readable: list[Extent]) -> None:
    batch: list[tuple[Extent, memoryview, Future[None]]] = []
    buf_size = max(_READ_BATCH_BYTES, max(align_up(e.copy.length, ALIGNMENT) for e in readable))
    buf = mmap.mmap(-1, buf_size)  # page-aligned: O_DIRECT reads land without a bounce
    view, used = memoryview(buf), 0
    with Progress(f"fsck {tier}", sum(e.copy.length for e in readable)) as bar:

        def drain() -> None:
            for e, dst, fut in batch:
                try:
                    fut.result()
                except OSError as err:
                    scan.flag(e.v, tier, "unreadable", f"read failed: {err}")
                else:
                    verify(scan, tier, e, dst)
                bar.advance(len(dst))
                dst.release()
            batch.clear()

        try:
            for e in readable:
                size_aligned = align_up(e.copy.length, ALIGNMENT)
                if used + size_aligned > buf_size:
                    drain()
                    used = 0
                dst = view[used : used + e.copy.length]
                batch.append((e, dst, store.read_async(e.off, dst)))
                used += size_aligned
            drain()
        finally:
            view.release()
            buf.close()


def _check_header(scan: Scan, tier: str, store: NvmeStore, e: Extent) -> None:
    h, row = store.read_header(e.off), e.v.row
    if h is None:
        scan.flag_header(e.v, tier, "no valid header page in front of the block: a rebuild "
                                    "of the catalog would not find it")  # fmt: skip
    elif (h.ns_id, h.key) != (row.ns_id, row.key):
        scan.flag_header(e.v, tier, f"the header page names the block {h.ns_id.hex()[:8]}/"
                                    f"{h.key.hex()}")  # fmt: skip
    elif (h.nbytes, h.checksum, h.encoding) != (e.copy.length, e.copy.checksum,
                                                 e.copy.encoding):  # encoded: its own  # fmt: skip
        scan.flag_header(e.v, tier, f"the header page says {h.nbytes} bytes, xxh3 "
                                    f"{h.checksum:#018x}, {h.encoding}")  # fmt: skip


def _check_host(scan: Scan, tier: str, shm_dir: Path, tag: str, tenant: str,
                items: list[Extent]) -> None:  # fmt: skip
    path = shm_dir / segment_name(tag, tenant)
    if not path.is_file():
        for e in items:
            scan.flag(e.v, tier, "missing-file", f"segment {path} of tenant {tenant!r} is gone")
        return
    size = os.stat(path).st_size
    readable, overlaps = check_extents(scan, tier, items, size, f"segment {path}")
    if not readable:
        return
    total = sum(e.copy.length for e in readable)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mm, \
            Progress(f"fsck {tier} {tenant}", total) as bar:  # fmt: skip
        view = memoryview(mm)
        try:
            for e in readable:
                with view[e.off : e.off + e.copy.length] as data:
                    verify(scan, tier, e, data)
                bar.advance(e.copy.length)
        finally:
            view.release()
    resolve_overlaps(scan, tier, overlaps)


def _queue_copies(result: Scan, v: RowVerdict, ns: NamespaceFacts,
                  chain: dict[str, TierPlace], queues: dict[str, list[Extent]],
                  unchecked: dict[str, int]) -> None:  # fmt: skip
    for c in v.row.copies:
        place = chain.get(c.tier)
        tally = result.tally.setdefault(c.tier, TierTally(place.kind if place else "?"))
        tally.rows += 1
        tally.bytes += c.length
        if place is None or place.kind not in CHECKED_KINDS:
            v.unchecked.add(c.tier)
            tally.unchecked += 1
            unchecked[c.tier] = unchecked.get(c.tier, 0) + 1
        elif c.encoding == "raw" and c.length != v.row.nbytes:
            result.flag(v, c.tier, "size", f"the copy has {c.length} bytes, the block "
                                           f"{v.row.nbytes}")  # fmt: skip
        elif place.kind == "csd":
            queues.setdefault(c.tier, []).append(Extent(v, c, -1))
        elif not isinstance(c.location, int):
            result.flag(v, c.tier, "misaligned", f"location {c.location!r} is not an offset")
        else:
            # Host copies are checked per tenant segment, the rest per tier.
            group = f"{c.tier}\0{ns.tenant}" if place.kind == "host" else c.tier
            queues.setdefault(group, []).append(Extent(v, c, c.location))


def scan(data_dir: Path, chain: tuple[TierPlace, ...], shm_dir: Path) -> Scan:
    from tierctl.fsck_csd import check_csd  # here: it builds on this module's types

    catalog = data_dir / CATALOG
    if not catalog.is_file():
        raise UsageError(f"no catalog at {catalog}: not a tierd data dir")
    namespaces, rows, integrity = read_catalog(catalog)
    result = Scan(namespaces=len(namespaces), rows=len(rows))
    result.tally = {p.name: TierTally(p.kind) for p in chain if p.configured}
    result.meta = {ns_id: ns.meta for ns_id, ns in namespaces.items()}
    if integrity != "ok":
        result.problems.append(Problem("catalog", "integrity", f"PRAGMA quick_check: {integrity}"))
    by_name = {p.name: p for p in chain}
    queues: dict[str, list[Extent]] = {}
    unchecked: dict[str, int] = {}
    for row in rows:
        v = result.verdicts[(row.ns_id, row.key)] = RowVerdict(row)
        ns = namespaces.get(row.ns_id)
        if ns is None:
            result.flag(v, "row", "orphan", "its namespace is not in the catalog")
        elif ns.block_bytes >= 0 and row.nbytes != ns.block_bytes:
            result.flag(v, "row", "size", f"{row.nbytes} bytes; the namespace's blocks are "
                                          f"{ns.block_bytes}")  # fmt: skip
        elif not row.copies:
            result.flag(v, "row", "no-copy", "names no copy in any tier")
        else:
            _queue_copies(result, v, ns, by_name, queues, unchecked)
    tag = shm_tag(data_dir)
    for group, items in queues.items():
        tier, _, tenant = group.partition("\0")
        place = by_name[tier]
        if place.kind == "host":
            _check_host(result, tier, shm_dir, tag, tenant, items)
        elif place.kind == "nvme":
            _check_nvme(result, place, items)
        else:
            check_csd(result, place, items)
    for tier, n in sorted(unchecked.items()):
        known_tier = by_name.get(tier)
        why = (
            f"fsck cannot read a {known_tier.kind} tier offline"
            if known_tier is not None
            else "the configuration has no tier of that name (pass the daemon's --config)"
        )
        result.notes.append(f"{n} copies in tier {tier!r} not checked: {why}")
    known = {segment_name(tag, ns.tenant) for ns in namespaces.values()}
    for seg in sorted(shm_dir.glob(f"tierd.{tag}.*")):
        if seg.name not in known:
            result.notes.append(f"{seg} belongs to no namespace in the catalog")
    return result
