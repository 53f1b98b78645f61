"""Attend over host, NVMe and CSD workers at once; a killed worker never yields a wrong
answer, and its blocks serve again once the pool has restarted it."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch

from tests.attention.test_attend_core import (
    DIM,
    GROUP,
    KV_HEADS,
    LAYERS,
    dense,
    layout,
    put_sequence,
    service,
)
from tierd.attention.attend import AttendCall
from tierd.core.service import CacheService
from tierd.errors import FailedPrecondition, Unavailable


@pytest.fixture
def svc(tmp_path):
    yield from service(tmp_path, 128, csd_workers=2)


def check(svc: CacheService, seq_id: int, kv: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for layer in range(LAYERS):
        q = torch.randn(1, KV_HEADS * GROUP, DIM, generator=g)
        ((out, _),) = svc.attend.attend([AttendCall(seq_id, layer, q)])
        want = dense(q, kv[layer, 0], kv[layer, 1])
        err = (out.double() - want).norm() / want.norm()
        assert err <= 1e-5, f"layer {layer}: relative error {err:.2e}"


def test_three_tier_split_equals_dense_and_survives_a_killed_worker(svc: CacheService) -> None:
    lay = layout("float32")
    ns, keys, _, kv = put_sequence(svc, lay, 12, seed=5)
    rng = np.random.default_rng(5)
    where = rng.choice(["host", "nvme", "csd"], size=len(keys))
    for tier in ("nvme", "csd"):
        chosen = [k for k, t in zip(keys, where) if t == tier]
        assert svc.move(ns.id, chosen, tier) == len(chosen)
    assert {svc.directory.best_name(e) for e in (svc.index.get(ns.id, k) for k in keys)} == {"host", "nvme", "csd"}
    workers = {c.location for k in keys if (c := svc.index.get(ns.id, k).copies.get("csd"))}
    assert workers == {"w0", "w1"}  # round robin spread the blocks over both
    seq_id, _ = svc.attend.open_sequence(ns.id, keys)
    check(svc, seq_id, kv, seed=1)

    pid = svc.tiers.get("csd").pool.info("w0").pid
    os.kill(pid, signal.SIGKILL)
    q = torch.randn(1, KV_HEADS * GROUP, DIM)
    deadline = time.monotonic() + 30
    saw_error = False
    while time.monotonic() < deadline:
        try:
            ((out, _),) = svc.attend.attend([AttendCall(seq_id, 0, q)])
        except (Unavailable, FailedPrecondition):
            saw_error = True  # refused while w0 is down: never a partial answer
            if svc.tiers.get("csd").pool.healthy("w0") and svc.tiers.get("csd").pool.info("w0").pid != pid:
                break
            continue
        # Any answer given must be the dense one (the worker may already be back).
        want = dense(q, kv[0, 0], kv[0, 1])
        assert (out.double() - want).norm() / want.norm() <= 1e-5
        if svc.tiers.get("csd").pool.info("w0").pid != pid:
            break
    assert saw_error or svc.tiers.get("csd").pool.info("w0").pid != pid
    assert svc.tiers.get("csd").pool.healthy("w0"), "the pool restarts a killed worker"
    check(svc, seq_id, kv, seed=2)  # its shard came back intact
    svc.attend.close_sequence(seq_id)
    # A get of CSD-resident blocks stages them back into host, byte-exact.
    csd_keys = [k for k, t in zip(keys, where) if t == "csd"][:3]
    prepared = svc.prepare_get(ns.id, csd_keys)
    assert all(s.found and s.tier == "csd" for s in prepared.slots)
    svc.release(prepared.lease_id)
