"""A data dir written by the release before copies (one catalog column per tier) migrates on
first start: every copy it recorded is adopted, byte-exact, and nothing else changes."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from tests.core.conftest import (
    BB,
    LAYOUT,
    Harness,
    block_bytes_for,
    get_blocks,
    keys_for,
    put_blocks,
)
from tierd.core.catalog import Catalog, CopyRow
from tierd.core.catalog_check import APPLICATION_ID, SCHEMA_VERSION, check_catalog, open_catalog
from tierd.core.startup import CATALOG_FILE

# The previous release's blocks table, as it created it.
_V1_BLOCKS = """
CREATE TABLE blocks (
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
) WITHOUT ROWID
"""


def to_previous_release(path: Path) -> None:
    """Rewrite a catalog into the previous release's schema, as that release left it
    (stamped version 1): the copies folded back into one column per tier."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("BEGIN")
        db.execute("ALTER TABLE blocks RENAME TO blocks_now")
        db.execute(_V1_BLOCKS)
        db.execute(
            "INSERT INTO blocks SELECT b.ns_id, b.key, b.nbytes, b.checksum,"
            " (SELECT location FROM copies c WHERE c.ns_id = b.ns_id AND c.key = b.key"
            "  AND c.tier = 'host'),"
            " (SELECT location FROM copies c WHERE c.ns_id = b.ns_id AND c.key = b.key"
            "  AND c.tier = 'nvme'),"
            " b.pinned, b.last_access,"
            " (SELECT location FROM copies c WHERE c.ns_id = b.ns_id AND c.key = b.key"
            "  AND c.tier = 'csd'),"
            " b.layer_sums FROM blocks_now b"
        )
        db.execute("DROP TABLE blocks_now")
        db.execute("DROP TABLE copies")
        db.execute("COMMIT")
        db.execute("PRAGMA user_version = 1")


def test_a_previous_release_data_dir_migrates_and_serves_every_block(tmp_path: Path) -> None:
    h = Harness(tmp_path / "data")
    try:
        svc = h.open(host_blocks=8, nvme_blocks=64)
        ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
        keys = keys_for(ns, 20)
        for i in range(0, 20, 4):
            put_blocks(svc, ns, keys[i : i + 4])
        assert svc.placer.settle(10)
        svc.set_pinned(ns, keys[:1], True)
        where = {k: sorted(svc.index.get(ns, k).copies) for k in keys}
        assert {"host"} in map(set, where.values()) and {"nvme"} in map(set, where.values())
        h.close_all()

        path = tmp_path / "data" / CATALOG_FILE
        to_previous_release(path)
        assert check_catalog(path) == "previous"

        svc = h.open(host_blocks=8, nvme_blocks=64)
        assert check_catalog(path) == "current"
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
            assert "host_off" not in {r[1] for r in db.execute("PRAGMA table_info(blocks)")}
        assert {k: sorted(svc.index.get(ns, k).copies) for k in keys} == where
        assert svc.index.get(ns, keys[0]).pinned
        for i in range(0, 20, 4):
            assert get_blocks(svc, ns, keys[i : i + 4]) == [block_bytes_for(k) for k in keys[i : i + 4]]
    finally:
        h.close_all(destroy=True)


def test_migration_turns_each_column_into_a_copy(tmp_path: Path) -> None:
    path = tmp_path / CATALOG_FILE
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("CREATE TABLE namespaces (ns_id BLOB PRIMARY KEY, tenant TEXT NOT NULL,"
                   " model TEXT NOT NULL, layout TEXT NOT NULL, extra TEXT NOT NULL)")
        db.execute(_V1_BLOCKS)
        rows = [
            (b"a", 4096, None, None),  # host only
            (b"b", None, 8192, None),  # NVMe only
            (b"c", 0, 12288, "w1"),  # all three
            (b"d", None, None, "w0"),  # a CSD worker only
        ]
        for key, host, nvme, csd in rows:
            db.execute("INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?, 0, 1.0, ?, NULL)",
                       (b"ns", key, BB, -5, host, nvme, csd))  # fmt: skip
    assert check_catalog(path) == "previous"  # unstamped: the release before that
    with closing(open_catalog(path)) as cat:
        got = {r.key: r.copies for r in cat.blocks()}
    sum_ = (1 << 64) - 5  # the unsigned checksum the signed column held
    assert got == {
        b"a": (CopyRow("host", 4096, BB, sum_),),
        b"b": (CopyRow("nvme", 8192, BB, sum_),),
        b"c": tuple(sorted((CopyRow("host", 0, BB, sum_), CopyRow("nvme", 12288, BB, sum_),
                            CopyRow("csd", "w1", BB, sum_)), key=lambda c: c.tier)),
        b"d": (CopyRow("csd", "w0", BB, sum_),),
    }  # fmt: skip
    with closing(Catalog(path)) as again:  # idempotent: a second open migrates nothing
        assert {r.key: r.copies for r in again.blocks()} == got


def test_a_catalog_from_before_codecs_gains_their_columns_and_the_new_version(
    tmp_path: Path,
) -> None:
    """Version 2 (a row per copy, no codecs): opened, it gains copies.layer_sums and
    namespaces.lossless, is stamped 3 (a daemon that knows only 2 then refuses it rather
    than read encoded copies as raw), and serves its blocks."""
    h = Harness(tmp_path / "data")
    try:
        svc = h.open(host_blocks=8, nvme_blocks=64)
        ns = svc.open_namespace("t1", "m", LAYOUT)[0].id
        keys = keys_for(ns, 4)
        put_blocks(svc, ns, keys)
        h.close_all()
        path = tmp_path / "data" / CATALOG_FILE
        with closing(sqlite3.connect(path, isolation_level=None)) as db:
            db.execute("ALTER TABLE copies DROP COLUMN layer_sums")
            db.execute("ALTER TABLE namespaces DROP COLUMN lossless")
            db.execute("PRAGMA user_version = 2")
        assert check_catalog(path) == "previous"

        svc = h.open(host_blocks=8, nvme_blocks=64)
        assert check_catalog(path) == "current"
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
            assert "layer_sums" in {r[1] for r in db.execute("PRAGMA table_info(copies)")}
            assert "lossless" in {r[1] for r in db.execute("PRAGMA table_info(namespaces)")}
        assert get_blocks(svc, ns, keys) == [block_bytes_for(k) for k in keys]
    finally:
        h.close_all(destroy=True)
