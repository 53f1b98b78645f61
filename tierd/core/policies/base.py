"""What every placement policy offers the placer, and the shared per-entry state slot.

Primitives: `Policy` (hooks `on_insert`, `on_hit`, `on_evict`, `admit`; ordering
`priority` / `victims`), `Policy.state(entry)`.

A policy instance serves one tier and keeps its per-block state in
`entry.policy_state[tier]`, so the state lives and dies with the entry: a block removed
by a path that calls no hook (delete, a dropped corrupt copy) leaves nothing behind, and
a block the policy never saw (adopted after a restart) simply gets fresh state on first
use. Orderings are computed over the candidates the placer hands in; nothing is scanned.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

from tierd.core.index import BlockEntry


class Policy(ABC):
    name = ""

    def __init__(self, tier: str = "host") -> None:
        self.tier = tier
        self.clock = 0  # logical time: one tick per insert or hit seen by this policy

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    def state(self, entry: BlockEntry) -> Any:
        """This policy's state for `entry`, created (as if inserted long ago) if missing."""
        st = entry.policy_state.get(self.tier)
        if st is None:
            st = entry.policy_state[self.tier] = self.fresh(entry, 0)
        return st

    def fresh(self, entry: BlockEntry, now: int) -> Any:
        return now

    def on_insert(self, entry: BlockEntry) -> None:
        """The block got a copy in this tier (put, seal, promotion, demotion into it)."""
        entry.policy_state[self.tier] = self.fresh(entry, self.tick())

    def on_hit(self, entry: BlockEntry) -> None:
        """A read of the block was served while it had a copy in this tier."""

    def on_evict(self, entry: BlockEntry) -> None:
        """The block's copy left this tier (demoted or evicted)."""
        entry.policy_state.pop(self.tier, None)

    def admit(self, entry: BlockEntry) -> bool:
        """Whether a block demoted from the tier above may be written here (else it is
        dropped from the cache). Pinned blocks and explicit moves are never asked."""
        return True

    @abstractmethod
    def priority(self, entry: BlockEntry) -> Any:
        """Sort key: the lowest leaves first (each policy's own rule)."""

    def victims(self, candidates: Iterable[BlockEntry]) -> Iterator[BlockEntry]:
        """The candidates in the order they should leave, consumed lazily by the placer."""
        return iter(sorted(candidates, key=self.priority))
