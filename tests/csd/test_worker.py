"""The CsdWorker service over a real gRPC server (in-process): blocks and PartialAttend.

PartialAttend is checked against attention computed here, in float64, over the K/V taken
straight from the tensors the blocks were made of.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tierd.csd.shard import CATALOG_FILE
from tierd.csd.worker import CsdWorkerServer
from tierd.errors import ExtentError
from tierd.tiers.checksum import checksum
from tierd.tiers.nvme import DATA_FILE
from tierd_client._proto import csd_pb2 as cpb
from tierd_client._proto import csd_pb2_grpc as cpb_grpc
from tierd_client.layout import KVLayout
from tierd_client.rpc import field_from_metadata
from tierd_client.tensors import to_message as tensor_to_proto
from tierd_client.tensors import to_torch as tensor_from_proto

NS = b"w" * 16
MiB = 1 << 20


def _layout(dtype: str, tokens: int = 16) -> KVLayout:
    # GQA: 6 query heads over 2 kv heads; 4 layers; head_dim 64.
    return KVLayout(num_layers=4, num_kv_heads=2, head_dim=64, dtype=dtype, block_tokens=tokens)


def _make_blocks(layout: KVLayout, n: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.block_shape, generator=g).to(layout.torch_dtype()) for _ in range(n)]


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _key(i: int) -> bytes:
    return b"key-%04d" % i


def _store_req(
    layout: KVLayout, blocks: list[torch.Tensor], base: int = 0
) -> cpb.StoreBlocksRequest:
    return cpb.StoreBlocksRequest(layout=layout.to_proto(), blocks=[
        cpb.CsdBlock(namespace_id=NS, key=_key(base + i), checksum=checksum(_raw(b)), data=_raw(b))
        for i, b in enumerate(blocks)
    ])  # fmt: skip


def reference_attention(q: torch.Tensor, blocks: list[torch.Tensor], layer: int, scale: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """float64 attention of q [Tq, Hq, D] over one layer of `blocks`, no mask; (out, lse)."""
    k = torch.cat([b[layer, 0] for b in blocks], dim=1).double()  # [Hkv, N, D]
    v = torch.cat([b[layer, 1] for b in blocks], dim=1).double()
    group = q.shape[1] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)  # [Hq, N, D]
    s = torch.einsum("thd,hnd->thn", q.double(), k) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("thn,hnd->thd", torch.softmax(s, dim=-1), v)
    return out, lse


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


class Worker:
    def __init__(self, base: Path, capacity: int = 8 * MiB) -> None:
        self.dir = base / "shard"
        self.address = f"unix:{base / 'w.sock'}"
        self.capacity = capacity
        self.server: CsdWorkerServer | None = None
        self.channel: grpc.Channel | None = None
        self.start()

    def start(self) -> None:
        self.server = CsdWorkerServer(self.dir, self.address, self.capacity, drain_seconds=1.0)
        self.server.start()
        self.channel = grpc.insecure_channel(self.address)
        self.stub = cpb_grpc.CsdWorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.server is not None:
            self.server.stop()
        self.server = self.channel = None


@pytest.fixture
def worker() -> Iterator[Worker]:
    base = Path(tempfile.mkdtemp(prefix="csd-w-"))  # short: unix socket paths are <= 107 bytes
    w = Worker(base)
    yield w
    w.stop()
    shutil.rmtree(base, ignore_errors=True)


def test_health_and_block_calls(worker: Worker) -> None:
    resp = worker.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    layout = _layout("float16")
    blocks = _make_blocks(layout, 3, seed=1)
    assert worker.stub.StoreBlocks(_store_req(layout, blocks), timeout=10).stored == 3
    got = list(worker.stub.ReadBlocks(cpb.CsdKeys(namespace_id=NS,
                                                  keys=[_key(2), b"nope", _key(0)])))  # fmt: skip
    assert [(b.key, b.data) for b in got] == [
        (_key(2), _raw(blocks[2])),
        (_key(0), _raw(blocks[0])),
    ]
    assert all(b.checksum == checksum(b.data) for b in got)
    listed = worker.stub.ListBlocks(cpb.ListBlocksRequest())
    assert [(n.namespace_id, sorted(n.keys)) for n in listed.namespaces] == [
        (NS, [_key(0), _key(1), _key(2)])
    ]
    drop = worker.stub.DropBlocks(cpb.CsdKeys(namespace_id=NS, keys=[_key(1), b"nope"]))
    assert drop.dropped == 1
    st = worker.stub.Stats(cpb.WorkerStatsRequest())
    assert (st.blocks, st.capacity_bytes, st.corrupt_reads) == (2, 8 * MiB, 0)
    assert st.used_bytes == 2 * layout.block_bytes  # 32 KiB blocks: page multiples


def test_store_errors_become_status_codes(worker: Worker) -> None:
    layout = _layout("float32")
    req = _store_req(layout, _make_blocks(layout, 1, seed=2))
    req.blocks[0].checksum ^= 1
    with pytest.raises(grpc.RpcError) as e:
        worker.stub.StoreBlocks(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_from_metadata(e.value.trailing_metadata()) == "blocks[0].checksum"
    # 8 MiB holds 128 blocks of 64 KiB: 130 do not fit, and none of them is stored.
    with pytest.raises(grpc.RpcError) as e:
        worker.stub.StoreBlocks(_store_req(layout, _make_blocks(layout, 130, seed=3)), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert worker.stub.Stats(cpb.WorkerStatsRequest()).blocks == 0


def _attend(worker: Worker, layout: KVLayout, keys: list[bytes], layer: int, q: torch.Tensor,
            scale: float = 0.0) -> cpb.PartialAttendResponse:  # fmt: skip
    req = cpb.PartialAttendRequest(namespace_id=NS, layout=layout.to_proto(), keys=keys,
                                   layer=layer, q=tensor_to_proto(q), scale=scale)  # fmt: skip
    return worker.stub.PartialAttend(req, timeout=30)


@pytest.mark.parametrize(("dtype", "tol"), [("float32", 1e-5), ("bfloat16", 1e-2)])
@pytest.mark.parametrize("tokens", [16, 12])  # 12: layers start mid-page
def test_partial_attend_matches_reference(worker: Worker, dtype: str, tol: float,
                                          tokens: int) -> None:  # fmt: skip
    layout = _layout(dtype, tokens)
    blocks = _make_blocks(layout, 7, seed=4)
    worker.stub.StoreBlocks(_store_req(layout, blocks), timeout=30)
    g = torch.Generator().manual_seed(5)
    for layer in range(layout.num_layers):
        for q_tokens in (1, 3):
            q = torch.randn(q_tokens, 6, 64, generator=g).to(layout.torch_dtype())
            keys = [_key(i) for i in (4, 0, 6, 2, 5)] + [b"absent"]
            resp = _attend(worker, layout, keys, layer, q)
            out, lse = tensor_from_proto(resp.out, "out"), tensor_from_proto(resp.lse, "lse")
            assert out.dtype == lse.dtype == torch.float32
            assert out.shape == (q_tokens, 6, 64) and lse.shape == (q_tokens, 6)
            assert list(resp.missing) == [b"absent"]
            ref_out, ref_lse = reference_attention(q, [blocks[i] for i in (4, 0, 6, 2, 5)],
                                                   layer, 1 / math.sqrt(64))  # fmt: skip
            assert _rel(out, ref_out) < tol
            assert _rel(lse, ref_lse) < tol


def test_partial_attend_scale_no_keys_and_bad_input(worker: Worker) -> None:
    layout = _layout("float32")
    blocks = _make_blocks(layout, 2, seed=6)
    worker.stub.StoreBlocks(_store_req(layout, blocks), timeout=10)
    q = torch.randn(1, 6, 64)
    resp = _attend(worker, layout, [_key(0), _key(1)], 3, q, scale=0.05)
    ref_out, ref_lse = reference_attention(q, blocks, 3, 0.05)
    assert _rel(tensor_from_proto(resp.out, "out"), ref_out) < 1e-5
    assert _rel(tensor_from_proto(resp.lse, "lse"), ref_lse) < 1e-5
    empty = _attend(worker, layout, [b"absent"], 0, q)
    assert torch.equal(tensor_from_proto(empty.out, "out"), torch.zeros(1, 6, 64))
    assert torch.isneginf(tensor_from_proto(empty.lse, "lse")).all()
    for keys, layer, query, field in [
        ([_key(0)], 4, q, "layer"),
        ([_key(0)], 0, torch.randn(1, 5, 64), "q.shape"),
        ([_key(0)], 0, torch.randn(1, 6, 32), "q.shape"),
        ([_key(0), _key(0)], 0, q, "keys"),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            _attend(worker, layout, keys, layer, query)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_from_metadata(e.value.trailing_metadata()) == field


def test_restart_keeps_blocks_and_catches_corruption(worker: Worker) -> None:
    layout = _layout("float32")
    blocks = _make_blocks(layout, 3, seed=7)
    worker.stub.StoreBlocks(_store_req(layout, blocks), timeout=10)
    worker.stop()
    with sqlite3.connect(worker.dir / CATALOG_FILE) as db:
        (off,) = db.execute("SELECT offset FROM blocks WHERE key = ?", (_key(1),)).fetchone()
    fd = os.open(worker.dir / DATA_FILE, os.O_RDWR)
    os.pwrite(fd, b"\xff" * 8, off + layout.block_bytes - 8)  # last layer's V
    os.close(fd)
    worker.start()
    q = torch.randn(2, 6, 64)
    last = layout.num_layers - 1
    # Layer 0 of block 1 is intact and serves; its damaged last layer does not.
    resp = _attend(worker, layout, [_key(0), _key(1), _key(2)], 0, q)
    assert list(resp.missing) == []
    resp = _attend(worker, layout, [_key(0), _key(1), _key(2)], last, q)
    assert list(resp.missing) == [_key(1)]
    ref_out, _ = reference_attention(q, [blocks[0], blocks[2]], last, 1 / 8)
    assert _rel(tensor_from_proto(resp.out, "out"), ref_out) < 1e-5
    assert worker.stub.Stats(cpb.WorkerStatsRequest()).corrupt_reads == 1


def test_a_broken_shard_invariant_is_internal_and_logged(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    layout = _layout("float16")
    worker.stub.StoreBlocks(_store_req(layout, _make_blocks(layout, 1, seed=8)), timeout=10)
    assert worker.server is not None
    shard = worker.server.shard
    row = next(r for r in shard._catalog.rows() if r.key == _key(0))
    shard._nvme.free(row.offset, row.nbytes)  # the extent freed behind the shard's back
    with caplog.at_level(logging.ERROR, logger="tierd.server"), pytest.raises(grpc.RpcError) as e:
        worker.stub.DropBlocks(cpb.CsdKeys(namespace_id=NS, keys=[_key(0)]), timeout=10)
    # The shard freeing it again is a double free: the daemon's bug, not the caller's.
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert field_from_metadata(e.value.trailing_metadata()) is None
    details = e.value.details()
    assert "ExtentError" in details and f"offset={row.offset}" not in details
    ref = details.split()[2]  # "internal error <ref> (...)"
    [logged] = [r for r in caplog.records if ref in r.getMessage()]
    assert logged.exc_info is not None and isinstance(logged.exc_info[1], ExtentError)
    assert f"offset={row.offset}" in str(logged.exc_info[1])


def test_an_impossible_query_shape_is_invalid_argument_naming_the_field(worker: Worker) -> None:
    layout = _layout("float32")
    worker.stub.StoreBlocks(_store_req(layout, _make_blocks(layout, 1, seed=9)), timeout=10)
    for shape, field in [([1 << 32, 1 << 32, 64], "q.data"), ([1 << 63, 6, 64], "q.shape")]:
        q = tensor_to_proto(torch.zeros(1, 6, 64))
        del q.shape[:]
        q.shape.extend(shape)
        q.data = b""
        req = cpb.PartialAttendRequest(namespace_id=NS, layout=layout.to_proto(), keys=[_key(0)],
                                       layer=0, q=q)  # fmt: skip
        with pytest.raises(grpc.RpcError) as e:
            worker.stub.PartialAttend(req, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_from_metadata(e.value.trailing_metadata()) == field
