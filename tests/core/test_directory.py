"""The directory step by step: exact outcomes of each bookkeeping call, with no tier and no
byte moved. Released space is recorded instead of freed, so every test can say exactly
which copy was given back, when."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tierd.config import Config, TenantConfig
from tierd.core.catalog import Catalog, CopyRow, NamespaceRow
from tierd.core.directory import Directory
from tierd.core.index import BlockEntry, NamespaceInfo, layout_to_list
from tierd.core.policies import make_policy
from tierd.errors import ResourceExhausted
from tierd.tiers.base import Copy
from tierd_client.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=4)
BB = LAYOUT.block_bytes
CHAIN = ("mem", "disk", "far")


def ns_of(tenant: str) -> NamespaceInfo:
    return NamespaceInfo(tenant.encode().ljust(16, b"."), tenant, "m", LAYOUT, ())


class Books:
    """A directory over a real catalog, recording every release."""

    def __init__(self, path: Path, config: Config | None = None, policy: str = "lru") -> None:
        self.released: list[tuple[bytes, str, object]] = []
        self.catalog = Catalog(path)
        self.config = config or Config()
        self.dir = Directory(
            self.catalog, CHAIN, {t: make_policy(policy, t) for t in CHAIN},
            lambda e, c: self.released.append((e.key, c.tier, c.location)),
            lambda: self.config,
        )  # fmt: skip
        for tenant in ("a", "b"):
            ns = ns_of(tenant)
            self.catalog.upsert_namespace(
                NamespaceRow(ns.id, tenant, "m", layout_to_list(LAYOUT), [])
            )

    def put(self, tenant: str, key: bytes, offset: int, now: float = 0.0) -> BlockEntry:
        """As a put commits: stage, record (without the lock), publish."""
        ns = ns_of(tenant)
        with self.dir.cond:
            staged, ticket = self.dir.stage_blocks(ns, [(key, Copy("mem", offset, BB, 7))], now)
        try:
            self.dir.log.commit(ticket)
        except BaseException:
            with self.dir.cond:
                self.dir.unstage(ns, staged)
            raise
        with self.dir.cond:
            (entry,) = self.dir.publish(ns, staged, now)
            return entry

    def catalog_pinned(self) -> set[bytes]:
        return {r.key for r in self.catalog.blocks() if r.pinned}

    def rows(self) -> dict[bytes, tuple[CopyRow, ...]]:
        self.dir.log.commit_all()  # what was recorded behind, too
        return {r.key: r.copies for r in self.catalog.blocks()}


@pytest.fixture
def books(tmp_path: Path) -> Iterator[Books]:
    b = Books(tmp_path / "index.sqlite3")
    with closing(b.catalog):
        yield b


def test_a_put_is_on_record_and_read_from_its_only_copy(books: Books) -> None:
    entry = books.put("a", b"k1", 4096)
    assert books.dir.best(entry) == Copy("mem", 4096, BB, 7)
    assert books.rows() == {b"k1": (CopyRow("mem", 4096, BB, 7),)}
    assert books.dir.usage("mem") == {"a": BB} and books.dir.blocks_in("mem") == 1


def test_the_fastest_copy_is_read_and_dropping_it_falls_back(books: Books) -> None:
    d = books.dir
    entry = books.put("a", b"k1", 0)
    with d.cond:
        d.add_copy(entry, Copy("far", "w0", BB, 7))
        d.add_copy(entry, Copy("disk", 8192, BB, 7))
        d.record_copies(entry)
        assert d.best_name(entry) == "mem"
        d.drop_copy(entry, entry.copies["mem"])
        assert d.best_name(entry) == "disk"
        d.drop_copy(entry, entry.copies["disk"])
        assert d.best(entry) == Copy("far", "w0", BB, 7)
        d.record_copies(entry)
    assert books.released == [(b"k1", "mem", 0), (b"k1", "disk", 8192)]
    assert books.rows() == {b"k1": (CopyRow("far", "w0", BB, 7),)}
    assert d.usage("mem") == {} and d.usage("disk") == {} and d.usage("far") == {"a": BB}


def test_lru_victims_leave_in_order_and_held_blocks_stay(books: Books) -> None:
    d = books.dir
    a, b, c, e = (books.put("a", k, i * BB, now=float(i))
                  for i, k in enumerate((b"a", b"b", b"c", b"e")))  # fmt: skip
    with d.cond:
        a.last_access = 10.0  # a was read last
        d.policies["mem"].on_hit(a)
        assert d.victims("mem", 2 * BB, include_pinned=True) == [b, c]
        held = d.hold(ns_of("a"), [b"b"])
        assert held == [b]
        assert d.victims("mem", 2 * BB, include_pinned=True) == [c, e]  # b is being read
        d.drop_reader(b)
        assert d.victims("mem", 4 * BB, include_pinned=True) == [b, c, e, a]


def test_pinned_last_copies_are_never_victims_but_may_be_demoted(books: Books) -> None:
    d = books.dir
    x, y = books.put("a", b"x", 0, now=1.0), books.put("a", b"y", BB, now=2.0)
    with d.cond:
        assert d.set_pinned(ns_of("a"), [b"x"], True) == 1
        assert books.catalog_pinned() == {b"x"}
        assert d.victims("mem", 2 * BB) == [y]
        assert d.victims("mem", 2 * BB, include_pinned=True) == [x, y]
        d.add_copy(x, Copy("disk", 0, BB, 7))
        assert d.victims("mem", 2 * BB) == [x, y]  # it has another copy now


def test_the_tenant_over_its_share_gives_first(tmp_path: Path) -> None:
    cfg = Config(tenants=(TenantConfig("a", token_sha256="0" * 64),
                          TenantConfig("b", token_sha256="1" * 64, quotas=(("mem", BB),))))  # fmt: skip
    books = Books(tmp_path / "i.sqlite3", cfg)
    with closing(books.catalog):
        a1, a2 = books.put("a", b"a1", 0, 1.0), books.put("a", b"a2", BB, 2.0)
        b1, b2 = books.put("b", b"b1", 0, 3.0), books.put("b", b"b2", BB, 4.0)
        with books.dir.cond:
            # b is over its quota in mem (2 blocks for 1): its oldest leaves first; then
            # a holds the most, then both hold one block (a tie goes by tenant name).
            assert books.dir.victims("mem", 4 * BB, include_pinned=True) == [b1, a1, a2, b2]


def test_a_deleted_block_being_read_is_released_only_by_its_last_reader(books: Books) -> None:
    d = books.dir
    books.put("a", b"k", 0)
    with d.cond:
        (entry,) = d.hold(ns_of("a"), [b"k"])
        d.hold(ns_of("a"), [b"k"])
    assert d.delete(ns_of("a"), [b"k"]) == 1
    assert books.rows() == {} and d.index.get(ns_of("a").id, b"k") is None
    with d.cond:
        d.drop_reader(entry)
        assert books.released == []
        d.drop_reader(entry)
    assert books.released == [(b"k", "mem", 0)]
    assert d.usage("mem") == {}


def test_a_corrupt_copy_is_dropped_unless_others_read_it(books: Books) -> None:
    d = books.dir
    entry = books.put("a", b"k", 0)
    with d.cond:
        d.add_copy(entry, Copy("disk", 4096, BB, 7))
        d.hold(ns_of("a"), [b"k"])
    d.drop_corrupt_copy(entry, "mem", 0)  # someone reads it: only marked for a check
    assert entry.copies["mem"].verified is False and books.released == []
    d.drop_corrupt_copy(entry, "mem", 0, own_readers=1)  # the caller is the only reader
    assert books.released == [(b"k", "mem", 0)]
    d.drop_corrupt_copy(entry, "mem", 0)  # idempotent
    d.drop_corrupt_copy(entry, "disk", 999)  # a copy that is not there (moved since)
    assert d.counters.corrupt_reads == 1 and d.counters.tier("mem").misses == 1
    d.drop_corrupt_copy(entry, "disk", 4096)
    assert entry.deleted and books.rows() == {}  # no copy left: the block left the cache


def test_eviction_drops_one_copy_or_the_whole_block(books: Books) -> None:
    d = books.dir
    two = books.put("a", b"two", 0)
    one = books.put("a", b"one", BB)
    with d.cond:
        d.add_copy(two, Copy("disk", 0, BB, 7))
        d.record_copies(two)
        d.evict(two, "mem")
        d.evict(one, "mem")
    assert books.rows() == {b"two": (CopyRow("disk", 0, BB, 7),)}
    assert books.released == [(b"two", "mem", 0), (b"one", "mem", BB)]
    assert one.deleted and not two.deleted
    assert d.counters.tier("mem").evictions == 2


def test_claims_count_blocks_moving_and_keep_them_out_of_choices(books: Books) -> None:
    d = books.dir
    entry = books.put("a", b"k", 0)
    with d.cond:
        d.claim(entry)
        assert d.moving == 1 and d.victims("mem", BB, include_pinned=True) == []
        d.unclaim(entry)
        d.unclaim(entry)  # twice is once
        assert d.moving == 0 and d.victims("mem", BB, include_pinned=True) == [entry]


def test_a_full_catalog_makes_nothing_visible(books: Books, monkeypatch) -> None:
    def full(*plans: object) -> None:
        raise ResourceExhausted("disk full")

    monkeypatch.setattr(books.catalog, "run", full)
    with pytest.raises(ResourceExhausted):
        books.put("a", b"k", 0)
    assert len(books.dir.index) == 0 and books.dir.usage("mem") == {}
    assert not books.dir.pending  # the key is free for the next put
    monkeypatch.undo()
    books.put("a", b"k", 0)
    assert books.rows() == {b"k": (CopyRow("mem", 0, BB, 7),)}


def test_a_key_being_recorded_belongs_to_its_first_put(books: Books) -> None:
    d, ns = books.dir, ns_of("a")
    with d.cond:
        first, t1 = d.stage_blocks(ns, [(b"k", Copy("mem", 0, BB, 7))])
        second, t2 = d.stage_blocks(ns, [(b"k", Copy("mem", BB, BB, 7))])
        # The second answers only once the first's row is in: it waits on its ticket.
        assert [k for k, _ in first] == [b"k"] and second == [] and t2 == t1
        assert d.index.get(ns.id, b"k") is None  # not visible before it is on record
    d.log.commit(t1)
    with d.cond:
        (entry,) = d.publish(ns, first)
    assert d.best(entry).location == 0 and books.rows() == {b"k": (CopyRow("mem", 0, BB, 7),)}


def test_a_failed_delete_puts_everything_back(books: Books, monkeypatch) -> None:
    d = books.dir
    entry = books.put("a", b"k", 0)

    def full(*plans: object) -> None:
        raise ResourceExhausted("disk full")

    monkeypatch.setattr(books.catalog, "run", full)
    with pytest.raises(ResourceExhausted):
        d.delete(ns_of("a"), [b"k"])
    assert d.index.get(ns_of("a").id, b"k") is entry and not entry.deleted
    assert books.released == []


def test_usage_by_tenant_follows_every_change(books: Books) -> None:
    d = books.dir
    ea = books.put("a", b"x", 0)
    books.put("b", b"y", 0)
    with d.cond:
        d.add_copy(ea, Copy("disk", 0, BB, 7))
        assert d.usage_by_tenant() == {("a", "mem"): BB, ("b", "mem"): BB, ("a", "disk"): BB}
    d.delete(ns_of("a"), [b"x"])
    assert d.usage_by_tenant() == {("b", "mem"): BB}
