"""Numpy / torch blocks <-> raw-bit storage views: dtype checks, zero copy, byte-exactness."""

from __future__ import annotations

import numpy as np
import pytest

from tierd_client import InvalidArgument, KVLayout
from tierd_client._proto import tierd_pb2 as pb
from tierd_client.arrays import as_tensor, block_rows, out_buffer, storage_view

torch = pytest.importorskip("torch")

BF16 = KVLayout(2, 2, 8, "bfloat16", 4)
F16 = KVLayout(2, 2, 8, "float16", 4)
F8 = KVLayout(2, 2, 8, "float8_e4m3", 4)


def _random_bits(layout: KVLayout, n: int, seed: int = 0) -> np.ndarray:
    """Every bit pattern is fair game, NaN payloads and -0 included."""
    info = np.iinfo(layout.numpy_dtype)
    rng = np.random.default_rng(seed)
    return rng.integers(
        info.min, info.max, (n, *layout.block_shape), dtype=layout.numpy_dtype, endpoint=True
    )


def test_bf16_tensor_to_raw_bytes_and_back_is_byte_exact() -> None:
    bits = _random_bits(BF16, 3)
    t = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).clone()
    rows = block_rows(t, BF16, 3)
    raw = b"".join(bytes(p) for p in rows.byte_pieces())
    assert raw == bits.tobytes()
    assert len(raw) == 3 * BF16.block_bytes

    buf = out_buffer(BF16, 3, as_torch=True)
    buf.view.reshape(-1).view(np.uint8)[:] = np.frombuffer(raw, dtype=np.uint8)
    back = buf.result
    assert back.dtype == torch.bfloat16 and tuple(back.shape) == (3, *BF16.block_shape)
    assert torch.equal(back.view(torch.int16), t.view(torch.int16))


def test_bf16_values_survive() -> None:
    t = torch.randn(1, *BF16.block_shape).to(torch.bfloat16)
    view = storage_view(t, BF16)
    assert view.dtype == np.uint16
    assert torch.equal(as_tensor(view.copy(), BF16), t)


def test_tensor_view_is_zero_copy() -> None:
    t = torch.zeros(2, *BF16.block_shape, dtype=torch.bfloat16)
    view = storage_view(t, BF16)
    t[1, 0, 0, 0, 0, 0] = 1.0
    assert view[1, 0, 0, 0, 0, 0] == 0x3F80  # bf16 bits of 1.0
    assert np.shares_memory(view, t.view(torch.int16).numpy())


def test_float8_tensor_round_trip() -> None:
    bits = _random_bits(F8, 2, seed=1)
    t = torch.from_numpy(bits).view(torch.float8_e4m3fn)
    assert storage_view(t, F8).tobytes() == bits.tobytes()
    assert torch.equal(as_tensor(bits, F8).view(torch.uint8), t.view(torch.uint8))


def test_numpy_raw_bits_accepted_for_bf16() -> None:
    bits = _random_bits(BF16, 2)
    rows = block_rows(bits, BF16, 2)
    assert rows.row(1) is not None and np.shares_memory(rows.row(1), bits)
    assert rows.wire_shape() == pb.BlockShape(dims=list(BF16.block_shape), dtype=pb.DTYPE_BFLOAT16)


def test_sequence_of_tensors() -> None:
    ts = [torch.randn(*F16.block_shape, dtype=torch.float16) for _ in range(3)]
    rows = block_rows(ts, F16, 3)
    assert b"".join(bytes(p) for p in rows.byte_pieces()) == b"".join(
        t.numpy().tobytes() for t in ts
    )


@pytest.mark.parametrize(
    ("blocks", "field"),
    [
        (np.zeros((2, *BF16.block_shape), np.float16), "blocks.dtype"),  # numpy f16 for bf16
        (np.zeros((2, *BF16.block_shape), np.int16), "blocks.dtype"),
        (torch.zeros(2, *BF16.block_shape, dtype=torch.float16), "blocks.dtype"),
        (torch.zeros(2, *BF16.block_shape, dtype=torch.int16), "blocks.dtype"),
        (np.zeros((3, *BF16.block_shape), np.uint16), "blocks"),  # 3 blocks for 2 keys
        (np.zeros((2, 2, 2, 4, 2, 8), np.uint16), "blocks.shape"),  # token-major mistake
        (np.zeros((2, *BF16.block_shape[:-1]), np.uint16), "blocks"),  # rank 5
        ([np.zeros(BF16.block_shape, np.uint16)], "blocks"),  # sequence too short
        ([np.zeros(BF16.block_shape, np.uint16), np.zeros(4, np.uint16)], "blocks[1].shape"),
        (
            [np.zeros(BF16.block_shape, np.uint16), np.zeros(BF16.block_shape, np.float32)],
            "blocks[1].dtype",
        ),
        ("not blocks", "blocks"),
        ([[0] * 8] * 2, "blocks[0]"),
    ],
)
def test_bad_blocks_name_the_field(blocks: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        block_rows(blocks, BF16, 2)
    assert e.value.field == field


def test_fresh_out_buffers_are_zero() -> None:
    buf = out_buffer(BF16, 2)
    assert buf.result is buf.view and buf.view.dtype == np.uint16 and not buf.view.any()
    tbuf = out_buffer(BF16, 2, as_torch=True)
    assert tbuf.result.dtype == torch.bfloat16 and not tbuf.result.view(torch.int16).any()
    assert np.shares_memory(tbuf.view, tbuf.result.view(torch.int16).numpy())


def test_out_given() -> None:
    out = np.full((2, *F16.block_shape), 7, np.float16)
    buf = out_buffer(F16, 2, out=out)
    assert buf.result is out and np.shares_memory(buf.view, out)
    as_t = out_buffer(F16, 2, out=out, as_torch=True)
    assert isinstance(as_t.result, torch.Tensor) and np.shares_memory(as_t.view, out)
    t = torch.empty(2, *BF16.block_shape, dtype=torch.bfloat16)
    tb = out_buffer(BF16, 2, out=t)
    assert tb.result is t


@pytest.mark.parametrize(
    ("out", "field"),
    [
        (np.zeros((3, *F16.block_shape), np.float16), "out.shape"),
        (np.zeros((2, *F16.block_shape), np.float32), "out.dtype"),
        (np.zeros((2, 2, *F16.block_shape), np.float16)[:, 0], "out"),  # not contiguous
        (torch.zeros(2, *F16.block_shape, dtype=torch.bfloat16), "out.dtype"),
    ],
)
def test_bad_out(out: object, field: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        out_buffer(F16, 2, out=out)
    assert e.value.field == field


def test_readonly_out_rejected() -> None:
    out = np.zeros((1, *F16.block_shape), np.float16)
    out.flags.writeable = False
    with pytest.raises(InvalidArgument):
        out_buffer(F16, 1, out=out)


def test_ml_dtypes_bfloat16_accepted() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    a = np.ones((1, *BF16.block_shape), dtype=ml_dtypes.bfloat16)
    assert (block_rows(a, BF16, 1).row(0) == 0x3F80).all()
