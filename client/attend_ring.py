"""The attend ring's wire format, shared by the client and the daemon: one definition of
where each byte lies, so both sides read and write the same layout.

Primitives: client `encode_request(area, items) -> int | None`, `response_bytes(q_shapes)`,
`read_response(area, as_torch) -> [(out, lse)] | RingError`; daemon
`table_bytes(header)`, `read_request(table, area_bytes) -> [RingItem]`,
`wire_tensor(spec, area, field)`, `wire_tokens(item, area)`, `write_results(area,
results)`, `write_error(area, code, field, message)`; the control words `CTL_BYTES`,
`SEQ`, `CLOSED`.

A ring is two sealed memory files the daemon creates per client connection: the request
file (the client writes, the daemon only reads) and the response file (the daemon writes,
the client maps it read-only). Each starts with a cache line of control words, then its
area:

  request  [0, 8)  seq, u64: written by the client after the request is complete
  response [0, 8)  seq, u64: written by the daemon after the response is complete
           [8, 16) closed, u64: nonzero once the daemon serves this ring no more

One request is in flight per ring (a decode step's layers depend on each other); a
client wanting more at once opens more rings. A request is a header, a table of fixed
size entries (one per item: ids, scale, and three tensor specs with explicit dtype, dims,
offset and length), and a data region the specs point into:

  header  <IIQ   magic "TRQ1", n_items, reserved
  item    <QIfII Q  sequence_id, layer, scale (float32, as the RPC's field), has_kv,
                    n_tokens, tokens_offset; then q, k_new, v_new as
  tensor  <II4QQQ   dtype (the wire DType enum), ndim (<= 4), dims, offset, nbytes

A response is a header `<IIII` (magic "TRS1", status: 0 or a gRPC status code, n_items,
reserved), then either a table of (out, lse) tensor specs and their data, or the error's
field and message lengths `<II` and their UTF-8 bytes. Offsets are relative to the area
and 8-aligned. Everything the daemon reads is copied out before it is checked (the client
can rewrite the area at any time), and every offset and length is checked against the
area before any data is touched; the tensors' own checks are the RPC path's (`to_torch`),
so both paths refuse the same inputs with the same errors.
"""

from __future__ import annotations

import math
import operator
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from ._proto import tierd_pb2 as pb
from .errors import InvalidArgument
from .tensors import to_numpy, to_torch

CTL_BYTES = 64  # control words: one cache line before each area
SEQ = 0  # index of the seq word in either file's control words (u64)
CLOSED = 1  # index of the closed word in the response file

REQUEST_MAGIC = 0x31515254  # "TRQ1"
RESPONSE_MAGIC = 0x31535254  # "TRS1"
MAX_DIMS = 4  # tensors with more dimensions take the RPC path
MAX_ITEMS = 4096

_HEADER = struct.Struct("<IIQ")
_ITEM = struct.Struct("<QIfIIQ")
_TENSOR = struct.Struct("<II4QQQ")
ITEM_BYTES = _ITEM.size + 3 * _TENSOR.size
_RESP_HEADER = struct.Struct("<IIII")
_ERR = struct.Struct("<II")
RESULT_BYTES = 2 * _TENSOR.size

_FROM_NUMPY: dict[np.dtype, int] = {
    np.dtype(np.float16): pb.DTYPE_FLOAT16, np.dtype(np.float32): pb.DTYPE_FLOAT32,
    np.dtype(np.uint8): pb.DTYPE_UINT8,
}  # fmt: skip
_FROM_TORCH: dict[str, int] = {
    "float16": pb.DTYPE_FLOAT16, "float32": pb.DTYPE_FLOAT32, "bfloat16": pb.DTYPE_BFLOAT16,
    "float8_e4m3fn": pb.DTYPE_FLOAT8_E4M3, "uint8": pb.DTYPE_UINT8,
}  # fmt: skip
_RAW = {"bfloat16": "int16", "float8_e4m3fn": "uint8"}  # numpy has no such dtypes
_TORCH_NAMES = {code: name for name, code in _FROM_TORCH.items()}
_MAX_DIM = 1 << 40  # as `to_numpy` bounds each dimension
_F32_MAX = float(np.finfo(np.float32).max)


def align8(n: int) -> int:
    return (n + 7) & ~7


@dataclass(frozen=True)
class TensorSpec:
    dtype: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class RingItem:
    sequence_id: int
    layer: int
    scale: float
    has_kv: bool
    q: TensorSpec
    k_new: TensorSpec
    v_new: TensorSpec
    tokens_offset: int
    n_tokens: int


@dataclass(frozen=True)
class RingError:
    code: int  # a gRPC status code's number
    field: str | None
    message: str


class _Wire:
    """A tensor as `to_numpy` reads a message: dtype, shape and its bytes."""

    __slots__ = ("data", "dtype", "shape")

    def __init__(self, dtype: int, shape: tuple[int, ...], data: Any) -> None:
        self.dtype, self.shape, self.data = dtype, shape, data


# ---- client: requests ------------------------------------------------------------------


_torch: Any = None  # the torch module, once a tensor was seen (never imported here)
_TORCH_CODES: dict[Any, tuple[int, Any]] = {}  # torch dtype -> (wire code, raw view dtype)


def _torch_codes(torch: Any) -> dict[Any, tuple[int, Any]]:
    global _torch
    if not _TORCH_CODES:
        for name, code in _FROM_TORCH.items():
            raw = getattr(torch, _RAW[name]) if name in _RAW else None
            _TORCH_CODES[getattr(torch, name)] = (code, raw)
        _torch = torch
    return _TORCH_CODES


def _as_array(x: Any) -> tuple[int, np.ndarray] | None:
    """The wire dtype and a numpy view of `x`, or None where only the RPC path can say
    what happens to it (its dtype, rank or kind is one `to_message` would treat alike)."""
    if isinstance(x, np.ndarray):
        arr = x
        code = _FROM_NUMPY.get(arr.dtype)
        if code is None:
            return None
    else:
        torch = _torch or sys.modules.get("torch")
        if torch is None or not isinstance(x, torch.Tensor):
            return None  # lists and scalars: as the RPC path converts them
        got = _torch_codes(torch).get(x.dtype)
        if got is None:
            return None
        code, raw = got
        t = x.detach().cpu() if x.requires_grad or not x.is_cpu else x
        try:
            arr = (t if raw is None else t.view(raw)).numpy()
        except (RuntimeError, TypeError):  # lazy views (conjugate, negative): as the RPC does
            return None
    if not 1 <= arr.ndim <= MAX_DIMS:
        return None
    return code, arr


def _tokens(tokens: Sequence[int]) -> list[int] | None:
    if not tokens:
        return []
    try:
        out = [operator.index(t) for t in tokens]
    except TypeError:
        return None
    return out if all(-(2**63) <= t < 2**63 for t in out) else None


def _u(value: Any, bits: int) -> int | None:
    if type(value) is int:
        return value if 0 <= value < 2**bits else None
    if isinstance(value, bool):
        return None
    try:
        v = operator.index(value)
    except TypeError:
        return None
    return v if 0 <= v < 2**bits else None


def _scale(value: Any) -> float | None:
    if type(value) is float and -_F32_MAX <= value <= _F32_MAX:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        return None
    try:
        v = float(value)
    except OverflowError:
        return None
    return v if not math.isfinite(v) or abs(v) <= _F32_MAX else None  # else inf, as protobuf


def encode_request(area: memoryview, items: Sequence[Any]) -> int | None:
    """Write `items` (AttendItems) into the request area; its length, or None when some
    item is one the ring does not carry (the caller sends it over gRPC instead: a dtype,
    rank or value the RPC path itself refuses or converts, or a request too large)."""
    n = len(items)
    if not 1 <= n <= MAX_ITEMS:
        return None
    table_end = _HEADER.size + n * ITEM_BYTES
    pos = align8(table_end)
    entries: list[tuple[Any, ...]] = []
    copies: list[tuple[int, np.ndarray]] = []
    for item in items:
        seq, layer, scale = _u(item.sequence_id, 64), _u(item.layer, 32), _scale(item.scale)
        tokens = _tokens(item.new_tokens)
        if seq is None or layer is None or scale is None or tokens is None:
            return None
        has_kv = item.k_new is not None or item.v_new is not None
        specs = []
        for j, t in enumerate((item.q, item.k_new, item.v_new)):
            if t is None:
                if j == 0:
                    return None
                specs.append((0, (), 0, 0))  # as an unset message field: no dtype
                continue
            got = _as_array(t)
            if got is None:
                return None
            code, arr = got
            specs.append((code, arr.shape, pos, arr.nbytes))
            copies.append((pos, arr))
            pos = align8(pos + arr.nbytes)
        tok_off = pos
        pos = align8(pos + 8 * len(tokens))
        if pos > len(area):
            return None
        if tokens:
            copies.append((tok_off, np.asarray(tokens, dtype="<i8")))
        entries.append((seq, layer, scale, int(has_kv), len(tokens), tok_off, specs))
    flat = None
    for off, arr in copies:
        if arr.flags.c_contiguous:
            area[off : off + arr.nbytes] = arr.data.cast("B")
            continue
        if flat is None:
            flat = np.frombuffer(area, dtype=np.uint8, count=pos)
        dst = flat[off : off + arr.nbytes].view(arr.dtype).reshape(arr.shape)
        np.copyto(dst, arr, casting="no")
    _HEADER.pack_into(area, 0, REQUEST_MAGIC, n, 0)
    at = _HEADER.size
    for seq, layer, scale, has_kv, n_tok, tok_off, specs in entries:
        _ITEM.pack_into(area, at, seq, layer, scale, has_kv, n_tok, tok_off)
        at += _ITEM.size
        for code, shape, off, nbytes in specs:
            dims = (*shape, *(0,) * (MAX_DIMS - len(shape)))
            _TENSOR.pack_into(area, at, code, len(shape), *dims, off, nbytes)
            at += _TENSOR.size
    return pos


# ---- daemon: requests -------------------------------------------------------------------


def table_bytes(header: bytes) -> int:
    """From a copy of the request header: how many bytes the header and table take."""
    magic, n, _ = _HEADER.unpack_from(header)
    if magic != REQUEST_MAGIC or not 1 <= n <= MAX_ITEMS:
        raise InvalidArgument(f"not a ring request (magic {magic:#x}, {n} items)",
                              field="request")  # fmt: skip
    return _HEADER.size + n * ITEM_BYTES


def _spec(
    table: bytes | memoryview, at: int, area_bytes: int, data_start: int, field: str
) -> TensorSpec:
    dtype, ndim, *rest = _TENSOR.unpack_from(table, at)
    dims, offset, nbytes = rest[:MAX_DIMS], rest[MAX_DIMS], rest[MAX_DIMS + 1]
    if ndim > MAX_DIMS:
        raise InvalidArgument(f"{ndim} dimensions; the ring carries at most {MAX_DIMS}",
                              field=f"{field}.shape")  # fmt: skip
    if nbytes and not data_start <= offset <= offset + nbytes <= area_bytes:
        raise InvalidArgument(
            f"{nbytes} bytes at {offset} lie outside the data region [{data_start}, {area_bytes})",
            field=f"{field}.data",
        )
    return TensorSpec(dtype, tuple(dims[:ndim]), offset, nbytes)


def read_request(table: bytes, area_bytes: int) -> list[RingItem]:
    """The items of a request, from a private copy of its header and table; every offset
    and length is inside the area (`area_bytes`) and past the table."""
    n = (table_bytes(table) - _HEADER.size) // ITEM_BYTES
    data_start = _HEADER.size + n * ITEM_BYTES
    items = []
    for i in range(n):
        at = _HEADER.size + i * ITEM_BYTES
        seq, layer, scale, has_kv, n_tok, tok_off = _ITEM.unpack_from(table, at)
        field = f"items[{i}]"
        if has_kv not in (0, 1):
            raise InvalidArgument(f"has_kv is {has_kv}", field=f"{field}.k_new")
        if n_tok and not data_start <= tok_off <= tok_off + 8 * n_tok <= area_bytes:
            raise InvalidArgument(f"{n_tok} token ids at {tok_off} lie outside the data region",
                                  field=f"{field}.new_tokens")  # fmt: skip
        q, k, v = (_spec(table, at + _ITEM.size + j * _TENSOR.size, area_bytes, data_start,
                         f"{field}.{name}")
                   for j, name in enumerate(("q", "k_new", "v_new")))  # fmt: skip
        items.append(RingItem(seq, layer, scale, bool(has_kv), q, k, v, tok_off, n_tok))
    return items


def _plain(spec: TensorSpec) -> Any:
    """The torch dtype of a tensor whose shape and length agree, with a dtype the RPC
    path takes (else None: `to_torch` then refuses it with the RPC path's own words)."""
    import torch

    name = _TORCH_NAMES.get(spec.dtype)
    if name is None or not spec.shape or spec.nbytes == 0 or max(spec.shape) > _MAX_DIM:
        return None
    dtype = getattr(torch, name)
    if math.prod(spec.shape) * dtype.itemsize != spec.nbytes:
        return None
    return dtype


def wire_tensor(spec: TensorSpec, area: Any, field: str) -> Any:
    """The tensor `spec` points at, copied out of `area` into a torch tensor; checked as
    the RPC path checks a message (`to_torch`: dtype, dims, bytes for the shape)."""
    raw = area[spec.offset : spec.offset + spec.nbytes]
    dtype = _plain(spec)
    if dtype is None:
        return to_torch(cast(Any, _Wire(spec.dtype, spec.shape, raw)), field)
    import torch

    return torch.frombuffer(bytearray(raw), dtype=dtype).view(spec.shape)


def wire_tokens(item: RingItem, area: Any) -> tuple[int, ...]:
    raw = area[item.tokens_offset : item.tokens_offset + 8 * item.n_tokens]
    return tuple(np.frombuffer(raw, dtype="<i8").tolist())


def response_bytes(q_shapes: Sequence[Sequence[int]]) -> int:
    """The most a response to queries of these shapes takes: out [q_tokens, heads, dim]
    and lse [q_tokens, heads], float32 (an odd shape is refused; counted generously)."""
    total = _RESP_HEADER.size + len(q_shapes) * RESULT_BYTES
    for shape in q_shapes:
        numel = math.prod(shape)
        lse = math.prod(shape[:2]) if len(shape) == 3 else numel
        total += align8(4 * numel) + align8(4 * lse)
    return total


# ---- daemon: responses ----------------------------------------------------------------


def _tensor_bytes(t: Any) -> tuple[int, tuple[int, ...], memoryview]:
    import torch

    code, raw = _torch_codes(torch)[t.dtype]
    t = t.detach().cpu().contiguous()
    return code, tuple(t.shape), memoryview((t if raw is None else t.view(raw)).numpy()).cast("B")


def write_results(area: memoryview, results: Sequence[tuple[Any, Any]]) -> None:
    """Write (out, lse) tensors after the header and table; raises ValueError past the
    area (the caller checked `response_bytes` before attending, so that is a bug)."""
    pos = align8(_RESP_HEADER.size + len(results) * RESULT_BYTES)
    at = _RESP_HEADER.size
    for pair in results:
        for t in pair:
            code, shape, raw = _tensor_bytes(t)
            if len(shape) > MAX_DIMS or pos + len(raw) > len(area):
                raise ValueError(f"a result of shape {list(shape)} does not fit the ring")
            area[pos : pos + len(raw)] = raw
            dims = (*shape, *(0,) * (MAX_DIMS - len(shape)))
            _TENSOR.pack_into(area, at, code, len(shape), *dims, pos, len(raw))
            at += _TENSOR.size
            pos = align8(pos + len(raw))
    _RESP_HEADER.pack_into(area, 0, RESPONSE_MAGIC, 0, len(results), 0)


def write_error(area: memoryview, code: int, field: str | None, message: str) -> None:
    f = (field or "").encode("utf-8", "replace")[:1024]
    room = len(area) - _RESP_HEADER.size - _ERR.size - len(f)
    m = message.encode("utf-8", "replace")[: max(0, room)]
    start = _RESP_HEADER.size + _ERR.size
    area[start : start + len(f)] = f
    area[start + len(f) : start + len(f) + len(m)] = m
    _ERR.pack_into(area, _RESP_HEADER.size, len(f), len(m))
    _RESP_HEADER.pack_into(area, 0, RESPONSE_MAGIC, code, 0, 0)


# ---- client: responses ------------------------------------------------------------------


def read_response(area: memoryview, as_torch: bool) -> list[tuple[Any, Any]] | RingError:
    """The results (copies: the area is reused) or the error the daemon wrote."""
    magic, status, n, _ = _RESP_HEADER.unpack_from(area, 0)
    if magic != RESPONSE_MAGIC:
        raise ValueError(f"not a ring response (magic {magic:#x})")
    if status:
        flen, mlen = _ERR.unpack_from(area, _RESP_HEADER.size)
        start = _RESP_HEADER.size + _ERR.size
        if start + flen + mlen > len(area):
            raise ValueError("the error message lies outside the response area")
        field = bytes(area[start : start + flen]).decode("utf-8", "replace")
        msg = bytes(area[start + flen : start + flen + mlen]).decode("utf-8", "replace")
        return RingError(status, field or None, msg)
    if _RESP_HEADER.size + n * RESULT_BYTES > len(area):
        raise ValueError(f"{n} results do not fit the response area")
    data_start = _RESP_HEADER.size + n * RESULT_BYTES
    out: list[tuple[Any, Any]] = []
    for i in range(n):
        pair: list[Any] = []
        for j in range(2):
            at = _RESP_HEADER.size + (2 * i + j) * _TENSOR.size
            spec = _spec(area, at, len(area), data_start, "result")
            raw = area[spec.offset : spec.offset + spec.nbytes]
            dtype = _plain(spec) if as_torch else None
            if dtype is not None:
                import torch

                pair.append(torch.frombuffer(bytearray(raw), dtype=dtype).view(spec.shape))
            else:
                wire = cast(Any, _Wire(spec.dtype, spec.shape, raw))
                pair.append(to_torch(wire, "result") if as_torch else to_numpy(wire).copy())
        out.append((pair[0], pair[1]))
    return out
