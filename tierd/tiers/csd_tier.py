"""The CSD tier kind: computational-storage workers (`tierd.csd.pool`) as a chain tier.

A copy's location is the name of the worker holding it. Workers verify what they store and
serve, and attend next to their blocks (`partial_attend`), so only a query and one partial
result cross the wire. A tier with a codec gets its copies encoded (the transfer engine
encodes; the worker stores, serves and attends over the codes, and records each block's
encoding in its own catalog); space is counted as the worker's extents of the stored,
encoded bytes. Space is accounted here per worker (each has `capacity` bytes);
drops are queued, never waited on, so the core may free copies under its lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, ClassVar

from tierd.config import TierSpec
from tierd.tiers.base import BlockRef, Copy, CopyLost, Location, Tier
from tierd.tiers.extents import align_up
from tierd.tiers.io_backend import ALIGNMENT
from tierd.tiers.registry import TierContext

if TYPE_CHECKING:
    import torch

    from tierd.csd.pool import CsdPool


class CsdTier(Tier):
    kind = "csd"
    attends = True
    OPTIONS: ClassVar[dict[str, Any]] = {"workers": 0, "remote": ()}

    def __init__(self, spec: TierSpec, pool: CsdPool, capacity: int) -> None:
        super().__init__(spec)
        self.pool = pool
        self._capacity = capacity
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, spec: TierSpec, context: TierContext) -> CsdTier:
        from tierd.csd.pool import CsdPool
        from tierd.csd.supervisor import CsdWorkerSpec

        base = spec.path or context.data_dir / spec.name
        local = int(spec.option("workers", 0))
        remote = tuple(spec.option("remote", ()))
        specs = [
            CsdWorkerSpec(f"w{i}", base / f"w{i}", f"unix:{base}/w{i}.sock",
                          spec.capacity_bytes, spawn=True)
            for i in range(local)
        ] + [CsdWorkerSpec(f"r{i}", None, addr, 0, spawn=False)
             for i, addr in enumerate(remote)]  # fmt: skip
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(spec, CsdPool(specs), spec.capacity_bytes * max(1, len(specs)))

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._used.values())

    @property
    def backend(self) -> str:
        return "workers"

    def available(self) -> bool:
        return any(self.pool.healthy(n) for n in self.pool.names)

    def details(self) -> dict[str, Any]:
        return {"workers": {n: self.pool.healthy(n) for n in self.pool.names}}

    def start(self) -> list[str]:
        return self.pool.start()

    def close(self) -> None:
        self.pool.close()

    # -- space ------------------------------------------------------------------------------

    def _take(self, name: str, nbytes: int) -> None:
        with self._lock:
            self._used[name] = self._used.get(name, 0) + _extent(nbytes)

    def reserve(self, tenant: str, nbytes: int) -> Location | None:
        if self.used_bytes + _extent(nbytes) > self._capacity:
            return None
        name = self.pool.pick(1)[0]
        self._take(name, nbytes)
        return name

    def adopt(self, tenant: str, location: Location, nbytes: int) -> bool:
        if location not in self.pool.names:
            return False
        self._take(str(location), nbytes)
        return True

    def release(self, tenant: str, location: Location, nbytes: int) -> None:
        """Give back space `reserve` gave that never got a copy."""
        self._take(str(location), -nbytes)

    def free(self, block: BlockRef, copy: Copy) -> None:
        # A drop that fails leaves an orphan on the worker, which the daemon never names.
        self.pool.drop_later(str(copy.location), block.ns.id, [block.key])
        self._take(str(copy.location), -copy.length)

    # -- bytes --------------------------------------------------------------------------------

    def write(self, block: BlockRef, location: Location, data: memoryview) -> Future[None]:
        return self.write_many([(block, location, data)])[0]

    def write_many(
        self, items: Sequence[tuple[BlockRef, Location, memoryview]]
    ) -> list[Future[None]]:
        """One request per worker and namespace (all-or-nothing on the worker)."""
        futures: list[Future[None]] = [Future() for _ in items]
        groups: dict[tuple[str, bytes], list[int]] = {}
        for i, (block, location, _) in enumerate(items):
            groups.setdefault((str(location), block.ns.id), []).append(i)
        for (name, ns_id), idx in groups.items():
            try:
                layout = items[idx[0]][0].ns.layout
                self.pool.store(name, layout, ns_id,
                                [(items[i][0].key, items[i][0].checksum, items[i][2])
                                 for i in idx],
                                [getattr(items[i][0], "encoding", "raw") for i in idx])  # fmt: skip
            except BaseException as e:  # noqa: BLE001 - each waiter gets the failure
                for i in idx:
                    futures[i].set_exception(e)
                continue
            for i in idx:
                futures[i].set_result(None)
        return futures

    def read(self, block: BlockRef, copy: Copy, out: memoryview) -> Future[None]:
        done: Future[None] = Future()
        try:
            got = self.pool.read_encoded(str(copy.location), block.ns.id, [block.key])
            held = got.get(block.key)
            if held is None or held[0] != copy.encoding or len(held[1]) != len(out):
                raise CopyLost(f"csd worker {copy.location} does not hold this copy")
            out[:] = held[1]
            done.set_result(None)
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            done.set_exception(e)
        return done

    def partial_attend(
        self, location: Location, blocks: Sequence[BlockRef], layer: int, q: torch.Tensor,
        scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[bytes]] | None:
        ns = blocks[0].ns
        out, lse, missing = self.pool.partial_attend(
            str(location), ns.id, ns.layout, [b.key for b in blocks], layer, q, scale or 0.0
        )
        return out, lse, missing


def _extent(nbytes: int) -> int:
    """Space a copy of `nbytes` (negative: given back) takes on its worker: the shard
    allocates whole aligned extents (tierd.csd.shard). Codes are rarely a multiple of one,
    and space counted by length would place blocks the worker then refuses, so the tier
    would look free and never evict while demotions into it fail."""
    size = align_up(max(abs(nbytes), 1), ALIGNMENT)
    return size if nbytes >= 0 else -size
