"""An adapter dropped or evicted while calls on the namespaces that name it are under
way, each interleaving forced step by step on a real CacheService: no KV that depends on
an adapter the daemon no longer holds outlives the drop, and an adapter whose KV became
hot meanwhile is kept."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from tests.core.conftest import (
    LAYOUT,
    Harness,
    block_bytes_for,
    keys_for,
    make_config,
    put_blocks,
    slot_view,
)
from tests.integration.test_models import small_model
from tests.lora_files import SMALL_Q, area_bytes, write_adapter
from tierd.attention.attend import AttendCall
from tierd.config import WeightsConfig
from tierd.core.index import NamespaceInfo
from tierd.core.service import CacheService
from tierd.errors import FailedPrecondition, ResourceExhausted

TENANT = "t"


def _held(svc: CacheService, tmp_path: Path, *names: str) -> str:
    """Register the small base model and one adapter of it per name; the base's fingerprint."""
    small_model(tmp_path / "base")
    view, _ = svc.weights.register(TENANT, str(tmp_path / "base"), "", "base", False)
    for i, name in enumerate(names):
        write_adapter(tmp_path / name, SMALL_Q, seed=i)
        svc.weights.register(TENANT, str(tmp_path / name), "", name, False, "base")
    return view.registration.fingerprint


def _adapted(svc: CacheService, tmp_path: Path, name: str) -> NamespaceInfo:
    """A namespace of the base model that names adapter `name` (both registered here)."""
    base = _held(svc, tmp_path, name)
    ns, _ = svc.open_namespace(TENANT, base, LAYOUT, adapter=name)
    return ns


def _leased(svc: CacheService, ns: NamespaceInfo, keys: list[bytes]) -> int:
    """A put prepared and written, not yet committed: its lease id."""
    prepared = svc.prepare_put(ns.id, keys, LAYOUT.block_shape, LAYOUT.dtype)
    for key, slot in zip(keys, prepared.slots):
        slot_view(svc, prepared.lease_id, slot.offset)[:] = block_bytes_for(key)
    return prepared.lease_id


def test_a_put_committed_after_its_adapter_was_dropped_leaves_no_kv(harness: Harness,
                                                                    tmp_path: Path) -> None:  # fmt: skip
    svc = harness.open()
    ns = _adapted(svc, tmp_path, "lora")
    keys = keys_for(ns.id, 3)
    lease = _leased(svc, ns, keys)
    svc.weights.drop(TENANT, "lora")  # its sweep finds nothing: the put is not visible yet
    with pytest.raises(FailedPrecondition, match="dropped or evicted"):
        svc.commit_put(lease)
    assert svc.adapters.count(TENANT) == {}
    assert all(svc.index.get(ns.id, k) is None for k in keys)


def test_an_adapter_whose_kv_turns_hot_during_its_eviction_is_kept(harness: Harness,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    small_model(tmp_path / "sizes")
    write_adapter(tmp_path / "size-lora", SMALL_Q)
    # Room for the base and one adapter.
    capacity = area_bytes(tmp_path / "sizes")
    capacity += area_bytes(tmp_path / "size-lora", adapter=True)
    config = dataclasses.replace(make_config(harness.data_dir),
                                 weights=WeightsConfig(capacity_bytes=capacity))  # fmt: skip
    svc = CacheService(config)
    svc.start()
    harness.services.append(svc)
    base = _held(svc, tmp_path, "lora0")  # cold: no KV depends on it
    write_adapter(tmp_path / "lora1", SMALL_Q, seed=1)
    ns, _ = svc.open_namespace(TENANT, base, LAYOUT, adapter="lora0")
    keys = keys_for(ns.id, 2)
    delete = svc.adapters._delete

    def put_first(blocks):  # type: ignore[no-untyped-def]
        # lora0 was found cold; its KV is put (in memory: hot) before it is let go.
        svc.adapters._delete = delete  # type: ignore[method-assign]
        assert put_blocks(svc, ns.id, keys) == len(keys)
        delete(blocks)

    svc.adapters._delete = put_first  # type: ignore[method-assign]
    with pytest.raises(ResourceExhausted):
        svc.weights.register(TENANT, str(tmp_path / "lora1"), "", "lora1", False, "base")
    assert [v.registration.name for v in svc.weights.list(TENANT)] == ["base", "lora0"]
    assert all(svc.index.get(ns.id, k) is not None for k in keys)


def test_a_sequence_attends_no_more_once_its_adapter_is_dropped(harness: Harness,
                                                                tmp_path: Path) -> None:  # fmt: skip
    svc = harness.open()
    ns = _adapted(svc, tmp_path, "lora")
    keys = keys_for(ns.id, 2)
    assert put_blocks(svc, ns.id, keys) == len(keys)
    seq, cached = svc.attend.open_sequence(ns.id, keys)
    assert cached == 2 * LAYOUT.block_tokens
    q = torch.randn(1, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    (out, _), = svc.attend.attend([AttendCall(seq, 0, q)])  # fmt: skip
    assert torch.isfinite(out).all()
    svc.weights.drop(TENANT, "lora")
    with pytest.raises(FailedPrecondition, match="no longer held"):
        svc.attend.attend([AttendCall(seq, 0, q)])


def test_a_tail_sealed_after_its_adapter_was_dropped_is_not_cached(harness: Harness,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    svc = harness.open()
    ns = _adapted(svc, tmp_path, "lora")
    seq, _ = svc.attend.open_sequence(ns.id, [])
    store = svc.store_block

    def dropped_first(*args):  # type: ignore[no-untyped-def]
        # The drop lands after this attend call was let in, before its full tail is cached.
        svc.weights.drop(TENANT, "lora")
        return store(*args)

    svc.store_block = dropped_first  # type: ignore[method-assign]
    t = LAYOUT.block_tokens
    kv = torch.randn(LAYOUT.num_kv_heads, t, LAYOUT.head_dim)
    q = torch.randn(1, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    for layer in range(LAYOUT.num_layers):
        svc.attend.attend([AttendCall(seq, layer, q, kv, kv, tuple(range(t)) if layer == 0
                                      else ())])  # fmt: skip
    assert svc.adapters.count(TENANT) == {}
    assert len(svc.index) == 0
