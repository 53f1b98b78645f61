"""What the client hands back: plain frozen dataclasses, never protobuf messages.

Primitives: `SegmentInfo`, `Namespace`, `CachedBlock`, `LookupResult`, `GetResult`,
`tier_name(name, enum_value)`, `tier_kind(enum_value)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from ._proto import tierd_pb2 as pb
from .layout import KVLayout

Transport = Literal["shm", "engine", "inband"]
PutOutcome = Literal["stored", "already_present"]


def tier_kind(value: int) -> str:
    """TIER_HOST -> "host"; a value newer than these stubs -> "tier<value>"."""
    try:
        return str(pb.Tier.Name(value)).removeprefix("TIER_").lower()
    except ValueError:
        return f"tier{value}"


def tier_name(name: str, value: int) -> str:
    """The tier's configured name, as the daemon sent it; a daemon older than tier names
    sends only the kind's enum, and its tiers were named after their kinds."""
    return name or tier_kind(value)


@dataclass(frozen=True)
class SegmentInfo:
    """The tenant's shared memory as the daemon announced it (see `tierd_client.shm`)."""

    handoff: str  # unix socket that hands over the descriptors
    size: int  # block segment (read-only)
    host_id: str
    staging_size: int  # staging area (puts)
    instance: bytes  # changes when the daemon restarts


@dataclass(frozen=True)
class Namespace:
    """An opened namespace: every data call takes one.

    `transport` is what this client decided for it at open time ("shm" when the segment
    could be mapped, else "engine" when blocks go through a transfer engine, else
    "inband").
    """

    id: bytes
    tenant: str
    model: str
    layout: KVLayout
    block_bytes: int
    segment: SegmentInfo | None
    transport: Transport


@dataclass(frozen=True)
class CachedBlock:
    key: bytes
    tier: str  # the configured name of the tier holding it ("host", "nvme", "csd", ...)


@dataclass(frozen=True)
class LookupResult:
    cached_tokens: int  # leading tokens whose blocks are all cached
    blocks: list[CachedBlock]  # one per cached block, in prefix order
    # The peer daemon the prefix directory names as holding the next `held_blocks` blocks,
    # when the daemon did not pull them ("": none named, or all pulled).
    held_by: str = ""
    held_blocks: int = 0


@dataclass(frozen=True)
class GetResult:
    found: list[bool]
    # [n, *block_shape]: numpy (storage dtype) or torch (real dtype); missing rows untouched.
    blocks: Any

    @property
    def all_found(self) -> bool:
        return all(self.found)
