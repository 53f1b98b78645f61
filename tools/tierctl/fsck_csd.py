"""`tierctl fsck` on a CSD tier's copies: each against the shard of the worker holding it.

Primitives: `check_csd(scan, place, items)`; for the rebuild too: `locked_shard(worker,
shard)`, `shard_rows(shard)`, `shard_size(shard)`, `in_shard(offset, nbytes, size)`,
`read_shard(shard, extents, label)`.

A copy's location is a worker's name. A local worker (`w<i>`) keeps its blocks in its own
shard directory (a data file and `shard.sqlite3`, see `tierd.csd.shard`): the copy is good
when the shard's catalog holds the block with the copy's length and checksum, and the bytes
at its offset match. The shard's lock is held while it is read, so a worker still running
(say, orphaned by a killed daemon) is refused rather than read under its feet. Copies on
remote workers cannot be reached offline: they are counted as unchecked.
"""

from __future__ import annotations

import mmap
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from tierctl.errors import UsageError
from tierctl.fsck_scan import Extent, Scan, verify
from tierctl.fsck_tiers import TierPlace, local_shards
from tierctl.progress import Progress
from tierd.csd.shard import CATALOG_FILE, LOCK_FILE
from tierd.filelock import FileLocked, lock_file
from tierd.sqlite_rows import from_sql_u64
from tierd.tiers.extents import align_up
from tierd.tiers.io_backend import ALIGNMENT, PosixBackend
from tierd.tiers.nvme import DATA_FILE, NvmeStore

ShardRows = dict[tuple[bytes, bytes], tuple[int, int, int]]  # -> (offset, nbytes, checksum)


@contextmanager
def locked_shard(worker: str, shard: Path) -> Iterator[None]:
    """Hold the shard's lock, as its worker does for its life; refuse if a worker runs."""
    try:
        fd = lock_file(shard / LOCK_FILE)
    except FileLocked:
        raise UsageError(f"CSD worker {worker}'s shard {shard} is in use: stop the daemon and "
                         "its workers first") from None  # fmt: skip
    try:
        yield
    finally:
        os.close(fd)


def shard_rows(shard: Path) -> ShardRows:
    db = sqlite3.connect(f"file:{quote(str(shard / CATALOG_FILE))}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT ns_id, key, offset, nbytes, checksum FROM blocks")
        return {(bytes(ns), bytes(k)): (int(off), int(n), from_sql_u64(s))
                for ns, k, off, n, s in rows}  # fmt: skip
    finally:
        db.close()


def shard_size(shard: Path) -> int:
    data = shard / DATA_FILE
    return data.stat().st_size // ALIGNMENT * ALIGNMENT if data.is_file() else 0


def in_shard(offset: int, nbytes: int, size: int) -> bool:
    return offset >= 0 and offset % ALIGNMENT == 0 and offset + align_up(nbytes, ALIGNMENT) <= size


def read_shard(shard: Path, extents: list[tuple[int, int]],
               label: str) -> Iterator[tuple[int, memoryview | OSError]]:  # fmt: skip
    """(index, its bytes or the read's error) for each (offset, nbytes) in the shard's data
    file, all of them inside it (`in_shard`); the bytes are valid until the next item."""
    if not extents:
        return
    buf = mmap.mmap(-1, max(align_up(n, ALIGNMENT) for _, n in extents))  # page-aligned
    view = memoryview(buf)
    try:
        with NvmeStore(shard, shard_size(shard), backend=PosixBackend(direct=True)) as store, \
                Progress(label, sum(n for _, n in extents)) as bar:  # fmt: skip
            for i, (off, n) in enumerate(extents):
                with view[:n] as dst:
                    try:
                        store.read_into(off, dst)
                    except OSError as err:
                        yield i, err
                    else:
                        yield i, dst
                bar.advance(n)
    finally:
        view.release()
        buf.close()


def check_csd(scan: Scan, place: TierPlace, items: list[Extent]) -> None:
    shards = local_shards(place)
    by_worker: dict[str, list[Extent]] = {}
    for e in items:
        worker = str(e.copy.location)
        if worker in shards:
            by_worker.setdefault(worker, []).append(e)
        elif worker.startswith("w"):
            scan.flag(e.v, place.name, "missing-file", f"no shard of the local worker {worker} "
                                                       f"under {place.path}")  # fmt: skip
        else:
            e.v.unchecked.add(place.name)
            scan.tally[place.name].unchecked += 1
    if remote := sum(1 for e in items if place.name in e.v.unchecked):
        scan.notes.append(f"{place.name}: {remote} copies on remote workers not checked")
    for worker, extents in sorted(by_worker.items()):
        with locked_shard(worker, shards[worker]):
            _check_shard(scan, place.name, worker, shards[worker], extents)


def _check_shard(scan: Scan, tier: str, worker: str, shard: Path, items: list[Extent]) -> None:
    try:
        rows = shard_rows(shard)
    except sqlite3.Error as err:
        for e in items:
            scan.flag(e.v, tier, "unreadable", f"worker {worker}: cannot read its shard "
                                               f"catalog: {err}")  # fmt: skip
        return
    size, readable = shard_size(shard), []
    for e in items:
        held = rows.get((e.v.row.ns_id, e.v.row.key))
        if held is None:
            scan.flag(e.v, tier, "missing", f"worker {worker} does not hold the block")
        elif held[1:] != (e.copy.length, e.copy.checksum):
            scan.flag(e.v, tier, "checksum", f"worker {worker} holds {held[1]} bytes, xxh3 "
                                             f"{held[2]:#018x}")  # fmt: skip
        elif not in_shard(held[0], held[1], size):
            scan.flag(
                e.v,
                tier,
                "out-of-range",
                f"worker {worker}'s shard places it at {held[0]}, outside its {size}-byte file",
            )
        else:
            e.off = held[0]
            readable.append(e)
    extents = [(e.off, e.copy.length) for e in readable]
    for i, got in read_shard(shard, extents, f"fsck {tier} {worker}"):
        if isinstance(got, OSError):
            scan.flag(readable[i].v, tier, "unreadable", f"worker {worker}: read failed: {got}")
        else:
            verify(scan, tier, readable[i], got)
