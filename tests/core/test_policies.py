"""Placement policies: exact victim order on hand-made sequences of inserts and hits, and
one service whose host policy decides which blocks are demoted."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from tests.core.conftest import LAYOUT, Harness, keys_for, make_config, put_blocks
from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.core.policies import POLICIES, make_policy
from tierd.core.policies.base import SWEEP_MIN
from tierd.core.policies.cost import CostAware
from tierd.core.policies.lfu import LFU
from tierd.core.policies.s3fifo import S3FIFO
from tierd.core.policies.second_hit import SecondHit
from tierd.core.policies.spin import Spin
from tierd.core.policies.tinylfu import TinyLFU
from tierd.core.service import CacheService

NS = NamespaceInfo(b"n" * 16, "t", "m", LAYOUT, ())


def blocks(names: str) -> dict[str, BlockEntry]:
    return {n: BlockEntry(NS, n.encode().ljust(16, b"\0"), 100, 0) for n in names}


def order(policy, entries: dict[str, BlockEntry]) -> str:
    by_id = {id(e): n for n, e in entries.items()}
    return "".join(by_id[id(e)] for e in policy.victims(entries.values()))


def test_registry_names_and_unknown_name() -> None:
    assert list(POLICIES) == ["lru", "lfu", "s3fifo", "cost", "second_hit", "spin", "tinylfu"]
    with pytest.raises(ValueError, match="unknown eviction policy 'mru'; known: lru, lfu"):
        make_policy("mru")


def test_lru_least_recently_hit_first() -> None:
    p, e = make_policy("lru"), blocks("abcd")
    for n in "abcd":
        p.on_insert(e[n])
    p.on_hit(e["b"])
    p.on_hit(e["a"])
    assert order(p, e) == "cdba"
    e["d"].last_access = 5.0  # a lookup's refresh outranks the policy's own ticks
    assert order(p, e) == "cbad"


def lfu_sequence(p: LFU) -> dict[str, BlockEntry]:
    e = blocks("ab")
    p.on_insert(e["a"])
    for _ in range(3):
        p.on_hit(e["a"])
    p.on_insert(e["b"])
    for _ in range(2):
        p.on_hit(e["b"])
    return e


def test_lfu_fewest_hits_first_and_recency_breaks_ties() -> None:
    p, e = LFU(half_life=1000), blocks("abc")
    for n in "abc":
        p.on_insert(e[n])
    for n in "aac":
        p.on_hit(e[n])
    assert order(p, e) == "bca"
    p.on_hit(e["b"])  # b ties c at 2 hits and is the more recent
    assert order(p, e) == "cba"


def test_lfu_ages_old_counts() -> None:
    p = LFU(half_life=1 << 30)
    assert order(p, lfu_sequence(p)) == "ba"  # no aging: 4 touches beat 3
    p = LFU(half_life=2)
    assert order(p, lfu_sequence(p)) == "ab"  # a's 4 touches are old: decayed below b's 3


def test_s3fifo_small_queue_filters_one_hit_wonders() -> None:
    p, e = S3FIFO(), blocks("abcde")
    for n in "abcde":
        p.on_insert(e[n])
    p.on_hit(e["b"])
    p.on_hit(e["d"])
    # S's tail leaves unless hit (b, d move to M with their counters cleared), then M.
    assert order(p, e) == "acebd"


def test_s3fifo_ten_percent_rule_second_chance_and_lazy_moves() -> None:
    p, e = S3FIFO(), blocks("123456789xy")
    for n in "123456789":  # through the ghost queue into M
        p.on_insert(e[n])
        p.on_evict(e[n])
        p.on_insert(e[n])
    p.on_insert(e["x"])
    p.on_insert(e["y"])
    p.on_hit(e["1"])
    p.on_hit(e["x"])
    # S holds 2/11 >= 10%: x was hit, moves to M; S at 1/11 < 10%: M's tail 1 spends its
    # hit, 2 leaves; S at 1/10: y leaves; then M in FIFO order, x and the aged 1 last.
    assert order(p, e) == "2y3456789x1"
    # Only what an eviction actually passed over changed: a fresh policy, one victim taken.
    p, e = S3FIFO(), blocks("abc")
    for n in "abc":
        p.on_insert(e[n])
    p.on_hit(e["a"])
    p.on_hit(e["c"])
    victims = p.victims(e.values())
    assert next(victims) is e["b"]
    assert p.state(e["a"])[0] == 1 and p.state(e["c"])[0] == 0  # a moved to M, c not yet
    p.on_evict(e["b"])
    p.on_insert(e["b"])  # its key is in the ghost queue: straight into M
    assert p.state(e["b"])[0] == 1


def test_cost_keeps_deep_blocks_per_byte() -> None:
    p, e = CostAware(linear_tokens=0), blocks("abc")
    e["b"].depth = 50
    for n in "abc":
        p.on_insert(e[n])
    assert order(p, e) == "acb"
    for _ in range(3):
        p.on_hit(e["a"])
    # 4 touches do not outweigh recomputing attention over a 50-block prefix (101x)...
    assert order(p, e) == "cab"
    # ...but with the linear part of prefill counted, depth 50 is worth ~1.1x, hits win.
    p, e = CostAware(), blocks("abc")
    e["b"].depth = 50
    for n in "abc":
        p.on_insert(e[n])
    for _ in range(3):
        p.on_hit(e["a"])
    assert order(p, e) == "cba"
    e["c"].nbytes = 50  # same work for half the bytes: worth keeping over b
    assert order(p, e) == "bca"


def test_second_hit_admits_only_blocks_seen_twice() -> None:
    p, e = SecondHit(), blocks("abc")
    e["a"].hits = 1
    assert [p.admit(e[n]) for n in "abc"] == [True, False, False]
    again = blocks("b")["b"]  # b put again after being turned away: seen twice
    assert p.admit(again)
    assert not p.admit(blocks("b")["b"])  # admitted once, forgotten: a third put starts over
    assert order(p, e) == "abc"  # inside the tier: LRU


@pytest.mark.parametrize(("policy", "demoted"), [("lfu", "cold"), ("lru", "hot")])
def test_host_policy_decides_what_is_demoted(harness: Harness, policy: str, demoted: str) -> None:
    cfg = make_config(harness.data_dir, host_blocks=16)
    svc = CacheService(replace(cfg, host=replace(cfg.host, policy=policy)))
    svc.start()
    harness.services.append(svc)
    ns, _ = svc.open_namespace("t", "m", LAYOUT)
    keys = keys_for(ns.id, 16)
    hot, cold, last = keys[:8], keys[8:12], keys[12:]
    put_blocks(svc, ns.id, hot)
    for _ in range(3):
        svc.release(svc.prepare_get(ns.id, hot).lease_id)
    put_blocks(svc, ns.id, cold)  # 12 of 16 blocks: under the high watermark
    put_blocks(svc, ns.id, last)  # 16: above it, 4 blocks leave for NVMe
    assert svc.placer.settle(10)
    tiers = dict(zip(keys, svc.locate(ns.id, keys)))
    moved = {k for k, t in tiers.items() if t == "nvme"}
    # LFU demotes the never-read blocks, oldest first; LRU the blocks read longest ago.
    assert moved == (set(cold) if demoted == "cold" else set(hot[:4]))
    assert sum(t == "host" for t in tiers.values()) == 12


# -- spin and tinylfu ---------------------------------------------------------------------


def order_of(policy, entries: dict[str, BlockEntry], **kw) -> str:
    """The incremental order (`victims_of`), every block live."""
    by_id = {id(e): n for n, e in entries.items()}
    gen = policy.victims_of("t", kw.pop("live", lambda e: True), **kw)
    try:
        return "".join(by_id[id(e)] for e in gen)
    finally:
        gen.close()


def test_spin_budget_then_cohorts_deepest_first() -> None:
    p, e = Spin(bucket_seconds=10.0, budget=3), blocks("abcd")
    for depth, n in enumerate("abcd"):  # one request's prefix, used at t = 1 s
        e[n].depth, e[n].last_access = depth, 1.0
        p.on_insert(e[n])
    # d is past the budget of 3 blocks: first out. a, b, c share cohort 0: deepest first.
    assert order(p, e) == order_of(p, e) == "dcba"
    e.update(blocks("eg"))
    e["e"].last_access = 12.0  # cohort 1
    p.on_insert(e["e"])
    e["a"].last_access = 15.0  # read again: cohort 1, after e
    p.on_hit(e["a"])
    e["g"].depth, e["g"].last_access = 2, 19.0  # the newest, but the deepest of cohort 1
    p.on_insert(e["g"])
    assert order(p, e) == order_of(p, e) == "dcbgea"
    lru = make_policy("lru")  # LRU on the same uses breaks the first prefix at its head
    for n in "abcdeg":
        lru.on_insert(e[n])
    lru.on_hit(e["a"])
    assert order(lru, e) == "bcdeag"


def test_spin_default_budget_follows_the_tier_size() -> None:
    p = Spin()
    pool = [BlockEntry(NS, i.to_bytes(16, "little"), 100, 0) for i in range(2048)]
    deep = pool[0]
    deep.depth, deep.last_access = 20, 5.0  # the most recent block, 20 deep
    for entry in pool[:1024]:
        p.on_insert(entry)
    assert p.budget == 16  # 1024 blocks / 64
    assert next(p.victims_of("t", lambda x: True)) is deep  # over budget: first out
    for entry in pool[1024:]:
        p.on_insert(entry)
    assert p.budget == 32
    for entry in pool[1:1024]:
        p.on_evict(entry)
    assert p.budget == 32  # the tier emptying does not lower it
    assert list(p.victims_of("t", lambda x: True))[-1] is deep  # within budget: newest
    assert order(p, {str(i): e for i, e in enumerate([deep, *pool[1024:]])})[-1] == "0"


def test_tinylfu_admits_only_what_beats_its_victim() -> None:
    p, e = TinyLFU(), blocks("abcd")
    for n in "aaabcc":
        p.on_access(e[n])
    # estimates: a 3 (doorkeeper + 2), b 1, c 2, d 0 (never seen)
    assert [p.estimate(e[n]) for n in "abcd"] == [3, 1, 2, 0]
    assert p.admit(e["a"], victim=e["b"]) and not p.admit(e["b"], victim=e["a"])
    assert not p.admit(e["c"], victim=e["c"])  # a tie keeps the incumbent
    assert p.admit(e["d"])  # room in the tier: nothing displaced, admitted
    p.on_insert(e["a"])
    p.on_insert(e["b"])
    assert order(p, {n: e[n] for n in "ab"}) == order_of(p, e) == "ab"  # inside: LRU


def test_tinylfu_halves_counts_and_clears_doorkeeper_each_window() -> None:
    p, e = TinyLFU(min_sample=4096), blocks("ab")
    for _ in range(7):
        p.on_access(e["a"])  # doorkeeper + 6
    p.on_access(e["b"])
    assert p.estimate(e["a"]) == 7 and p.estimate(e["b"]) == 1
    filler = [BlockEntry(NS, i.to_bytes(16, "little"), 100, 0) for i in range(4096 - 8)]
    for f in filler:  # the window is 4096 accesses
        p.on_access(f)
    assert p.estimate(e["a"]) == 3 and p.estimate(e["b"]) == 0
    # Counts stop at 15, so one block hammered for ever ages out within a few windows.
    for _ in range(40):
        p.on_access(e["b"])
    assert p.estimate(e["b"]) == 16


# -- incremental victim order ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(POLICIES))
def test_victims_of_skips_busy_forgets_dead_and_restores_untaken(name: str) -> None:
    p, e = make_policy(name), blocks("abcd")
    for n in "abcd":
        p.on_insert(e[n])
    full = order(p, e) if name != "s3fifo" else "abcd"  # S3-FIFO: FIFO, nothing hit
    first, second, third, fourth = (e[n] for n in full)
    assert order_of(p, e) == full
    assert order_of(p, e, busy=lambda x: x is first) == full[1:]
    assert order_of(p, e) == full  # the busy block is still there
    gen = p.victims_of("t", lambda x: True)
    assert next(gen) is first and next(gen) is second
    p.on_evict(first)  # taken; the second one was not
    gen.close()
    assert order_of(p, e) == full[1:]
    assert order_of(p, e, live=lambda x: x is not third) == full[1] + full[3]
    assert order_of(p, e) == full[1] + full[3]  # the dead block is forgotten
    assert p.tenants() == ["t"]
    p.on_evict(second)
    p.on_evict(fourth)
    assert p.tenants() == [] and order_of(p, e) == ""


def tenant_ns(tenant: str) -> NamespaceInfo:
    return NamespaceInfo(tenant.encode().ljust(16, b"\0"), tenant, "m", LAYOUT, ())


@pytest.mark.parametrize("name", list(POLICIES))
def test_victims_of_matches_victims_on_random_workloads(name: str) -> None:
    """Two instances of the policy (tiers x and y) see the same hooks; x is asked through
    `victims_of`, y through `victims` over all its blocks: every answer is the same."""
    rng = random.Random(sum(map(ord, name)))
    x, y = POLICIES[name]("x"), POLICIES[name]("y")
    spaces = [tenant_ns(t) for t in ("t0", "t1", "t2")]
    pool = [BlockEntry(spaces[i % 3], i.to_bytes(16, "little"), 100 + 50 * (i % 4), 0)
            for i in range(120)]  # fmt: skip
    held: set[int] = set()
    for step in range(1, 1500):
        i, action = rng.randrange(len(pool)), rng.random()
        entry = pool[i]
        if action < 0.45:
            entry.depth = rng.randrange(40)
            entry.last_access = float(step)
            entry.hits += i in held
            for p in (x, y):
                p.on_access(entry)
                (p.on_hit if i in held else p.on_insert)(entry)
            held.add(i)
        elif action < 0.55:
            entry.last_access = float(step)  # a lookup's refresh, no hook
        elif action < 0.65 and i in held:
            for p in (x, y):
                p.on_evict(entry)
            held.discard(i)
        elif action > 0.9:  # an eviction pass: the first few victims of one tenant leave
            tenant, take = spaces[rng.randrange(3)].tenant, rng.randrange(1, 6)
            mine = [pool[j] for j in sorted(held) if pool[j].ns.tenant == tenant]
            gen = x.victims_of(tenant, lambda e: True)
            got = [v for v, _ in zip(gen, range(take))]
            gen.close()
            want = [v for v, _ in zip(y.victims(mine), range(take))]
            assert got == want, f"step {step}"
            for v in got:
                for p in (x, y):
                    p.on_evict(v)
                held.discard(pool.index(v))
    assert sorted(x.tenants()) == sorted({pool[j].ns.tenant for j in held})
    for ns in spaces:
        mine = [pool[j] for j in sorted(held) if pool[j].ns is ns]
        assert list(x.victims_of(ns.tenant, lambda e: True)) == list(y.victims(mine))


@pytest.mark.parametrize("name", list(POLICIES))
def test_deleted_blocks_are_forgotten_without_a_hook(name: str) -> None:
    p, e = make_policy(name), blocks("abcdef")
    for n in "abcdef":
        p.on_insert(e[n])
    for n in "ace":
        e[n].deleted = True  # deleted by a path that calls no hook
    churn = blocks("x")["x"]
    for _ in range(SWEEP_MIN):
        p.on_insert(churn)
        p.on_evict(churn)
    assert [p.tracked(e[n]) for n in "abcdef"] == [False, True] * 3
    assert order_of(p, e) == order(p, {n: e[n] for n in "bdf"})
