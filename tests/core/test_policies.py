"""Placement policies: exact victim order on hand-made sequences of inserts and hits, and
one service whose host policy decides which blocks are demoted."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.core.conftest import LAYOUT, Harness, keys_for, make_config, put_blocks
from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.core.policies import POLICIES, make_policy
from tierd.core.policies.cost import CostAware
from tierd.core.policies.lfu import LFU
from tierd.core.policies.s3fifo import S3FIFO
from tierd.core.policies.second_hit import SecondHit
from tierd.core.service import CacheService

NS = NamespaceInfo(b"n" * 16, "t", "m", LAYOUT, ())


def blocks(names: str) -> dict[str, BlockEntry]:
    return {n: BlockEntry(NS, n.encode().ljust(16, b"\0"), 100, 0, host_off=0) for n in names}


def order(policy, entries: dict[str, BlockEntry]) -> str:
    by_id = {id(e): n for n, e in entries.items()}
    return "".join(by_id[id(e)] for e in policy.victims(entries.values()))


def test_registry_names_and_unknown_name() -> None:
    assert list(POLICIES) == ["lru", "lfu", "s3fifo", "cost", "second_hit"]
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
