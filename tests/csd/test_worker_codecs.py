"""A CSD worker holding encoded blocks (in-process gRPC server): stored and served as the
codec's codes, space counted in encoded bytes, attend over raw and encoded blocks of one
request merged, equal to attention over the decoded blocks, and encodings kept across a
restart of the worker."""

from __future__ import annotations

import math
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from tests.csd.test_worker import (
    NS,
    Worker,
    _attend,
    _key,
    _layout,
    _make_blocks,
    _raw,
    _rel,
    reference_attention,
)
from tierd.tiers.checksum import checksum
from tierd_client._proto import csd_pb2 as cpb
from tierd_client.tensors import to_torch as tensor_from_proto
from tierd_kernels.codecs import make_codec


@pytest.fixture
def worker() -> Iterator[Worker]:
    base = Path(tempfile.mkdtemp(prefix="csd-c-"))  # short: unix socket paths are <= 107 bytes
    w = Worker(base)
    yield w
    w.stop()
    shutil.rmtree(base, ignore_errors=True)


def _encoded(codec: str, block: torch.Tensor) -> bytes:
    return make_codec(codec).encode(block).numpy().tobytes()


def _store(worker: Worker, layout: object, items: list[tuple[bytes, bytes, str]]) -> int:
    req = cpb.StoreBlocksRequest(layout=layout.to_proto(), blocks=[  # type: ignore[attr-defined]
        cpb.CsdBlock(namespace_id=NS, key=k, checksum=checksum(d), data=d,
                     encoding="" if e == "raw" else e)
        for k, d, e in items
    ])  # fmt: skip
    return int(worker.stub.StoreBlocks(req, timeout=30).stored)


@pytest.mark.parametrize("codec", ["int8", "kivi4"])
def test_encoded_blocks_are_stored_served_and_attended_as_codes(worker: Worker,
                                                                codec: str) -> None:  # fmt: skip
    layout = _layout("float32")
    c = make_codec(codec)
    blocks = _make_blocks(layout, 6, seed=7)
    size = c.block_bytes(layout.block_shape, torch.float32)
    # Blocks 0-3 encoded, 4-5 raw: one request attends over both kinds.
    items = [(_key(i), _encoded(codec, b), codec) for i, b in enumerate(blocks[:4])]
    items += [(_key(i), _raw(b), "raw") for i, b in enumerate(blocks[4:], start=4)]
    assert _store(worker, layout, items) == 6
    stats = worker.stub.Stats(cpb.WorkerStatsRequest(), timeout=5)
    extent = lambda n: -(-n // 4096) * 4096
    assert stats.used_bytes == 4 * extent(size) + 2 * extent(layout.block_bytes)

    decoded = [c.decode(torch.frombuffer(bytearray(d), dtype=torch.uint8), layout.block_shape,
                        torch.float32) if e != "raw" else blocks[i]
               for i, (_, d, e) in enumerate(items)]  # fmt: skip
    for restarted in (False, True):
        got = {b.key: (b.encoding, b.data)
               for b in worker.stub.ReadBlocks(cpb.CsdKeys(namespace_id=NS,
                                                           keys=[k for k, _, _ in items]))}  # fmt: skip
        assert got == {k: ("" if e == "raw" else e, d) for k, d, e in items}
        g = torch.Generator().manual_seed(11)
        keys = [_key(i) for i in (5, 0, 3, 4, 1)]
        for layer in range(layout.num_layers):
            q = torch.randn(2, 6, 64, generator=g)
            resp = _attend(worker, layout, keys + [b"absent"], layer, q)
            assert list(resp.missing) == [b"absent"]
            out, lse = tensor_from_proto(resp.out, "out"), tensor_from_proto(resp.lse, "lse")
            ref_out, ref_lse = reference_attention(q, [decoded[i] for i in (5, 0, 3, 4, 1)],
                                                   layer, 1 / math.sqrt(64))  # fmt: skip
            assert _rel(out, ref_out) < 1e-5 and _rel(lse, ref_lse) < 1e-5
        if not restarted:
            worker.stop()
            worker.start()


def test_a_block_of_the_wrong_encoded_size_or_an_unknown_encoding_is_refused(
    worker: Worker,
) -> None:
    layout = _layout("float32")
    (block,) = _make_blocks(layout, 1, seed=1)
    for data, encoding in ((_raw(block), "int8"), (_encoded("int8", block), "zstd")):
        with pytest.raises(grpc.RpcError) as err:
            _store(worker, layout, [(_key(0), data, encoding)])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert worker.stub.Stats(cpb.WorkerStatsRequest(), timeout=5).blocks == 0


def test_a_shard_written_before_encodings_reads_its_blocks_as_raw(tmp_path: Path) -> None:
    from tierd.csd.shard import CATALOG_FILE, CsdShard, StoreItem
    from tierd.tiers.io_backend import PosixBackend

    layout = _layout("float32")
    (block,) = _make_blocks(layout, 1, seed=3)
    data = _raw(block)
    with CsdShard(tmp_path, 1 << 20, backend=PosixBackend()) as s:
        s.store(layout, [StoreItem(NS, _key(0), checksum(data), data)])
    with sqlite3.connect(tmp_path / CATALOG_FILE) as db:
        db.execute("ALTER TABLE blocks DROP COLUMN encoding")  # the schema before codecs
    with CsdShard(tmp_path, 1 << 20, backend=PosixBackend()) as s:
        assert list(s.read_blocks(NS, [_key(0)])) == [(_key(0), checksum(data), data, "raw")]
        assert s.read_layers(NS, layout, [_key(0)], 1).encoding == "raw"
