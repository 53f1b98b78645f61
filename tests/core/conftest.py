"""A real CacheService on a temporary data dir, with small tiers, torn down completely."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierd.config import Config, HostTierConfig, NvmeTierConfig
from tierd.core.service import CacheService
from tierd_client.keys import block_keys
from tierd_client.layout import KVLayout

# 2 layers x 2 (K|V) x 2 heads x 16 tokens x 64 dim x fp16 = 16 KiB per block
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
BB = LAYOUT.block_bytes


def make_config(data_dir: Path, host_blocks: int = 64, nvme_blocks: int = 256) -> Config:
    return Config(
        data_dir=data_dir,
        host=HostTierConfig(capacity_bytes=host_blocks * BB, pin_memory=False),
        nvme=NvmeTierConfig(capacity_bytes=nvme_blocks * BB, io_threads=4),
    ).resolved()


class Harness:
    """Opens services on one data dir; every one it opened is closed at the end."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.services: list[CacheService] = []

    def open(self, **sizes: int) -> CacheService:
        svc = CacheService(make_config(self.data_dir, **sizes))
        svc.start()
        self.services.append(svc)
        return svc

    def close_all(self, destroy: bool = False) -> None:
        for svc in self.services:
            svc.close()
        if destroy:
            for svc in self.services:
                svc.top.arena.destroy()
        self.services.clear()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path / "data")
    yield h
    h.close_all(destroy=True)


def block_bytes_for(key: bytes) -> bytes:
    """Deterministic content for a key, so any mix-up is detectable."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.integers(0, 256, BB, dtype=np.uint8).tobytes()


def slot_view(svc: CacheService, lease_id: int, offset: int, nbytes: int = BB) -> memoryview:
    """Where a local client writes a put slot: the lease's staging area."""
    return svc.staging.view(svc.leases.get(lease_id).area, offset, nbytes)


def put_blocks(svc: CacheService, ns_id: bytes, keys: list[bytes]) -> int:
    """The shared-memory put protocol, done the way a local client does it."""
    prepared = svc.prepare_put(ns_id, keys, LAYOUT.block_shape, LAYOUT.dtype)
    for key, slot in zip(keys, prepared.slots):
        if slot.state == "leased":
            slot_view(svc, prepared.lease_id, slot.offset)[:] = block_bytes_for(key)
    return svc.commit_put(prepared.lease_id) if prepared.lease_id else 0


def get_blocks(svc: CacheService, ns_id: bytes, keys: list[bytes]) -> list[bytes | None]:
    prepared = svc.prepare_get(ns_id, keys)
    ns = svc.namespace(ns_id)
    try:
        return [bytes(svc.view(ns, s.offset)) if s.found else None for s in prepared.slots]
    finally:
        svc.release(prepared.lease_id)


def keys_for(ns_id: bytes, n_blocks: int, seed: int = 0) -> list[bytes]:
    tokens = np.random.default_rng(seed).integers(0, 50_000, n_blocks * LAYOUT.block_tokens)
    return block_keys(ns_id, tokens, LAYOUT.block_tokens)
