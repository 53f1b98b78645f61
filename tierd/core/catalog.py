"""The persistent index: SQLite in WAL mode, so committed blocks survive restart and kill -9.

Primitives: `Catalog(path)`, `upsert_namespace`, `namespaces()`, `blocks()`,
`insert_blocks(rows)`, `update_locations(rows)`, `delete_blocks(keys)`, `set_pinned`.

A row is written in the same call that makes a block visible, before the RPC answers, so
whatever a client was told is committed is on record. WAL with synchronous=NORMAL is
durable against process crashes (the kernel has the pages); only a power loss can drop
the last transactions, and then the blocks they name are just cache misses.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tierd.sqlite_rows import from_sql_u64, to_sql_u64, write_rows
from tierd.tiers.checksum import pack_layer_sums, unpack_layer_sums

_SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    ns_id BLOB PRIMARY KEY,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    layout TEXT NOT NULL,
    extra TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS blocks (
    ns_id BLOB NOT NULL,
    key BLOB NOT NULL,
    nbytes INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    host_off INTEGER,
    nvme_off INTEGER,
    pinned INTEGER NOT NULL DEFAULT 0,
    last_access REAL NOT NULL,
    csd TEXT,
    layer_sums BLOB,
    PRIMARY KEY (ns_id, key)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class NamespaceRow:
    ns_id: bytes
    tenant: str
    model: str
    layout: list[int | str]
    extra: list[str]


@dataclass(frozen=True)
class BlockRow:
    ns_id: bytes
    key: bytes
    nbytes: int
    checksum: int
    host_off: int | None
    nvme_off: int | None
    pinned: bool
    last_access: float
    csd: str | None = None  # the CSD worker holding a copy
    layer_sums: tuple[int, ...] | None = None  # see BlockEntry.layer_sums


class Catalog:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, guarded by our own lock: the core serialises metadata anyway.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(blocks)")}
        if "csd" not in columns:  # catalogs written before CSD placement existed
            self._db.execute("ALTER TABLE blocks ADD COLUMN csd TEXT")
        if "layer_sums" not in columns:  # catalogs written before per-layer checksums
            self._db.execute("ALTER TABLE blocks ADD COLUMN layer_sums BLOB")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, sql: str, rows: Iterable[tuple]) -> None:
        with self._lock:
            write_rows(self._db, sql, rows)

    def upsert_namespace(self, row: NamespaceRow) -> None:
        self._write(
            "INSERT OR IGNORE INTO namespaces VALUES (?, ?, ?, ?, ?)",
            [(row.ns_id, row.tenant, row.model, json.dumps(row.layout), json.dumps(row.extra))],
        )

    def namespaces(self) -> list[NamespaceRow]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM namespaces").fetchall()
        return [NamespaceRow(r[0], r[1], r[2], json.loads(r[3]), json.loads(r[4])) for r in rows]

    def blocks(self) -> Iterator[BlockRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT ns_id, key, nbytes, checksum, host_off, nvme_off, pinned, last_access, csd,"
                " layer_sums FROM blocks"
            ).fetchall()
        for r in rows:
            yield BlockRow(r[0], r[1], r[2], from_sql_u64(r[3]), r[4], r[5], bool(r[6]), r[7], r[8],
                           unpack_layer_sums(r[9]))  # fmt: skip

    def insert_blocks(self, rows: Iterable[BlockRow]) -> None:
        self._write(
            "INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (r.ns_id, r.key, r.nbytes, to_sql_u64(r.checksum), r.host_off, r.nvme_off,
                 int(r.pinned), r.last_access, r.csd, pack_layer_sums(r.layer_sums))
                for r in rows
            ),
        )

    def update_locations(self, rows: Iterable[tuple[bytes, bytes, int | None, int | None]]) -> None:
        """(ns_id, key, host_off, nvme_off) for blocks that moved between tiers."""
        self._write(
            "UPDATE blocks SET host_off = ?, nvme_off = ? WHERE ns_id = ? AND key = ?",
            ((h, n, ns, k) for ns, k, h, n in rows),
        )

    def set_layer_sums(self, rows: Iterable[tuple[bytes, bytes, tuple[int, ...]]]) -> None:
        """(ns_id, key, sums) for blocks whose per-layer checksums were just computed."""
        self._write(
            "UPDATE blocks SET layer_sums = ? WHERE ns_id = ? AND key = ?",
            ((pack_layer_sums(s), ns, k) for ns, k, s in rows),
        )

    def set_csd(self, rows: Iterable[tuple[bytes, bytes, str | None]]) -> None:
        """(ns_id, key, worker) for blocks placed on (or taken off) a CSD worker."""
        self._write(
            "UPDATE blocks SET csd = ? WHERE ns_id = ? AND key = ?",
            ((w, ns, k) for ns, k, w in rows),
        )

    def delete_blocks(self, keys: Iterable[tuple[bytes, bytes]]) -> None:
        self._write("DELETE FROM blocks WHERE ns_id = ? AND key = ?", keys)

    def set_pinned(self, keys: Iterable[tuple[bytes, bytes]], pinned: bool) -> None:
        self._write(
            "UPDATE blocks SET pinned = ? WHERE ns_id = ? AND key = ?",
            ((int(pinned), ns, k) for ns, k in keys),
        )
