"""The slow uploader, against a real daemon: an in-band Put stream that stalls past its
lease fails when it resumes, and none of its bytes lands in another block of the tenant,
even though that block's put took the staging the stalled stream had."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from tierd.tiers.host import segments_of
from tierd_client import KVLayout, TierdClient
from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc

LAYOUT = KVLayout(2, 2, 64, "float16", 16)  # 16 KiB blocks
LEASE_MS = 300


def test_a_put_stream_stalled_past_its_lease_writes_nothing() -> None:
    with tempfile.TemporaryDirectory(prefix="fnc-") as d:
        base = Path(d)
        cfg = base / "tierd.toml"
        cfg.write_text(f'data_dir = "{base}/data"\n[server]\nlisten = ["unix:{base}/s.sock"]\n'
                       '[host]\ncapacity = "16MiB"\n[nvme]\ncapacity = "32MiB"\n'
                       f"[leases]\ndefault_ttl_ms = {LEASE_MS}\n")  # fmt: skip
        with open(base / "log", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "tierd", "serve", "--config",
                                     str(cfg)], stderr=log)  # fmt: skip
        address = f"unix:{base}/s.sock"
        try:
            with TierdClient(address, tenant="t", timeout=30, transport="inband") as c:
                ns = c.open_namespace("m", LAYOUT)
                slow_keys = c.block_keys(ns, np.arange(16) + 100)
                other_keys = c.block_keys(ns, np.arange(16) + 200)
                resume = threading.Event()

                def chunks() -> Iterator[pb.PutChunk]:
                    header = pb.PutHeader(namespace_id=ns.id, keys=slow_keys,
                                          shape=pb.BlockShape(dims=list(LAYOUT.block_shape),
                                                              dtype=pb.DTYPE_FLOAT16))  # fmt: skip
                    yield pb.PutChunk(header=header, data=b"\x11" * (LAYOUT.block_bytes // 2))
                    resume.wait(30)  # the uploader stalls here
                    yield pb.PutChunk(data=b"\x22" * (LAYOUT.block_bytes // 2))

                with grpc.insecure_channel(address) as ch:
                    call = pb_grpc.TierdStub(ch).Put.future(chunks(), timeout=30)
                    # The stalled stream's lease is taken, then reaped by the daemon.
                    _wait_for(lambda: c.stats()["active_leases"] == 1, "the lease")
                    _wait_for(lambda: c.stats()["active_leases"] == 0, "the lease's expiry")
                    other = np.random.default_rng(3).standard_normal(
                        (1, *LAYOUT.block_shape)).astype(np.float16)  # fmt: skip
                    assert c.put(ns, other_keys, other) == ["stored"]
                    resume.set()
                    try:
                        call.result()
                        raise AssertionError("a put past its lease must fail")
                    except grpc.RpcError as e:
                        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION
                got = c.get(ns, other_keys + slow_keys)
                assert got.found == [True, False]
                assert np.array_equal(got.blocks[0], other[0])
        finally:
            proc.terminate()
            proc.wait(30)
            for seg in segments_of(base / "data"):
                seg.unlink(missing_ok=True)


def _wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
