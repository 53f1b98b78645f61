"""Bringing a CacheService up: the data dir's lock, the CSD worker pool, and rebuilding
the index from the catalog after a restart or a crash.

Primitives: `lock_data_dir(data_dir)`, `csd_pool(config)`, `recover(service)`.
"""

from __future__ import annotations

import fcntl
import logging
from pathlib import Path
from typing import IO, TYPE_CHECKING

from tierd.config import Config
from tierd.core.index import BlockEntry, NamespaceInfo, layout_from_list
from tierd.errors import ConfigError

if TYPE_CHECKING:
    from tierd.core.service import CacheService
    from tierd.csd.pool import CsdPool

log = logging.getLogger("tierd.core")


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """One daemon per data dir: two would hand out the same extents. `tierctl fsck` takes
    the same lock, so it never checks a catalog a daemon is writing."""
    f = open(data_dir / "tierd.lock", "a+b")  # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ConfigError("data_dir", f"{data_dir} is in use by another tierd process") from None
    return f


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
            row.last_access, host_verified=host_off is None, layer_sums=row.layer_sums,
        ))  # fmt: skip
    svc.catalog.delete_blocks(dropped)
    svc.catalog.update_locations(moved)
    svc.host.release_unused()
    log.info("recovered %d blocks (%d dropped)", len(svc.index), len(dropped))
