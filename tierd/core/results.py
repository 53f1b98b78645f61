"""Results of the core's calls: plain frozen dataclasses the servicer turns into messages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SegmentInfo:
    """A tenant's shared memory as clients see it: the block segment (read-only to them)
    and the staging area (where puts are written), both handed over as descriptors."""

    size: int
    host_id: str
    staging_size: int
    staging_generation: int  # a new staging area (after an expired lease) has a new one


@dataclass(frozen=True)
class ClientFds:
    """Descriptors one client maps: its tenant's segment read-only, its staging area
    read-write. Whoever holds them closes them once handed over."""

    segment_fd: int
    segment_size: int
    staging_fd: int
    staging_size: int
    staging_generation: int


@dataclass(frozen=True)
class LookupResult:
    cached_tokens: int
    blocks: list[tuple[bytes, str]]  # (key, tier) of each cached block, prefix order
    # A peer the prefix directory names as holding the next blocks, which were not pulled.
    held_by: str = ""
    held_blocks: int = 0


@dataclass(frozen=True)
class PutSlot:
    state: str  # "leased" | "already_present"
    offset: int


@dataclass(frozen=True)
class PreparedPut:
    lease_id: int
    slots: list[PutSlot]
    segment: SegmentInfo


@dataclass(frozen=True)
class GetSlot:
    found: bool
    offset: int
    tier: str


@dataclass(frozen=True)
class PreparedGet:
    lease_id: int
    slots: list[GetSlot]
    segment: SegmentInfo
