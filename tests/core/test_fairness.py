"""Weighted fair victim order and quotas."""

from __future__ import annotations

from tierd.config import Config, TenantConfig
from tierd.core.fairness import fair_victim_order, over_quota
from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.tiers.base import Copy
from tierd_client.layout import KVLayout

LAYOUT = KVLayout(1, 1, 64, "float16", 16)


def entries(tenant: str, n: int, start: float = 0.0) -> list[BlockEntry]:
    ns = NamespaceInfo(tenant.encode().ljust(16, b"\0"), tenant, "m", LAYOUT, ())
    return [BlockEntry(ns, i.to_bytes(16, "little"), 100, 0, {"host": Copy("host", i, 100, 0)},
                       last_access=start + i)
            for i in range(n)]  # fmt: skip


def config(*tenants: TenantConfig) -> Config:
    return Config(tenants=tenants)


def test_heaviest_per_weight_gives_first_until_shares_match_weights() -> None:
    cfg = config(TenantConfig("a", token_sha256="0" * 64, weight=1.0),
                 TenantConfig("b", token_sha256="1" * 64, weight=3.0))  # fmt: skip
    a, b = entries("a", 10), entries("b", 10)
    order = fair_victim_order(a + b, {"a": 1000, "b": 1000}, cfg, lambda e: e.last_access, "host")
    assert len(order) == 20
    # Equal usage, b weighs 3x: a gives until its usage per weight is below b's.
    first = [e.ns.tenant for e in order[:8]]
    assert first.count("a") >= 6
    # Within a tenant, least recently used first.
    a_order = [e.last_access for e in order if e.ns.tenant == "a"]
    assert a_order == sorted(a_order)


def test_over_quota_tenant_gives_before_anyone() -> None:
    cfg = config(TenantConfig("small", token_sha256="0" * 64, weight=10.0, host_quota=300),
                 TenantConfig("big", token_sha256="1" * 64, weight=1.0))  # fmt: skip
    small, big = entries("small", 5), entries("big", 50)
    order = fair_victim_order(small + big, {"small": 500, "big": 5000}, cfg,
                              lambda e: e.last_access, "host")  # fmt: skip
    assert [e.ns.tenant for e in order[:2]] == ["small", "small"]  # 500 -> 300: at quota
    assert order[2].ns.tenant == "big"
    assert over_quota(cfg, "small", "host", 301) and not over_quota(cfg, "small", "host", 300)
    assert not over_quota(cfg, "big", "host", 10**12)  # no quota configured
