"""SQLite as the daemon's catalog and the CSD shards' use it: one place for its habits.

Primitives: `connect(path, schema) -> sqlite3.Connection`, `columns(db, table)`,
`write_rows(db, sql, rows)`, `write_many(db, steps)`, `to_sql_u64(v)`, `from_sql_u64(v)`.

Autocommit connections (isolation_level=None) in WAL mode with synchronous=NORMAL: durable
against process crashes (the kernel has the pages); a power loss may drop the last
transactions, whose blocks are then only cache misses. Callers serialise access under their
own lock, so one connection is shared between threads.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from tierd.errors import ResourceExhausted

_I64 = 1 << 63


def connect(path: Path, schema: str) -> sqlite3.Connection:
    """Open (or create) the database at `path` and apply `schema` (idempotent DDL)."""
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(schema)
    except BaseException:
        db.close()
        raise
    return db


def columns(db: sqlite3.Connection, table: str) -> set[str]:
    """The column names of `table`, to upgrade files written by an older schema."""
    return {row[1] for row in db.execute(f"PRAGMA table_info({table})")}


def write_rows(db: sqlite3.Connection, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
    """`sql` for each row in one transaction: all or nothing. Caller serialises."""
    write_many(db, [(sql, rows)])


def write_many(
    db: sqlite3.Connection, steps: Iterable[tuple[str, Iterable[tuple[object, ...]]]]
) -> None:
    """Several statements, each over its rows, in one transaction: all or nothing. A full
    disk is ResourceExhausted (nothing recorded), not an internal error. Caller serialises."""
    try:
        db.execute("BEGIN")
        try:
            for sql, rows in steps:
                db.executemany(sql, rows)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    except sqlite3.OperationalError as e:
        if "full" in str(e):  # SQLITE_FULL: the disk under the database is full
            raise ResourceExhausted(
                f"the catalog's disk is full ({e}); nothing was recorded"
            ) from e
        raise


def to_sql_u64(v: int) -> int:
    """SQLite integers are signed 64-bit; checksums are unsigned."""
    return v - (1 << 64) if v >= _I64 else v


def from_sql_u64(v: int) -> int:
    return v + (1 << 64) if v < 0 else v
