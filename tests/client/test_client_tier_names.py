"""The client shows tiers by their configured names, and falls back to the kind's enum for a
daemon older than tier names (here: a gRPC server answering as such a daemon did)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from tierd_client import KVLayout, Namespace, TierdClient
from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc

LAY = KVLayout(2, 2, 8, "float16", 4)
NS = Namespace(b"\x01" * 16, "default", "m", LAY, LAY.block_bytes, None, "inband")
KEYS = [bytes([i]) * 16 for i in range(3)]


class _OlderDaemon(pb_grpc.TierdServicer):
    """Fills only the fields a daemon had before tiers were named."""

    def __init__(self) -> None:
        self.moves: list[pb.MoveRequest] = []

    def Stats(self, request, context):  # type: ignore[no-untyped-def]
        return pb.StatsResponse(
            tiers=[pb.TierStats(tier=pb.TIER_HOST, capacity_bytes=8, hits=3, backend="shm"),
                   pb.TierStats(tier=pb.TIER_NVME, capacity_bytes=16, backend="posix")],
            tenants=[pb.TenantUsage(tenant="a", tier=pb.TIER_NVME, used_bytes=4)],
        )  # fmt: skip

    def Locate(self, request, context):  # type: ignore[no-untyped-def]
        return pb.LocateResponse(tiers=[pb.TIER_HOST, pb.TIER_UNSPECIFIED, pb.TIER_CSD])

    def Lookup(self, request, context):  # type: ignore[no-untyped-def]
        return pb.LookupResponse(
            cached_tokens=4, blocks=[pb.BlockLocation(key=KEYS[0], tier=pb.TIER_NVME)]
        )

    def Move(self, request, context):  # type: ignore[no-untyped-def]
        self.moves.append(request)
        return pb.MoveResponse(moved=len(request.keys))


@pytest.fixture
def older() -> Iterator[tuple[TierdClient, _OlderDaemon]]:
    servicer = _OlderDaemon()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_TierdServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with TierdClient(f"127.0.0.1:{port}", timeout=10, max_retries=0) as c:
            yield c, servicer
    finally:
        server.stop(None)


def test_an_older_daemons_tiers_are_named_after_their_kinds(
    older: tuple[TierdClient, _OlderDaemon],
) -> None:
    c, _ = older
    stats = c.stats()
    assert list(stats["tiers"]) == ["host", "nvme"]
    host = stats["tiers"]["host"]
    assert (host["kind"], host["available"], host["hits"], host["misses"]) == ("host", True, 3, 0)
    assert stats["tiers"]["nvme"]["kind"] == "nvme"
    assert stats["tenants"] == [{"tenant": "a", "tier": "nvme", "used_bytes": 4}]
    assert c.locate(NS, KEYS) == ["host", None, "csd"]
    assert [b.tier for b in c.lookup(NS, [1, 2, 3, 4]).blocks] == ["nvme"]


def test_a_move_names_the_tier_and_carries_the_kind_an_older_daemon_reads(
    older: tuple[TierdClient, _OlderDaemon],
) -> None:
    c, servicer = older
    assert c.move(NS, KEYS[:1], "nvme") == 1
    assert c.move(NS, KEYS[:1], "disk") == 1
    assert [(m.tier_name, m.tier) for m in servicer.moves] == [
        ("nvme", pb.TIER_NVME), ("disk", pb.TIER_UNSPECIFIED)]  # fmt: skip
