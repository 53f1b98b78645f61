"""Adapters and the KV that depends on them, at the directory and registry level: which
adapters `reclaim_order` takes, in what order, with which blocks first; and that the
book deletes an adapter's KV before the registry lets the adapter go."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from tests.integration.test_models import small_model
from tests.lora_files import SMALL_Q, write_adapter
from tierd.config import Config
from tierd.core.adapters import AdapterBook, dependents, reclaim_order
from tierd.core.catalog import Catalog, NamespaceRow
from tierd.core.directory import Directory
from tierd.core.index import BlockEntry, NamespaceInfo, layout_to_list
from tierd.core.policies import make_policy
from tierd.errors import ResourceExhausted
from tierd.tiers.base import Copy
from tierd.weights.registry import AdapterUse, ModelRegistry
from tierd_client.keys import namespace_id
from tierd_client.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=4)
BB = LAYOUT.block_bytes
CHAIN = ("mem", "disk")


class Books:
    """A directory over a real catalog; releases and evictions are logged in order."""

    def __init__(self, path: Path) -> None:
        self.events: list[tuple[str, object]] = []
        self.catalog = Catalog(path)
        self.dir = Directory(
            self.catalog, CHAIN, {t: make_policy("lru", t) for t in CHAIN},
            lambda e, c: self.events.append(("free", e.key)), lambda: Config(),
        )  # fmt: skip
        self._offset = 0

    def ns(self, adapter: str, tenant: str = "t") -> NamespaceInfo:
        ns_id = namespace_id(tenant, "base", layout_to_list(LAYOUT), adapter=adapter)
        self.catalog.upsert_namespace(NamespaceRow(ns_id, tenant, "base", layout_to_list(LAYOUT),
                                                   [], False, adapter))  # fmt: skip
        info = NamespaceInfo(ns_id, tenant, "base", LAYOUT, (), False, adapter)
        self.dir.index.namespaces[ns_id] = info  # as OpenNamespace does
        return info

    def put(self, ns: NamespaceInfo, key: bytes, *, on_disk: bool = False,
            last_access: float = 0.0) -> BlockEntry:  # fmt: skip
        """A block in memory, or (`on_disk`) demoted: its only copy on disk."""
        self._offset += BB
        with self.dir.cond:
            (entry,) = self.dir.add_blocks(ns, [(key, Copy("mem", self._offset, BB, 7))])
            if on_disk:
                self.dir.add_copy(entry, Copy("disk", self._offset, BB, 7))
                self.dir.evict(entry, "mem")
            entry.last_access = last_access
        self.dir.log.commit_all()
        self.events.clear()
        return entry


@pytest.fixture
def books(tmp_path: Path) -> Iterator[Books]:
    b = Books(tmp_path / "index.sqlite3")
    with closing(b.catalog):
        yield b


def _fp(c: str) -> str:
    return c * 64


def test_cold_adapters_go_least_recently_used_first_each_after_its_kv(books: Books) -> None:
    a, b, c, _, e = (books.ns(_fp(x)) for x in "abcde")
    a_new = books.put(a, b"a-new", on_disk=True, last_access=20.0)
    a_old = books.put(a, b"a-old", on_disk=True, last_access=3.0)
    books.put(b, b"b-mem")  # in the memory tier: B is hot
    c_only = books.put(c, b"c", on_disk=True, last_access=2.0)
    e_read = books.put(e, b"e", on_disk=True, last_access=0.5)
    pinned = books.put(e, b"e-pinned", on_disk=True)
    pinned.pinned = True
    uses = [AdapterUse(_fp("a"), 100, 10.0), AdapterUse(_fp("b"), 100, 0.0),
            AdapterUse(_fp("c"), 100, 1.0), AdapterUse(_fp("d"), 100, 0.0)]  # fmt: skip
    with books.dir.cond:
        deps = dependents(books.dir)

        def order(need: int) -> list[tuple[str, tuple[bytes, ...]]]:
            return [(fp[0], tuple(e.key for e in blocks))
                    for fp, blocks in reclaim_order(uses, deps, need, "mem")]  # fmt: skip

        # D (no KV, last used at 0), then C (its block at 2), then A (its newest block at
        # 20, though registered at 10); B is hot. Within A, its least recent block first.
        assert order(1) == [("d", ())]
        assert order(150) == [("d", ()), ("c", (b"c",))]
        assert order(300) == [("d", ()), ("c", (b"c",)), ("a", (b"a-old", b"a-new"))]
        with pytest.raises(ResourceExhausted):  # the cold ones hold 300: nothing is taken
            order(301)
        uses.append(AdapterUse(_fp("e"), 100, 0.0))
        with pytest.raises(ResourceExhausted):  # E's pinned block keeps it...
            order(301)
        pinned.pinned = False
        e_read.readers = 1
        with pytest.raises(ResourceExhausted):  # ...as a block being read does
            order(301)
        e_read.readers = 0
        assert order(400) == [("d", ()), ("e", (b"e-pinned", b"e")), ("c", (b"c",)),
                              ("a", (b"a-old", b"a-new"))]  # fmt: skip
        # Equal last uses go by fingerprint.
        uses.append(AdapterUse(_fp("0"), 100, 0.0))
        assert order(200) == [("0", ()), ("d", ())]
    assert (a_new.last_access, a_old.last_access, c_only.last_access) == (20.0, 3.0, 2.0)


def _registry(tmp_path: Path, capacity: int) -> tuple[ModelRegistry, str, list[str]]:
    small_model(tmp_path / "base")
    reg = ModelRegistry(capacity, tmp_path / "weights")
    base = reg.register("t", str(tmp_path / "base"), "", "base", False)[0].registration
    fps = []
    for i in range(2):
        write_adapter(tmp_path / f"lora{i}", SMALL_Q, seed=i)
        view, _ = reg.register("t", str(tmp_path / f"lora{i}"), "", f"lora{i}", False,
                               base_model="base")  # fmt: skip
        fps.append(view.registration.fingerprint)
    return reg, base.fingerprint, fps


def test_reclaim_deletes_the_cold_adapters_kv_before_the_adapter(books: Books,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    reg, _, (cold, hot) = _registry(tmp_path, 1 << 20)
    try:
        book = AdapterBook(books.dir, reg)
        evict = reg.evict

        def logged(fp: str) -> None:  # the registry's own evict, its call logged in order
            books.events.append(("evict", fp[0:4]))
            evict(fp)

        reg.evict = logged  # type: ignore[method-assign,assignment]
        ns_cold, ns_hot = books.ns(cold), books.ns(hot)
        books.put(ns_cold, b"k1", on_disk=True, last_access=1.0)
        books.put(ns_cold, b"k2", on_disk=True, last_access=2.0)
        books.put(ns_hot, b"h1")
        with books.dir.cond:
            assert {fp: len(v) for fp, v in dependents(books.dir).items()} == {cold: 2, hot: 1}
        book.reclaim(1)
        assert books.events == [("free", b"k1"), ("free", b"k2"), ("evict", cold[0:4])]
        assert [v.registration.name for v in reg.list("t")] == ["base", "lora1"]
        assert book.count("t") == {hot: 1}
        assert not reg.sees("t", cold) and reg.sees("t", hot)
        with pytest.raises(ResourceExhausted):  # the one left is hot
            book.reclaim(1)
        assert book.count("t") == {hot: 1}
        # A drop is no eviction: the adapter goes at once, and its KV with it.
        books.events.clear()
        reg.drop("t", "lora1")
        assert books.events == [("free", b"h1")] and book.count("t") == {}
    finally:
        reg.close()


def test_a_registration_over_capacity_evicts_a_cold_adapter(books: Books,
                                                            tmp_path: Path) -> None:  # fmt: skip
    reg, _, fps = _registry(tmp_path, 1 << 20)
    used = reg.used_bytes()
    reg.close()
    # Room for the base and two adapters: a third one needs the least recent cold one gone.
    reg = ModelRegistry(used, tmp_path / "weights")
    try:
        AdapterBook(books.dir, reg)
        books.put(books.ns(fps[1]), b"hot")  # lora1 is hot, lora0 cold (no KV)
        write_adapter(tmp_path / "lora2", SMALL_Q, seed=2)
        reg.register("t", str(tmp_path / "lora2"), "", "lora2", False, base_model="base")
        assert [v.registration.name for v in reg.list("t")] == ["base", "lora1", "lora2"]
        write_adapter(tmp_path / "lora3", SMALL_Q, seed=3)
        books.put(books.ns(reg.list("t", "lora2")[0].registration.fingerprint), b"hot2")
        with pytest.raises(ResourceExhausted):  # both adapters have KV in memory
            reg.register("t", str(tmp_path / "lora3"), "", "lora3", False, base_model="base")
        assert [v.registration.name for v in reg.list("t")] == ["base", "lora1", "lora2"]
    finally:
        reg.close()


def test_the_index_keeps_each_adapters_blocks_apart_through_replacement_and_removal() -> None:
    from tierd.core.index import Index

    index = Index()
    a = NamespaceInfo(b"a" * 16, "t", "base", LAYOUT, (), False, _fp("a"))
    plain = NamespaceInfo(b"p" * 16, "t", "base", LAYOUT, (), False, "")
    old, new = BlockEntry(a, b"k", BB, 1), BlockEntry(a, b"k", BB, 2)
    other, unadapted = BlockEntry(a, b"j", BB, 3), BlockEntry(plain, b"k", BB, 4)
    for e in (old, other, unadapted):
        index.add(e)
    index.add(new)  # the same key again: it replaces the old block
    assert {fp: sorted(e.checksum for e in v) for fp, v in index.adapted().items()} == {
        _fp("a"): [2, 3]
    }
    index.remove(old)  # no longer indexed: nothing changes
    assert sorted(e.checksum for e in index.adapted_by(_fp("a"))) == [2, 3]
    index.remove(new)
    index.remove(other)
    assert index.adapted() == {} and index.adapted_by(_fp("a")) == []
    assert len(index) == 1 and index.get(plain.id, b"k") is unadapted
