"""tierctl fsck on data dirs written by a real CacheService, then damaged on purpose."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.core.conftest import (
    BB,
    LAYOUT,
    Harness,
    block_bytes_for,
    get_blocks,
    keys_for,
    put_blocks,
)
from tierctl.cli import main
from tierctl.fsck_scan import shm_tag
from tierctl.fsck_tiers import tier_chain
from tierctl.rebuild import rebuild_catalog
from tierd.config import load_config
from tierd.core.catalog import BlockRow, Catalog, CopyRow
from tierd.core.index import layout_to_list
from tierd.core.service import CacheService
from tierd.filelock import DATA_DIR_LOCK
from tierd.tiers.block_header import HEADER_BYTES, BlockHeader, NamespaceMeta
from tierd.tiers.checksum import checksum
from tierd.tiers.host import SHM_DIR, segment_name
from tierd.tiers.io_backend import PosixBackend
from tierd.tiers.nvme import NvmeStore
from tierd_client.keys import namespace_id

TENANT = "fsck-tenant"


@dataclass
class Populated:
    harness: Harness
    data_dir: Path
    ns_id: bytes
    keys: list[bytes]

    def rows(self) -> dict[bytes, tuple[int | None, int | None]]:
        """key -> (host copy's offset, NVMe copy's offset), straight from the catalog."""
        return catalog_rows(self.data_dir, "host", "nvme")

    def sql(self, statement: str, *params: object) -> None:
        with closing(sqlite3.connect(self.data_dir / "index.sqlite3")) as db, db:
            db.execute(statement, params)

    @property
    def segment(self) -> Path:
        return SHM_DIR / segment_name(shm_tag(self.data_dir), TENANT)


@pytest.fixture
def populated(tmp_path: Path) -> Iterator[Populated]:
    """24 blocks through a host tier of 8: most are demoted to NVMe; one is read back, so
    it has both copies. The service is closed: fsck runs on a stopped daemon's dir."""
    h = Harness(tmp_path / "data")
    try:
        svc = h.open(host_blocks=8, nvme_blocks=64)
        ns, _ = svc.open_namespace(TENANT, "model", LAYOUT)
        keys = keys_for(ns.id, 24)
        for i in range(0, len(keys), 4):
            assert put_blocks(svc, ns.id, keys[i : i + 4]) == 4
        assert svc.placer.settle(10)
        # Promote one demoted block: it then has a host copy and an NVMe copy.
        with svc.cond:
            nvme_only = [e.key for e in svc.index.entries() if set(e.copies) == {"nvme"}]
        assert get_blocks(svc, ns.id, [nvme_only[0]]) == [block_bytes_for(nvme_only[0])]
        h.close_all()
        yield Populated(h, tmp_path / "data", ns.id, keys)
    finally:
        h.close_all()
        # By name, not through the services: tests close and reopen them along the way.
        for seg in SHM_DIR.glob(f"tierd.{shm_tag(tmp_path / 'data')}.*"):
            seg.unlink(missing_ok=True)


def catalog_rows(data_dir: Path, top: str, low: str) -> dict[bytes, tuple[int | None, int | None]]:
    """key -> (location in tier `top`, location in tier `low`) of every block row."""
    # closing(): a sqlite3 connection's own context manager commits but stays open,
    # and fsck would rightly see this process holding the catalog.
    with closing(sqlite3.connect(data_dir / "index.sqlite3")) as db:
        return {bytes(k): (h, n) for k, h, n in db.execute(
            "SELECT b.key, t.location, l.location FROM blocks b "
            "LEFT JOIN copies t ON t.ns_id = b.ns_id AND t.key = b.key AND t.tier = ? "
            "LEFT JOIN copies l ON l.ns_id = b.ns_id AND l.key = b.key AND l.tier = ?",
            (top, low))}  # fmt: skip


def fsck(data_dir: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict]:
    code = main(["fsck", "--data-dir", str(data_dir), "--json", *extra])
    captured = capsys.readouterr()
    if code == 2:
        print(captured.err)  # why it could not check, in the failure report
    return code, (json.loads(captured.out) if captured.out.strip() else {})


def _scribble(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset + 100)
        f.write(b"\xa5" * 64)


def test_clean_dir_is_clean(populated: Populated, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = fsck(populated.data_dir, capsys=capsys)
    assert code == 0, report
    assert report["rows"] == 24 and report["problems"] == []
    tiers = report["tiers"]
    assert tiers["nvme"]["rows"] > 0 and tiers["host"]["rows"] > 0
    assert tiers["nvme"]["bad"] == tiers["host"]["bad"] == 0
    # The text form says so too, and a daemon config file can name the data dir.
    config = populated.data_dir.parent / "tierd.toml"
    config.write_text(f'data_dir = "{populated.data_dir}"\n')
    assert main(["fsck", "--config", str(config)]) == 0
    assert "clean" in capsys.readouterr().out
    # --nvme-path says where the NVMe tier's file is: elsewhere, its copies are missing.
    nvme = str(populated.data_dir / "nvme")
    assert fsck(populated.data_dir, "--nvme-path", nvme, capsys=capsys)[0] == 0
    code, report = fsck(populated.data_dir, "--nvme-path", nvme + "-moved", capsys=capsys)
    assert code == 1 and {p["kind"] for p in report["problems"]} == {"missing-file"}
    assert report["tiers"]["nvme"]["bad"] == tiers["nvme"]["rows"]


def test_corruption_found_repaired_and_good_blocks_still_served(
    populated: Populated, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = populated.rows()
    nvme_victim = next(k for k, (h, n) in rows.items() if h is None and n is not None)
    host_victim = next(k for k, (h, n) in rows.items() if h is not None and n is None)
    _scribble(populated.data_dir / "nvme" / "blocks.dat", rows[nvme_victim][1] or 0)
    _scribble(populated.segment, rows[host_victim][0] or 0)

    code, report = fsck(populated.data_dir, capsys=capsys)
    assert code == 1
    found = {(p["tier"], p["kind"], p["key"]) for p in report["problems"]}
    assert found == {
        ("nvme", "checksum", nvme_victim.hex()),
        ("host", "checksum", host_victim.hex()),
    }
    assert populated.rows() == rows  # a plain check writes nothing

    code, report = fsck(populated.data_dir, "--repair", capsys=capsys)
    assert code == 1 and report["deleted"] == 2 and report["cleared"] == 0
    assert {p["action"] for p in report["problems"]} == {"deleted row"}
    after = populated.rows()
    assert set(after) == set(rows) - {nvme_victim, host_victim}
    assert all(after[k] == rows[k] for k in after)  # good rows untouched

    code, report = fsck(populated.data_dir, capsys=capsys)
    assert code == 0 and report["problems"] == []

    svc = populated.harness.open(host_blocks=8, nvme_blocks=64)
    # In fours: a get stages NVMe blocks in host, which holds 8.
    got = [
        d
        for i in range(0, 24, 4)
        for d in get_blocks(svc, populated.ns_id, populated.keys[i : i + 4])
    ]
    for key, data in zip(populated.keys, got, strict=True):
        if key in (nvme_victim, host_victim):
            assert data is None
        else:
            assert data == block_bytes_for(key), key.hex()
    assert svc.stats().corrupt_reads == 0


def test_bad_copy_of_a_two_copy_block_is_dropped_not_the_block(
    populated: Populated, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = populated.rows()
    both = next(k for k, (h, n) in rows.items() if h is not None and n is not None)
    _scribble(populated.segment, rows[both][0] or 0)
    code, report = fsck(populated.data_dir, "--repair", capsys=capsys)
    assert code == 1 and report["deleted"] == 0 and report["cleared"] == 1
    assert [(p["tier"], p["kind"], p["action"]) for p in report["problems"]] == [
        ("host", "checksum", "dropped the bad copy")
    ]
    assert populated.rows()[both] == (None, rows[both][1])
    assert fsck(populated.data_dir, capsys=capsys)[0] == 0
    svc = populated.harness.open(host_blocks=8, nvme_blocks=64)
    assert get_blocks(svc, populated.ns_id, [both]) == [block_bytes_for(both)]


def test_catalog_level_problems(populated: Populated, capsys: pytest.CaptureFixture[str]) -> None:
    rows = populated.rows()
    nvme_keys = [k for k, (h, n) in rows.items() if h is None and n is not None]
    misaligned, out_of_range, overlapping, no_copy = nvme_keys[:4]
    nvme_copy = "UPDATE copies SET location = {} WHERE key = ? AND tier = 'nvme'"
    populated.sql(nvme_copy.format("location + 512"), misaligned)
    populated.sql(nvme_copy.format("?"), 1 << 40, out_of_range)
    # Onto a good block's extent: the intruder's checksum fails, the owner stays good.
    owner = nvme_keys[4]
    populated.sql(nvme_copy.format("?"), rows[owner][1], overlapping)
    populated.sql("DELETE FROM copies WHERE key = ?", no_copy)
    wrong_size = nvme_keys[5]
    populated.sql("UPDATE blocks SET nbytes = ? WHERE key = ?", BB // 2, wrong_size)
    orphan = bytes(16)
    populated.sql("INSERT INTO blocks SELECT ?, key, nbytes, checksum, pinned, last_access, "
                  "layer_sums FROM blocks WHERE key = ?", orphan, nvme_keys[6])  # fmt: skip

    code, report = fsck(populated.data_dir, "--repair", capsys=capsys)
    assert code == 1
    kinds = {(p["kind"], p["key"]) for p in report["problems"]}
    assert ("misaligned", misaligned.hex()) in kinds
    assert ("out-of-range", out_of_range.hex()) in kinds
    assert ("overlap", overlapping.hex()) in kinds and ("checksum", overlapping.hex()) in kinds
    assert ("no-copy", no_copy.hex()) in kinds
    assert ("size", wrong_size.hex()) in kinds
    assert ("orphan", nvme_keys[6].hex()) in kinds
    assert not any(p["key"] == owner.hex() for p in report["problems"])
    assert report["deleted"] == 6
    assert fsck(populated.data_dir, capsys=capsys)[0] == 0
    assert populated.rows()[owner] == rows[owner]


def test_lost_host_segment(populated: Populated, capsys: pytest.CaptureFixture[str]) -> None:
    rows = populated.rows()
    populated.segment.unlink()
    code, report = fsck(populated.data_dir, "--repair", capsys=capsys)
    assert code == 1
    host_rows = {k for k, (h, _) in rows.items() if h is not None}
    assert {bytes.fromhex(p["key"]) for p in report["problems"]} == host_rows
    assert {p["kind"] for p in report["problems"]} == {"missing-file"}
    kept = populated.rows()
    # Host-only rows are gone; rows that also had an NVMe copy keep it.
    assert set(kept) == {k for k, (_, n) in rows.items() if n is not None}
    assert all(h is None for h, _ in kept.values())


def test_refuses_while_the_data_dir_is_in_use(
    populated: Populated, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = populated.data_dir
    # 1. A live service (what a daemon is) holds the catalog open.
    populated.harness.open(host_blocks=8, nvme_blocks=64)
    assert main(["fsck", "--data-dir", str(data_dir)]) == 2
    assert "is locked" in capsys.readouterr().err  # the service holds the data dir's lock
    populated.harness.close_all()
    # 2. Someone holds the data dir's lock (a daemon that takes it, or another fsck).
    fd = os.open(data_dir / DATA_DIR_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        code = main(["fsck", "--data-dir", str(data_dir)])
        assert code == 2 and "is locked" in capsys.readouterr().err
    finally:
        os.close(fd)
    # 3. Something answers on the data dir's socket.
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(data_dir / "tierd.sock"))
        s.listen()
        code = main(["fsck", "--data-dir", str(data_dir)])
        assert code == 2 and "answers on" in capsys.readouterr().err
    os.unlink(data_dir / "tierd.sock")
    assert main(["fsck", "--data-dir", str(data_dir)]) == 0


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fsck"]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert main(["fsck", "--data-dir", str(tmp_path / "missing")]) == 2
    assert main(["fsck", "--data-dir", str(tmp_path)]) == 2
    assert "not a tierd data dir" in capsys.readouterr().err
    assert main(["fsck", "--bogus"]) == 2


# -- a damaged or lost catalog, rebuilt from the blocks' own headers --------------------------


def _damage_catalog(data_dir: Path, kind: str) -> None:
    path = data_dir / "index.sqlite3"
    if kind == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(os.urandom(20_000))


@pytest.mark.parametrize("kind", ["deleted", "empty", "garbage"])
def test_a_lost_catalog_is_rebuilt_from_the_nvme_headers(
    populated: Populated, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = populated.rows()
    on_nvme = {k for k, (_, n) in rows.items() if n is not None}
    host_only = set(rows) - on_nvme
    assert on_nvme and host_only
    _damage_catalog(populated.data_dir, kind)

    code, report = fsck(populated.data_dir, capsys=capsys)
    assert code == 1
    assert [(p["tier"], p["kind"]) for p in report["problems"]] == [
        ("catalog", "missing" if kind == "deleted" else "damaged")
    ]
    code, report = fsck(populated.data_dir, "--repair", capsys=capsys)
    assert code == 1
    rebuilt = report["rebuilt"]
    assert (rebuilt["namespaces"], rebuilt["nvme_blocks"]) == (1, len(on_nvme))
    assert rebuilt["corrupt"] == [] and rebuilt["duplicates"] == 0
    assert report["problems"][0]["action"].startswith("rebuilt from the tiers")
    aside = list(populated.data_dir.glob("index.sqlite3.damaged-*"))
    assert len(aside) == (0 if kind == "deleted" else 1)
    assert set(populated.rows()) == on_nvme
    assert fsck(populated.data_dir, capsys=capsys)[0] == 0

    svc = populated.harness.open(host_blocks=8, nvme_blocks=64)
    for key in populated.keys:
        want = block_bytes_for(key) if key in on_nvme else None
        assert get_blocks(svc, populated.ns_id, [key]) == [want], key.hex()
    assert svc.stats().corrupt_reads == 0


def test_rebuild_skips_a_corrupt_block_and_a_deleted_one_stays_deleted(
    populated: Populated, capsys: pytest.CaptureFixture[str]
) -> None:
    before = populated.rows()
    deleted = next(k for k, (h, n) in before.items() if h is None and n is not None)
    svc = populated.harness.open(host_blocks=8, nvme_blocks=64)
    assert svc.delete(populated.ns_id, [deleted]) == 1
    populated.harness.close_all()
    # What the tiers hold now: the reopened daemon's placement may have demoted more.
    rows = populated.rows()
    on_nvme = [k for k, (_, n) in rows.items() if n is not None]
    corrupt = next(k for k, (h, n) in rows.items() if h is None and n is not None)
    _scribble(populated.data_dir / "nvme" / "blocks.dat", rows[corrupt][1] or 0)
    _damage_catalog(populated.data_dir, "deleted")

    code, report = fsck(populated.data_dir, "--repair", capsys=capsys)
    assert code == 1
    assert deleted not in rows
    assert report["rebuilt"]["nvme_blocks"] == len(on_nvme) - 1  # all but the corrupt one
    bad = [p for p in report["problems"] if p["tier"] == "nvme"]
    assert [(p["kind"], p["key"], p["action"]) for p in bad] == [
        ("checksum", corrupt.hex(), "not recovered")
    ]
    assert set(populated.rows()) == {k for k, (_, n) in rows.items() if n is not None} - {
        corrupt,
        deleted,
    }
    # Its header was zeroed: a second rebuild does not report it again.
    _damage_catalog(populated.data_dir, "deleted")
    code, report = fsck(populated.data_dir, "--repair", capsys=capsys)
    assert report["rebuilt"]["corrupt"] == []


def test_blocks_of_the_previous_format_stay_readable_but_cannot_be_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A data dir written before blocks carried headers: an unmarked catalog, NVMe blocks
    from offset 0 with nothing in front of them."""
    data = tmp_path / "data"
    nvme_dir = data / "nvme"
    h = Harness(data)
    try:
        svc = h.open(host_blocks=8, nvme_blocks=64)
        ns, _ = svc.open_namespace(TENANT, "model", LAYOUT)
        ns_row = next(iter(svc.catalog.namespaces()))
        h.close_all(destroy=True)
        for name in ("index.sqlite3", "nvme"):
            path = data / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        old_keys = keys_for(ns.id, 3, seed=5)
        with (
            NvmeStore(nvme_dir, 64 * BB, backend=PosixBackend()) as old,
            closing(Catalog(data / "index.sqlite3")) as cat,
        ):
            cat.upsert_namespace(ns_row)
            for i, key in enumerate(old_keys):
                old.write(i * BB, block_bytes_for(key))
                digest = checksum(block_bytes_for(key))
                copy = CopyRow("nvme", i * BB, BB, digest)
                cat.insert_blocks([BlockRow(ns.id, key, BB, digest, False, 0.0, copies=(copy,))])
        assert not (nvme_dir / "blocks.key").exists()

        svc = h.open(host_blocks=8, nvme_blocks=64)
        assert get_blocks(svc, ns.id, old_keys) == [block_bytes_for(k) for k in old_keys]
        new_keys = keys_for(ns.id, 2, seed=6)
        assert put_blocks(svc, ns.id, new_keys) == 2
        assert svc.move(ns.id, new_keys, "nvme") == 2
        h.close_all()
        svc = h.open(host_blocks=8, nvme_blocks=64)  # legacy and headed extents side by side
        assert get_blocks(svc, ns.id, old_keys + new_keys) == [
            block_bytes_for(k) for k in old_keys + new_keys
        ]
        h.close_all()

        _damage_catalog(data, "deleted")
        code, report = fsck(data, "--repair", capsys=capsys)
        assert code == 1 and report["rebuilt"]["nvme_blocks"] == 2
        svc = h.open(host_blocks=8, nvme_blocks=64)
        assert get_blocks(svc, ns.id, old_keys + new_keys) == [None] * 3 + [
            block_bytes_for(k) for k in new_keys
        ]
    finally:
        h.close_all(destroy=True)


def test_rebuild_keeps_the_newest_of_two_headers_of_one_block(tmp_path: Path) -> None:
    """A crash between writing a block's new copy and zeroing the old one's header leaves
    two; the later write wins, the other header is zeroed."""
    layout = layout_to_list(LAYOUT)
    ns_id = namespace_id(TENANT, "model", layout, [])
    meta = NamespaceMeta(TENANT, "model", layout, [])
    key = keys_for(ns_id, 1)[0]
    old, new = bytes(BB), block_bytes_for(key)
    data = tmp_path / "data"
    with NvmeStore(data / "nvme", 64 * BB, backend=PosixBackend(), headers=True) as store:
        offsets = []
        for gen, payload in ((2, new), (1, old)):  # the older one later in the file
            off = store.allocate(BB)
            assert off is not None
            store.write(off, payload, BlockHeader(ns_id, key, BB, checksum(payload), meta, gen))
            offsets.append(off)
    out = rebuild_catalog(data, tier_chain(data))
    assert (out.nvme_blocks, out.duplicates, out.corrupt) == (1, 1, [])
    with closing(Catalog(data / "index.sqlite3")) as cat:
        assert [(r.key, r.checksum, r.copies) for r in cat.blocks()] == [
            (key, checksum(new), (CopyRow("nvme", offsets[0], BB, checksum(new)),))
        ]
    with NvmeStore(data / "nvme", 64 * BB, backend=PosixBackend(), headers=True) as store:
        assert [b.offset for b in store.scan_headers()] == [offsets[0]]


def test_a_wrong_header_page_is_rewritten_so_a_rebuild_finds_the_block(
    populated: Populated, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = populated.rows()
    victim = next(k for k, (h, n) in rows.items() if h is None and n is not None)
    offset = rows[victim][1] or 0
    with open(populated.data_dir / "nvme" / "blocks.dat", "r+b") as f:
        f.seek(offset - HEADER_BYTES)
        f.write(bytes(HEADER_BYTES))  # what the daemon writes when it frees the extent
    code, report = fsck(populated.data_dir, "--repair", capsys=capsys)
    assert code == 1 and (report["deleted"], report["cleared"], report["headers"]) == (0, 0, 1)
    assert [(p["tier"], p["kind"], p["key"], p["action"]) for p in report["problems"]] == [
        ("nvme", "header", victim.hex(), "rewrote the header")
    ]
    assert populated.rows() == rows  # the copy is good: the catalog keeps it as it was
    assert fsck(populated.data_dir, capsys=capsys)[0] == 0
    _damage_catalog(populated.data_dir, "deleted")
    code, report = fsck(populated.data_dir, "--repair", capsys=capsys)
    assert report["rebuilt"]["nvme_blocks"] == sum(1 for _, n in rows.values() if n is not None)
    assert populated.rows()[victim] == (None, offset)


def _named_chain_config(tmp_path: Path) -> Path:
    """A [[tiers]] chain whose tiers are not named host, nvme and csd; the NVMe tier's file
    away from the data dir."""
    config = tmp_path / "tierd.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = {8 * BB}\npin_memory = false\n'
        f'[[tiers]]\nname = "disk"\nkind = "nvme"\ncapacity = {64 * BB}\n'
        f'path = "{tmp_path / "disk"}"\nio_threads = 4\n'
        f'[[tiers]]\nname = "accel"\nkind = "csd"\ncapacity = {16 * BB}\nworkers = 1\n'
        "spill = false\n"
    )
    return config


def _shard_offset(shard: Path, key: bytes) -> int:
    with closing(sqlite3.connect(shard / "shard.sqlite3")) as db:
        return int(db.execute("SELECT offset FROM blocks WHERE key = ?", (key,)).fetchone()[0])


def test_a_chain_of_other_names_is_checked_repaired_and_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _named_chain_config(tmp_path)
    cfg = load_config(config).resolved()
    data, shard = cfg.data_dir, cfg.data_dir / "accel" / "w0"
    services: list[CacheService] = []

    def start() -> CacheService:
        services.append(svc := CacheService(cfg))
        svc.start()
        return svc

    try:
        svc = start()
        ns, _ = svc.open_namespace(TENANT, "model", LAYOUT)
        keys = keys_for(ns.id, 24)
        for i in range(0, len(keys), 4):
            assert put_blocks(svc, ns.id, keys[i : i + 4]) == 4
        assert svc.placer.settle(10)
        assert svc.move(ns.id, keys[:4], "accel") == 4
        with svc.cond:
            where = {e.key: set(e.copies) for e in svc.index.entries()}
        svc.close()
        assert {"mem", "disk", "accel"} == set().union(*where.values())

        code, report = fsck(data, "--config", str(config), capsys=capsys)
        assert code == 0, report
        tally = report["tiers"]
        assert [(t, tally[t]["kind"]) for t in tally] == [
            ("mem", "host"),
            ("disk", "nvme"),
            ("accel", "csd"),
        ]
        assert all(tally[t]["rows"] > 0 and tally[t]["bad"] == 0 for t in tally)
        assert tally["accel"]["unchecked"] == 0  # a local worker's copies are read
        # Without the config the tiers are unknown: reported, not checked, never repaired.
        code, report = fsck(data, "--repair", capsys=capsys)
        assert code == 0 and report["deleted"] == report["cleared"] == 0
        assert all(report["tiers"][t]["unchecked"] == tally[t]["rows"] for t in tally)
        assert any("'disk'" in n and "--config" in n for n in report["notes"])

        rows = catalog_rows(data, "disk", "accel")
        disk_only = next(k for k in keys if where[k] == {"disk"})
        on_accel = next(k for k in keys if where[k] == {"accel"})
        _scribble(tmp_path / "disk" / "blocks.dat", rows[disk_only][0] or 0)
        _scribble(shard / "blocks.dat", _shard_offset(shard, on_accel))
        code, report = fsck(data, "--config", str(config), "--repair", capsys=capsys)
        assert code == 1
        assert {(p["tier"], p["kind"], p["key"]) for p in report["problems"]} == {
            ("disk", "checksum", disk_only.hex()),
            ("accel", "checksum", on_accel.hex()),
        }
        survivors = set(keys) - {disk_only, on_accel}
        assert set(catalog_rows(data, "disk", "accel")) == survivors
        assert fsck(data, "--config", str(config), capsys=capsys)[0] == 0

        _damage_catalog(data, "garbage")
        code, report = fsck(data, "--config", str(config), "--repair", capsys=capsys)
        on_disk = {k for k in survivors if "disk" in where[k]}
        on_accel_now = {k for k in survivors if "accel" in where[k]}
        rebuilt = report["rebuilt"]
        assert (rebuilt["nvme_blocks"], rebuilt["csd_blocks"]) == (len(on_disk), len(on_accel_now))
        # The damaged blocks are still in the tiers' files: their bytes are checked, not trusted.
        assert {(p["tier"], p["kind"], p["key"], p["action"]) for p in report["problems"][1:]} == {
            ("disk", "checksum", disk_only.hex(), "not recovered"),
            ("accel", "checksum", on_accel.hex(), "not recovered"),
        }
        after = catalog_rows(data, "disk", "accel")
        assert set(after) == on_disk | on_accel_now
        assert {k for k, (d, _) in after.items() if d is not None} == on_disk
        assert {k for k, (_, a) in after.items() if a is not None} == on_accel_now
        assert fsck(data, "--config", str(config), capsys=capsys)[0] == 0

        svc = start()
        for key in keys:
            want = block_bytes_for(key) if key in after else None
            assert get_blocks(svc, ns.id, [key]) == [want], key.hex()
        assert svc.stats().corrupt_reads == 0
    finally:
        for s in services:
            s.close()
        for seg in SHM_DIR.glob(f"tierd.{shm_tag(data)}.*"):
            seg.unlink(missing_ok=True)


def test_rebuild_keeps_the_namespace_of_kv_computed_through_an_adapter(tmp_path: Path) -> None:
    """A namespace that names a LoRA adapter has the adapter in its id: its blocks' headers
    carry it, so a rebuilt catalog has the namespace (and the adapter) back."""
    layout = layout_to_list(LAYOUT)
    adapter = "ab" * 32
    ns_id = namespace_id(TENANT, "model", layout, [], adapter=adapter)
    meta = NamespaceMeta(TENANT, "model", layout, [], adapter)
    key = keys_for(ns_id, 1)[0]
    payload = block_bytes_for(key)
    data = tmp_path / "data"
    with NvmeStore(data / "nvme", 64 * BB, backend=PosixBackend(), headers=True) as store:
        off = store.allocate(BB)
        assert off is not None
        store.write(off, payload, BlockHeader(ns_id, key, BB, checksum(payload), meta, 1))
    out = rebuild_catalog(data, tier_chain(data))
    assert (out.namespaces, out.nvme_blocks, out.unknown_namespace) == (1, 1, 0)
    with closing(Catalog(data / "index.sqlite3")) as cat:
        (row,) = cat.namespaces()
        assert (row.ns_id, row.adapter) == (ns_id, adapter)
        assert [r.key for r in cat.blocks()] == [key]
