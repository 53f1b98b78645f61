"""Attend in the core: any split of a sequence's blocks across tiers gives dense attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tierd.attention.attend import AttendCall
from tierd.config import Config, CsdConfig, HostTierConfig, NvmeTierConfig
from tierd.core.service import CacheService
from tierd.errors import InvalidArgument, NotFound
from tierd_client.keys import block_keys
from tierd_client.layout import KVLayout

LAYERS, KV_HEADS, GROUP, DIM, T = 3, 2, 3, 64, 16


def layout(dtype: str) -> KVLayout:
    return KVLayout(LAYERS, KV_HEADS, DIM, dtype, T)


def service(tmp_path, blocks: int, csd_workers: int = 0):
    """A started CacheService with room for `blocks` float32 blocks per tier (and per CSD
    worker), torn down completely after the test."""
    bb = layout("float32").block_bytes
    cfg = Config(
        data_dir=tmp_path / "data",
        host=HostTierConfig(capacity_bytes=blocks * bb, pin_memory=False),
        nvme=NvmeTierConfig(capacity_bytes=blocks * bb, io_threads=4),
        csd=CsdConfig(workers=csd_workers, capacity_bytes=blocks * bb),
    ).resolved()
    s = CacheService(cfg)
    s.start()
    yield s
    s.close()
    s.top.arena.destroy()


@pytest.fixture
def svc(tmp_path):
    yield from service(tmp_path, 256)


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Independent oracle in float64: q [qt, H, D], k/v [KVH, S, D]; causal for qt > 1."""
    q, k, v = q.double(), k.double(), v.double()
    qt, heads, dim = q.shape
    k = k.repeat_interleave(heads // k.shape[0], dim=0)
    v = v.repeat_interleave(heads // v.shape[0], dim=0)
    scores = torch.einsum("qhd,hsd->hqs", q, k) / dim**0.5
    s = k.shape[1]
    pos_q = torch.arange(s - qt, s)[:, None]
    scores = scores.masked_fill(torch.arange(s)[None, :] > pos_q, float("-inf"))
    return torch.einsum("hqs,hsd->qhd", torch.softmax(scores, dim=-1), v)


def put_sequence(svc: CacheService, lay: KVLayout, n_blocks: int, seed: int):
    """Random KV for n_blocks full blocks, stored through the put path."""
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, lay.dtype)
    kv = torch.randn(LAYERS, 2, KV_HEADS, n_blocks * T, DIM, generator=g).to(dt)
    ns, _ = svc.open_namespace("tenant", f"model-{lay.dtype}", lay)
    tokens = torch.randint(0, 30000, (n_blocks * T,), generator=g).numpy()
    keys = block_keys(ns.id, tokens, T)
    prepared = svc.prepare_put(ns.id, keys, lay.block_shape, lay.dtype)
    for i, slot in enumerate(prepared.slots):
        block = kv[:, :, :, i * T : (i + 1) * T].contiguous()
        raw = block.view(torch.uint8).numpy().reshape(-1)
        area = svc.leases.get(prepared.lease_id).area
        svc.staging.view(area, slot.offset, lay.block_bytes)[:] = raw.tobytes()
    svc.commit_put(prepared.lease_id)
    return ns, keys, tokens, kv


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attend_equals_dense_for_random_tier_splits(svc, dtype: str, tol: float, seed: int):
    lay = layout(dtype)
    n_blocks, tail = 9, 5
    ns, keys, _tokens, kv = put_sequence(svc, lay, n_blocks, seed)
    rng = np.random.default_rng(seed)
    to_nvme = [k for k in keys if rng.random() < 0.5]
    assert svc.move(ns.id, to_nvme, "nvme") == len(to_nvme)
    assert {svc.directory.best_name(svc.index.get(ns.id, k)) for k in to_nvme} <= {"nvme"}
    seq_id, cached = svc.attend.open_sequence(ns.id, keys)
    assert cached == n_blocks * T
    g = torch.Generator().manual_seed(100 + seed)
    dt = getattr(torch, dtype)
    tail_kv = torch.randn(LAYERS, 2, KV_HEADS, tail, DIM, generator=g).to(dt)
    for layer in range(LAYERS):
        q = torch.randn(tail, KV_HEADS * GROUP, DIM, generator=g)
        (out, lse), = svc.attend.attend([AttendCall(
            seq_id, layer, q, tail_kv[layer, 0], tail_kv[layer, 1],
            tuple(range(tail)) if layer == 0 else (),
        )])  # fmt: skip
        k_all = torch.cat([kv[layer, 0], tail_kv[layer, 0]], dim=1)
        v_all = torch.cat([kv[layer, 1], tail_kv[layer, 1]], dim=1)
        want = dense(q, k_all.float(), v_all.float())
        err = (out.double() - want).norm() / want.norm()
        assert err <= tol, f"layer {layer}: relative error {err:.2e}"
        assert lse.shape == (tail, KV_HEADS * GROUP)
    svc.attend.close_sequence(seq_id)
    assert all(e.readers == 0 for e in svc.index.entries())


def test_decode_steps_seal_the_tail_into_findable_blocks(svc):
    lay = layout("float32")
    ns, keys, tokens, kv = put_sequence(svc, lay, 2, seed=7)
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    g = torch.Generator().manual_seed(3)
    new_tokens = list(range(500, 500 + T + 3))
    new_kv = torch.randn(LAYERS, 2, KV_HEADS, len(new_tokens), DIM, generator=g)
    for step, tok in enumerate(new_tokens):
        for layer in range(LAYERS):
            q = torch.randn(1, KV_HEADS * GROUP, DIM, generator=g)
            (out, _), = svc.attend.attend([AttendCall(
                seq_id, layer, q, new_kv[layer, 0, :, step : step + 1],
                new_kv[layer, 1, :, step : step + 1], (tok,) if layer == 0 else (),
            )])  # fmt: skip
            k_all = torch.cat([kv[layer, 0], new_kv[layer, 0, :, : step + 1]], dim=1)
            v_all = torch.cat([kv[layer, 1], new_kv[layer, 1, :, : step + 1]], dim=1)
            want = dense(q, k_all, v_all)
            assert (out.double() - want).norm() / want.norm() <= 1e-5
    full = np.concatenate([tokens, new_tokens])
    assert svc.lookup(ns.id, full).cached_tokens == 3 * T  # the sealed block is findable
    sealed_key = block_keys(ns.id, full, T)[2]
    entry = svc.index.get(ns.id, sealed_key)
    raw = bytes(svc.top.view("tenant", entry.copies["host"].location, lay.block_bytes))
    sealed = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(lay.block_shape)
    assert torch.equal(sealed, new_kv[:, :, :, :T])
    svc.attend.close_sequence(seq_id)


def test_attend_rejects_bad_calls(svc):
    lay = layout("float32")
    ns, keys, _, _ = put_sequence(svc, lay, 1, seed=1)
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    q = torch.randn(1, KV_HEADS * GROUP, DIM)
    cases = [
        (AttendCall(seq_id, LAYERS, q), "items[0].layer"),
        (AttendCall(seq_id, 0, torch.randn(1, 5, DIM)), "items[0].q"),
        (AttendCall(seq_id, 0, torch.randn(1, KV_HEADS, DIM + 1)), "items[0].q"),
        (AttendCall(seq_id, 0, torch.randn(3, KV_HEADS, DIM)), "items[0].q"),
        (AttendCall(seq_id, 0, q, torch.randn(KV_HEADS, 1, DIM), torch.randn(KV_HEADS, 1, DIM)),
         "new_tokens"),
    ]
    for call, field in cases:
        with pytest.raises(InvalidArgument) as info:
            svc.attend.attend([call])
        assert info.value.field == field
    with pytest.raises(NotFound):
        svc.attend.attend([AttendCall(seq_id + 1, 0, q)])
    svc.attend.close_sequence(seq_id)
    with pytest.raises(NotFound):
        svc.attend.close_sequence(seq_id)
