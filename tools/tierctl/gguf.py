"""A small reader of GGUF metadata headers (the key/value part; tensors are never read).

Primitives: `read_metadata(path) -> dict[str, object]`, `is_gguf(path)`, `GGUFError`.

Layout (GGUF v2/v3; v1 differs only in 32-bit counts and lengths): magic "GGUF", uint32
version, uint64 tensor count, uint64 key/value count, then for each pair a string key,
a uint32 value type and the value. Strings are a length then UTF-8 bytes; arrays are an
element type, a count and the elements. Everything is little-endian unless the file is
a big-endian GGUF, which shows as a byte-swapped version number.

Tokenizer vocabularies are arrays of ~100k strings: the reader skips over arrays it will
not return (strings one length at a time, numbers with one seek) instead of building
them, and returns only numeric arrays short enough to be per-layer values.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

MAGIC = b"GGUF"
# Numeric arrays up to this many elements are returned (per-layer head counts and the
# like); longer ones (token types, scores) are only counted.
MAX_ARRAY_RETURNED = 4096
# Sanity limits, so a corrupt or hostile file fails fast instead of allocating gigabytes.
MAX_STRING_BYTES = 1 << 24
MAX_KV_COUNT = 1 << 20

_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL = range(8)
_STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = 8, 9, 10, 11, 12
_SCALAR = {
    _UINT8: "B", _INT8: "b", _UINT16: "H", _INT16: "h", _UINT32: "I", _INT32: "i",
    _FLOAT32: "f", _BOOL: "?", _UINT64: "Q", _INT64: "q", _FLOAT64: "d",
}  # fmt: skip


class GGUFError(ValueError):
    """The file is not GGUF, or its header is damaged."""


class ArrayInfo:
    """Stands for an array that was skipped: its element type and length."""

    def __init__(self, elem_type: int, count: int) -> None:
        self.elem_type, self.count = elem_type, count

    def __repr__(self) -> str:
        return f"ArrayInfo(type={self.elem_type}, count={self.count})"


class _Reader:
    def __init__(self, f: BinaryIO, endian: str, wide: bool) -> None:
        self.f, self.endian = f, endian
        self.count_fmt = "Q" if wide else "I"  # v1 used 32-bit counts and lengths

    def unpack(self, fmt: str) -> object:
        size = struct.calcsize(self.endian + fmt)
        data = self.f.read(size)
        if len(data) != size:
            raise GGUFError("file ends inside the metadata header")
        return struct.unpack(self.endian + fmt, data)[0]

    def count(self) -> int:
        return int(self.unpack(self.count_fmt))  # type: ignore[call-overload]

    def string(self) -> str:
        n = self.count()
        if n > MAX_STRING_BYTES:
            raise GGUFError(f"string of {n} bytes in the header: not a sane GGUF file")
        data = self.f.read(n)
        if len(data) != n:
            raise GGUFError("file ends inside a string")
        return data.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.count()
        if n > MAX_STRING_BYTES:
            raise GGUFError(f"string of {n} bytes in the header: not a sane GGUF file")
        self.f.seek(n, 1)

    def value(self, vtype: int) -> object:
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array()
        raise GGUFError(f"unknown value type {vtype}")

    def array(self) -> object:
        elem = int(self.unpack("I"))  # type: ignore[call-overload]
        n = self.count()
        if elem in _SCALAR:
            fmt = _SCALAR[elem]
            if n <= MAX_ARRAY_RETURNED:
                size = struct.calcsize(fmt) * n
                data = self.f.read(size)
                if len(data) != size:
                    raise GGUFError("file ends inside an array")
                return list(struct.unpack(f"{self.endian}{n}{fmt}", data))
            self.f.seek(struct.calcsize(fmt) * n, 1)
        elif elem == _STRING:
            for _ in range(n):
                self.skip_string()
        elif elem == _ARRAY:
            for _ in range(n):
                self.array()
        else:
            raise GGUFError(f"unknown array element type {elem}")
        return ArrayInfo(elem, n)


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_metadata(path: Path | str) -> dict[str, object]:
    """Every metadata key with its value (long arrays as ArrayInfo)."""
    with open(path, "rb") as f:
        if f.read(4) != MAGIC:
            raise GGUFError(f"{path} is not a GGUF file (no GGUF magic)")
        raw = f.read(4)
        if len(raw) != 4:
            raise GGUFError("file ends inside the header")
        version, endian = struct.unpack("<I", raw)[0], "<"
        if version > 0xFFFF:  # byte-swapped: a big-endian GGUF
            version, endian = struct.unpack(">I", raw)[0], ">"
        if version not in (1, 2, 3):
            raise GGUFError(f"unsupported GGUF version {version}")
        r = _Reader(f, endian, wide=version >= 2)
        r.count()  # tensor count: unused
        n_kv = r.count()
        if n_kv > MAX_KV_COUNT:
            raise GGUFError(f"{n_kv} metadata keys: not a sane GGUF file")
        meta: dict[str, object] = {"GGUF.version": version}
        for _ in range(n_kv):
            key = r.string()
            vtype = int(r.unpack("I"))  # type: ignore[call-overload]
            meta[key] = r.value(vtype)
        return meta


# -- writing, for tests and fixtures -------------------------------------------------------


def write_metadata(path: Path | str, meta: dict[str, object], *, version: int = 3) -> None:
    """A GGUF file with these key/values and no tensors (ints as uint32 or uint64, floats
    as float32, str, bool, and lists of ints or strings). Enough to test readers."""
    wide = version >= 2
    cnt = "<Q" if wide else "<I"

    def s(text: str) -> bytes:
        b = text.encode()
        return struct.pack(cnt, len(b)) + b

    def typed(v: object) -> bytes:
        if isinstance(v, bool):
            return struct.pack("<I?", _BOOL, v)
        if isinstance(v, int):
            if 0 <= v < 2**32:
                return struct.pack("<II", _UINT32, v)
            return struct.pack("<Iq", _INT64, v)
        if isinstance(v, float):
            return struct.pack("<If", _FLOAT32, v)
        if isinstance(v, str):
            return struct.pack("<I", _STRING) + s(v)
        if isinstance(v, list):
            if all(isinstance(x, str) for x in v):
                body = b"".join(s(x) for x in v)
                return struct.pack("<II", _ARRAY, _STRING) + struct.pack(cnt, len(v)) + body
            body = b"".join(struct.pack("<i", int(x)) for x in v)
            return struct.pack("<II", _ARRAY, _INT32) + struct.pack(cnt, len(v)) + body
        raise TypeError(f"cannot write {type(v).__name__} to GGUF")

    out = [MAGIC, struct.pack("<I", version), struct.pack(cnt, 0), struct.pack(cnt, len(meta))]
    for key, value in meta.items():
        out.append(s(key) + typed(value))
    Path(path).write_bytes(b"".join(out))
