"""The NVMe store's files beside its data: the data file's lock, the header MAC key and
the log of legacy (headerless) extents.

Primitives: `lock_data_file(path) -> fd` (`StoreInUse`), `load_mac_key(path)`,
`create_mac_key(path)`, `read_legacy(path)`, `write_legacy(path, offsets)`,
`append_legacy(path, line)`; the names `DATA_FILE`, `KEY_FILE`, `LEGACY_FILE`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from tierd.filelock import FileLocked, lock_file

DATA_FILE = "blocks.dat"
KEY_FILE = "blocks.key"
LEGACY_FILE = "blocks.legacy"
MAC_KEY_BYTES = 32


class StoreInUse(FileLocked):
    """Another process holds the data file."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, "is in use by another process (a tierd daemon or tierctl)")


def lock_data_file(path: Path) -> int:
    """An exclusive lock on the data file, held while the returned descriptor is open: two
    daemons sharing one file would hand out the same extents."""
    try:
        return lock_file(path)
    except FileLocked:
        raise StoreInUse(path) from None


def load_mac_key(path: Path) -> bytes | None:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        return None
    return key if len(key) == MAC_KEY_BYTES else None


def create_mac_key(path: Path) -> bytes:
    """A fresh key, written atomically (owner-only) so a crash never leaves half a key."""
    key = secrets.token_bytes(MAC_KEY_BYTES)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


def read_legacy(path: Path) -> set[int]:
    """Replay `+offset` / `-offset` lines; a torn last line is ignored."""
    live: set[int] = set()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return live
    for line in text.splitlines():
        try:
            off = int(line[1:])
        except ValueError:
            continue
        if line.startswith("+"):
            live.add(off)
        elif line.startswith("-"):
            live.discard(off)
    return live


def write_legacy(path: Path, offsets: set[int]) -> None:
    if not offsets:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(f"+{off}\n" for off in sorted(offsets)))
    os.replace(tmp, path)


def append_legacy(path: Path, line: str) -> None:
    # Before the space is reused: a restart must not take a new extent there for legacy.
    with open(path, "a") as f:
        f.write(line + "\n")
