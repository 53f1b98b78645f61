"""[limits] in the core: each bound refused with its code and field, nothing left behind;
lookup stops hashing at the first miss; limits validated in the config and live on reload."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

import tierd_client.keys
from tierd.config import (
    Config,
    HostTierConfig,
    LimitsConfig,
    NvmeTierConfig,
    ServerConfig,
    TenantConfig,
)
from tierd.core.service import CacheService
from tierd.errors import ConfigError, InvalidArgument, ResourceExhausted, TierdError
from tierd_client.keys import block_keys
from tierd_client.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
BB = LAYOUT.block_bytes


@pytest.fixture
def open_svc(tmp_path: Path) -> Iterator[Callable[..., CacheService]]:
    opened: list[CacheService] = []

    def open_svc(tenants: tuple[TenantConfig, ...] = (), **limits: int) -> CacheService:
        cfg = Config(
            data_dir=tmp_path / "data",
            host=HostTierConfig(capacity_bytes=64 * BB, pin_memory=False),
            nvme=NvmeTierConfig(capacity_bytes=256 * BB, io_threads=2),
            limits=dataclasses.replace(LimitsConfig(), **limits),
            tenants=tenants,
        ).resolved()
        svc = CacheService(cfg)
        svc.start()
        opened.append(svc)
        return svc

    yield open_svc
    for svc in opened:
        svc.close()
        svc.top.arena.destroy()


def put(svc: CacheService, ns_id: bytes, keys: list[bytes]) -> None:
    writer = svc.begin_inband_put(ns_id, keys, LAYOUT.block_shape, LAYOUT.dtype)
    for i, _ in enumerate(keys):
        writer.write(np.full(BB, i % 251, np.uint8).tobytes())
    writer.finish()


def keys_of(ns_id: bytes, n: int, seed: int = 0) -> list[bytes]:
    tokens = np.random.default_rng(seed).integers(0, 50_000, n * 16)
    return block_keys(ns_id, tokens, 16)


def refused(call: Callable[[], object]) -> tuple[type[TierdError], str | None, str]:
    with pytest.raises(TierdError) as info:
        call()
    return type(info.value), info.value.field, info.value.message


def test_layouts_and_names_past_their_limits_are_refused_and_not_kept(open_svc) -> None:
    svc = open_svc(max_block_bytes=4 * BB)
    big = "x" * 257
    cases = [
        (("t", "m", KVLayout(1025, 1, 8, "uint8", 1), ()), "namespace.layout.num_layers",
         "limits.max_layers"),
        (("t", "m", KVLayout(1, 1025, 8, "uint8", 1), ()), "namespace.layout.num_kv_heads",
         "limits.max_kv_heads"),
        (("t", "m", KVLayout(1, 1, 1025, "uint8", 1), ()), "namespace.layout.head_dim",
         "limits.max_head_dim"),
        (("t", "m", KVLayout(1, 1, 1, "uint8", 65_537), ()), "namespace.layout.block_tokens",
         "limits.max_block_tokens"),
        (("t", "m", KVLayout(9, 2, 64, "float16", 16), ()), "namespace.layout",
         "limits.max_block_bytes"),
        ((big, "m", LAYOUT, ()), "namespace.tenant", "limits.max_name_bytes"),
        (("t", "é" * 129, LAYOUT, ()), "namespace.model", "limits.max_name_bytes"),
        (("t", "m", LAYOUT, [str(i) for i in range(17)]), "namespace.extra_keys",
         "limits.max_extra_keys"),
        (("t", "m", LAYOUT, ["lora", big]), "namespace.extra_keys[1]", "limits.max_name_bytes"),
    ]  # fmt: skip
    for args, field, key in cases:
        cls, got_field, message = refused(lambda a=args: svc.open_namespace(*a))
        assert (cls, got_field) == (InvalidArgument, field), message
        assert key in message
    assert not svc.index.namespaces  # nothing was kept, in memory or in the catalog
    assert svc.catalog.namespaces() == []
    svc.open_namespace("t" * 256, "m" * 256, LAYOUT, ["k" * 256] * 16)  # at the limits: fine


def test_tenant_names_in_open_mode_and_namespaces_per_tenant(open_svc) -> None:
    svc = open_svc(max_open_tenants=3, max_namespaces_per_tenant=2)
    for t in ("a", "b", "c"):
        svc.open_namespace(t, "m", LAYOUT)
    assert refused(lambda: svc.open_namespace("d", "m", LAYOUT))[:2] == (
        ResourceExhausted,
        "limits.max_open_tenants",
    )
    svc.open_namespace("a", "m2", LAYOUT)  # a known tenant may open more
    svc.open_namespace("a", "m2", LAYOUT)  # reopening is not a new namespace
    assert refused(lambda: svc.open_namespace("a", "m3", LAYOUT))[:2] == (
        ResourceExhausted,
        "limits.max_namespaces_per_tenant",
    )


def test_configured_tenants_are_not_counted_as_open_mode_names(open_svc) -> None:
    tenants = tuple(TenantConfig(name=n, token_sha256=hashlib.sha256(n.encode()).hexdigest())
                    for n in ("a", "b", "c"))  # fmt: skip
    svc = open_svc(tenants=tenants, max_open_tenants=1)
    for t in ("a", "b", "c"):
        svc.open_namespace(t, "m", LAYOUT)


def test_lookup_is_bounded_and_stops_hashing_at_the_first_miss(open_svc, monkeypatch) -> None:
    svc = open_svc(max_lookup_tokens=1 << 20)
    ns, _ = svc.open_namespace("t", "m", LAYOUT)
    tokens = np.random.default_rng(1).integers(0, 50_000, 1 << 20)
    put(svc, ns.id, block_keys(ns.id, tokens[: 3 * 16], 16))
    hashed = []
    real = tierd_client.keys.next_block_key

    def counting(*args: object) -> bytes:
        hashed.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tierd_client.keys, "next_block_key", counting)
    result = svc.lookup(ns.id, tokens)  # 65,536 blocks, the 4th a miss
    assert result.cached_tokens == 3 * 16
    assert len(hashed) <= 8, f"hashed {len(hashed)} blocks to find a miss at the 4th"
    assert svc.counters.misses == 1
    cls, field, message = refused(lambda: svc.lookup(ns.id, np.zeros((1 << 20) + 1, np.int64)))
    assert (cls, field) == (InvalidArgument, "tokens") and "limits.max_lookup_tokens" in message


def test_open_leases_and_their_bytes_are_bounded_per_tenant(open_svc) -> None:
    svc = open_svc(max_leases_per_tenant=2, max_lease_bytes_per_tenant=4 * BB)
    ns, _ = svc.open_namespace("a", "m", LAYOUT)
    other, _ = svc.open_namespace("b", "m", LAYOUT)
    first = svc.prepare_put(ns.id, keys_of(ns.id, 1, 1), LAYOUT.block_shape, LAYOUT.dtype)
    assert refused(lambda: svc.prepare_put(ns.id, keys_of(ns.id, 4, 2), LAYOUT.block_shape,
                                           LAYOUT.dtype))[:2] == (
        ResourceExhausted, "limits.max_lease_bytes_per_tenant")  # fmt: skip
    svc.prepare_put(ns.id, keys_of(ns.id, 3, 3), LAYOUT.block_shape, LAYOUT.dtype)
    assert refused(lambda: svc.prepare_put(ns.id, keys_of(ns.id, 1, 4), LAYOUT.block_shape,
                                           LAYOUT.dtype))[:2] == (
        ResourceExhausted, "limits.max_leases_per_tenant")  # fmt: skip
    # Another tenant is not held back; ending a lease makes room again.
    held = svc.prepare_put(other.id, keys_of(other.id, 4, 5), LAYOUT.block_shape, LAYOUT.dtype)
    assert svc.release(first.lease_id)
    svc.prepare_put(ns.id, keys_of(ns.id, 1, 6), LAYOUT.block_shape, LAYOUT.dtype)
    # Get leases hold blocks too: they count the same way.
    assert svc.release(held.lease_id)
    stored = keys_of(other.id, 3, 7)
    put(svc, other.id, stored)
    svc.prepare_get(other.id, stored)
    assert refused(lambda: svc.prepare_get(other.id, stored[:2]))[:2] == (
        ResourceExhausted,
        "limits.max_lease_bytes_per_tenant",
    )
    svc.prepare_get(other.id, stored[:1])
    assert refused(lambda: svc.prepare_get(other.id, stored[:1]))[:2] == (
        ResourceExhausted,
        "limits.max_leases_per_tenant",
    )


def test_pins_count_against_the_tenants_quota(open_svc) -> None:
    tenants = (TenantConfig(name="q", token_sha256="0" * 64, host_quota=3 * BB),)
    svc = open_svc(tenants=tenants)
    ns, _ = svc.open_namespace("q", "m", LAYOUT)
    keys = keys_of(ns.id, 3, 8)
    put(svc, ns.id, keys)
    assert svc.set_pinned(ns.id, keys[:2], True) == 2
    assert svc.set_pinned(ns.id, keys[:2], True) == 0  # already pinned: adds nothing
    put(svc, ns.id, extra := keys_of(ns.id, 2, 9))
    cls, field, message = refused(lambda: svc.set_pinned(ns.id, extra, True))
    assert (cls, field) == (ResourceExhausted, "limits.max_pinned_bytes_per_tenant"), message
    assert not any(svc.index.get(ns.id, k).pinned for k in extra)
    assert svc.set_pinned(ns.id, extra[:1], True) == 1  # up to the quota
    assert svc.set_pinned(ns.id, keys[:1], False) == 1
    assert svc.set_pinned(ns.id, extra[1:], True) == 1


def test_pinned_bytes_limit_without_quotas(open_svc) -> None:
    svc = open_svc(max_pinned_bytes_per_tenant=2 * BB)
    ns, _ = svc.open_namespace("t", "m", LAYOUT)
    put(svc, ns.id, keys := keys_of(ns.id, 3, 10))
    assert svc.set_pinned(ns.id, keys[:2], True) == 2
    assert refused(lambda: svc.set_pinned(ns.id, keys[2:], True))[:2] == (
        ResourceExhausted,
        "limits.max_pinned_bytes_per_tenant",
    )


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"max_layers": 0}, "limits.max_layers"),
        ({"max_lookup_tokens": 1 << 30}, "limits.max_lookup_tokens"),
        ({"stream_first_message_ms": 0}, "limits.stream_first_message_ms"),
        ({"stream_reserve_workers": 16}, "limits.stream_reserve_workers"),
        ({"connection_idle_ms": 10}, "limits.connection_idle_ms"),
    ],
)
def test_limits_out_of_range_are_config_errors(limits: dict[str, int], key: str) -> None:
    cfg = Config(server=ServerConfig(workers=16), limits=dataclasses.replace(LimitsConfig(),
                                                                             **limits))  # fmt: skip
    with pytest.raises(ConfigError) as info:
        cfg.validate()
    assert info.value.field == key


def test_limits_reload_live_but_connection_keys_need_a_restart() -> None:
    old = Config()
    new = dataclasses.replace(old, limits=dataclasses.replace(
        old.limits, max_query_tokens=64, connection_idle_ms=5_000))  # fmt: skip
    live, restart = old.reload_changes(new)
    assert live.limits.max_query_tokens == 64
    assert live.limits.connection_idle_ms == old.limits.connection_idle_ms
    assert restart == ["limits.connection_idle_ms"]
