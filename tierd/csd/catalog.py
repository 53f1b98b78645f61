"""A CSD shard's own index: SQLite in WAL mode, one row per stored block.

Primitives: `ShardCatalog(path)`, `rows() -> list[ShardRow]`, `insert(rows)`,
`delete(keys)`, `close()`; `layout_to_json(layout)`, `layout_from_json(text)`.

The worker writes a block's bytes first and its row second, in the call that answers the
daemon, so a row always names bytes that were fully written; a kill -9 between the two
leaves only an unnamed extent, which the allocator reclaims on the next start (space is
rebuilt from the rows). WAL with synchronous=NORMAL survives process crashes; a power
loss may drop the last transactions, and those blocks are then just misses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tierd.sqlite_rows import columns, connect, from_sql_u64, to_sql_u64, write_rows
from tierd.tiers.checksum import pack_layer_sums, unpack_layer_sums
from tierd_client.layout import KVLayout

_SCHEMA = """
CREATE TABLE IF NOT EXISTS blocks (
    ns_id BLOB NOT NULL,
    key BLOB NOT NULL,
    offset INTEGER NOT NULL,
    nbytes INTEGER NOT NULL,
    checksum INTEGER NOT NULL,
    layout TEXT NOT NULL,
    layer_sums BLOB,
    encoding TEXT NOT NULL DEFAULT 'raw',
    PRIMARY KEY (ns_id, key)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class ShardRow:
    ns_id: bytes
    key: bytes
    offset: int
    nbytes: int
    checksum: int
    layout: KVLayout
    # One checksum per layer's K|V range (attend verifies what it reads); None for rows
    # written before they existed, until a whole read checks the block and adds them.
    layer_sums: tuple[int, ...] | None = None
    # How the stored bytes are encoded (tierd.transfer.encoding): `nbytes`, `checksum` and
    # `layer_sums` are of those bytes, so a restarted worker serves and attends over its
    # codes as they were stored.
    encoding: str = "raw"


def layout_to_json(layout: KVLayout) -> str:
    return json.dumps(dataclasses.asdict(layout), sort_keys=True)


@functools.lru_cache(maxsize=64)
def layout_from_json(text: str) -> KVLayout:
    # Cached: every block of a namespace repeats the same few layouts.
    return KVLayout(**json.loads(text))


class ShardCatalog:
    def __init__(self, path: Path) -> None:
        # One connection under our own lock: the shard serialises metadata anyway.
        self._db = connect(path, _SCHEMA)
        self._lock = threading.Lock()
        have = columns(self._db, "blocks")
        if "layer_sums" not in have:  # shards before per-layer checksums
            self._db.execute("ALTER TABLE blocks ADD COLUMN layer_sums BLOB")
        if "encoding" not in have:  # shards before codecs: every block raw
            self._db.execute("ALTER TABLE blocks ADD COLUMN encoding TEXT NOT NULL DEFAULT 'raw'")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def rows(self) -> list[ShardRow]:
        with self._lock:
            raw = self._db.execute(
                "SELECT ns_id, key, offset, nbytes, checksum, layout, layer_sums, encoding "
                "FROM blocks"
            ).fetchall()
        return [
            ShardRow(r[0], r[1], r[2], r[3], from_sql_u64(r[4]), layout_from_json(r[5]),
                     unpack_layer_sums(r[6]), r[7])
            for r in raw
        ]  # fmt: skip

    def insert(self, rows: Iterable[ShardRow]) -> None:
        self._write(
            "INSERT OR REPLACE INTO blocks (ns_id, key, offset, nbytes, checksum, layout, "
            "layer_sums, encoding) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (r.ns_id, r.key, r.offset, r.nbytes, to_sql_u64(r.checksum),
                 layout_to_json(r.layout), pack_layer_sums(r.layer_sums), r.encoding)
                for r in rows
            ),
        )  # fmt: skip

    def set_layer_sums(self, row: ShardRow) -> None:
        self._write(
            "UPDATE blocks SET layer_sums = ? WHERE ns_id = ? AND key = ? AND offset = ?",
            [(pack_layer_sums(row.layer_sums), row.ns_id, row.key, row.offset)],
        )

    def delete(self, keys: Iterable[tuple[bytes, bytes]]) -> None:
        """Remove the rows of (ns_id, key) pairs; absent ones are ignored."""
        self._write("DELETE FROM blocks WHERE ns_id = ? AND key = ?", keys)

    def _write(self, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
        with self._lock:
            write_rows(self._db, sql, rows)
