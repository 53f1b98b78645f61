"""torch tensors on the wire: the `Tensor` message (shape, dtype enum, raw little-endian bytes).

Primitives: `tensor_to_proto(t) -> pb.Tensor`, `tensor_from_proto(msg, field) -> torch.Tensor`.

Bytes are the tensor's raw bits in C order; bfloat16 and float8 travel as their bits, like
KV blocks do. Decoding copies (protobuf bytes are immutable and torch wants writable memory).
"""

from __future__ import annotations

import math

import torch
from tierd_client._proto import tierd_pb2 as pb
from tierd_client.layout import dtype_from_proto, dtype_to_proto

from tierd.errors import InvalidArgument

_TORCH_OF: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float8_e4m3": torch.float8_e4m3fn,
    "uint8": torch.uint8,
}
_NAME_OF: dict[torch.dtype, str] = {v: k for k, v in _TORCH_OF.items()}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_OF[name]


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    name = _NAME_OF.get(t.dtype)
    if name is None:
        raise InvalidArgument(f"dtype {t.dtype} cannot travel; expected one of {list(_TORCH_OF)}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    # view(uint8) reinterprets the bits of any dtype, so bf16/fp8 need no numpy dtype.
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return pb.Tensor(shape=list(t.shape), dtype=dtype_to_proto(name), data=data)  # type: ignore[arg-type]


def tensor_from_proto(msg: pb.Tensor, field: str) -> torch.Tensor:
    try:
        name = dtype_from_proto(msg.dtype)
    except ValueError as exc:
        raise InvalidArgument(str(exc), field=f"{field}.dtype") from None
    dtype = _TORCH_OF[name]
    shape = [int(d) for d in msg.shape]
    expect = math.prod(shape) * dtype.itemsize
    if len(msg.data) != expect:
        raise InvalidArgument(
            f"{len(msg.data)} bytes for shape {shape} of {name} ({expect} expected)",
            field=f"{field}.data",
        )
    if expect == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(msg.data), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)
