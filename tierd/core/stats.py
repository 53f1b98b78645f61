"""Counters the core keeps, and the snapshot `Stats` returns.

Primitives: `Counters` (mutated under the core's lock), `StatsSnapshot`, `TierSnapshot`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TierCounters:
    hits: int = 0  # blocks (or attend layer reads) served from this tier
    misses: int = 0  # a block held here could not be served from it (corrupt, unreachable)
    bytes_read: int = 0  # bytes served from the tier (out)
    bytes_written: int = 0  # bytes written into the tier (in)
    evictions: int = 0  # copies the placer removed to make room


@dataclass
class Counters:
    lookups: int = 0
    misses: int = 0
    demotions: int = 0
    promotions: int = 0
    corrupt_reads: int = 0
    tiers: dict[str, TierCounters] = field(default_factory=dict)  # by tier name

    def tier(self, name: str) -> TierCounters:
        counters = self.tiers.get(name)
        if counters is None:
            counters = self.tiers[name] = TierCounters()
        return counters


@dataclass(frozen=True)
class TierSnapshot:
    name: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    counters: TierCounters
    backend: str
    kind: str = ""
    available: bool = True


@dataclass(frozen=True)
class StatsSnapshot:
    tiers: list[TierSnapshot]
    lookups: int
    misses: int
    demotions: int
    promotions: int
    corrupt_reads: int
    active_leases: int
    namespaces: int
    active_sequences: int = 0
