"""Tier kinds by name: adding a kind is one module and one line here.

Primitives: `KINDS` (kind -> "module:Class"), `kind_class(kind) -> type[Tier]`,
`build_tier(spec, context) -> Tier`, `TierContext`.

Kinds are imported on first use, so a configuration check does not pull in what a kind
needs to run (grpc for CSD workers, CUDA for HBM).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tierd.config import TierSpec
    from tierd.tiers.base import Tier

KINDS: dict[str, str] = {
    "host": "tierd.tiers.host_tier:HostTier",
    "nvme": "tierd.tiers.nvme_tier:NvmeTier",
    "csd": "tierd.tiers.csd_tier:CsdTier",
    "redis": "tierd.tiers.remote_redis:RedisTier",
    "mooncake": "tierd.tiers.remote_mooncake:MooncakeTier",
}


@dataclass(frozen=True)
class TierContext:
    """What a tier may need from the daemon besides its own spec."""

    data_dir: Path
    segment_tag: str  # names this daemon's shared-memory segments


def kind_class(kind: str) -> type[Tier]:
    try:
        module, _, cls = KINDS[kind].partition(":")
    except KeyError:
        raise KeyError(f"unknown tier kind {kind!r}; known: {', '.join(KINDS)}") from None
    return getattr(importlib.import_module(module), cls)  # type: ignore[no-any-return]


def build_tier(spec: TierSpec, context: TierContext) -> Tier:
    return kind_class(spec.kind).open(spec, context)
