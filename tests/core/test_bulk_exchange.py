"""The exchange area under a real CacheService and a real Mooncake engine (TCP loopback):
what it holds counts against the tenant's lease bytes, and closing it (the daemon's
shutdown) neither breaks a lease that ends afterwards nor pulls the mapping from under a
call still in flight."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.mooncake_master import needs_mooncake
from tierd.config import Config, HostTierConfig, LimitsConfig, NvmeTierConfig
from tierd.core.bulk import Bulk, Source
from tierd.core.service import CacheService
from tierd.errors import ResourceExhausted, Unavailable
from tierd.transfer.exchange import ExchangeArea
from tierd.transfer.p2p import PeerEngine
from tierd_client.keys import block_keys
from tierd_client.layout import KVLayout

pytestmark = needs_mooncake
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
BB = LAYOUT.block_bytes


@pytest.fixture
def open_bulk(tmp_path: Path) -> Iterator[Callable[..., tuple[CacheService, Bulk]]]:
    opened: list[tuple[CacheService, Bulk]] = []

    def open_bulk(**limits: int) -> tuple[CacheService, Bulk]:
        cfg = Config(
            data_dir=tmp_path / "data",
            host=HostTierConfig(capacity_bytes=64 * BB, pin_memory=False),
            nvme=NvmeTierConfig(capacity_bytes=256 * BB, io_threads=2),
            limits=dataclasses.replace(LimitsConfig(), **limits),
        ).resolved()
        svc = CacheService(cfg)
        svc.start()
        bulk = Bulk(svc, ExchangeArea(PeerEngine.open("127.0.0.1", "tcp"), 32 * BB))
        svc.bulk = bulk
        opened.append((svc, bulk))
        return svc, bulk

    yield open_bulk
    for svc, bulk in opened:
        svc.bulk = None
        bulk.close()
        svc.close()
        svc.top.arena.destroy()


def stored(svc: CacheService, n: int, seed: int = 0) -> tuple[bytes, list[bytes]]:
    ns, _ = svc.open_namespace("alpha", "m", LAYOUT)
    tokens = np.random.default_rng(seed).integers(0, 50_000, n * LAYOUT.block_tokens)
    keys = block_keys(ns.id, tokens, LAYOUT.block_tokens)
    for i, key in enumerate(keys):  # one at a time: within any lease-bytes limit
        writer = svc.begin_inband_put(ns.id, [key], LAYOUT.block_shape, LAYOUT.dtype)
        writer.write(np.full(BB, i + 1, np.uint8).tobytes())
        writer.finish()
    return ns.id, keys


def test_blocks_in_the_exchange_area_count_against_the_lease_bytes(
    open_bulk: Callable[..., tuple[CacheService, Bulk]],
) -> None:
    """A BulkGet's lease holds its exchange slots until Release: those bytes are the
    tenant's, as the memory copies it pinned before were, so a tenant cannot fill the
    area every tenant shares beyond its lease bytes."""
    svc, bulk = open_bulk(max_lease_bytes_per_tenant=2 * BB)
    ns_id, keys = stored(svc, 4)
    lent = bulk.lend(ns_id, keys[:2], 0)
    assert bulk.area.used_bytes >= 2 * BB
    with pytest.raises(ResourceExhausted) as err:
        bulk.lend(ns_id, keys[2:], 0)
    assert err.value.field == "limits.max_lease_bytes_per_tenant"
    assert svc.release(lent.lease_id)
    assert bulk.area.used_bytes == 0
    svc.release(bulk.lend(ns_id, keys[2:], 0).lease_id)


def test_a_lease_that_ends_after_the_area_closed_ends_cleanly(
    open_bulk: Callable[..., tuple[CacheService, Bulk]],
) -> None:
    """The daemon closes the clients' engine before the core: a BulkGet lease still open
    then expires in the reaper, which must end it (and every other lease expiring with it)
    rather than fail on the closed area."""
    svc, bulk = open_bulk()
    ns_id, keys = stored(svc, 3)
    lent = bulk.lend(ns_id, keys[:2], 0)
    other = svc.prepare_get(ns_id, keys[2:], 0)
    bulk.close()
    svc.reap(now=time.monotonic() + 3600)
    assert svc.leases.get(lent.lease_id) is None and svc.leases.get(other.lease_id) is None
    entry = svc.index.get(ns_id, keys[2])
    assert entry is not None and entry.readers == 0


def test_closing_keeps_slots_lent_to_a_client_mapped(
    open_bulk: Callable[..., tuple[CacheService, Bulk]],
) -> None:
    """A client may be reading a lent slot through the engine when the daemon closes the
    area: the engine refuses new reads from then on, but the one under way still reads
    that memory, so it stays mapped; an area with nothing lent is unmapped."""
    svc, bulk = open_bulk()
    ns_id, keys = stored(svc, 2)
    lent = bulk.lend(ns_id, keys, 0)
    bulk.close()
    assert not bulk.area._map.closed
    assert svc.release(lent.lease_id)
    idle = ExchangeArea(PeerEngine.open("127.0.0.1", "tcp"), 4 * BB)
    idle.give(idle.take(BB) or 0, BB)
    idle.close()
    assert idle._map.closed


def test_closing_waits_for_a_put_reading_into_its_slots(
    open_bulk: Callable[..., tuple[CacheService, Bulk]],
) -> None:
    """A BulkPut whose engine read is under way has the engine writing into its exchange
    slots: closing the area must not unmap them under it (the read would write into
    memory no longer mapped), and the put still ends as a failed read."""
    svc, bulk = open_bulk()
    ns, _ = svc.open_namespace("alpha", "m", LAYOUT)
    keys = block_keys(ns.id, list(range(LAYOUT.block_tokens)), LAYOUT.block_tokens)
    hung = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(hung.accept()[0]), daemon=True).start()
    failed: list[BaseException] = []
    source = Source(f"127.0.0.1:{hung.getsockname()[1]}", "tcp", 1 << 20, BB)

    def put() -> None:
        try:
            bulk.put(ns.id, keys, LAYOUT.block_shape, LAYOUT.dtype, source, [0])
        except BaseException as e:  # noqa: BLE001 - examined below
            failed.append(e)

    t = threading.Thread(target=put)
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not accepted:
            assert time.monotonic() < deadline, "the put never reached the client's engine"
            time.sleep(0.01)
        closer = threading.Thread(target=bulk.close)
        closer.start()
        closer.join(0.5)
        assert not bulk.area._map.closed, "the area was unmapped under a running read"
        accepted[0].close()
        t.join(60)
        closer.join(30)
        assert not t.is_alive() and not closer.is_alive()
        assert len(failed) == 1 and isinstance(failed[0], Unavailable), failed
        assert bulk.area._map.closed
    finally:
        for conn in accepted:
            conn.close()
        hung.close()


def test_a_get_the_area_cannot_hold_is_refused_before_it_reads_anything(
    open_bulk: Callable[..., tuple[CacheService, Bulk]],
) -> None:
    """More blocks than the free part of the area: RESOURCE_EXHAUSTED on `exchange`
    before any block is promoted or counted, since the client makes the same call in-band
    next and that one counts its hits (a lent slot holds the rest of the area here)."""
    svc, bulk = open_bulk()
    ns_id, keys = stored(svc, 31)
    lent = bulk.lend(ns_id, keys[:30], 0)
    hits, misses = svc.counters.tier("host").hits, svc.counters.misses
    with pytest.raises(ResourceExhausted) as err:
        bulk.lend(ns_id, keys[:3] + [b"\0" * 16], 0)
    assert err.value.field == "exchange"
    assert (svc.counters.tier("host").hits, svc.counters.misses) == (hits, misses)
    assert svc.release(lent.lease_id) and bulk.area.used_bytes == 0


def test_the_clients_time_to_read_starts_after_the_copy(
    open_bulk: Callable[..., tuple[CacheService, Bulk]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy into the exchange area that takes most of the lease's TTL (here a clock that
    jumps 9 s while the blocks are copied, of a 10 s TTL) still leaves the client the whole
    TTL to read them, rather than slots zeroed by an expiry right after."""
    import tierd.core.bulk as bulk_module

    svc, bulk = open_bulk()
    ns_id, keys = stored(svc, 2)
    clock = [time.monotonic()]
    monkeypatch.setattr(bulk_module.time, "monotonic", lambda: clock[0])
    view = bulk.area.view

    def slow_view(offset: int, nbytes: int) -> memoryview:
        clock[0] += 4.5  # each block's copy takes 4.5 s of the clock
        return view(offset, nbytes)

    monkeypatch.setattr(bulk.area, "view", slow_view)
    lent = bulk.lend(ns_id, keys, 10_000)
    with svc.cond:
        lease = svc.leases.get(lent.lease_id)
        assert lease is not None and lease.deadline >= clock[0] + 10.0 - 1.0
