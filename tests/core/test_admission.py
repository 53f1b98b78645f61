"""A slower tier's admission filter, as the daemon runs it: with TinyLFU on NVMe, blocks put
once and never read do not displace blocks read again and again; with LRU they do."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.core.conftest import BB, LAYOUT, Harness, keys_for, make_config, put_blocks
from tierd.core.service import CacheService
from tierd.tiers.io_backend import ALIGNMENT

NVME_BLOCKS = 4


@pytest.mark.parametrize(("policy", "kept"), [("tinylfu", True), ("lru", False)])
def test_one_off_blocks_do_not_displace_hot_ones_under_tinylfu(
    harness: Harness, policy: str, kept: bool
) -> None:
    cfg = make_config(harness.data_dir, host_blocks=8)
    # Room for exactly NVME_BLOCKS blocks, each with its header page.
    nvme = replace(cfg.nvme, capacity_bytes=NVME_BLOCKS * (BB + ALIGNMENT), policy=policy)
    svc = CacheService(replace(cfg, nvme=nvme))
    svc.start()
    harness.services.append(svc)
    ns = svc.open_namespace("t", "m", LAYOUT)[0].id
    keys = keys_for(ns, NVME_BLOCKS + 8)
    hot, once = keys[:NVME_BLOCKS], keys[NVME_BLOCKS:]
    put_blocks(svc, ns, hot)
    assert svc.move(ns, hot, "nvme") == NVME_BLOCKS  # NVMe is full of them
    for _ in range(4):  # read again and again (each get promotes them; NVMe keeps its copy)
        svc.release(svc.prepare_get(ns, hot).lease_id)
    for i in range(0, len(once), 2):  # then blocks nobody reads push host over its watermark
        put_blocks(svc, ns, once[i : i + 2])
        assert svc.placer.settle(10)
    where = dict(zip(keys, svc.locate(ns, keys)))
    in_nvme = {k for k in keys if (e := svc.index.get(ns, k)) and "nvme" in e.copies}
    if kept:
        assert in_nvme == set(hot)  # every hot block kept its NVMe copy
        assert not any(where[k] == "nvme" for k in once)  # one-off blocks were turned away
    else:
        # LRU admits whatever is demoted: one-off blocks took NVMe space from hot ones.
        assert any(where[k] == "nvme" for k in once)
        assert not set(hot) <= in_nvme
