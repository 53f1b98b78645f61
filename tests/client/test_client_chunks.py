"""In-band framing: Put payloads re-cut into chunks, Get streams written into rows."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tierd_client import KVLayout
from tierd_client._proto import tierd_pb2 as pb
from tierd_client.arrays import block_rows
from tierd_client.chunks import CHUNK_BYTES, GetAssembler, iter_chunks, put_chunks
from tierd_client.errors import Internal


def _payload(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _pieces(data: bytes, sizes: list[int]) -> list[memoryview]:
    mv, out, pos = memoryview(data), [], 0
    for s in sizes:
        out.append(mv[pos : pos + s])
        pos += s
    assert pos == len(data)
    return out


def test_zero_bytes_gives_no_chunks() -> None:
    assert list(iter_chunks([], 8)) == []
    assert list(iter_chunks([memoryview(b"")], 8)) == []


def test_zero_bytes_put_still_sends_the_header() -> None:
    header = pb.PutHeader(namespace_id=b"n" * 16, keys=[])
    chunks = list(put_chunks(header, [], 8))
    assert len(chunks) == 1
    assert chunks[0].HasField("header") and chunks[0].data == b""


@pytest.mark.parametrize("multiple", [1, 2, 5])
def test_exact_multiples(multiple: int) -> None:
    data = _payload(8 * multiple)
    chunks = list(iter_chunks([memoryview(data)], 8))
    assert [len(c) for c in chunks] == [8] * multiple
    assert b"".join(chunks) == data


@pytest.mark.parametrize(("size", "expect"), [(1, [1]), (7, [7]), (9, [8, 1]), (23, [8, 8, 7])])
def test_remainder(size: int, expect: list[int]) -> None:
    data = _payload(size)
    chunks = list(iter_chunks([memoryview(data)], 8))
    assert [len(c) for c in chunks] == expect
    assert b"".join(chunks) == data


def test_pieces_cross_chunk_boundaries() -> None:
    rng = np.random.default_rng(3)
    sizes = [int(s) for s in rng.integers(0, 30, 50)]
    data = _payload(sum(sizes), seed=1)
    chunks = list(iter_chunks(_pieces(data, sizes), 16))
    assert b"".join(chunks) == data
    assert all(len(c) == 16 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 16
    assert all(type(c) is bytes for c in chunks)


def test_only_the_first_chunk_has_the_header() -> None:
    header = pb.PutHeader(namespace_id=b"n" * 16, keys=[b"k" * 16] * 3)
    data = _payload(40)
    chunks = list(put_chunks(header, [memoryview(data)], 16))
    assert [c.HasField("header") for c in chunks] == [True, False, False]
    assert chunks[0].header == header
    assert b"".join(c.data for c in chunks) == data


def test_real_blocks_use_4mib_chunks() -> None:
    lay = KVLayout(4, 8, 128, "float16", 32)  # 512 KiB blocks
    n = 9  # 4.5 MiB: one full chunk and a remainder
    blocks = np.random.default_rng(0).standard_normal((n, *lay.block_shape)).astype(np.float16)
    rows = block_rows(blocks, lay, n)
    header = pb.PutHeader(namespace_id=b"n" * 16, keys=[bytes([i]) * 16 for i in range(n)])
    chunks = list(put_chunks(header, rows.byte_pieces()))
    assert [len(c.data) for c in chunks] == [CHUNK_BYTES, n * lay.block_bytes - CHUNK_BYTES]
    assert b"".join(c.data for c in chunks) == blocks.tobytes()
    assert all(c.ByteSize() < 64 << 20 for c in chunks)


def test_strided_blocks_are_sent_in_logical_order() -> None:
    lay = KVLayout(1, 2, 4, "float32", 2)
    big = np.arange(3 * 2 * int(np.prod(lay.block_shape)), dtype=np.float32)
    blocks = big.reshape(3, 2, *lay.block_shape)[:, 1]  # every other block: not contiguous
    assert not blocks.flags.c_contiguous
    rows = block_rows(blocks, lay, 3)
    assert b"".join(iter_chunks(rows.byte_pieces(), 7)) == np.ascontiguousarray(blocks).tobytes()


def _assemble(found: list[bool], bb: int, data: bytes, cuts: list[int]) -> tuple:
    dest = np.full((len(found), bb), 0xEE, dtype=np.uint8)
    asm = GetAssembler(dest, bb)
    bounds = [0, *cuts, len(data)]
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        chunk = pb.GetChunk(data=data[a:b])
        if i == 0:
            chunk.found.extend(found)
            chunk.block_bytes = bb
        asm.feed(chunk)
    return asm.finish(), dest


@pytest.mark.parametrize("cuts", [[], [10], [3, 4, 25], [5, 10, 15, 20, 25]])
def test_get_assembler_fills_found_rows_only(cuts: list[int]) -> None:
    found = [True, False, True, True, False]
    bb = 10
    data = _payload(3 * bb, seed=5)
    got, dest = _assemble(found, bb, data, cuts)
    assert got == found
    assert dest[[0, 2, 3]].tobytes() == data
    assert (dest[[1, 4]] == 0xEE).all()


def test_get_assembler_all_missing() -> None:
    got, dest = _assemble([False, False], 10, b"", [])
    assert got == [False, False] and (dest == 0xEE).all()


def test_get_assembler_errors() -> None:
    with pytest.raises(Internal, match="more bytes"):
        _assemble([True], 4, b"12345", [])
    with pytest.raises(Internal) as e:
        _assemble([True, True], 4, b"12345", [])
    assert e.value.field == "data"
    dest = np.zeros((2, 4), dtype=np.uint8)
    with pytest.raises(Internal) as e:
        GetAssembler(dest, 4).feed(pb.GetChunk(found=[True], block_bytes=4, data=b"1234"))
    assert e.value.field == "found"
    with pytest.raises(Internal) as e:
        GetAssembler(dest, 4).feed(pb.GetChunk(found=[True, True], block_bytes=8))
    assert e.value.field == "block_bytes"
    with pytest.raises(Internal, match="before its first chunk"):
        GetAssembler(dest, 4).finish()
    assert GetAssembler(np.zeros((0, 4), dtype=np.uint8), 4).finish() == []
