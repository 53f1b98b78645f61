"""The persistent index: SQLite in WAL mode, so committed blocks survive restart and kill -9.

Primitives: `Catalog(path)`, `upsert_namespace`, `namespaces()`, `blocks()`,
`insert_blocks(rows)`, `set_copies(items)`, `delete_blocks(keys)`, `set_pinned`,
`set_layer_sums`, `migrate_v1(db)`; rows `BlockRow`, `CopyRow`, `NamespaceRow`.

A block is one row of `blocks` and one row of `copies` per tier holding it (the tier's
configured name, its location there, stored length, checksum and encoding).

A row is written in the same call that makes a block visible, before the RPC answers, so
whatever a client was told is committed is on record. WAL with synchronous=NORMAL is
durable against process crashes (the kernel has the pages); only a power loss can drop
the last transactions, and then the blocks they name are just cache misses.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tierd.sqlite_rows import columns, connect, from_sql_u64, to_sql_u64, write_many
from tierd.tiers.base import Copy
from tierd.tiers.checksum import pack_layer_sums, unpack_layer_sums

_NAMESPACES = """
CREATE TABLE IF NOT EXISTS namespaces (
    ns_id BLOB PRIMARY KEY,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    layout TEXT NOT NULL,
    extra TEXT NOT NULL,
    lossless INTEGER NOT NULL DEFAULT 0,
    adapter TEXT NOT NULL DEFAULT ''
)"""
_BLOCKS = """
CREATE TABLE IF NOT EXISTS blocks (
    ns_id BLOB NOT NULL,
    key BLOB NOT NULL,
    nbytes INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 0,
    last_access REAL NOT NULL,
    layer_sums BLOB,
    PRIMARY KEY (ns_id, key)
) WITHOUT ROWID"""
_COPIES = """
CREATE TABLE IF NOT EXISTS copies (
    ns_id BLOB NOT NULL,
    key BLOB NOT NULL,
    tier TEXT NOT NULL,
    location ANY NOT NULL,
    length INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    encoding TEXT NOT NULL DEFAULT 'raw',
    layer_sums BLOB,
    PRIMARY KEY (ns_id, key, tier)
) WITHOUT ROWID"""
_SCHEMA = f"{_NAMESPACES};{_BLOCKS};{_COPIES}"

# The release before copies kept one column per tier; its catalogs always named the tiers
# of the shorthand sections, so each column becomes a copy in the tier of that name.
_V1_COPY_COLUMNS = (("host_off", "host"), ("nvme_off", "nvme"), ("csd", "csd"))


@dataclass(frozen=True)
class NamespaceRow:
    ns_id: bytes
    tenant: str
    model: str
    layout: list[int | str]
    extra: list[str]
    lossless: bool = False  # see NamespaceInfo.lossless
    adapter: str = ""  # see NamespaceInfo.adapter


@dataclass(frozen=True)
class CopyRow:
    tier: str
    location: int | str
    length: int
    checksum: int
    encoding: str = "raw"
    layer_sums: tuple[int, ...] | None = None  # see Copy.layer_sums


@dataclass(frozen=True)
class BlockRow:
    ns_id: bytes
    key: bytes
    nbytes: int
    checksum: int
    pinned: bool
    last_access: float
    layer_sums: tuple[int, ...] | None = None  # see BlockEntry.layer_sums
    copies: tuple[CopyRow, ...] = ()


def migrate_v1(db: sqlite3.Connection) -> int:
    """Turn a catalog with per-tier columns into one with a row per copy, in one
    transaction (a crash leaves the old catalog whole). Returns the copies written."""
    cols = columns(db, "blocks")
    if "host_off" not in cols:
        return 0
    db.execute("BEGIN")
    try:
        db.execute("ALTER TABLE blocks RENAME TO blocks_v1")
        db.execute(_BLOCKS)
        db.execute(_COPIES)
        sums = "layer_sums" if "layer_sums" in cols else "NULL"
        db.execute(f"INSERT INTO blocks SELECT ns_id, key, nbytes, checksum, pinned, "
                   f"last_access, {sums} FROM blocks_v1")  # fmt: skip
        n = 0
        for column, tier in _V1_COPY_COLUMNS:
            if column not in cols:
                continue
            n += db.execute(
                f"INSERT INTO copies SELECT ns_id, key, ?, {column}, nbytes, checksum, 'raw', NULL "
                f"FROM blocks_v1 WHERE {column} IS NOT NULL", (tier,)
            ).rowcount
        db.execute("DROP TABLE blocks_v1")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return n


class Catalog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, guarded by our own lock: the core serialises metadata anyway.
        self._db = connect(path, _NAMESPACES)
        self._lock = threading.Lock()
        cols = columns(self._db, "blocks")
        if cols and "csd" not in cols and "host_off" in cols:  # before CSD placement existed
            self._db.execute("ALTER TABLE blocks ADD COLUMN csd TEXT")
        migrate_v1(self._db)
        self._db.executescript(_SCHEMA)
        # Catalogs from before codecs: copies were all raw, namespaces all lossy-allowed.
        for table, column in (("namespaces", "lossless INTEGER NOT NULL DEFAULT 0"),
                              ("copies", "layer_sums BLOB"),
                              ("namespaces", "adapter TEXT NOT NULL DEFAULT ''")):  # fmt: skip
            if column.split()[0] not in columns(self._db, table):
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def upsert_namespace(self, row: NamespaceRow) -> None:
        self.run([(
            "INSERT OR IGNORE INTO namespaces VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(row.ns_id, row.tenant, row.model, json.dumps(row.layout), json.dumps(row.extra),
              int(row.lossless), row.adapter)],
        )])  # fmt: skip

    def namespaces(self) -> list[NamespaceRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT ns_id, tenant, model, layout, extra, lossless, adapter FROM namespaces"
            ).fetchall()
        return [NamespaceRow(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4]), bool(r[5]),
                             r[6]) for r in rows]  # fmt: skip

    def blocks(self) -> Iterator[BlockRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT ns_id, key, nbytes, checksum, pinned, last_access, layer_sums FROM blocks"
            ).fetchall()
            copies: dict[tuple[bytes, bytes], list[CopyRow]] = {}
            for c in self._db.execute(
                "SELECT ns_id, key, tier, location, length, checksum, encoding, layer_sums "
                "FROM copies"
            ):
                copies.setdefault((c[0], c[1]), []).append(
                    CopyRow(c[2], c[3], c[4], from_sql_u64(c[5]), c[6], unpack_layer_sums(c[7]))
                )
        for r in rows:
            yield BlockRow(r[0], r[1], r[2], from_sql_u64(r[3]), bool(r[4]), r[5],
                           unpack_layer_sums(r[6]), tuple(copies.get((r[0], r[1]), ())))  # fmt: skip

    # Each change is a plan (statements with their rows) that `run` commits as one
    # transaction; the directory's write log (tierd.core.catalog_log) runs several plans
    # together, in the order it decided them.

    def run(self, *plans: Plan) -> None:
        """Commit the plans' statements in one transaction: all or nothing."""
        with self._lock:
            write_many(self._db, [step for plan in plans for step in plan])

    def insert_blocks(self, rows: Iterable[BlockRow]) -> None:
        self.run(plan_insert_blocks(rows))

    def set_copies(self, items: Iterable[tuple[bytes, bytes, Sequence[CopyRow]]]) -> None:
        """(ns_id, key, copies): each block's copies are now exactly these."""
        self.run(plan_set_copies(items))

    def set_layer_sums(self, rows: Iterable[tuple[bytes, bytes, int, tuple[int, ...]]]) -> None:
        """(ns_id, key, checksum, sums) for blocks whose per-layer checksums were just
        computed."""
        self.run(plan_set_layer_sums(rows))

    def delete_blocks(self, keys: Iterable[tuple[bytes, bytes]]) -> None:
        self.run(plan_delete_blocks(keys))

    def set_pinned(self, keys: Iterable[tuple[bytes, bytes]], pinned: bool) -> None:
        self.run(plan_set_pinned(keys, pinned))


Plan = list[tuple[str, list[tuple[object, ...]]]]


def plan_insert_blocks(rows: Iterable[BlockRow]) -> Plan:
    """New blocks with their copies. A key's row is replaced whole only by a put after its
    delete, which removed its copies rows with it; a copy row left over by a lost write
    names bytes that fail the block's checksum, so it is never served. Two statements, not
    three: this is every put's cost."""
    rows = list(rows)
    return [
        ("INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?)",
         [(r.ns_id, r.key, r.nbytes, to_sql_u64(r.checksum), int(r.pinned), r.last_access,
           pack_layer_sums(r.layer_sums)) for r in rows]),
        ("INSERT OR REPLACE INTO copies VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
         [_copy_values(r.ns_id, r.key, c) for r in rows for c in r.copies]),
    ]  # fmt: skip


# Copies only of a block on record: a change to a block deleted meanwhile leaves no orphans.
_INSERT_COPY = ("INSERT INTO copies SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE EXISTS "
                "(SELECT 1 FROM blocks WHERE ns_id = ? AND key = ?)")  # fmt: skip


def plan_set_copies(items: Iterable[tuple[bytes, bytes, Sequence[CopyRow]]]) -> Plan:
    items = list(items)
    return [
        ("DELETE FROM copies WHERE ns_id = ? AND key = ?", [(ns, k) for ns, k, _ in items]),
        (_INSERT_COPY, [(*_copy_values(ns, k, c), ns, k) for ns, k, cs in items for c in cs]),
    ]


def plan_set_layer_sums(rows: Iterable[tuple[bytes, bytes, int, tuple[int, ...]]]) -> Plan:
    """(ns_id, key, checksum, sums): only onto the row of the block they were taken from (a
    block put again under the key since, with other bytes, keeps its own)."""
    return [("UPDATE blocks SET layer_sums = ? WHERE ns_id = ? AND key = ? AND checksum = ?",
             [(pack_layer_sums(s), ns, k, to_sql_u64(c)) for ns, k, c, s in rows])]  # fmt: skip


def plan_delete_blocks(keys: Iterable[tuple[bytes, bytes]]) -> Plan:
    keys = list(keys)
    return [("DELETE FROM copies WHERE ns_id = ? AND key = ?", keys),
            ("DELETE FROM blocks WHERE ns_id = ? AND key = ?", keys)]  # fmt: skip


def plan_set_pinned(keys: Iterable[tuple[bytes, bytes]], pinned: bool) -> Plan:
    return [("UPDATE blocks SET pinned = ? WHERE ns_id = ? AND key = ?",
             [(int(pinned), ns, k) for ns, k in keys])]  # fmt: skip


def _copy_values(ns_id: bytes, key: bytes, c: CopyRow) -> tuple[object, ...]:
    return (ns_id, key, c.tier, c.location, c.length, to_sql_u64(c.checksum), c.encoding,
            pack_layer_sums(c.layer_sums))


def copy_rows(copies: Iterable[Copy]) -> tuple[CopyRow, ...]:
    """The catalog's rows for a block's copies."""
    return tuple(CopyRow(c.tier, c.location, c.length, c.checksum, c.encoding, c.layer_sums)
                 for c in copies)  # fmt: skip
