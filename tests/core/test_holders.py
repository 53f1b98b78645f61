"""The prefix directory's core (tierd.core.holders) over an in-memory book: which peers its
advice names and in what order, what is written when, and that a slow or failing store
costs dropped entries, counted, never an error or a blocked caller. The Redis side runs
against a real cluster in tests/integration/test_peer_directory.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from tierd.core import holders as holders_mod
from tierd.core.holders import Holders
from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.tiers.base import Copy
from tierd_client.layout import KVLayout

LAY = KVLayout(num_layers=1, num_kv_heads=1, head_dim=8, dtype="float32", block_tokens=4)
NS = NamespaceInfo(b"n" * 16, "it", "m", LAY, ())
A, B, X = "10.0.0.1:7001", "10.0.0.2:7001", "10.0.0.9:7001"


class Book:
    """Entries in a dict: key -> {holder: expiry ms}; `gate` holds writes back."""

    name = "remote"

    def __init__(self) -> None:
        self.up = True
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # a write reached the store
        self.entries: dict[bytes, dict[str, int]] = {}
        self.calls: list[tuple[list[bytes], list[bytes]]] = []

    def available(self) -> bool:
        return self.up

    def record(self, holder: str, held: Sequence[tuple[NamespaceInfo, bytes]],
               gone: Sequence[tuple[NamespaceInfo, bytes]], ttl_ms: int) -> None:  # fmt: skip
        self.entered.set()
        self.gate.wait()
        if self.fail:
            raise ConnectionError("cluster down")
        self.calls.append(([k for _, k in held], [k for _, k in gone]))
        for _, key in held:
            self.entries.setdefault(key, {})[holder] = int(time.time() * 1000) + ttl_ms
        for _, key in gone:
            self.entries.get(key, {}).pop(holder, None)

    def holders(self, ns: NamespaceInfo, keys: Sequence[bytes]) -> list[dict[str, int]]:
        return [dict(self.entries.get(k, {})) for k in keys]


def poll(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 10
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def entry(key: bytes, *tiers: str) -> BlockEntry:
    e = BlockEntry(NS, key, 128, 0)
    for tier in tiers:
        e.copies[tier] = Copy(tier, 0, 128, 0)
    return e


@pytest.fixture
def book() -> Book:
    return Book()


@pytest.fixture
def made(book: Book) -> Iterator[Callable[..., Holders]]:
    opened: list[Holders] = []

    def make(holder: str = A, ttl_ms: int = 30_000) -> Holders:
        h = Holders(book, holder, ttl_ms, local=("host", "nvme"))
        opened.append(h)
        return h

    yield make
    book.gate.set()
    for h in opened:
        h.close()


def test_advice_names_configured_peers_only_longest_run_first(
    book: Book, made: Callable[..., Holders]
) -> None:
    far = int(time.time() * 1000) + 60_000
    book.entries = {b"k0": {A: far, B: far, X: far}, b"k1": {A: far, X: far}, b"k2": {X: far}}
    h = made(holder="")
    advice = h.advise(NS, [b"k0", b"k1", b"k2"], [B, A])
    assert advice.runs == ((A, 2), (B, 1))  # X holds the most, but is not a peer
    assert h.advise(NS, [b"k2"], [B, A]).runs == ()
    assert (h.snapshot().hits, h.snapshot().misses) == (1, 1)
    book.entries = {b"k0": {A: int(time.time() * 1000) - 1}}  # expired
    assert h.advise(NS, [b"k0"], [A]).runs == ()
    book.up = False  # down: no call, no advice, neither hit nor miss
    assert h.advise(NS, [b"k0"], [A]).runs == () and h.snapshot().misses == 2
    assert not h.snapshot().available


def test_held_renewed_and_gone_with_the_last_local_copy(
    book: Book, made: Callable[..., Holders]
) -> None:
    h = made(ttl_ms=3_000)
    e = entry(b"k0", "host")
    h.added([e])
    poll(lambda: A in book.entries.get(b"k0", {}), "recorded")
    h.touched(e, e.advertised + 0.1)  # young: not written again
    h.touched(e, e.advertised + 1.5)  # past a third of its TTL: renewed
    poll(lambda: h.snapshot().writes == 2, "renewed once")
    e.copies["remote"] = Copy("remote", "own", 128, 0)
    e.copies["nvme"] = Copy("nvme", 0, 128, 0)
    h.dropped(e, e.copies.pop("host"))  # still on NVMe: held
    h.dropped(e, e.copies.pop("nvme"))  # only the shared tier's copy is left: gone
    h.dropped(e, e.copies.pop("remote"))
    poll(lambda: not book.entries[b"k0"], "removed")
    assert h.snapshot().writes == 3


def test_a_held_then_gone_key_in_one_batch_ends_gone(
    book: Book, made: Callable[..., Holders]
) -> None:
    book.gate.clear()
    h = made()
    first = entry(b"k1", "host")
    h.added([entry(b"k0", "host")])
    assert book.entered.wait(10)  # the writer took the first
    h.added([first])
    h.dropped(first, first.copies.pop("host"))
    book.gate.set()
    poll(lambda: h.snapshot().writes == 3, "written")
    assert book.calls[-1] == ([], [b"k1"])


def test_a_full_queue_or_a_failing_store_drops_and_counts(
    book: Book, made: Callable[..., Holders], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(holders_mod, "QUEUE", 4)
    book.gate.clear()  # the store hangs: callers must not
    h = made()
    h.added([entry(b"k0", "host")])
    assert book.entered.wait(10)  # the writer waits on the store
    started = time.monotonic()
    h.added([entry(bytes([i]), "host") for i in range(10)])
    assert time.monotonic() - started < 1
    assert h.snapshot().writes_dropped == 6
    book.fail = True
    book.gate.set()
    poll(lambda: h.snapshot().writes_dropped == 11, "the failed batches count as dropped")
    assert h.snapshot().errors >= 1 and h.snapshot().writes == 0
    book.fail, book.up = False, False
    h.added([entry(b"k9", "host")])  # down: dropped without a call
    poll(lambda: h.snapshot().writes_dropped == 12, "dropped while down")


def test_a_copy_replaced_in_place_keeps_the_entry(book: Book, made: Callable[..., Holders]) -> None:
    book.gate.clear()
    h = made()
    e = entry(b"k0", "host")
    h.added([e])
    assert book.entered.wait(10)
    h.dropped(e, e.copies.pop("host"))  # as the directory replaces a copy: drop, then add
    e.copies["host"] = Copy("host", 64, 128, 0)
    book.gate.set()
    poll(lambda: h.snapshot().writes == 2, "written")
    assert book.calls == [([b"k0"], [])] and A in book.entries[b"k0"]


def test_a_hit_on_a_block_held_only_in_a_shared_tier_is_not_advertised(
    book: Book, made: Callable[..., Holders]
) -> None:
    h = made()
    e = entry(b"k0", "host", "remote")
    h.added([e])
    poll(lambda: A in book.entries.get(b"k0", {}), "recorded")
    h.dropped(e, e.copies.pop("host"))  # only the shared tier's copy is left: gone
    poll(lambda: not book.entries[b"k0"], "removed")
    h.touched(e, time.time())  # a lookup hits the shared copy: still not held here
    found = entry(b"k1", "remote")  # found in the shared tier by a lookup, never local
    h.touched(found, time.time())
    h.added([entry(b"k2", "host")])  # a marker: written after anything queued before it
    poll(lambda: A in book.entries.get(b"k2", {}), "marker recorded")
    assert not book.entries[b"k0"] and b"k1" not in book.entries


def test_a_block_from_before_a_restart_leaving_removes_its_entry(
    book: Book, made: Callable[..., Holders]
) -> None:
    book.entries = {b"k0": {A: int(time.time() * 1000) + 60_000}}  # written before a restart
    h = made()
    e = entry(b"k0", "host")  # adopted at start: this run never advertised it
    h.dropped(e, e.copies.pop("host"))  # evicted before any lookup hit it
    poll(lambda: not book.entries[b"k0"], "its entry removed")
