"""Placement policies as values, one module each, chosen per tier by name.

Primitives: `Policy` (see `base`), `POLICIES` (name -> class), `make_policy(name, tier)`.

`host.policy` and `nvme.policy` name one of `POLICIES`; the placer calls the hooks as
blocks enter a tier, are read, and leave it, and asks `victims` (sorting the candidates it
hands in) or `victims_of` (an incremental order kept by the hooks) for the order in which
blocks should leave. `second_hit` and `tinylfu` are admission filters for a slower tier
(with LRU inside it); the others only order victims and admit everything. `spin` orders
by coarse recency, deepest block first, with a per-request budget.
"""

from __future__ import annotations

from tierd.core.policies.base import Policy
from tierd.core.policies.cost import CostAware
from tierd.core.policies.lfu import LFU
from tierd.core.policies.lru import LRU
from tierd.core.policies.s3fifo import S3FIFO
from tierd.core.policies.second_hit import SecondHit
from tierd.core.policies.spin import Spin
from tierd.core.policies.tinylfu import TinyLFU

POLICIES: dict[str, type[Policy]] = {
    p.name: p for p in (LRU, LFU, S3FIFO, CostAware, SecondHit, Spin, TinyLFU)
}


def make_policy(name: str, tier: str = "tier") -> Policy:
    try:
        return POLICIES[name](tier)
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}"
        ) from None


__all__ = ["POLICIES", "Policy", "make_policy"]
