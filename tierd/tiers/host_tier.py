"""The host tier kind: the shared-memory arena (`tierd.tiers.host`) as a chain tier.

Puts land here and gets are served from here: clients map each tenant's segment read-only
and copy blocks out themselves. Copies adopted after a restart are checked before use,
since a crash may have left a segment written past its catalog rows.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tierd.config import TierSpec
from tierd.tiers.base import BlockRef, Copy, Location, MemoryTier
from tierd.tiers.host import HostArena
from tierd.tiers.registry import TierContext


class HostTier(MemoryTier):
    kind = "host"
    OPTIONS: ClassVar[dict[str, Any]] = {"pin_memory": True}

    def __init__(self, spec: TierSpec, arena: HostArena) -> None:
        super().__init__(spec)
        self.arena = arena

    @classmethod
    def open(cls, spec: TierSpec, context: TierContext) -> HostTier:
        pin = bool(spec.option("pin_memory", True))
        return cls(spec, HostArena(spec.capacity_bytes, context.segment_tag, pin=pin))

    @property
    def capacity(self) -> int:
        return self.arena.capacity

    @property
    def used_bytes(self) -> int:
        return self.arena.used_bytes

    @property
    def backend(self) -> str:
        return "shm"

    def tenant_used(self, tenant: str) -> int | None:
        return self.arena.segment(tenant).alloc.used_bytes

    def reserve(self, tenant: str, nbytes: int) -> Location | None:
        return self.arena.allocate(tenant, nbytes)

    def adopt(self, tenant: str, location: Location, nbytes: int) -> bool:
        return (isinstance(location, int) and self.arena.existing_segment(tenant)
                and self.arena.reserve(tenant, location, nbytes))  # fmt: skip

    def release(self, tenant: str, location: Location, nbytes: int) -> None:
        self.arena.free(tenant, int(location), nbytes)

    def free(self, block: BlockRef, copy: Copy) -> None:
        self.arena.free(block.ns.tenant, int(copy.location), copy.length)

    def view(self, tenant: str, location: int, nbytes: int) -> memoryview:
        return self.arena.view(tenant, location, nbytes)

    def client_fd(self, tenant: str) -> tuple[int, int]:
        return self.arena.client_fd(tenant)

    def segment_size(self, tenant: str) -> int:
        return self.arena.segment(tenant).size

    def trim(self) -> None:
        self.arena.trim()

    def release_unused(self) -> None:
        self.arena.release_unused()

    def close(self) -> None:
        self.arena.close()
