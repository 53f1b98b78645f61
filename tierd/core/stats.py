"""Counters the core keeps, and the snapshot `Stats` returns.

Primitives: `Counters` (mutated under the core's lock), `StatsSnapshot`, `TierSnapshot`.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TierCounters:
    hits: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0


@dataclass
class Counters:
    lookups: int = 0
    misses: int = 0
    demotions: int = 0
    promotions: int = 0
    corrupt_reads: int = 0
    host: TierCounters = field(default_factory=TierCounters)
    nvme: TierCounters = field(default_factory=TierCounters)

    def tier(self, name: str) -> TierCounters:
        return self.host if name == "host" else self.nvme


@dataclass(frozen=True)
class TierSnapshot:
    name: str
    capacity_bytes: int
    used_bytes: int
    blocks: int
    counters: TierCounters
    backend: str


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
