"""The NVMe tier kind: block extents in one preallocated file (`tierd.tiers.nvme`).

Each block carries a signed header page describing it (`tierd.tiers.block_header`), so the
catalog can be rebuilt from the file. Reads are aligned to the file's 4 KiB pages for
O_DIRECT; callers that read a sub-range (attend reads one layer) align through
`read_align`.
"""

from __future__ import annotations

import errno
from concurrent.futures import Future
from typing import Any, ClassVar

from tierd.config import TierSpec
from tierd.errors import ConfigError, ExtentError
from tierd.tiers.base import BlockRef, Copy, Location, Tier
from tierd.tiers.block_header import BlockHeader, NamespaceMeta
from tierd.tiers.io_backend import ALIGNMENT, select_backend
from tierd.tiers.nvme import NvmeStore, StoreInUse
from tierd.tiers.registry import TierContext

_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def block_header(block: BlockRef) -> BlockHeader:
    """What the header page in front of a block says of it."""
    ns = block.ns
    lay = ns.layout
    layout = [lay.num_layers, lay.num_kv_heads, lay.head_dim, lay.dtype, lay.block_tokens]
    meta = NamespaceMeta(ns.tenant, ns.model, layout, list(ns.extra_keys), ns.adapter)
    # A copy stored encoded is described by the transfer engine's stand-in for the block
    # (its stored bytes, their encoding, the block's own size and checksum).
    encoding = getattr(block, "encoding", "raw")
    if encoding == "raw":
        return BlockHeader(ns.id, block.key, block.nbytes, block.checksum, meta)
    stored: Any = block
    return BlockHeader(ns.id, block.key, block.nbytes, block.checksum, meta, 0, encoding,
                       stored.block_nbytes, stored.block_checksum)  # fmt: skip


class NvmeTier(Tier):
    kind = "nvme"
    read_align = ALIGNMENT
    OPTIONS: ClassVar[dict[str, Any]] = {"backend": "auto", "direct_io": True, "io_threads": 8,
                               "chunk_bytes": 1 << 20}  # fmt: skip

    def __init__(self, spec: TierSpec, store: NvmeStore) -> None:
        super().__init__(spec)
        self.store = store

    @classmethod
    def open(cls, spec: TierSpec, context: TierContext) -> NvmeTier:
        key = f"{spec.name}.path"
        try:
            backend = select_backend(spec.option("backend", "auto"),
                                     direct=bool(spec.option("direct_io", True)))  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"{spec.name}.backend", str(e)) from e
        path = spec.path or context.data_dir / spec.name
        try:
            store = NvmeStore(path, spec.capacity_bytes, backend=backend,
                              io_threads=int(spec.option("io_threads", 8)),
                              chunk_bytes=int(spec.option("chunk_bytes", 1 << 20)),
                              headers=True)  # fmt: skip
        except StoreInUse as e:
            raise ConfigError(key, f"{e.path} is in use by another tierd process: two "
                                   "daemons cannot share one NVMe file") from None  # fmt: skip
        except OSError as e:
            if e.errno in _NO_SPACE:
                # Preallocation is where a too-small disk shows: say so, name the key.
                raise ConfigError(f"{spec.name}.capacity", f"cannot reserve "
                                  f"{spec.capacity_bytes} bytes under {path}: "
                                  f"{e.strerror or e}") from None  # fmt: skip
            raise ConfigError(key, f"cannot use {e.filename or path}: "
                                   f"{e.strerror or e}") from None  # fmt: skip
        return cls(spec, store)

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def used_bytes(self) -> int:
        return self.store.used_bytes

    @property
    def backend(self) -> str:
        return self.store.backend_name

    def details(self) -> dict[str, Any]:
        return {"path": str(self.store.path), "direct": self.store.direct}

    def reserve(self, tenant: str, nbytes: int) -> Location | None:
        return self.store.allocate(nbytes)

    def adopt(self, tenant: str, location: Location, nbytes: int) -> bool:
        if not isinstance(location, int):
            return False
        try:
            self.store.reserve(location, nbytes)
        except ExtentError:  # overlaps another copy on record, or past the file's end
            return False
        return True

    def finish_recovery(self) -> None:
        self.store.finish_recovery()  # which reserved extents have no header (older files)

    def free(self, block: BlockRef, copy: Copy) -> None:
        self.store.free(int(copy.location), copy.length)

    def release(self, tenant: str, location: Location, nbytes: int) -> None:
        """Give back space `reserve` gave that never got a copy."""
        self.store.free(int(location), nbytes)

    def write(self, block: BlockRef, location: Location, data: memoryview) -> Future[None]:
        return self.store.write_async(int(location), data, header=block_header(block))

    def read(self, block: BlockRef, copy: Copy, out: memoryview) -> Future[None]:
        return self.store.read_async(int(copy.location), out)

    def read_range(self, block: BlockRef, copy: Copy, start: int, out: memoryview) -> Future[None]:
        return self.store.read_async(int(copy.location) + start, out)

    def close(self) -> None:
        self.store.close()
