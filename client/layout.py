"""The KV layout of a model and how its blocks look in numpy, torch and on the wire.

Primitives: `KVLayout(...)` (validated, frozen), `.block_shape`, `.itemsize`,
`.block_bytes`, `.block_elems`, `.numpy_dtype`, `.torch_dtype()`, `.to_proto()`,
`KVLayout.from_proto(msg)`, `dtype_to_proto(name)`, `dtype_from_proto(value)`.

A block holds `block_tokens` tokens for all layers, laid out
`[layer][K|V][kv_head][token][dim]`, so its shape is
`(num_layers, 2, num_kv_heads, block_tokens, head_dim)`.

Numpy has no bfloat16 or float8: for those layouts numpy arrays carry the raw bits, as
`uint16` (bfloat16) or `uint8` (float8_e4m3) views, and `numpy_dtype` is that storage
dtype. Torch tensors are given and returned in their real dtype (`torch.bfloat16`,
`torch.float8_e4m3fn`). Arrays from `ml_dtypes` (dtype names "bfloat16",
"float8_e4m3fn") are accepted too and read through the same raw-bit view.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._proto import tierd_pb2 as pb

if TYPE_CHECKING:
    import torch

# name -> (itemsize, numpy storage dtype, torch dtype attribute, proto enum value)
_DTYPES: dict[str, tuple[int, np.dtype[Any], str, int]] = {
    "float16": (2, np.dtype(np.float16), "float16", pb.DTYPE_FLOAT16),
    "bfloat16": (2, np.dtype(np.uint16), "bfloat16", pb.DTYPE_BFLOAT16),
    "float32": (4, np.dtype(np.float32), "float32", pb.DTYPE_FLOAT32),
    # The wire name says e4m3; torch has two e4m3 formats and tierd means the OCP "fn"
    # one (no infinities, one NaN pattern), which is also what CUDA's fp8 kernels use.
    "float8_e4m3": (1, np.dtype(np.uint8), "float8_e4m3fn", pb.DTYPE_FLOAT8_E4M3),
    "uint8": (1, np.dtype(np.uint8), "uint8", pb.DTYPE_UINT8),
}
DTYPES: tuple[str, ...] = tuple(_DTYPES)

# Names under which ml_dtypes (or a future numpy) spells the dtypes numpy lacks.
_NUMPY_ALIASES: dict[str, str] = {"bfloat16": "bfloat16", "float8_e4m3": "float8_e4m3fn"}

_PROTO_TO_NAME: dict[int, str] = {v[3]: k for k, v in _DTYPES.items()}

# The proto's fields are uint32; larger values could not travel.
_U32_MAX = 2**32 - 1


def dtype_to_proto(name: str) -> int:
    """The wire enum of a dtype name ("bfloat16" -> DTYPE_BFLOAT16)."""
    try:
        return _DTYPES[name][3]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}") from None


def dtype_from_proto(value: int) -> str:
    """The dtype name of a wire enum value."""
    try:
        return _PROTO_TO_NAME[value]
    except KeyError:
        raise ValueError(f"unknown or unspecified DType enum value {value}") from None


@dataclass(frozen=True)
class KVLayout:
    """Shape of one model's KV cache; a block is `block_tokens` tokens of every layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    block_tokens: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            # bool is an int subclass; KVLayout(True, ...) is a bug, not a 1.
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(  # noqa: TRY004 - the layout reports all bad input as ValueError
                    f"KVLayout.{name} must be an int, got {type(value).__name__}"
                )
            if not 1 <= int(value) <= _U32_MAX:
                raise ValueError(f"KVLayout.{name} must be in [1, 2**32-1], got {value}")
            object.__setattr__(self, name, int(value))
        if self.dtype not in _DTYPES:
            raise ValueError(
                f"KVLayout.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}"
            )

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.num_kv_heads, self.block_tokens, self.head_dim)

    @property
    def itemsize(self) -> int:
        return _DTYPES[self.dtype][0]

    @property
    def block_elems(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.block_tokens * self.head_dim

    @property
    def block_bytes(self) -> int:
        return self.block_elems * self.itemsize

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        """The numpy dtype blocks are read and written as (raw bits for bf16 / f8)."""
        return _DTYPES[self.dtype][1]

    @property
    def numpy_alias(self) -> str | None:
        """The ml_dtypes name of the real dtype where numpy itself lacks it."""
        return _NUMPY_ALIASES.get(self.dtype)

    def torch_dtype(self) -> torch.dtype:
        """The real torch dtype; imports torch, so call it only when tensors are involved."""
        import torch

        return getattr(torch, _DTYPES[self.dtype][2])  # type: ignore[no-any-return]

    def to_proto(self) -> pb.KVLayout:
        return pb.KVLayout(
            num_layers=self.num_layers,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=dtype_to_proto(self.dtype),  # type: ignore[arg-type]
            block_tokens=self.block_tokens,
        )

    @classmethod
    def from_proto(cls, msg: pb.KVLayout) -> KVLayout:
        return cls(
            num_layers=msg.num_layers,
            num_kv_heads=msg.num_kv_heads,
            head_dim=msg.head_dim,
            dtype=dtype_from_proto(msg.dtype),
            block_tokens=msg.block_tokens,
        )
