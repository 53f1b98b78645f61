"""A slow catalog commit or a slow NVMe read holds only the calls that wait for it: lookups,
reads of other blocks and stats go on meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from tests.core.conftest import (
    LAYOUT,
    Harness,
    block_bytes_for,
    get_blocks,
    keys_for,
    put_blocks,
)
from tierd.core.service import CacheService

STUCK_S = 30.0  # what a stuck I/O would cost the calls below if they waited on it
QUICK_S = 10.0  # each unrelated call must finish well within this, however loaded


class Gate:
    """Makes one function block (the next time it runs) until opened."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.entered = threading.Event()
        self.opened = threading.Event()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.entered.is_set():
            self.entered.set()
            self.opened.wait(STUCK_S)
        return self.fn(*args, **kwargs)


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    t.start()
    return t, out


def unrelated_calls_finish(svc: CacheService, ns: bytes, keys: list[bytes]) -> None:
    """Lookup, get and stats of blocks already cached, each in well under a stuck I/O."""
    for call in (
        lambda: svc.lookup(ns, _tokens(keys)),
        lambda: get_blocks(svc, ns, keys),
        svc.stats,
        lambda: svc.locate(ns, keys),
    ):
        t, out = in_thread(call)
        t.join(QUICK_S)
        assert not t.is_alive(), "a call unrelated to the stuck I/O waited for it"
        assert out


def _tokens(keys: list[bytes]) -> list[int]:
    return list(range(len(keys) * LAYOUT.block_tokens))


@pytest.fixture
def svc(harness: Harness) -> CacheService:
    return harness.open(host_blocks=16, nvme_blocks=64)


def test_a_stuck_catalog_commit_holds_only_its_put(svc: CacheService, monkeypatch) -> None:
    ns_b = svc.open_namespace("b", "m", LAYOUT)[0].id
    cached = keys_for(ns_b, 4, seed=1)
    put_blocks(svc, ns_b, cached)
    ns_a = svc.open_namespace("a", "m", LAYOUT)[0].id
    new = keys_for(ns_a, 2, seed=2)

    gate = Gate(svc.catalog.run)
    monkeypatch.setattr(svc.catalog, "run", gate)
    putter, done = in_thread(lambda: put_blocks(svc, ns_a, new))
    assert gate.entered.wait(QUICK_S), "the put never reached the catalog"
    try:
        unrelated_calls_finish(svc, ns_b, cached)
        assert putter.is_alive() and svc.locate(ns_a, new) == ["", ""]  # not visible yet
    finally:
        gate.opened.set()
    putter.join(QUICK_S)
    assert done == [2]
    assert get_blocks(svc, ns_a, new) == [block_bytes_for(k) for k in new]


def test_a_stuck_nvme_read_holds_only_its_get(svc: CacheService, monkeypatch) -> None:
    ns = svc.open_namespace("t", "m", LAYOUT)[0].id
    cold = keys_for(ns, 2, seed=3)
    put_blocks(svc, ns, cold)
    assert svc.move(ns, cold, "nvme") == 2
    hot = keys_for(ns, 4, seed=4)
    put_blocks(svc, ns, hot)

    nvme = svc.tiers.get("nvme")
    gate = Gate(nvme.read)
    monkeypatch.setattr(nvme, "read", gate)
    reader, got = in_thread(lambda: get_blocks(svc, ns, cold[:1]))
    assert gate.entered.wait(QUICK_S), "the get never reached the NVMe tier"
    try:
        unrelated_calls_finish(svc, ns, hot)
        assert reader.is_alive()
    finally:
        gate.opened.set()
    reader.join(QUICK_S)
    assert got == [[block_bytes_for(cold[0])]]
