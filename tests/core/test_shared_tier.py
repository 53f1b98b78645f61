"""Shared tiers in the core, step by step: what the directory records for a block found in a
shared tier, and how lookup, get, write-through and eviction treat such tiers, through a
tier kind defined in the tests (tests/tiers/shared_dict_tier.py: one dict that several
services of this process share, as daemons share a cluster). No kind is named in the core:
these steps hold for any tier with `shared = True`."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from tests.core.test_directory import BB as DIR_BB
from tests.core.test_directory import Books, ns_of
from tests.tiers import shared_dict_tier
from tests.tiers.test_tier_kind_registration import get, put
from tierd.config import Config, TierSpec
from tierd.core.catalog import CopyRow
from tierd.core.service import CacheService
from tierd.tiers import registry
from tierd.tiers.base import Copy, Found
from tierd_client.keys import block_keys
from tierd_client.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype="float32", block_tokens=8)
BB = LAYOUT.block_bytes
TOKENS = LAYOUT.block_tokens


@pytest.fixture
def books(tmp_path: Path) -> Iterator[Books]:
    b = Books(tmp_path / "index.sqlite3")
    with closing(b.catalog):
        yield b


def test_a_found_block_is_a_new_entry_whose_one_copy_is_the_shared_one(books: Books) -> None:
    ns = ns_of("a")
    found = Found("found", DIR_BB, 0xABC, (1, 2))
    with books.dir.cond:
        (entry,) = books.dir.add_found(ns, [(b"f1", found, Copy("far", "found", DIR_BB, 0xABC))],
                                       now=5.0)  # fmt: skip
        assert books.dir.index.get(ns.id, b"f1") is entry
        assert (entry.checksum, entry.layer_sums, entry.nbytes) == (0xABC, (1, 2), DIR_BB)
        assert list(entry.copies) == ["far"] and books.dir.best_name(entry) == "far"
        assert books.dir.blocks_in("far") == 1 and books.dir.usage("far") == {"a": DIR_BB}
        assert books.dir.counters.tier("far").bytes_written == 0  # nothing was written
    rows = books.rows()  # on record (committed behind), as the copy's location says
    assert rows == {b"f1": (CopyRow("far", "found", DIR_BB, 0xABC),)}

    # A key cached meanwhile, or being put, stays the local one: nothing is added.
    books.put("a", b"k1", 4096)
    with books.dir.cond:
        books.dir.pending.add((ns.id, b"k2"))
        added = books.dir.add_found(ns, [
            (b"k1", found, Copy("far", "found", DIR_BB, 0xABC)),
            (b"k2", found, Copy("far", "found", DIR_BB, 0xABC)),
        ])  # fmt: skip
        assert added == [] and books.dir.index.get(ns.id, b"k2") is None
        assert list(books.dir.index.get(ns.id, b"k1").copies) == ["mem"]

        # Evicted from the shared tier, its copy is released like any other (the tier
        # decides that a found copy is only forgotten), and the block leaves the cache.
        books.dir.evict(entry, "far")
        assert books.released == [(b"f1", "far", "found")] and entry.deleted
    assert b"f1" not in books.rows()


# -- through services sharing one store -----------------------------------------------------


@pytest.fixture
def shared_kind() -> Iterator[None]:
    registry.KINDS["shared"] = "tests.tiers.shared_dict_tier:SharedTier"
    yield
    del registry.KINDS["shared"]
    shared_dict_tier.STORES.clear()


@pytest.fixture
def daemons(shared_kind: None, tmp_path: Path) -> Iterator[Callable[..., CacheService]]:
    started: list[CacheService] = []

    def start(name: str, write: str = "demote", host_blocks: int = 32) -> CacheService:
        cfg = Config(data_dir=tmp_path / name, tier_list=(
            TierSpec("mem", "host", host_blocks * BB, options=(("pin_memory", False),)),
            TierSpec("far", "shared", 64 * BB, path=tmp_path / "store",
                     options=(("write", write),)),
        )).resolved()  # fmt: skip
        svc = CacheService(cfg)
        svc.start()
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.close()
        svc.top.arena.destroy()


def blocks(ns: bytes, n: int) -> tuple[list[bytes], dict[bytes, bytes]]:
    keys = block_keys(ns, np.arange(n * TOKENS), TOKENS)
    return keys, {k: np.random.default_rng(i).bytes(BB) for i, k in enumerate(keys)}


def poll(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_a_daemon_finds_the_prefix_another_wrote_through(
    daemons: Callable[..., CacheService], tmp_path: Path
) -> None:
    a, b = daemons("a", write="through"), daemons("b")
    store = shared_dict_tier.STORES[str(tmp_path / "store")]
    ns = a.open_namespace("t", "m", LAYOUT)[0].id
    keys, data = blocks(ns, 5)
    put(a, ns, keys, data)
    # Written through at once (memory keeps its copy), not when memory demotes them.
    poll(lambda: a.stats().tiers[1].blocks == 5, "write-through copies")
    assert a.locate(ns, keys) == ["mem"] * 5 and store.writes == 5

    assert b.open_namespace("t", "m", LAYOUT)[0].id == ns
    res = b.lookup(ns, np.arange(5 * TOKENS + 3))
    assert res.cached_tokens == 5 * TOKENS and [t for _, t in res.blocks] == ["far"] * 5
    assert store.finds == [5]  # one call for the keys past the (empty) local prefix
    # Promoted in the background before anyone asks; the get is byte-exact.
    poll(lambda: b.locate(ns, keys) == ["mem"] * 5, "background promotion")
    assert get(b, ns, keys) == [data[k] for k in keys]
    stats = b.stats()
    assert stats.tiers[1].counters.hits == 0 and stats.promotions == 5 and stats.misses == 0

    # b forgets its found copies without deleting them: a still reads them after.
    assert b.move(ns, keys, "far") == 5 and b.delete(ns, keys) == 5
    assert len(store.values) == 5
    assert a.move(ns, keys[:1], "far") == 1 and get(a, ns, keys[:1]) == [data[keys[0]]]


def test_a_lookup_continues_its_local_prefix_there_and_stops_at_the_first_miss(
    daemons: Callable[..., CacheService], tmp_path: Path
) -> None:
    a, b = daemons("a", write="through"), daemons("b")
    store = shared_dict_tier.STORES[str(tmp_path / "store")]
    ns = a.open_namespace("t", "m", LAYOUT)[0].id
    b.open_namespace("t", "m", LAYOUT)
    keys, data = blocks(ns, 8)
    put(b, ns, keys[:2], data)  # b holds 0-1 itself (demote: never written to the store)
    put(a, ns, keys[2:5] + keys[6:], data)  # the store holds 2-4 and 6-7, not 5
    poll(lambda: len(store.values) == 5, "write-through copies")
    res = b.lookup(ns, np.arange(8 * TOKENS))
    assert [t for _, t in res.blocks] == ["mem", "mem", "far", "far", "far"]
    assert res.cached_tokens == 5 * TOKENS and b.stats().misses == 1
    assert store.finds == [6]  # keys 2-7 in one call
    assert b.locate(ns, keys[5:]) == ["", "", ""]  # nothing past the miss was adopted


def test_a_shared_tier_that_is_down_is_not_asked_and_its_copies_are_misses(
    daemons: Callable[..., CacheService], tmp_path: Path
) -> None:
    a, b = daemons("a", write="through"), daemons("b")
    store = shared_dict_tier.STORES[str(tmp_path / "store")]
    ns = a.open_namespace("t", "m", LAYOUT)[0].id
    b.open_namespace("t", "m", LAYOUT)
    keys, data = blocks(ns, 3)
    put(a, ns, keys, data)
    poll(lambda: len(store.values) == 3, "write-through copies")
    assert b.lookup(ns, np.arange(3 * TOKENS)).cached_tokens == 3 * TOKENS
    store.down = True
    assert b.move(ns, keys, "far") == 3  # only copies there now
    t0 = time.monotonic()
    assert get(b, ns, keys) == [None, None, None]  # misses, at once, no error
    assert time.monotonic() - t0 < 1.0
    assert b.locate(ns, keys) == ["far"] * 3  # kept: the store may come back
    asked = len(store.finds)
    assert b.lookup(ns, np.arange(3 * TOKENS)).cached_tokens == 3 * TOKENS  # local books
    b.delete(ns, keys)
    assert b.lookup(ns, np.arange(3 * TOKENS)).cached_tokens == 0
    assert len(store.finds) == asked  # a tier that is down is not asked
    store.down = False
    assert get(b, ns, keys) == [None] * 3  # deleted here; the store still has a's copies
    assert b.lookup(ns, np.arange(3 * TOKENS)).cached_tokens == 3 * TOKENS


def test_demote_mode_writes_only_what_memory_demotes_and_through_mode_never_twice(
    daemons: Callable[..., CacheService], tmp_path: Path
) -> None:
    demoting = daemons("d", host_blocks=4)
    ns = demoting.open_namespace("t", "m", LAYOUT)[0].id
    keys, data = blocks(ns, 8)
    store = shared_dict_tier.STORES[str(tmp_path / "store")]
    put(demoting, ns, keys[:2], data)
    assert demoting.placer.settle(10) and store.writes == 0  # under the watermark: none
    for i in range(2, 8, 2):
        put(demoting, ns, keys[i : i + 2], data)
        assert demoting.placer.settle(10)
    assert 0 < store.writes == demoting.stats().tiers[1].blocks < 8

    through = daemons("t", write="through", host_blocks=4)
    ns2 = through.open_namespace("t", "m2", LAYOUT)[0].id
    keys2, data2 = blocks(ns2, 8)
    before = store.writes
    for i in range(0, 8, 2):
        put(through, ns2, keys2[i : i + 2], data2)
        poll(lambda i=i: through.stats().tiers[1].blocks == i + 2, "write-through copies")
        assert through.placer.settle(10)
    # Memory demoted some of them: their copy was there already, so nothing was written
    # twice, and every block is still served byte-exact.
    assert store.writes - before == 8 and "far" in through.locate(ns2, keys2)
    for i in range(0, 8, 2):
        assert get(through, ns2, keys2[i : i + 2]) == [data2[k] for k in keys2[i : i + 2]]


def test_a_long_prefix_is_asked_in_growing_batches(
    daemons: Callable[..., CacheService], tmp_path: Path
) -> None:
    a, b = daemons("a", write="through", host_blocks=64), daemons("b", host_blocks=64)
    store = shared_dict_tier.STORES[str(tmp_path / "store")]
    ns = a.open_namespace("t", "m", LAYOUT)[0].id
    b.open_namespace("t", "m", LAYOUT)
    keys, data = blocks(ns, 40)
    for i in range(0, 40, 8):
        put(a, ns, keys[i : i + 8], data)
    poll(lambda: len(store.values) == 40, "write-through copies")
    assert b.lookup(ns, np.arange(40 * TOKENS)).cached_tokens == 40 * TOKENS
    assert store.finds == [32, 8]  # a small first call, then four times as many at most
    del store.finds[:]
    assert b.lookup(ns, np.arange(41 * TOKENS)).cached_tokens == 40 * TOKENS
    assert store.finds == [1]  # past what b holds now, only the keys that are left
