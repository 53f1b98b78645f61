"""Blocks given as numpy arrays or torch tensors, seen as raw-bit numpy views.

Primitives: `is_tensor(x)`, `storage_view(x, layout, field)`,
`block_rows(blocks, layout, n) -> BlockRows` (`.row(i)`, `.byte_pieces()`, `.wire_shape()`),
`out_buffer(layout, n, out=None, as_torch=False) -> OutBuffer` (`.view`, `.result`,
`.finish(found)`), `as_tensor(view, layout)`, `byte_rows(view, layout)`.

Both transports move bytes, so everything is reduced to a numpy array in the layout's
*storage* dtype (`KVLayout.numpy_dtype`: uint16 for bfloat16, uint8 for float8) that
shares memory with what the caller gave: a CPU tensor is read through `.numpy()` on a
same-itemsize integer view, never copied. torch is imported only when a tensor is seen or
asked for (`sys.modules` tells whether one could exist at all).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._proto import tierd_pb2 as pb
from .errors import InvalidArgument
from .layout import KVLayout, dtype_to_proto
from .shapes import check_block_shape

# Integer torch dtypes of the same width, to reach dtypes numpy cannot hold.
_TORCH_RAW_VIEW = {"bfloat16": "int16", "float8_e4m3": "uint8"}


def is_tensor(x: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _tensor_view(t: Any, layout: KVLayout, field: str) -> np.ndarray:
    """A CPU tensor of the layout's dtype as a storage-dtype numpy array (shared memory)."""
    import torch

    want = layout.torch_dtype()
    if t.dtype != want:
        raise InvalidArgument(
            f"tensor dtype {t.dtype} does not match the layout's {want}", field=f"{field}.dtype"
        )
    if t.device.type != "cpu":
        raise InvalidArgument(f"tensor is on {t.device}, expected cpu", field=field)
    t = t.detach()
    raw = _TORCH_RAW_VIEW.get(layout.dtype)
    if raw is not None:
        # Same element size, so this view keeps shape and strides (works non-contiguous).
        t = t.view(getattr(torch, raw))
    return t.numpy().view(layout.numpy_dtype)


def _array_view(a: Any, layout: KVLayout, field: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise InvalidArgument(
            f"expected a numpy array or torch tensor, got {type(a).__name__}", field=field
        )
    want = layout.numpy_dtype
    if a.dtype == want:
        return a
    if layout.numpy_alias is not None and a.dtype.name == layout.numpy_alias:
        return a.view(want)  # ml_dtypes array: reinterpret its bits, no copy
    hint = f" (raw bits of {layout.dtype})" if layout.numpy_alias else ""
    raise InvalidArgument(
        f"array dtype {a.dtype} does not match the layout: expected {want}{hint}",
        field=f"{field}.dtype",
    )


def storage_view(x: Any, layout: KVLayout, field: str = "blocks") -> np.ndarray:
    """`x` (array or tensor) as a numpy array of the layout's storage dtype, no copy."""
    return _tensor_view(x, layout, field) if is_tensor(x) else _array_view(x, layout, field)


def _to_cpu(x: Any) -> Any:
    # Device tensors cannot be read by numpy: one device-to-host copy is unavoidable.
    return x.cpu() if is_tensor(x) and x.device.type != "cpu" else x


@dataclass(frozen=True)
class BlockRows:
    """n blocks in storage dtype: one [n, *block_shape] array or n separate arrays."""

    layout: KVLayout
    whole: np.ndarray | None
    rows: Sequence[np.ndarray]

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, i: int) -> np.ndarray:
        return self.rows[i]

    def wire_shape(self) -> pb.BlockShape:
        """The shape and dtype of what was really given, for the daemon to check."""
        dims = self.rows[0].shape if self.rows else self.layout.block_shape
        dtype = dtype_to_proto(self.layout.dtype)
        return pb.BlockShape(dims=list(dims), dtype=dtype)  # type: ignore[arg-type]

    def byte_pieces(self) -> Iterator[memoryview]:
        """The payload as byte views in block order; lazily copies only strided rows."""
        if self.whole is not None and self.whole.flags.c_contiguous:
            if self.whole.size:
                yield self.whole.reshape(-1).view(np.uint8).data
            return
        for r in self.rows:
            yield np.ascontiguousarray(r).reshape(-1).view(np.uint8).data


def block_rows(blocks: Any, layout: KVLayout, n: int) -> BlockRows:
    """Validate `blocks` ([n, *block_shape] or n of block_shape) against the layout."""
    if is_tensor(blocks) or isinstance(blocks, np.ndarray):
        whole = storage_view(_to_cpu(blocks), layout, "blocks")
        if whole.ndim != 6 or whole.shape[0] != n:
            raise InvalidArgument(
                f"expected an array of shape [{n}, *{layout.block_shape}], got {whole.shape}",
                field="blocks",
            )
        check_block_shape(layout, whole.shape[1:], "blocks.shape")
        return BlockRows(layout, whole, list(whole))
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence):
        raise InvalidArgument(
            "blocks must be an array/tensor or a sequence of arrays/tensors", field="blocks"
        )
    if len(blocks) != n:
        raise InvalidArgument(f"{len(blocks)} blocks for {n} keys", field="blocks")
    rows = []
    for i, b in enumerate(blocks):
        r = storage_view(_to_cpu(b), layout, f"blocks[{i}]")
        check_block_shape(layout, r.shape, f"blocks[{i}].shape")
        rows.append(r)
    return BlockRows(layout, None, rows)


def byte_rows(view: np.ndarray, layout: KVLayout) -> np.ndarray:
    """A C-contiguous [n, *block_shape] view as [n, block_bytes] uint8 (shared memory)."""
    return view.reshape(view.shape[0], layout.block_elems).view(np.uint8)


@dataclass
class OutBuffer:
    """Where a get writes: `view` is the storage-dtype numpy array the transports fill."""

    view: np.ndarray
    result: Any
    _device_target: Any = field(default=None)

    def finish(self, found: Sequence[bool]) -> None:
        """Move found rows onto the device when the caller's `out` lives there."""
        target, self._device_target = self._device_target, None
        if target is None:
            return
        import torch

        staging = self.result
        idx = [i for i, f in enumerate(found) if f]
        if idx:
            index = torch.tensor(idx, dtype=torch.long)
            target.index_copy_(0, index.to(target.device), staging[index].to(target.device))
        self.result = target


def _check_out(view: np.ndarray, n: int, layout: KVLayout) -> None:
    if view.shape != (n, *layout.block_shape):
        raise InvalidArgument(
            f"out has shape {view.shape}, expected {(n, *layout.block_shape)}", field="out.shape"
        )
    if not view.flags.c_contiguous or not view.flags.writeable:
        raise InvalidArgument("out must be C-contiguous and writeable", field="out")


def as_tensor(view: np.ndarray, layout: KVLayout) -> Any:
    """A storage-dtype numpy array as a torch tensor of the real dtype (shared memory)."""
    import torch

    raw = _TORCH_RAW_VIEW.get(layout.dtype)
    if raw == "int16":
        return torch.from_numpy(view.view(np.int16)).view(layout.torch_dtype())
    return torch.from_numpy(view).view(layout.torch_dtype())


def out_buffer(layout: KVLayout, n: int, *, out: Any = None, as_torch: bool = False) -> OutBuffer:
    """The caller's `out` (checked) or a fresh zeroed buffer, numpy unless torch is wanted.

    A numpy `out` with `as_torch` is returned as a tensor sharing its memory.
    """
    shape = (n, *layout.block_shape)
    if out is None:
        arr = np.zeros(shape, dtype=layout.numpy_dtype)
        return OutBuffer(arr, as_tensor(arr, layout) if as_torch else arr)
    if is_tensor(out) and out.device.type != "cpu":
        # numpy cannot write device memory: stage on the host, `finish` copies found rows.
        if out.dtype != layout.torch_dtype():
            raise InvalidArgument(f"out dtype {out.dtype} != the layout's", field="out.dtype")
        if tuple(out.shape) != shape:
            raise InvalidArgument(f"out has shape {tuple(out.shape)}", field="out.shape")
        staging = np.empty(shape, dtype=layout.numpy_dtype)
        return OutBuffer(staging, as_tensor(staging, layout), out)
    if is_tensor(out):
        view = _tensor_view(out, layout, "out")
        result = out
    else:
        view = _array_view(out, layout, "out")
        result = as_tensor(view, layout) if as_torch else out
    _check_out(view, n, layout)
    return OutBuffer(view, result)
