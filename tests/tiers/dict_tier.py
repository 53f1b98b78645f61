"""A tier kind for tests: copies as bytes in a dict, one slot per block. Registered by a
test (`registry.KINDS["dict"] = "tests.tiers.dict_tier:DictTier"`), it is a whole kind in
one module, as a real one would be.

Options: `slot_bytes` (the size of one block, required). A tier with a `path` keeps its
dict across daemons of one test process, keyed by that path, so a restart finds it."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import Any, ClassVar

from tierd.config import TierSpec
from tierd.tiers.base import BlockRef, Copy, Location, Tier
from tierd.tiers.registry import TierContext

_STORES: dict[str, dict[int, bytes]] = {}


class DictTier(Tier):
    kind = "dict"
    OPTIONS: ClassVar[dict[str, Any]] = {"slot_bytes": 0}

    def __init__(self, spec: TierSpec, store: dict[int, bytes], slot_bytes: int) -> None:
        super().__init__(spec)
        self.store, self.slot_bytes = store, slot_bytes
        self.slots = spec.capacity_bytes // slot_bytes
        self.free_slots = set(range(self.slots)) - set(store)
        self.lock = threading.Lock()

    @classmethod
    def open(cls, spec: TierSpec, context: TierContext) -> DictTier:
        store = _STORES.setdefault(str(spec.path), {}) if spec.path else {}
        return cls(spec, store, int(spec.option("slot_bytes", 0)))

    @property
    def capacity(self) -> int:
        return self.slots * self.slot_bytes

    @property
    def used_bytes(self) -> int:
        return (self.slots - len(self.free_slots)) * self.slot_bytes

    def reserve(self, tenant: str, nbytes: int) -> Location | None:
        with self.lock:
            return self.free_slots.pop() if self.free_slots else None

    def adopt(self, tenant: str, location: Location, nbytes: int) -> bool:
        with self.lock:
            if location not in self.store:
                return False
            self.free_slots.discard(int(location))
            return True

    def release(self, tenant: str, location: Location, nbytes: int) -> None:
        with self.lock:
            self.store.pop(int(location), None)
            self.free_slots.add(int(location))

    def free(self, block: BlockRef, copy: Copy) -> None:
        self.release(block.ns.tenant, copy.location, copy.length)

    def write(self, block: BlockRef, location: Location, data: memoryview) -> Future[None]:
        self.store[int(location)] = bytes(data)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def read(self, block: BlockRef, copy: Copy, out: memoryview) -> Future[None]:
        """A freed copy's bytes are gone at once: reading one fails (KeyError)."""
        done: Future[None] = Future()
        try:
            out[:] = self.store[int(copy.location)]
            done.set_result(None)
        except KeyError as e:
            done.set_exception(e)
        return done
