"""Weighted fair sharing of contended capacity between tenants (after FairServe).

Primitives: `fair_victim_order(candidates, usage, config, priority, tier) -> entries`,
`fair_victims(candidates, usage, config, order, tier) -> iterator` (lazy, per-policy order),
`fair_merge(queues, usage, config, tier) -> iterator` (over per-tenant queues),
`over_quota(config, tenant, tier, usage_after) -> bool`.

When a tier must give up space, the tenant holding the most per unit of weight gives
first: victims are taken one at a time from whoever currently has the largest
usage / weight, so under pressure each tenant's share converges to its weight rather than
to how early it arrived. A tenant over its configured quota for the tier pays before
anyone else. Within a tenant, the tier's placement policy (LRU by default) picks the block.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from tierd.config import Config
from tierd.core.index import BlockEntry


def _quota(config: Config, tenant: str, tier: str) -> int:
    t = config.tenant(tenant)
    return t.quota(tier) if t is not None else 0


def over_quota(config: Config, tenant: str, tier: str, usage_after: int) -> bool:
    quota = _quota(config, tenant, tier)
    return quota > 0 and usage_after > quota


def _pressure(config: Config, tenant: str, tier: str, usage: int) -> tuple[int, float]:
    """Sort key (bigger gives first): over-quota tenants ahead, then usage per weight."""
    t = config.tenant(tenant)
    weight = t.weight if t is not None else 1.0
    return (1 if over_quota(config, tenant, tier, usage) else 0, usage / weight)


def fair_victim_order(
    candidates: Iterable[BlockEntry],
    usage: dict[str, int],
    config: Config,
    priority: Callable[[BlockEntry], Any],
    tier: str,
) -> list[BlockEntry]:
    """All candidates, in the order they should leave `tier`."""
    return list(fair_victims(candidates, usage, config,
                             lambda es: iter(sorted(es, key=priority)), tier))  # fmt: skip


def fair_victims(
    candidates: Iterable[BlockEntry],
    usage: dict[str, int],
    config: Config,
    order: Callable[[list[BlockEntry]], Iterator[BlockEntry]],
    tier: str,
) -> Iterator[BlockEntry]:
    """The candidates in the order they should leave `tier`, each tenant's own blocks in
    `order` (a policy's `victims`), pulled lazily: a policy whose ordering changes its
    state as it goes (S3-FIFO) only does so for the blocks the caller actually took."""
    by_tenant: dict[str, list[BlockEntry]] = {}
    for entry in candidates:
        by_tenant.setdefault(entry.ns.tenant, []).append(entry)
    queues = {t: order(entries) for t, entries in by_tenant.items()}
    return fair_merge(queues, usage, config, tier)


def fair_merge(
    queues: dict[str, Iterator[BlockEntry]], usage: dict[str, int], config: Config, tier: str
) -> Iterator[BlockEntry]:
    """Victims one at a time from the tenant under most pressure (as the config's weights
    and quotas say), each tenant's from its own queue (a policy's leave order)."""
    return merge_by_pressure(queues, usage,
                             lambda t, used: _neg(_pressure(config, t, tier, used)))  # fmt: skip


def merge_by_pressure(
    queues: Mapping[str, Iterator[BlockEntry]],
    usage: Mapping[str, int],
    key: Callable[[str, int], tuple[float, ...]],
) -> Iterator[BlockEntry]:
    """Victims one at a time from the tenant whose `key(tenant, bytes held)` is smallest
    (ties: by tenant name), its usage lowered by each block taken, pulled lazily."""
    held = dict(usage)
    heap = [(key(t, held.get(t, 0)), t) for t in queues]
    heapq.heapify(heap)
    while heap:
        _, tenant = heapq.heappop(heap)
        entry = next(queues[tenant], None)
        if entry is None:
            continue
        yield entry
        held[tenant] = held.get(tenant, 0) - entry.nbytes
        heapq.heappush(heap, (key(tenant, held[tenant]), tenant))


def _neg(key: tuple[int, float]) -> tuple[int, float]:
    return (-key[0], -key[1])
