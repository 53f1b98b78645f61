"""Every configured tier reports itself, by the name the config gives it, through Stats, the
Prometheus metrics and `tierctl status`, with hits booked to the tier that served them; a
real daemon whose `[[tiers]]` chain names its tiers "mem" (host), "disk" (nvme) and
"shards" (csd, one worker it spawns)."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from tests.integration.conftest import START_DEADLINE_S, DaemonProcess
from tests.integration.test_operations import Worker
from tests.ports import free_port
from tests.server.test_metrics import scrape
from tierctl.cli import main as tierctl
from tierd_client import AttendItem, InvalidArgument, KVLayout, TierdClient
from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc

LAY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_tokens=16)
SPAN = LAY.block_bytes // LAY.num_layers  # what one attend reads of a block: one layer
TIERS = {"mem": "host", "disk": "nvme", "shards": "csd"}  # name -> kind, in chain order


def chain(csd: str) -> str:
    return (
        '[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = "64MiB"\n\n'
        '[[tiers]]\nname = "disk"\nkind = "nvme"\ncapacity = "128MiB"\n\n'
        f'[[tiers]]\nname = "shards"\nkind = "csd"\ncapacity = "32MiB"\nspill = false\n{csd}\n'
    )


def configured(daemon: DaemonProcess, body: str) -> DaemonProcess:
    """The daemon with `body` as its config, and none of the fixture's [host]/[nvme] sizes
    (a [[tiers]] chain replaces those sections)."""
    for flag in ("--host-capacity", "--nvme-capacity"):
        i = daemon.cmd.index(flag)
        del daemon.cmd[i : i + 2]
    config = daemon.base / "tierd.toml"
    config.write_text(body)
    daemon.cmd += ["--config", str(config)]
    return daemon


def wait_available(c: TierdClient, tier: str, want: bool) -> dict[str, Any]:
    deadline = time.monotonic() + START_DEADLINE_S
    while (stats := c.stats())["tiers"][tier]["available"] != want:
        assert time.monotonic() < deadline, f"{tier} never became available={want}"
        time.sleep(0.1)
    return stats


def tier_counts(stats: dict[str, Any]) -> dict[str, tuple[int, int, int]]:
    return {n: (t["hits"], t["misses"], t["bytes_read"]) for n, t in stats["tiers"].items()}


def block_for(key: bytes) -> np.ndarray:
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    return rng.standard_normal(LAY.block_shape, dtype=np.float32)


@pytest.fixture
def named(spawn_daemon: Callable[..., DaemonProcess]) -> Iterator[tuple[DaemonProcess, int]]:
    port = free_port()
    daemon = configured(
        spawn_daemon(start=False),
        chain("workers = 1") + f'\n[metrics]\nlisten = "127.0.0.1:{port}"\ntenant_labels = true\n',
    )
    daemon.start()
    yield daemon, port


def test_every_named_tier_reports_and_hits_go_to_the_tier_that_served(
    named: tuple[DaemonProcess, int], capsys: pytest.CaptureFixture[str]
) -> None:
    daemon, port = named
    with TierdClient(daemon.address, tenant="it") as c:
        stats = wait_available(c, "shards", True)
        assert list(stats["tiers"]) == list(TIERS)  # every tier, CSD included, in chain order
        assert {n: t["kind"] for n, t in stats["tiers"].items()} == TIERS
        assert stats["tiers"]["mem"]["capacity_bytes"] == 64 << 20
        assert stats["tiers"]["disk"]["capacity_bytes"] == 128 << 20
        assert stats["tiers"]["shards"]["capacity_bytes"] == 32 << 20

        ns = c.open_namespace("tier-stats", LAY)
        keys = c.block_keys(ns, np.arange(6 * LAY.block_tokens))
        c.put(ns, keys, np.stack([block_for(k) for k in keys]))
        assert c.move(ns, keys[2:4], "disk") == 2
        assert c.move(ns, keys[4:], "shards") == 2
        assert c.locate(ns, keys) == ["mem", "mem", "disk", "disk", "shards", "shards"]
        assert [b.tier for b in c.lookup(ns, np.arange(6 * LAY.block_tokens)).blocks] == [
            "mem", "mem", "disk", "disk", "shards", "shards"]  # fmt: skip
        stats = c.stats()
        assert {n: t["blocks"] for n, t in stats["tiers"].items()} == {
            "mem": 2, "disk": 2, "shards": 2}  # fmt: skip
        for name in TIERS:
            assert stats["tiers"][name]["used_bytes"] >= 2 * LAY.block_bytes
        assert stats["tiers"]["disk"]["bytes_written"] >= 2 * LAY.block_bytes
        assert stats["tiers"]["shards"]["bytes_written"] >= 2 * LAY.block_bytes
        assert {(u["tier"], u["used_bytes"]) for u in stats["tenants"]} == {
            (n, 2 * LAY.block_bytes) for n in TIERS}  # fmt: skip

        # A get of a block on disk is a disk hit (the promotion's source), not a mem hit.
        before = tier_counts(stats)
        res = c.get(ns, keys[2:3])
        assert res.found == [True] and res.blocks[0].tobytes() == block_for(keys[2]).tobytes()
        after = tier_counts(c.stats())
        assert after["disk"] == (before["disk"][0] + 1, 0, before["disk"][2] + LAY.block_bytes)
        assert after["mem"] == before["mem"] and after["shards"] == before["shards"]

        # Attend reads each layer where the block is: keys[2] is now in mem, keys[3] on disk,
        # keys[4:] in the CSD worker's shard (which computes its own partial).
        seq = c.open_sequence(ns, keys)
        rng = np.random.default_rng(1)
        for layer in range(LAY.num_layers):
            q = rng.standard_normal((1, 2 * LAY.num_kv_heads, LAY.head_dim), dtype=np.float32)
            c.attend([AttendItem(seq, layer, q)], as_torch=False)
        c.close_sequence(seq)
        final = c.stats()
        layers = LAY.num_layers
        served = {"mem": 3 * layers, "disk": 1 * layers, "shards": 2 * layers}
        for name, n in served.items():
            hits, misses, read = tier_counts(final)[name]
            assert (hits - after[name][0], misses, read - after[name][2]) == (n, 0, n * SPAN)
        assert all(t["available"] for t in final["tiers"].values())

    m = scrape(port)
    for name, kind in TIERS.items():
        t, labels = final["tiers"][name], f'{{kind="{kind}",tier="{name}"}}'
        assert m[f"tierd_tier_hits_total{labels}"] == t["hits"]
        assert m[f"tierd_tier_misses_total{labels}"] == 0
        assert m[f"tierd_tier_read_bytes_total{labels}"] == t["bytes_read"]
        assert m[f"tierd_tier_written_bytes_total{labels}"] == t["bytes_written"]
        assert m[f"tierd_tier_evictions_total{labels}"] == t["evictions"]
        assert m[f"tierd_tier_capacity_bytes{labels}"] == t["capacity_bytes"]
        assert m[f"tierd_tier_blocks{labels}"] == t["blocks"]
        assert m[f"tierd_tier_available{labels}"] == 1
        assert m[f'tierd_tenant_used_bytes{{tenant="it",tier="{name}"}}'] > 0
    assert not [k for k in m if 'tier="host"' in k or 'tier="nvme"' in k or 'tier="csd"' in k]

    capsys.readouterr()
    assert tierctl(["status", "--address", daemon.address, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {n: (t["kind"], t["available"]) for n, t in doc["tiers"].items()} == {
        n: (k, True) for n, k in TIERS.items()}  # fmt: skip
    assert tierctl(["top", "--address", daemon.address, "--count", "2", "--interval", "0.05"]) == 0
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines()]
    for name, kind in TIERS.items():
        assert sum(1 for r in rows if r[:2] == [name, kind] and "up" in r) == 2, table
    assert table.count("hits/s") == 1  # rates from the second refresh on


def test_move_by_name_and_by_the_enum_of_older_clients(
    named: tuple[DaemonProcess, int],
) -> None:
    daemon, _ = named
    with TierdClient(daemon.address, tenant="it") as c:
        ns = c.open_namespace("tier-move", LAY)
        keys = c.block_keys(ns, np.arange(3 * LAY.block_tokens))
        c.put(ns, keys, np.stack([block_for(k) for k in keys]))
        with pytest.raises(InvalidArgument) as e:
            c.move(ns, keys, "nvme")  # a kind, not a tier of this daemon
        assert e.value.field == "tier_name" and "mem, disk, shards" in str(e.value)
        with grpc.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.TierdStub(channel)
            # An older client names only the kind: the first tier of that kind.
            moved = stub.Move(pb.MoveRequest(namespace_id=ns.id, keys=keys[:1], tier=pb.TIER_NVME))
            assert moved.moved == 1
            where = stub.Locate(pb.KeysRequest(namespace_id=ns.id, keys=keys))
            assert list(where.tier_names) == ["disk", "mem", "mem"]
            assert list(where.tiers) == [pb.TIER_NVME, pb.TIER_HOST, pb.TIER_HOST]
            stats = stub.Stats(pb.StatsRequest())
            assert [(t.tier_name, t.kind, t.tier) for t in stats.tiers] == [
                ("mem", "host", pb.TIER_HOST), ("disk", "nvme", pb.TIER_NVME),
                ("shards", "csd", pb.TIER_CSD)]  # fmt: skip
            with pytest.raises(grpc.RpcError) as rpc:
                stub.Move(pb.MoveRequest(namespace_id=ns.id, keys=keys, tier=pb.TIER_HBM))
            assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "mem, disk, shards" in str(rpc.value.details())


def test_an_unreachable_csd_tier_reports_unavailable_and_books_its_misses(
    spawn_daemon: Callable[..., DaemonProcess], capsys: pytest.CaptureFixture[str]
) -> None:
    base = Path(tempfile.mkdtemp(prefix="tierd-csd-"))
    worker = Worker(base)
    try:
        worker.start()
        daemon = configured(spawn_daemon(start=False), chain(f'remote = ["{worker.address}"]'))
        daemon.start()
        with TierdClient(daemon.address, tenant="it") as c:
            wait_available(c, "shards", True)
            ns = c.open_namespace("tier-down", LAY)
            keys = c.block_keys(ns, np.arange(2 * LAY.block_tokens))
            c.put(ns, keys, np.stack([block_for(k) for k in keys]))
            assert c.move(ns, keys, "shards") == 2
            worker.kill()
            before = wait_available(c, "shards", False)
            assert c.get(ns, keys).found == [False, False]
            after = c.stats()
            assert after["tiers"]["shards"]["misses"] == before["tiers"]["shards"]["misses"] + 2
            assert after["tiers"]["shards"]["hits"] == before["tiers"]["shards"]["hits"]
            assert after["tiers"]["mem"]["misses"] == 0 and after["corrupt_reads"] == 0
            capsys.readouterr()
            assert tierctl(["status", "--address", daemon.address]) == 0
            rows = [line.split() for line in capsys.readouterr().out.splitlines()]
            assert [r[3] for r in rows if r[:2] in (["mem", "host"], ["shards", "csd"])] == [
                "up", "DOWN"]  # fmt: skip
            worker.start()
            wait_available(c, "shards", True)
    finally:
        worker.kill()
        shutil.rmtree(base, ignore_errors=True)
