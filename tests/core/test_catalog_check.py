"""The catalog is checked before the daemon trusts it: new ones are created whole, an older
release's is adopted, and every kind of damage is refused with what to run."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from tests.core.conftest import LAYOUT, Harness, keys_for, make_config, put_blocks
from tierd.core.catalog import BlockRow, Catalog, CopyRow, NamespaceRow
from tierd.core.catalog_check import (
    APPLICATION_ID,
    CatalogDamaged,
    CatalogTooNew,
    check_catalog,
    open_catalog,
)
from tierd.core.service import CacheService
from tierd.errors import ConfigError

NS = NamespaceRow(b"n" * 16, "t", "m", [1, 1, 8, "uint8", 1], [])


def _pragma(path: Path, name: str) -> int:
    with closing(sqlite3.connect(path)) as db:
        return int(db.execute(f"PRAGMA {name}").fetchone()[0])


def test_a_new_catalog_is_created_whole_and_marked(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    assert check_catalog(path) == "missing"
    open_catalog(path).close()
    assert check_catalog(path) == "current"
    assert _pragma(path, "application_id") == APPLICATION_ID
    assert [p.name for p in tmp_path.iterdir()] == ["index.sqlite3"]  # no leftover


def test_a_previous_release_catalog_is_adopted(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    with closing(Catalog(path)) as old:  # what the previous release wrote: no marks
        old.upsert_namespace(NS)
        old.insert_blocks([BlockRow(NS.ns_id, b"k" * 16, 8, 1, False, 0.0,
                                    copies=(CopyRow("nvme", 4096, 8, 1),))])  # fmt: skip
    assert check_catalog(path) == "previous"
    with closing(open_catalog(path)) as cat:
        assert [(r.key, r.copies) for r in cat.blocks()] == [
            (b"k" * 16, (CopyRow("nvme", 4096, 8, 1),))
        ]
    assert check_catalog(path) == "current"


def _damaged(path: Path, kind: str) -> None:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(b"\x00tierd? no" * 1000)
    elif kind == "header only":
        path.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    elif kind == "other schema":
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("CREATE TABLE blocks (id INTEGER)")
    elif kind == "not ours":
        with closing(sqlite3.connect(path)) as db, db:
            db.execute("PRAGMA application_id = 7")
            db.execute("CREATE TABLE t (x)")
    elif kind == "quick_check":
        with closing(Catalog(path)) as cat:
            cat.upsert_namespace(NS)
            cat.insert_blocks(BlockRow(NS.ns_id, i.to_bytes(16, "big"), 8, 1, False, 0.0)
                              for i in range(2000))  # fmt: skip
        with open(path, "r+b") as f:
            f.seek((path.stat().st_size // 4096 // 2) * 4096 + 200)
            f.write(b"\xa5" * 1000)


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty", "empty (0 bytes)"),
        ("garbage", "not an SQLite database"),
        ("header only", "file is not a database"),
        ("other schema", "wrong schema: table namespaces missing"),
        ("not ours", "another program's database"),
        ("quick_check", "PRAGMA quick_check"),
    ],
)
def test_damage_is_named(tmp_path: Path, kind: str, reason: str) -> None:
    path = tmp_path / "index.sqlite3"
    _damaged(path, kind)
    with pytest.raises(CatalogDamaged, match=reason.replace("(", r"\(").replace(")", r"\)")):
        check_catalog(path)
    with pytest.raises(CatalogDamaged):
        check_catalog(path, readonly=True)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    open_catalog(path).close()
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(CatalogTooNew, match="newer tierd"):
        check_catalog(path)


def test_the_service_refuses_a_damaged_catalog_naming_the_repair(tmp_path: Path) -> None:
    data = tmp_path / "data"
    h = Harness(data)
    svc = h.open()
    ns, _ = svc.open_namespace("t", "m", LAYOUT)
    put_blocks(svc, ns.id, keys_for(ns.id, 2))
    h.close_all(destroy=True)
    (data / "index.sqlite3").write_bytes(b"")
    cfg = make_config(data)
    with pytest.raises(ConfigError, match="empty") as info:
        CacheService(cfg)
    assert info.value.field == "data_dir"
    assert f"tierctl fsck --repair --data-dir {data}" in str(info.value)
    assert (data / "index.sqlite3").stat().st_size == 0  # left for fsck to move aside
    # Nothing stays held: the data dir can be opened by the next try.
    (data / "index.sqlite3").unlink()
    CacheService(cfg).close()


def test_layer_sums_land_only_on_the_block_they_were_taken_from(tmp_path: Path) -> None:
    with closing(open_catalog(tmp_path / "index.sqlite3")) as cat:
        cat.upsert_namespace(NS)
        cat.insert_blocks([BlockRow(NS.ns_id, b"k" * 16, 8, 5, False, 0.0)])
        # Sums of an older block under the same key (checksum 4) are not this block's.
        cat.set_layer_sums([(NS.ns_id, b"k" * 16, 4, (1, 2))])
        assert [r.layer_sums for r in cat.blocks()] == [None]
        cat.set_layer_sums([(NS.ns_id, b"k" * 16, 5, (1, 2))])
        assert [r.layer_sums for r in cat.blocks()] == [(1, 2)]
