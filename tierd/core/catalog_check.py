"""Opening the catalog safely: a damaged one is refused, never read as empty or left to
crash the daemon later; a new one is created whole.

Primitives: `check_catalog(path) -> "missing" | "previous" | "current"` (raises
`CatalogDamaged` or `CatalogTooNew`), `open_catalog(path) -> Catalog`,
`create_catalog(path) -> Catalog`, `move_aside(path) -> Path`.

SQLite opens a zero-length or missing file as an empty database, so the daemon would
start with no blocks and silently forget every one it had. A catalog is therefore only
ever created under a temporary name and renamed into place once its tables exist and it
carries tierd's `application_id` and schema version: from then on any file at the
catalog's path must be a whole tierd catalog, and anything else (empty, garbage bytes,
another program's database, a failing `PRAGMA quick_check`) is damage. Catalogs of the
previous release (application_id 0, our tables) are adopted and stamped.
"""

from __future__ import annotations

import sqlite3
import stat
import time
from pathlib import Path
from urllib.parse import quote

from tierd.core.catalog import Catalog

APPLICATION_ID = 0x54495244  # "TIRD"
# 3: copies may be encoded by a tier's codec (copies.layer_sums, namespaces.lossless): a
# daemon that knows only 2 would read an encoded copy as raw bytes, so it must refuse;
# 2: a row per copy (table copies); 1 and unversioned: a column per tier, migrated on open.
SCHEMA_VERSION = 3
_SQLITE_MAGIC = b"SQLite format 3\x00"
_NAMESPACES = {"ns_id", "tenant", "model", "layout", "extra"}
_REQUIRED = {
    "namespaces": _NAMESPACES,
    "blocks": {"ns_id", "key", "nbytes", "checksum", "pinned", "last_access"},
    "copies": {"ns_id", "key", "tier", "location", "length", "checksum", "encoding"},
}
_REQUIRED_V1 = {
    "namespaces": _NAMESPACES,
    "blocks": {"ns_id", "key", "nbytes", "checksum", "host_off", "nvme_off", "pinned",
               "last_access"},
}  # fmt: skip
_SIDE_FILES = ("-wal", "-shm")


class CatalogDamaged(Exception):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"the catalog {path} is damaged: {reason}")
        self.path = path
        self.reason = reason


class CatalogTooNew(Exception):
    def __init__(self, path: Path, version: int) -> None:
        super().__init__(f"the catalog {path} has schema version {version}, written by a newer "
                         f"tierd (this one knows up to {SCHEMA_VERSION})")  # fmt: skip
        self.path = path


def check_catalog(path: Path, *, readonly: bool = False) -> str:
    """What is at `path`: "missing", "previous" (an older release's catalog) or "current".
    `readonly`: open it without writing (not even a WAL checkpoint), as fsck's check does."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    if not stat.S_ISREG(st.st_mode):
        raise CatalogDamaged(path, "not a regular file")
    if st.st_size == 0:
        raise CatalogDamaged(path, "the file is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(100)
    if not head.startswith(_SQLITE_MAGIC):
        raise CatalogDamaged(path, "not an SQLite database (garbage where its header should be)")
    if len(head) < 100:
        raise CatalogDamaged(path, f"truncated to {len(head)} bytes")
    try:
        db = (sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True) if readonly
              else sqlite3.connect(str(path), isolation_level=None))  # fmt: skip
    except sqlite3.Error as e:
        raise CatalogDamaged(path, str(e)) from None
    try:
        app_id = int(db.execute("PRAGMA application_id").fetchone()[0])
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        verdict = [str(r[0]) for r in db.execute("PRAGMA quick_check")]
        columns = {
            name: {str(c[1]) for c in db.execute(f"PRAGMA table_info({name})")}
            for name in (*_REQUIRED, *_REQUIRED_V1)
        }
    except sqlite3.DatabaseError as e:
        raise CatalogDamaged(path, str(e)) from None
    finally:
        db.close()
    if verdict != ["ok"]:
        raise CatalogDamaged(path, "PRAGMA quick_check: " + "; ".join(verdict[:3]))
    if app_id not in (0, APPLICATION_ID):
        raise CatalogDamaged(path, f"another program's database (application_id {app_id:#x})")
    if version > SCHEMA_VERSION:
        raise CatalogTooNew(path, version)
    current = app_id == APPLICATION_ID and version >= SCHEMA_VERSION
    # An older catalog is checked against its own schema, unless a migration already ran
    # and the crash came before the new version was stamped.
    migrated = all(want <= columns[t] for t, want in _REQUIRED.items())
    for table, want in (_REQUIRED if current or migrated else _REQUIRED_V1).items():
        if missing := want - columns[table]:
            what = "missing" if not columns[table] else f"without {', '.join(sorted(missing))}"
            raise CatalogDamaged(path, f"wrong schema: table {table} {what}")
    return "current" if current else "previous"


def _stamp(path: Path) -> None:
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    finally:
        db.close()


def create_catalog(path: Path) -> Catalog:
    """A new, empty catalog, complete before it appears at `path`."""
    tmp = path.with_name(path.name + ".new")
    for suffix in ("", *_SIDE_FILES):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)  # a crash during a former creation
    Catalog(tmp).close()
    _stamp(tmp)
    tmp.replace(path)
    return Catalog(path)


def open_catalog(path: Path) -> Catalog:
    """The catalog at `path`, created if missing; raises `CatalogDamaged`, `CatalogTooNew`."""
    state = check_catalog(path)
    if state == "missing":
        return create_catalog(path)
    catalog = Catalog(path)  # migrates an older release's tables, in one transaction
    if state == "previous":
        _stamp(path)  # after the migration: a crash before it leaves the older version
    return catalog


def move_aside(path: Path) -> Path:
    """Rename a damaged catalog (and its WAL files) out of the way; the new name."""
    dest = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%dT%H%M%S')}-{n}")
    for suffix in ("", *_SIDE_FILES):
        src = Path(f"{path}{suffix}")
        if src.exists():
            src.rename(f"{dest}{suffix}")
    return dest
