"""The tier chain the daemon runs: built from the config's `[[tiers]]` by kind.

Primitives: `TierSet.open(config, tag)`, `chain`, `top` (the memory tier puts land in and
gets are served from), `get(name)`,
`below(name)` (where that tier's victims go), `close()`.

The core speaks of tiers only through this: by position in the chain, by capability, or
by the name a copy carries; never by a specific kind.
"""

from __future__ import annotations

from collections.abc import Iterator

from tierd.config import Config
from tierd.tiers.base import MemoryTier, Tier
from tierd.tiers.registry import TierContext, build_tier


class TierSet:
    def __init__(self, tiers: list[Tier]) -> None:
        if not tiers or not isinstance(tiers[0], MemoryTier):
            raise ValueError("the first tier of a chain must be a memory tier")
        self.chain = tiers
        self.top: MemoryTier = tiers[0]
        self._by_name = {t.name: t for t in tiers}
        self._rank = {t.name: i for i, t in enumerate(tiers)}

    @classmethod
    def open(cls, config: Config, segment_tag: str) -> TierSet:
        """Every tier of the config's chain, or a ConfigError (nothing left open then)."""
        context = TierContext(config.data_dir, segment_tag)
        built: list[Tier] = []
        try:
            for spec in config.tiers:
                built.append(build_tier(spec, context))
        except BaseException:
            for tier in built:
                tier.close()
            raise
        return cls(built)

    def __iter__(self) -> Iterator[Tier]:
        return iter(self.chain)

    def get(self, name: str) -> Tier | None:
        return self._by_name.get(name)

    def below(self, name: str) -> Tier | None:
        """The next tier down that takes demoted blocks (None: victims leave the cache)."""
        for tier in self.chain[self._rank[name] + 1 :]:
            if tier.spec.spill:
                return tier
        return None

    def start(self) -> dict[str, list[str]]:
        """Start what tiers run; what is not serving yet, by tier."""
        return {t.name: down for t in self.chain if (down := t.start())}

    def close(self) -> None:
        for tier in reversed(self.chain):
            tier.close()
