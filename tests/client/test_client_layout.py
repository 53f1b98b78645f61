"""KVLayout: block maths, validation, proto conversion, dtype tables."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

from tierd_client import DTYPES, KVLayout
from tierd_client._proto import tierd_pb2 as pb
from tierd_client.layout import dtype_from_proto, dtype_to_proto

ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float8_e4m3": 1, "uint8": 1}
NUMPY = {
    "float16": np.float16,
    "bfloat16": np.uint16,
    "float32": np.float32,
    "float8_e4m3": np.uint8,
    "uint8": np.uint8,
}


@pytest.mark.parametrize("dtype", DTYPES)
def test_block_maths(dtype: str) -> None:
    lay = KVLayout(num_layers=3, num_kv_heads=4, head_dim=64, dtype=dtype, block_tokens=16)
    assert lay.block_shape == (3, 2, 4, 16, 64)
    assert lay.itemsize == ITEMSIZE[dtype]
    assert lay.block_elems == 3 * 2 * 4 * 16 * 64
    assert lay.block_bytes == lay.block_elems * ITEMSIZE[dtype]
    assert lay.numpy_dtype == np.dtype(NUMPY[dtype])
    assert lay.numpy_dtype.itemsize == lay.itemsize


def test_smollm_layout_block_bytes() -> None:
    # SmolLM2-135M: 30 layers, 3 kv heads, head dim 64; bf16, 16 tokens a block.
    lay = KVLayout(30, 3, 64, "bfloat16", 16)
    assert lay.block_bytes == 30 * 2 * 3 * 16 * 64 * 2 == 368640


@pytest.mark.parametrize("dtype", DTYPES)
def test_proto_round_trip(dtype: str) -> None:
    lay = KVLayout(2, 8, 128, dtype, 32)
    msg = lay.to_proto()
    assert isinstance(msg, pb.KVLayout)
    assert KVLayout.from_proto(pb.KVLayout.FromString(msg.SerializeToString())) == lay
    assert dtype_from_proto(dtype_to_proto(dtype)) == dtype


def test_proto_enum_values() -> None:
    assert dtype_to_proto("bfloat16") == pb.DTYPE_BFLOAT16
    assert dtype_to_proto("float8_e4m3") == pb.DTYPE_FLOAT8_E4M3
    with pytest.raises(ValueError, match="unspecified"):
        dtype_from_proto(pb.DTYPE_UNSPECIFIED)
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_to_proto("int4")
    with pytest.raises(ValueError):
        KVLayout.from_proto(pb.KVLayout(num_layers=1, num_kv_heads=1, head_dim=1, block_tokens=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_layers": 0}, "num_layers"),
        ({"num_kv_heads": -1}, "num_kv_heads"),
        ({"head_dim": 2**32}, "head_dim"),
        ({"block_tokens": True}, "block_tokens"),
        ({"block_tokens": 16.0}, "block_tokens"),
        ({"num_layers": "2"}, "num_layers"),
        ({"dtype": "fp16"}, "dtype"),
        ({"dtype": "float8_e5m2"}, "dtype"),
    ],
)
def test_validation(kwargs: dict[str, object], match: str) -> None:
    base: dict[str, object] = {
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 64,
        "dtype": "float16",
        "block_tokens": 16,
    }
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KVLayout(**base)  # type: ignore[arg-type]


def test_numpy_ints_accepted_and_normalised() -> None:
    lay = KVLayout(np.int64(2), np.int32(2), 64, "float16", 16)  # type: ignore[arg-type]
    assert type(lay.num_layers) is int and lay == KVLayout(2, 2, 64, "float16", 16)


def test_frozen_and_hashable() -> None:
    lay = KVLayout(2, 2, 64, "float16", 16)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lay.num_layers = 3  # type: ignore[misc]
    assert {lay: 1}[KVLayout(2, 2, 64, "float16", 16)] == 1


def test_torch_dtypes() -> None:
    torch = pytest.importorskip("torch")
    assert KVLayout(1, 1, 1, "bfloat16", 1).torch_dtype() == torch.bfloat16
    assert KVLayout(1, 1, 1, "float8_e4m3", 1).torch_dtype() == torch.float8_e4m3fn
    assert KVLayout(1, 1, 1, "float32", 1).torch_dtype() == torch.float32


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys, tierd_client, tierd_client.client\n"
        "lay = tierd_client.KVLayout(1, 1, 8, 'bfloat16', 4)\n"
        "assert 'torch' not in sys.modules, 'torch imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
