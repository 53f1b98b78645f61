"""Eviction policies: kept as the old import path of `tierd.core.policies`.

Primitives: `EvictionPolicy`, `POLICIES`, `make_policy(name, tier)`.
"""

from __future__ import annotations

from tierd.core.policies import POLICIES, make_policy
from tierd.core.policies import Policy as EvictionPolicy

__all__ = ["POLICIES", "EvictionPolicy", "make_policy"]
