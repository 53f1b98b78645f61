"""A new tier kind is one module and one registration: a kind defined here, storing copies in
a dict of bytes, runs as the second tier of a daemon's chain with no change to the core.
Demotion, promotion, explicit moves, attend's layer reads, corrupt copies, restart and the
per-tier stats all work through the `Tier` protocol alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tierd.attention.attend import AttendCall
from tierd.config import Config, TierSpec
from tierd.core.service import CacheService
from tierd.errors import ConfigError
from tierd.tiers import registry
from tierd_client.keys import block_keys
from tierd_client.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32", block_tokens=8)
BB = LAYOUT.block_bytes

@pytest.fixture
def kind() -> Iterator[None]:
    registry.KINDS["dict"] = "tests.tiers.dict_tier:DictTier"
    yield
    del registry.KINDS["dict"]


def chain(data_dir: Path, host_blocks: int, dict_blocks: int) -> Config:
    return Config(data_dir=data_dir, tier_list=(
        TierSpec("mem", "host", host_blocks * BB, options=(("pin_memory", False),)),
        TierSpec("far", "dict", dict_blocks * BB, path=data_dir / "far",
                 options=(("slot_bytes", BB),)),
    )).resolved()  # fmt: skip


def put(svc: CacheService, ns: bytes, keys: list[bytes], data: dict[bytes, bytes]) -> None:
    prepared = svc.prepare_put(ns, keys, LAYOUT.block_shape, LAYOUT.dtype)
    area = svc.leases.get(prepared.lease_id).area
    for key, slot in zip(keys, prepared.slots):
        svc.staging.view(area, slot.offset, BB)[:] = data[key]
    svc.commit_put(prepared.lease_id)


def get(svc: CacheService, ns: bytes, keys: list[bytes]) -> list[bytes | None]:
    prepared = svc.prepare_get(ns, keys)
    info = svc.namespace(ns)
    try:
        return [bytes(svc.view(info, s.offset)) if s.found else None for s in prepared.slots]
    finally:
        svc.release(prepared.lease_id)


def test_a_registered_kind_runs_as_a_tier_of_the_chain(kind: None, tmp_path: Path) -> None:
    cfg = chain(tmp_path / "data", host_blocks=4, dict_blocks=32)
    svc = CacheService(cfg)
    svc.start()
    try:
        ns = svc.open_namespace("t", "m", LAYOUT)[0].id
        rng = np.random.default_rng(0)
        kv = torch.from_numpy(rng.standard_normal((2, 2, 2, 12 * 8, 32), dtype=np.float32))
        keys = block_keys(ns, np.arange(12 * 8), 8)
        data = {k: kv[:, :, :, i * 8 : (i + 1) * 8].contiguous().numpy().tobytes()
                for i, k in enumerate(keys)}  # fmt: skip
        for i in range(0, 12, 2):  # three times what memory holds: demoted into "far"
            put(svc, ns, keys[i : i + 2], data)
            assert svc.placer.settle(10)
        where = svc.locate(ns, keys)
        assert set(where) == {"mem", "far"} and where.count("far") >= 8
        stats = {t.name: t for t in svc.stats().tiers}
        assert stats["far"].kind == "dict" and stats["far"].blocks == where.count("far")
        assert stats["far"].counters.bytes_written >= 8 * BB

        # Attend reads one layer of each "far" block through read_range: exact attention.
        seq, cached = svc.attend.open_sequence(ns, keys)
        assert cached == 12 * 8
        q = torch.randn(1, 4, 32)
        (out, _), = svc.attend.attend([AttendCall(seq, 1, q)])  # fmt: skip
        k, v = kv[1, 0].repeat_interleave(2, 0), kv[1, 1].repeat_interleave(2, 0)
        p = torch.softmax(torch.einsum("qhd,hkd->hqk", q, k) / 32**0.5, -1)
        want = torch.einsum("hqk,hkd->qhd", p, v)
        assert torch.allclose(out, want, atol=1e-5)
        svc.attend.close_sequence(seq)

        # Gets promote from it, byte-exact; a move puts blocks back into it.
        assert get(svc, ns, keys[:2]) == [data[k] for k in keys[:2]]
        assert svc.move(ns, keys[:2], "far") == 2 and svc.locate(ns, keys[:2]) == ["far"] * 2

        # A copy damaged in the new tier is caught by the core's checks, dropped, counted.
        victim = keys[0]
        copy = svc.index.get(ns, victim).copies["far"]
        store = svc.tiers.get("far").store
        store[int(copy.location)] = b"\0" * BB
        assert get(svc, ns, [victim]) == [None]
        assert svc.index.get(ns, victim) is None and svc.stats().corrupt_reads == 1
    finally:
        svc.close()
        svc.top.arena.destroy()

    # Restart: the catalog's copies in "far" are adopted through the kind's `adopt`.
    svc = CacheService(cfg)
    svc.start()
    try:
        assert svc.locate(ns, keys[1:2]) == ["far"]
        assert get(svc, ns, keys[1:2]) == [data[keys[1]]]
    finally:
        svc.close()
        svc.top.arena.destroy()


def test_a_kind_checks_its_own_keys(kind: None, tmp_path: Path) -> None:
    bad = Config(data_dir=tmp_path, tier_list=(
        TierSpec("mem", "host", 4 * BB), TierSpec("far", "dict", 4 * BB, options=(("slot", 3),)),
    ))  # fmt: skip
    with pytest.raises(ConfigError, match=r"tiers\[1\]\.slot.*its own keys: slot_bytes"):
        bad.validate()
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.kind.*memory tier"):
        Config(data_dir=tmp_path, tier_list=(TierSpec("far", "dict", 4 * BB),)).validate()
