"""Prometheus metrics and gRPC health against a real daemon."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.ports import free_port
from tierd.tiers.host import segments_of
from tierd_client import KVLayout, TierdClient


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("tierd_"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def start(base: Path, metrics: str, config: str = "") -> subprocess.Popen[bytes]:
    (base / "tierd.toml").write_text(config)
    return subprocess.Popen(
        [sys.executable, "-m", "tierd", "serve", "--config", str(base / "tierd.toml"),
         "--listen", f"unix:{base}/s.sock", "--data-dir", str(base / "data"),
         "--host-capacity", "8MiB", "--nvme-capacity", "64MiB", "--metrics", metrics],
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def test_metrics_and_health_follow_the_daemon() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tmx-") as d:
        base = Path(d)
        proc = start(base, f"127.0.0.1:{port}", "[metrics]\ntenant_labels = true\n")
        try:
            layout = KVLayout(2, 2, 64, "float16", 16)
            with TierdClient(f"unix:{base}/s.sock", tenant="acme") as c:
                ns = c.open_namespace("m", layout)
                keys = c.block_keys(ns, np.arange(16 * 8))
                blocks = np.ones((8, *layout.block_shape), dtype=np.float16)
                c.put(ns, keys, blocks)
                c.get(ns, keys)
                c.lookup(ns, np.arange(16 * 9))
                with grpc.insecure_channel(f"unix:{base}/s.sock") as ch:
                    health = health_pb2_grpc.HealthStub(ch)
                    status = health.Check(health_pb2.HealthCheckRequest(service="tierd.v1.Tierd"))
                    assert status.status == health_pb2.HealthCheckResponse.SERVING
            m = scrape(port)
            block = layout.block_bytes
            assert m['tierd_tier_used_bytes{kind="host",tier="host"}'] == 8 * block
            assert m['tierd_tier_hits_total{kind="host",tier="host"}'] == 8
            assert m['tierd_tier_read_bytes_total{kind="host",tier="host"}'] == 8 * block
            assert m['tierd_tenant_used_bytes{tenant="acme",tier="host"}'] == 8 * block
            assert m["tierd_lookups_total"] == 1 and m["tierd_misses_total"] == 1
            assert m['tierd_rpc_seconds_count{method="PreparePut"}'] >= 1
            assert m['tierd_rpc_seconds_count{method="CommitPut"}'] >= 1
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
            _remove_segments(base)


def _remove_segments(base: Path) -> None:
    for seg in segments_of(base / "data"):
        seg.unlink()


def test_metrics_bind_loopback_and_name_no_tenant_by_default() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tmx-") as d:
        base = Path(d)
        proc = start(base, str(port))  # a bare port: no host named, so loopback only
        try:
            layout = KVLayout(1, 2, 64, "float16", 16)
            with TierdClient(f"unix:{base}/s.sock", tenant="acme") as c:
                ns = c.open_namespace("m", layout)
                keys = c.block_keys(ns, np.arange(16))
                c.put(ns, keys, np.ones((1, *layout.block_shape), dtype=np.float16))
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
            assert b'tierd_tier_used_bytes{kind="host",tier="host"}' in text
            assert b"tenant" not in text and b"acme" not in text
            bound = {c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip
            assert bound == {"127.0.0.1"}
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
            _remove_segments(base)
