"""A shared tier kind for tests: copies in a dict that every daemon of the test process
configured with the same `path` sees, as daemons on several hosts see one Redis cluster.
Registered by a test (`registry.KINDS["shared"] = "tests.tiers.shared_dict_tier:SharedTier"`).

Options: `write` ("demote" | "through"). `STORES[path]` holds the values and counts the
calls (`finds`, `writes`); `down(path, True)` makes every tier on that store unavailable.
Copies are "own" (written here: deleted when freed) or "found" (only forgotten)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tierd.config import TierSpec
from tierd.errors import Unavailable
from tierd.tiers.base import BlockRef, Copy, CopyLost, Found, Location, NamespaceRef, Tier
from tierd.tiers.registry import TierContext


@dataclass
class Store:
    values: dict[tuple[str, bytes, bytes], tuple[bytes, int, tuple[int, ...] | None]] = field(
        default_factory=dict
    )
    finds: list[int] = field(default_factory=list)  # keys asked, per find call
    writes: int = 0
    down: bool = False


STORES: dict[str, Store] = {}


def _done(error: BaseException | None = None) -> Future[None]:
    f: Future[None] = Future()
    if error is None:
        f.set_result(None)
    else:
        f.set_exception(error)
    return f


class SharedTier(Tier):
    kind = "shared"
    shared = True
    OPTIONS: ClassVar[dict[str, Any]] = {"write": "demote"}

    def __init__(self, spec: TierSpec, store: Store) -> None:
        super().__init__(spec)
        self.store = store
        self.write_through = spec.option("write", "demote") == "through"
        self.used = 0
        self.lock = threading.Lock()

    @classmethod
    def open(cls, spec: TierSpec, context: TierContext) -> SharedTier:
        return cls(spec, STORES.setdefault(str(spec.path), Store()))

    @property
    def capacity(self) -> int:
        return self.spec.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.used

    def available(self) -> bool:
        return not self.store.down

    @staticmethod
    def _key(block: BlockRef) -> tuple[str, bytes, bytes]:
        return (block.ns.tenant, block.ns.id, block.key)

    def reserve(self, tenant: str, nbytes: int) -> Location | None:
        with self.lock:
            if self.store.down or self.used + nbytes > self.capacity:
                return None
            self.used += nbytes
            return "own"

    def adopt(self, tenant: str, location: Location, nbytes: int) -> bool:
        with self.lock:
            self.used += nbytes
        return location in ("own", "found")

    def release(self, tenant: str, location: Location, nbytes: int) -> None:
        with self.lock:
            self.used -= nbytes

    def free(self, block: BlockRef, copy: Copy) -> None:
        self.release(block.ns.tenant, copy.location, copy.length)
        if copy.location == "own":
            self.store.values.pop(self._key(block), None)

    def write(self, block: BlockRef, location: Location, data: memoryview) -> Future[None]:
        if self.store.down:
            return _done(Unavailable("down"))
        self.store.values[self._key(block)] = (bytes(data), block.checksum, block.layer_sums)
        self.store.writes += 1
        return _done()

    def read(self, block: BlockRef, copy: Copy, out: memoryview) -> Future[None]:
        if self.store.down:
            return _done(Unavailable("down"))
        value = self.store.values.get(self._key(block))
        if value is None or value[1] != copy.checksum:
            return _done(CopyLost("gone or replaced"))
        out[:] = value[0]
        return _done()

    def find(self, ns: NamespaceRef, keys: Sequence[bytes]) -> list[Found | None]:
        self.store.finds.append(len(keys))
        if self.store.down:
            return [None] * len(keys)
        out: list[Found | None] = []
        for key in keys:
            value = self.store.values.get((ns.tenant, ns.id, key))
            out.append(None if value is None else
                       Found("found", len(value[0]), value[1], value[2]))  # fmt: skip
        return out
