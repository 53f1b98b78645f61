"""Bringing a CacheService up: the data dir (writable, locked) and its catalog (checked),
and rebuilding the index from the catalog after a restart or a crash.

Primitives: `open_storage(config) -> (lock, catalog)`, `recover(service)`,
`fsck_advice(config)`.

Whatever keeps the daemon from starting is a `ConfigError` naming the key and the reason
(the OS's, or what is wrong with the catalog and what to run), never a traceback.
"""

from __future__ import annotations

import logging
import os
import shlex
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

from tierd.config import Config
from tierd.core.catalog import Catalog, copy_rows
from tierd.core.catalog_check import CatalogDamaged, CatalogTooNew, open_catalog
from tierd.core.index import BlockEntry, NamespaceInfo, layout_from_list
from tierd.errors import ConfigError
from tierd.filelock import lock_data_dir
from tierd.tiers.base import Copy
from tierd.transfer.encoding import stored_bytes
from tierd_client.layout import KVLayout

CATALOG_FILE = "index.sqlite3"

if TYPE_CHECKING:
    from tierd.core.service import CacheService

log = logging.getLogger("tierd.core")


def fsck_advice(config: Config) -> str:
    """The command that repairs this daemon's catalog."""
    cmd = ["tierctl", "fsck", "--repair", "--data-dir", str(config.data_dir)]
    if config.tier_list:  # fsck learns a [[tiers]] chain from the daemon's config file
        return shlex.join(cmd) + " --config <this daemon's config file>"
    if config.nvme.path is not None:
        cmd += ["--nvme-path", str(config.nvme.path)]
    return shlex.join(cmd)


def open_storage(config: Config) -> tuple[IO[bytes], Catalog]:
    """The data dir's lock and its catalog, or a ConfigError (nothing is left open then).
    The tiers open next (`tierd.core.tierset`), each kind naming what keeps it from it."""
    data_dir = config.data_dir
    _prepare_dir(data_dir)
    lock = lock_data_dir(data_dir)
    try:
        return lock, _open_catalog(config)
    except BaseException:
        lock.close()
        raise


def _prepare_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # A real write, not access(): root passes access() on a read-only mount.
        fd, probe = tempfile.mkstemp(prefix=".tierd-probe-", dir=data_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError("data_dir", f"{data_dir} cannot be used: {e.strerror or e} (the "
                                      "daemon needs to create and write files there)") from None  # fmt: skip


def _open_catalog(config: Config) -> Catalog:
    path = config.data_dir / CATALOG_FILE
    try:
        return open_catalog(path)
    except CatalogDamaged as e:
        raise ConfigError("data_dir", f"{e}. The daemon will not start on it; with the daemon "
                                      f"stopped, run `{fsck_advice(config)}` to move it aside "
                                      "and rebuild it from the NVMe tier") from None  # fmt: skip
    except CatalogTooNew as e:
        raise ConfigError("data_dir", str(e)) from None
    except OSError as e:
        raise ConfigError(
            "data_dir", f"cannot open the catalog {path}: {e.strerror or e}"
        ) from None


def _sums_of(sums: tuple[int, ...] | None, layout: KVLayout) -> tuple[int, ...] | None:
    """Per-layer checksums from the catalog, if they fit the layout (else: verify whole)."""
    return sums if sums is not None and len(sums) == layout.num_layers else None


def _sized(encoding: str, length: int, layout: KVLayout) -> bool:
    """Whether a copy of `length` bytes is what `encoding` makes of a block of `layout`."""
    try:
        return length == stored_bytes(encoding, layout)
    except ValueError:  # an encoding this build cannot read
        return False


def recover(svc: CacheService) -> None:
    """Rebuild the index from the catalog: adopt each recorded copy its tier can still
    vouch for (a memory tier's copies only where the tenant's memory survived, and then
    checked before first use); a block left with no copy is dropped."""
    for row in svc.catalog.namespaces():
        layout = layout_from_list(row.layout)
        svc.index.namespaces[row.ns_id] = NamespaceInfo(
            row.ns_id, row.tenant, row.model, layout, tuple(row.extra), row.lossless,
            row.adapter,
        )  # fmt: skip
    dropped: list[tuple[bytes, bytes]] = []
    changed: list[BlockEntry] = []
    unknown: set[str] = set()
    for row in svc.catalog.blocks():
        ns = svc.index.namespaces.get(row.ns_id)
        if ns is None:
            dropped.append((row.ns_id, row.key))
            continue
        copies: dict[str, Copy] = {}
        for c in row.copies:
            tier = svc.tiers.get(c.tier)
            if tier is None:
                unknown.add(c.tier)
            elif row.nbytes != ns.block_bytes or not _sized(c.encoding, c.length, ns.layout):
                # A row no daemon writes (a catalog rebuilt from headers that cannot say
                # how a copy is encoded): read as it claims, its bytes would be served wrong.
                log.warning("block %s: a %d-byte %s copy in %s is not one of this namespace's "
                            "blocks; forgotten", row.key.hex(), c.length, c.encoding, c.tier)  # fmt: skip
            elif tier.adopt(ns.tenant, c.location, c.length):
                copies[c.tier] = Copy(c.tier, c.location, c.length, c.checksum, c.encoding,
                                      verified=not tier.verify_adopted,
                                      layer_sums=c.layer_sums)  # fmt: skip
        if not copies:
            dropped.append((row.ns_id, row.key))
            continue
        entry = BlockEntry(ns, row.key, row.nbytes, row.checksum, copies, row.pinned,
                           row.last_access, layer_sums=_sums_of(row.layer_sums, ns.layout))  # fmt: skip
        svc.directory.adopt(entry)
        if len(copies) != len(row.copies):
            changed.append(entry)
    if unknown:
        log.warning("the catalog names tiers this configuration has not (%s): their copies "
                    "are forgotten", ", ".join(sorted(unknown)))  # fmt: skip
    for tier in svc.tiers:
        tier.finish_recovery()
    svc.catalog.delete_blocks(dropped)
    svc.catalog.set_copies((e.ns.id, e.key, copy_rows(e.copies.values())) for e in changed)
    svc.tiers.top.release_unused()
    log.info("recovered %d blocks (%d dropped)", len(svc.index), len(dropped))

