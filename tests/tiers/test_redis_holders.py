"""The prefix directory's entries in a real Redis cluster (tierd.tiers.redis_holders):
under the tenant's and namespace's keys, one field per daemon with its own expiry, the
hash kept as long as its longest-lived entry."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.redis_cluster import SERVERS, Cluster, needs_redis, started
from tests.tiers.test_remote_redis import ns_of, open_tier
from tierd.tiers.redis_holders import RedisHolderBook

pytestmark = needs_redis

A, B = "10.0.0.1:7001", "10.0.0.2:7001"


@pytest.fixture(scope="module", params=SERVERS)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    yield from started(Cluster, tmp_path_factory.mktemp("cluster"), server=request.param)


@pytest.fixture
def book(cluster: Cluster) -> Iterator[RedisHolderBook]:
    tier = open_tier(cluster.nodes, "cluster")
    try:
        yield RedisHolderBook(tier)
    finally:
        tier.close()


def test_a_shorter_ttl_never_cuts_another_daemons_entry(
    book: RedisHolderBook, cluster: Cluster
) -> None:
    ns, key = ns_of("it"), b"k" * 16
    book.record(A, [(ns, key)], [], 60_000)
    book.record(B, [(ns, key)], [], 200)  # B's TTL is shorter: its write must not cut A's
    with cluster.client() as rc:
        assert rc.pttl(book.key_of(ns, key)) > 50_000
    [held] = book.holders(ns, [key])
    assert set(held) == {A, B} and held[A] > time.time() * 1000 + 50_000
    other = b"o" * 16
    book.record(B, [(ns, other)], [], 400)  # a new hash takes its writer's TTL
    with cluster.client() as rc:
        assert 0 < rc.pttl(book.key_of(ns, other)) <= 400
