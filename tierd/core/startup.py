"""Bringing a CacheService up: the data dir (writable, locked), its catalog (checked), the
NVMe store (locked), the CSD worker pool, and rebuilding the index from the catalog after
a restart or a crash.

Primitives: `open_storage(config) -> (lock, catalog, nvme)`, `lock_data_dir(data_dir)`,
`csd_pool(config)`, `recover(service)`, `fsck_advice(config)`.

Whatever keeps the daemon from starting is a `ConfigError` naming the key and the reason
(the OS's, or what is wrong with the catalog and what to run), never a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import tempfile
from pathlib import Path
from typing import IO, TYPE_CHECKING

from tierd.config import Config
from tierd.core.catalog import Catalog
from tierd.core.catalog_check import CatalogDamaged, CatalogTooNew, open_catalog
from tierd.core.index import BlockEntry, NamespaceInfo, layout_from_list
from tierd.errors import ConfigError
from tierd.filelock import lock_data_dir
from tierd.tiers.io_backend import select_backend
from tierd.tiers.nvme import NvmeStore, StoreInUse
from tierd_client.layout import KVLayout

CATALOG_FILE = "index.sqlite3"
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)

if TYPE_CHECKING:
    from tierd.core.service import CacheService
    from tierd.csd.pool import CsdPool

log = logging.getLogger("tierd.core")


def fsck_advice(config: Config) -> str:
    """The command that repairs this daemon's catalog."""
    cmd = ["tierctl", "fsck", "--repair", "--data-dir", str(config.data_dir)]
    if config.nvme.path is not None:
        cmd += ["--nvme-path", str(config.nvme.path)]
    return shlex.join(cmd)


def open_storage(config: Config) -> tuple[IO[bytes], Catalog, NvmeStore]:
    """The data dir's lock, its catalog and the NVMe store, or a ConfigError (nothing is
    left open then)."""
    data_dir = config.data_dir
    _prepare_dir(data_dir)
    lock = lock_data_dir(data_dir)
    try:
        catalog = _open_catalog(config)
        try:
            return lock, catalog, _open_nvme(config)
        except BaseException:
            catalog.close()
            raise
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


def _open_nvme(config: Config) -> NvmeStore:
    try:
        backend = select_backend(config.nvme.backend, direct=config.nvme.direct_io)
    except ValueError as e:
        raise ConfigError("nvme.backend", str(e)) from e
    path = config.nvme_path
    try:
        return NvmeStore(path, config.nvme.capacity_bytes, backend=backend,
                         io_threads=config.nvme.io_threads, chunk_bytes=config.nvme.chunk_bytes,
                         headers=True)  # fmt: skip
    except StoreInUse as e:
        raise ConfigError("nvme.path", f"{e.path} is in use by another tierd process: two "
                                       "daemons cannot share one NVMe file") from None  # fmt: skip
    except OSError as e:
        if e.errno in _NO_SPACE:
            # Preallocation is where a too-small disk shows: say so, name the key.
            raise ConfigError("nvme.capacity", f"cannot reserve {config.nvme.capacity_bytes} "
                                               f"bytes under {path}: {e.strerror or e}") from None  # fmt: skip
        raise ConfigError("nvme.path", f"cannot use {e.filename or path}: "
                                       f"{e.strerror or e}") from None  # fmt: skip


def csd_pool(config: Config) -> CsdPool | None:
    from tierd.csd.pool import CsdPool
    from tierd.csd.supervisor import CsdWorkerSpec

    base = config.data_dir / "csd"
    specs = [
        CsdWorkerSpec(f"w{i}", base / f"w{i}", f"unix:{base}/w{i}.sock",
                      config.csd.capacity_bytes, spawn=True)
        for i in range(config.csd.workers)
    ] + [
        CsdWorkerSpec(f"r{i}", None, addr, 0, spawn=False)
        for i, addr in enumerate(config.csd.remote)
    ]  # fmt: skip
    if not specs:
        return None
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return CsdPool(specs)


def _sums_of(sums: tuple[int, ...] | None, layout: KVLayout) -> tuple[int, ...] | None:
    """Per-layer checksums from the catalog, if they fit the layout (else: verify whole)."""
    return sums if sums is not None and len(sums) == layout.num_layers else None


def recover(svc: CacheService) -> None:
    """Rebuild the index from the catalog; adopt host copies whose segment survived."""
    for row in svc.catalog.namespaces():
        layout = layout_from_list(row.layout)
        svc.index.namespaces[row.ns_id] = NamespaceInfo(
            row.ns_id, row.tenant, row.model, layout, tuple(row.extra)
        )
    surviving = {ns.tenant for ns in svc.index.namespaces.values()
                 if svc.host.existing_segment(ns.tenant)}
    dropped: list[tuple[bytes, bytes]] = []
    moved: list[tuple[bytes, bytes, int | None, int | None]] = []
    for row in svc.catalog.blocks():
        ns = svc.index.namespaces.get(row.ns_id)
        if ns is None:
            dropped.append((row.ns_id, row.key))
            continue
        host_off = row.host_off
        if host_off is not None and not (
            ns.tenant in surviving and svc.host.reserve(ns.tenant, host_off, row.nbytes)
        ):
            host_off = None
        nvme_off = row.nvme_off
        if nvme_off is not None:
            try:
                svc.nvme.reserve(nvme_off, row.nbytes)
            except ValueError:
                nvme_off = None
        csd = row.csd if svc.csd is not None and row.csd in svc.csd.names else None
        if host_off is None and nvme_off is None and csd is None:
            dropped.append((row.ns_id, row.key))
            continue
        if (host_off, nvme_off) != (row.host_off, row.nvme_off):
            moved.append((row.ns_id, row.key, host_off, nvme_off))
        svc.index.add(BlockEntry(
            ns, row.key, row.nbytes, row.checksum, host_off, nvme_off, csd, row.pinned,
            row.last_access, host_verified=host_off is None, layer_sums=_sums_of(row.layer_sums, ns.layout),
        ))  # fmt: skip
    svc.nvme.finish_recovery()  # which reserved extents have no header (older files)
    svc.catalog.delete_blocks(dropped)
    svc.catalog.update_locations(moved)
    svc.host.release_unused()
    log.info("recovered %d blocks (%d dropped)", len(svc.index), len(dropped))
