"""The tier-chain planner, step by step: which block leaves, where it goes, what is dropped."""

from __future__ import annotations

import pytest

from tests.core.conftest import LAYOUT
from tierd.core.chain import Level, Move, Share, TierChain
from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.core.policies import make_policy
from tierd.core.policies.base import Policy
from tierd.core.policies.tinylfu import TinyLFU
from tierd.errors import Internal

SPACES = {t: NamespaceInfo(t.encode().ljust(16, b"\0"), t, "m", LAYOUT, ()) for t in "tuv"}


def blocks(names: str, tenant: str = "t") -> dict[str, BlockEntry]:
    return {n: BlockEntry(SPACES[tenant], n.encode().ljust(16, b"\0"), 100, 0) for n in names}


def level(name: str, blocks: int, policy: str = "lru", admission: Policy | None = None,
          high: float = 1.0, low: float = 1.0) -> Level:  # fmt: skip
    return Level(name, blocks * 100, high, low, make_policy(policy, name), admission)


def names(entries: list[BlockEntry]) -> str:
    return "".join(e.key.rstrip(b"\0").decode() for e in entries)


def moves(ms: list[Move]) -> list[tuple[str, str, str | None, bool]]:
    return [(names([m.entry]), m.src, m.dst, m.write) for m in ms]


def put(chain: TierChain, e: BlockEntry, top: str = "host", **kw) -> list[Move]:
    """What a put does: make room for the block in the top level, then insert it."""
    done = chain.settle(top, e.nbytes, **kw)
    chain.access(e)
    chain.insert(e, top)
    return done


def test_lru_chain_demotes_then_drops_and_promotion_keeps_the_lower_copy() -> None:
    chain = TierChain([level("host", 3), level("nvme", 4)])
    e = blocks("abcdefghijk")
    for n in "abc":
        assert put(chain, e[n]) == []
    assert chain.need("host") == 0 and chain.need("host", 100) == 100
    assert names(chain.plan_room("host", 100)) == "a"
    assert names(chain.plan_room("host", 150)) == "ab"  # whole blocks: two to free 150
    chain.hit(e["a"])
    assert moves(put(chain, e["d"])) == [("b", "host", "nvme", True)]
    assert moves(put(chain, e["e"])) == [("c", "host", "nvme", True)]
    assert moves(put(chain, e["f"])) == [("a", "host", "nvme", True)]
    assert moves(put(chain, e["g"])) == [("d", "host", "nvme", True)]
    assert chain.used("nvme") == 400 and chain.usage("host") == {"t": 300}
    # NVMe is full: a demotion first evicts NVMe's oldest, which leaves the chain.
    assert moves(put(chain, e["h"])) == [("b", "nvme", None, False),
                                         ("e", "host", "nvme", True)]  # fmt: skip
    assert chain.levels_of(e["b"]) == []
    # A read served from NVMe (c) counts there; the read promotes it: the NVMe copy stays.
    assert chain.top_of(e["c"]) == "nvme"
    chain.hit(e["c"])
    assert moves(put(chain, e["c"])) == [("a", "nvme", None, False),
                                         ("f", "host", "nvme", True)]  # fmt: skip
    assert chain.levels_of(e["c"]) == ["host", "nvme"]
    assert moves(put(chain, e["i"])) == [("d", "nvme", None, False),
                                         ("g", "host", "nvme", True)]  # fmt: skip
    assert moves(put(chain, e["j"])) == [("e", "nvme", None, False),
                                         ("h", "host", "nvme", True)]  # fmt: skip
    # Demoting the block that kept its NVMe copy writes nothing.
    assert moves(put(chain, e["k"])) == [("c", "host", "nvme", False)]
    assert [chain.levels_of(e[n]) for n in "cfghijk"] == [["nvme"]] * 4 + [["host"]] * 3
    assert (chain.used("host"), chain.used("nvme")) == (300, 400)


def test_watermarks_free_down_to_the_low_mark() -> None:
    chain = TierChain([level("host", 10, high=0.9, low=0.5), level("nvme", 10)])
    e = blocks("abcdefghij")
    for n in "abcdefghi":
        put(chain, e[n])
    assert chain.need("host") == 0  # 900 of 1000: at the high mark, not above
    assert chain.need("host", 100) == 500  # 1000 would pass it: down to 500
    ms = put(chain, e["j"])
    assert moves(ms) == [(n, "host", "nvme", True) for n in "abcde"]
    assert chain.used("host") == 500 and chain.used("nvme") == 500


def test_second_hit_admission_drops_blocks_never_read() -> None:
    chain = TierChain([level("host", 2), level("nvme", 4, policy="second_hit")])
    e = blocks("abcdef")
    put(chain, e["a"])
    put(chain, e["b"])
    e["b"].hits = 1  # the caller keeps the entry's own counters
    chain.hit(e["b"])
    assert moves(put(chain, e["c"])) == [("a", "host", None, False)]  # a: seen once
    assert moves(put(chain, e["d"])) == [("b", "host", "nvme", True)]  # b: read once
    assert chain.levels_of(e["a"]) == [] and chain.levels_of(e["b"]) == ["nvme"]
    assert moves(put(chain, blocks("a")["a"])) == [("c", "host", None, False)]
    assert moves(put(chain, e["e"])) == [("d", "host", None, False)]
    # a's second put: its key was remembered, so it is admitted this time.
    assert moves(put(chain, e["f"])) == [("a", "host", "nvme", True)]


def test_tinylfu_admission_compares_with_the_victim_it_would_displace() -> None:
    gate = TinyLFU("nvme")
    chain = TierChain([level("host", 1), level("nvme", 2, admission=gate)])
    e = blocks("abcde")
    for n in "ab":  # a, b: read twice each on their way down
        put(chain, e[n])
        chain.hit(e[n])
        chain.hit(e[n])
    assert moves(put(chain, e["c"])) == [("b", "host", "nvme", True)]
    assert chain.levels_of(e["a"]) == ["nvme"]  # NVMe had room for both: no question
    assert [gate.estimate(e[n]) for n in "abc"] == [3, 3, 1]
    # NVMe is full: c (seen once) would displace a (seen three times): turned away.
    assert moves(put(chain, e["d"])) == [("c", "host", None, False)]
    for _ in range(3):
        chain.hit(e["d"])  # d: put + 3 reads = 4 > a's 3
    assert moves(put(chain, e["e"])) == [("a", "nvme", None, False),
                                         ("d", "host", "nvme", True)]  # fmt: skip
    assert chain.levels_of(e["b"]) == chain.levels_of(e["d"]) == ["nvme"]


def test_a_rejecting_level_passes_the_block_to_the_next() -> None:
    chain = TierChain([level("host", 1), level("nvme", 2, policy="second_hit"),
                       level("csd", 2)])  # fmt: skip
    e = blocks("abc")
    put(chain, e["a"])
    assert moves(put(chain, e["b"])) == [("a", "host", "csd", True)]
    e["b"].pinned = True  # pinned: moved down without asking, never dropped
    assert moves(put(chain, e["c"])) == [("b", "host", "nvme", True)]
    tiny, f = TierChain([level("host", 1), level("nvme", 0), level("csd", 1)]), blocks("xy")
    put(tiny, f["x"])
    assert moves(put(tiny, f["y"])) == [("x", "host", "csd", True)]  # nvme: no space at all


def test_pinned_blocks_never_leave_the_last_level_and_busy_ones_stay() -> None:
    chain = TierChain([level("host", 3)])
    e = blocks("abcd")
    for n in "abc":
        put(chain, e[n])
    e["a"].pinned = True
    assert names(chain.plan_room("host", 300)) == "bc"
    assert names(chain.plan_room("host", 300, busy=lambda x: x is e["b"])) == "c"
    assert moves(put(chain, e["d"], busy=lambda x: x is e["b"])) == [("c", "host", None, False)]
    assert chain.levels_of(e["b"]) == ["host"]
    # Busy blocks stay in every level a pass reaches; a level left with nothing that may
    # go takes its newcomers over capacity.
    two, f = TierChain([level("host", 1), level("nvme", 1)]), blocks("xyz")
    put(two, f["x"])
    put(two, f["y"])
    assert moves(put(two, f["z"], busy=lambda b: b is f["x"])) == [("y", "host", "nvme", True)]
    assert two.levels_of(f["x"]) == ["nvme"] and two.used("nvme") == 200


def test_fair_share_takes_from_the_tenant_over_its_share_first() -> None:
    chain = TierChain([level("host", 8)])
    t, u = blocks("abcde", "t"), blocks("xyz", "u")
    for e in [*t.values(), *u.values()]:
        put(chain, e)
    assert chain.usage("host") == {"t": 500, "u": 300}
    # Equal weights: t gives until it is down to u's 300, then they alternate (t first
    # on ties, by name).
    assert names(chain.plan_room("host", 600)) == "abcxdy"

    # u weighs a third as much: 300 / (1/3) = 900 > 500, u gives first.
    def share(tenant: str) -> Share:
        return Share(weight=1 / 3) if tenant == "u" else Share()

    assert names(chain.plan_room("host", 300, share=share)) == "xya"

    # A quota puts its tenant ahead of everyone while over it.
    def quota(tenant: str) -> Share:
        return Share(quota_bytes=200) if tenant == "u" else Share()

    assert names(chain.plan_room("host", 200, share=quota)) == "xa"
    # The caller's own usage figures (reserved space the chain does not see) count.
    assert names(chain.plan_room("host", 200, usage={"t": 500, "u": 900})) == "xy"


def test_bookkeeping_errors_and_forget() -> None:
    with pytest.raises(ValueError, match="at least one level"):
        TierChain([])
    with pytest.raises(ValueError, match="repeat"):
        TierChain([level("host", 1), level("host", 1)])
    chain = TierChain([level("host", 2), level("nvme", 2)])
    e = blocks("a")["a"]
    chain.insert(e, "host")
    chain.insert(e, "nvme")
    with pytest.raises(Internal, match="already holds"):
        chain.insert(e, "host")
    chain.forget(e)
    assert chain.levels_of(e) == [] and chain.usage("nvme") == {} and chain.used("host") == 0
    assert chain.plan_room("host", 100) == [] and chain.destination(e, "nvme") is None
