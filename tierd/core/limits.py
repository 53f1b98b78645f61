"""Bounds on what one request or one tenant can make the daemon hold (`[limits]`).

Primitives:
  `check_namespace(svc, tenant, model, layout, extra_keys)`   names, layout, tenants, namespaces
  `check_lookup(limits, n_tokens)`                              tokens per lookup
  `check_put_lease(svc, ns, keys)`, `check_get_lease(svc, ns, keys)`   leases per tenant
  `check_pins(svc, ns, keys)`                                   pinned bytes per tenant
  `check_sequences(limits, open_now)`                           open sequences per tenant
  `check_attend_item(limits, q_tokens, new_tokens, i)`          query tokens per attend item
  `tail_capacity(limits, block_tokens)`                         tokens a layer's tail may hold
  `check_tail(limits, seq, layer, n, held)`, `check_tail_bytes(limits, held, adding)`

Every refusal names its `limits.*` key in the message; a bound on a request field names
that field (INVALID_ARGUMENT), a bound on what a tenant holds names the key itself
(RESOURCE_EXHAUSTED), so a client can tell "fix the request" from "release something".

Per-tenant figures are counted from the core's own tables when a call asks, not kept as
running counters: a lease or sequence ends by several paths (commit, release, expiry,
drain), and a count taken from the table cannot drift from it. Each count is linear in
what is open, which these very limits bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from tierd.config import Config, LimitsConfig
from tierd.core.index import NamespaceInfo
from tierd.core.leases import PutLease
from tierd.errors import InvalidArgument, ResourceExhausted
from tierd_client.layout import KVLayout

if TYPE_CHECKING:
    from tierd.attention.sequences import Sequence as AttendSequence
    from tierd.core.service import CacheService


_LAYOUT_LIMITS = (
    ("num_layers", "max_layers"),
    ("num_kv_heads", "max_kv_heads"),
    ("head_dim", "max_head_dim"),
    ("block_tokens", "max_block_tokens"),
)


def _check_name(limits: LimitsConfig, value: str, field: str) -> None:
    n = len(value.encode("utf-8", "surrogatepass"))
    if n > limits.max_name_bytes:
        raise InvalidArgument(
            f"{n} bytes; limits.max_name_bytes is {limits.max_name_bytes}", field=field
        )


def check_layout(config: Config, layout: KVLayout, host_capacity: int) -> None:
    """The layout's dimensions and block size against the limits and the host tier."""
    lim = config.limits
    for name, limit_key in _LAYOUT_LIMITS:
        value, limit = getattr(layout, name), getattr(lim, limit_key)
        if value > limit:
            raise InvalidArgument(f"{value}; limits.{limit_key} is {limit}",
                                  field=f"namespace.layout.{name}")  # fmt: skip
    if layout.block_bytes > lim.max_block_bytes:
        raise InvalidArgument(
            f"one block is {layout.block_bytes} bytes; limits.max_block_bytes is "
            f"{lim.max_block_bytes}",
            field="namespace.layout",
        )
    if layout.block_bytes > host_capacity:
        raise ResourceExhausted(
            f"one block is {layout.block_bytes} bytes; the host tier holds {host_capacity}",
            field="namespace.layout",
        )


def check_namespace(
    svc: CacheService, tenant: str, model: str, layout: KVLayout, extra_keys: Sequence[str]
) -> None:
    """Everything OpenNamespace may not exceed: names, layout, and (for a namespace not yet
    known) tenants in open mode and namespaces per tenant."""
    config = svc.config
    lim = config.limits
    _check_name(lim, tenant, "namespace.tenant")
    _check_name(lim, model, "namespace.model")
    if len(extra_keys) > lim.max_extra_keys:
        raise InvalidArgument(f"{len(extra_keys)} extra keys; limits.max_extra_keys is "
                              f"{lim.max_extra_keys}", field="namespace.extra_keys")  # fmt: skip
    for i, key in enumerate(extra_keys):
        _check_name(lim, key, f"namespace.extra_keys[{i}]")
    check_layout(config, layout, svc.top.capacity)
    with svc.cond:
        spaces = list(svc.index.namespaces.values())
    wanted = (tenant, model, layout, tuple(extra_keys))
    if any((ns.tenant, ns.model, ns.layout, ns.extra_keys) == wanted for ns in spaces):
        return  # reopening what exists adds nothing
    mine = sum(1 for ns in spaces if ns.tenant == tenant)
    if mine == 0 and not config.tenants:
        tenants = len({ns.tenant for ns in spaces})
        if tenants >= lim.max_open_tenants:
            raise ResourceExhausted(
                f"{tenants} tenant names are in use; limits.max_open_tenants is "
                f"{lim.max_open_tenants} (configure [[tenants]] for more)",
                field="limits.max_open_tenants",
            )
    if mine >= lim.max_namespaces_per_tenant:
        raise ResourceExhausted(
            f"the tenant has {mine} namespaces; limits.max_namespaces_per_tenant is "
            f"{lim.max_namespaces_per_tenant}",
            field="limits.max_namespaces_per_tenant",
        )


def check_lookup(limits: LimitsConfig, n_tokens: int) -> None:
    if n_tokens > limits.max_lookup_tokens:
        raise InvalidArgument(f"{n_tokens} tokens; limits.max_lookup_tokens is "
                              f"{limits.max_lookup_tokens}", field="tokens")  # fmt: skip


def lease_bytes_limit(svc: CacheService, tenant: str) -> int:
    """Unset: the tenant's quota in the memory tier, else that tier's size (a multi-tenant
    daemon sets it)."""
    t = svc.config.tenant(tenant)
    quota = t.quota(svc.top.name) if t is not None else 0
    return svc.config.limits.max_lease_bytes_per_tenant or quota or svc.top.capacity


def _held_by(svc: CacheService, tenant: str) -> tuple[int, int]:
    """Open leases of `tenant` and the bytes they hold. Caller holds `cond`."""
    count = held = 0
    for lease in svc.leases.all():
        if lease.ns.tenant != tenant:
            continue
        count += 1
        if isinstance(lease, PutLease):
            held += len(lease.slots) * lease.ns.block_bytes
        else:
            held += sum(e.nbytes for e in lease.entries) + lease.other_bytes
    if svc.bulk is not None:  # transfer-engine puts under way hold room as put leases do
        for owner, nbytes in svc.bulk.held.values():
            if owner == tenant:
                count += 1
                held += nbytes
    return count, held


def _check_lease(svc: CacheService, tenant: str, nbytes: int) -> None:
    """Caller holds `cond`."""
    lim = svc.config.limits
    count, held = _held_by(svc, tenant)
    if count >= lim.max_leases_per_tenant:
        raise ResourceExhausted(
            f"the tenant has {count} open leases; limits.max_leases_per_tenant is "
            f"{lim.max_leases_per_tenant}: commit or release some",
            field="limits.max_leases_per_tenant",
        )
    cap = lease_bytes_limit(svc, tenant)
    if held + nbytes > cap:
        raise ResourceExhausted(
            f"the tenant's open leases hold {held} bytes and this call would add {nbytes}; "
            f"limits.max_lease_bytes_per_tenant is {cap}: commit or release some",
            field="limits.max_lease_bytes_per_tenant",
        )


def check_put_lease(svc: CacheService, ns: NamespaceInfo, keys: Sequence[bytes]) -> None:
    """A put lease for the keys not yet cached must fit the tenant's lease limits."""
    with svc.cond:
        fresh = sum(1 for k in keys if svc.index.get(ns.id, k) is None)
        if fresh:
            _check_lease(svc, ns.tenant, fresh * ns.block_bytes)


def check_get_lease(svc: CacheService, ns: NamespaceInfo, keys: Sequence[bytes]) -> None:
    """A get lease over the keys that are cached must fit the tenant's lease limits."""
    with svc.cond:
        held = sum(e.nbytes for k in keys if (e := svc.index.get(ns.id, k)) is not None)
        if held:
            _check_lease(svc, ns.tenant, held)


def pinned_bytes_limit(svc: CacheService, tenant: str) -> int:
    """Pinned blocks are never evicted, so they count against every quota the tenant has.
    Unset and without quotas: what the tiers that take demotions hold together."""
    configured = svc.config.limits.max_pinned_bytes_per_tenant
    spill = [t for t in svc.tiers if t is svc.top or t.spec.spill]
    caps = [configured or sum(t.capacity for t in spill)]
    t = svc.config.tenant(tenant)
    if t is not None:
        names = {tier.name for tier in svc.tiers}
        caps += [q for name, q in t.all_quotas().items() if q > 0 and name in names]
    return min(caps)


def check_pins(svc: CacheService, ns: NamespaceInfo, keys: Sequence[bytes]) -> None:
    tenant = ns.tenant
    with svc.cond:
        pinned = sum(e.nbytes for e in svc.index.entries() if e.pinned and e.ns.tenant == tenant)
        adding = sum(e.nbytes for k in keys
                     if (e := svc.index.get(ns.id, k)) is not None and not e.pinned)  # fmt: skip
    cap = pinned_bytes_limit(svc, tenant)
    if adding and pinned + adding > cap:
        raise ResourceExhausted(
            f"the tenant has {pinned} bytes pinned and this call would add {adding}; the "
            f"limit is {cap} (limits.max_pinned_bytes_per_tenant, and the tenant's quotas)",
            field="limits.max_pinned_bytes_per_tenant",
        )


def check_sequences(limits: LimitsConfig, open_now: int) -> None:
    if open_now >= limits.max_sequences_per_tenant:
        raise ResourceExhausted(
            f"the tenant has {open_now} open sequences; limits.max_sequences_per_tenant is "
            f"{limits.max_sequences_per_tenant}: close some",
            field="limits.max_sequences_per_tenant",
        )


def check_attend_item(limits: LimitsConfig, q_tokens: int, new_tokens: int, i: int) -> None:
    cap = limits.max_query_tokens
    if q_tokens > cap:
        raise InvalidArgument(f"{q_tokens} query tokens; limits.max_query_tokens is {cap}",
                              field=f"items[{i}].q")  # fmt: skip
    if new_tokens > cap:
        raise InvalidArgument(f"{new_tokens} new tokens; limits.max_query_tokens is {cap}",
                              field=f"items[{i}].k_new")  # fmt: skip


def tail_capacity(limits: LimitsConfig, block_tokens: int) -> int:
    """Tokens one layer's open tail may hold: at least a block, or it could never seal."""
    return max(limits.max_tail_tokens, block_tokens)


def check_tail_bytes(limits: LimitsConfig, held: int, adding: int) -> None:
    """Open tails are daemon memory outside every tier: bounded per tenant."""
    cap = limits.max_tail_bytes_per_tenant
    if adding and held + adding > cap:
        raise ResourceExhausted(
            f"the tenant's open sequence tails hold {held} bytes and this call would add "
            f"{adding}; limits.max_tail_bytes_per_tenant is {cap}: close sequences",
            field="limits.max_tail_bytes_per_tenant",
        )


def check_tail(
    limits: LimitsConfig, seq: AttendSequence, layer: int, n: int, held: Callable[[], int]
) -> None:
    """Appending `n` tokens to `layer`'s tail. A layer appended alone never seals (a block
    seals once every layer has it), so its tail is what a careless or hostile caller grows."""
    cap = tail_capacity(limits, seq.ns.layout.block_tokens)
    have = seq.tail_len(layer)
    if have + n > cap:
        raise ResourceExhausted(
            f"layer {layer}'s open tail holds {have} tokens and {n} more would pass "
            f"limits.max_tail_tokens ({cap}): append every layer, so that full blocks seal",
            field="limits.max_tail_tokens",
        )
    grow = seq.growth_bytes(layer, n, cap)
    if grow:  # tails grow by doubling: the tenant's total is summed only then
        check_tail_bytes(limits, held(), grow)
