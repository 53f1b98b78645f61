"""Dense tensors on the wire (the `Tensor` message): queries, new K/V, attention outputs.

Primitives: `to_message(x) -> pb.Tensor`, `to_torch(msg) -> torch.Tensor`,
`to_numpy(msg) -> np.ndarray`.

Accepts numpy arrays and CPU torch tensors. bfloat16 and float8 travel as raw bits; numpy
callers get them as uint16/uint8 arrays, torch callers get the real dtype.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from ._proto import tierd_pb2 as pb
from .errors import InvalidArgument

_NUMPY = {
    pb.DTYPE_FLOAT16: np.dtype(np.float16),
    pb.DTYPE_FLOAT32: np.dtype(np.float32),
    pb.DTYPE_BFLOAT16: np.dtype(np.uint16),  # raw bits
    pb.DTYPE_FLOAT8_E4M3: np.dtype(np.uint8),  # raw bits
    pb.DTYPE_UINT8: np.dtype(np.uint8),
}
_FROM_NUMPY = {np.dtype(np.float16): pb.DTYPE_FLOAT16, np.dtype(np.float32): pb.DTYPE_FLOAT32,
               np.dtype(np.uint8): pb.DTYPE_UINT8}  # fmt: skip
_TORCH_NAMES = {pb.DTYPE_FLOAT16: "float16", pb.DTYPE_FLOAT32: "float32",
                pb.DTYPE_BFLOAT16: "bfloat16", pb.DTYPE_FLOAT8_E4M3: "float8_e4m3fn",
                pb.DTYPE_UINT8: "uint8"}  # fmt: skip
_RAW = {"bfloat16": "int16", "float8_e4m3fn": "uint8"}
# Bounds numpy can reshape to (an empty tensor may have any other dimension).
_MAX_DIMS = 32
_MAX_DIM = 1 << 40


def to_message(x: Any) -> pb.Tensor:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        t = x.detach().cpu().contiguous()
        name = str(t.dtype).removeprefix("torch.")
        codes = {v: k for k, v in _TORCH_NAMES.items()}
        if name not in codes:
            raise InvalidArgument(f"tensors of {t.dtype} cannot travel", field="tensor.dtype")
        if name in _RAW:
            t = t.view(getattr(torch, _RAW[name]))
        return pb.Tensor(shape=list(x.shape), dtype=codes[name], data=t.numpy().tobytes())
    arr = np.ascontiguousarray(x)
    if arr.dtype not in _FROM_NUMPY:
        raise InvalidArgument(f"arrays of {arr.dtype} cannot travel", field="tensor.dtype")
    return pb.Tensor(shape=list(arr.shape), dtype=_FROM_NUMPY[arr.dtype], data=arr.tobytes())


def to_numpy(msg: pb.Tensor, field: str = "tensor") -> np.ndarray:
    dtype = _NUMPY.get(msg.dtype)
    if dtype is None:
        raise InvalidArgument("unknown or unspecified dtype", field=f"{field}.dtype")
    shape = tuple(int(d) for d in msg.shape)
    if len(shape) > _MAX_DIMS or any(d > _MAX_DIM for d in shape):
        raise InvalidArgument(
            f"shape {list(shape)}: at most {_MAX_DIMS} dimensions of at most {_MAX_DIM}",
            field=f"{field}.shape",
        )
    count = math.prod(shape)  # Python ints: np.prod would wrap around past 2**63
    if count * dtype.itemsize != len(msg.data):
        raise InvalidArgument(
            f"shape {list(shape)} of {dtype} needs {count * dtype.itemsize} bytes, "
            f"got {len(msg.data)}",
            field=f"{field}.data",
        )
    return np.frombuffer(msg.data, dtype=dtype).reshape(shape)


def to_torch(msg: pb.Tensor, field: str = "tensor") -> Any:
    import torch

    arr = to_numpy(msg, field)
    name = _TORCH_NAMES[msg.dtype]
    t = torch.from_numpy(arr.copy())  # the message's bytes are read-only
    if name in _RAW:
        t = t.view(getattr(torch, name))
    return t
