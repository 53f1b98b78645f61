"""Placement policies as values, one module each, chosen per tier by name.

Primitives: `Policy` (see `base`), `POLICIES` (name -> class), `make_policy(name, tier)`.

`host.policy` and `nvme.policy` name one of `POLICIES`; the placer calls the hooks as
blocks enter a tier, are read, and leave it, and asks `victims` for the order in which
blocks should leave. `second_hit` is an admission filter for a slower tier (with LRU
inside it); the others only order victims and admit everything.
"""

from __future__ import annotations

from tierd.core.policies.base import Policy
from tierd.core.policies.cost import CostAware
from tierd.core.policies.lfu import LFU
from tierd.core.policies.lru import LRU
from tierd.core.policies.s3fifo import S3FIFO
from tierd.core.policies.second_hit import SecondHit

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (LRU, LFU, S3FIFO, CostAware, SecondHit)}


def make_policy(name: str, tier: str = "host") -> Policy:
    try:
        return POLICIES[name](tier)
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; known: {', '.join(POLICIES)}"
        ) from None


__all__ = ["POLICIES", "Policy", "make_policy"]
