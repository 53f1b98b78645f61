"""Eviction policies: each is one priority function; the lowest priority goes first.

Primitives: `EvictionPolicy.priority(entry) -> float`, `POLICIES`, `make_policy(name)`.

The core picks victims among the blocks that may move (not pinned, not being read, not
already moving) and asks the policy only for an order, so a new policy is one function.
"""

from __future__ import annotations

from typing import Protocol

from tierd.core.index import BlockEntry


class EvictionPolicy(Protocol):
    name: str

    def priority(self, entry: BlockEntry) -> float: ...


class LRU:
    name = "lru"

    def priority(self, entry: BlockEntry) -> float:
        return entry.last_access


class LFU:
    """Fewest hits first; recency breaks ties (the fraction never outweighs a hit)."""

    name = "lfu"

    def priority(self, entry: BlockEntry) -> float:
        return entry.hits + entry.last_access * 1e-12


POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}") from None
