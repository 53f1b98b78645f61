"""Reading a model's tensors from the files a client names: safetensors or GGUF.

Primitives: `open_source(path, dtype) -> Source`, `SourceTensor`, `DTYPES`,
`resolve_dtype(name) -> str`.

A safetensors model (a directory of `*.safetensors` files, or one such file) is read
here, header by header, with no library: the names are already the transformers names,
and each tensor is converted with torch's own cast, which is what `from_pretrained(...,
dtype=...)` does, so a model built on the area computes exactly what one loaded the usual
way computes. A GGUF file is dequantized by transformers itself (it alone knows how GGUF
names and permutes each architecture's tensors); it needs transformers, gguf and
accelerate in the daemon's environment, and holds the dense model in memory while the
area is written.

Floating-point tensors are converted to the requested dtype; integer and boolean ones
keep theirs. The default is the file's float dtype when all its float tensors share one
of bfloat16, float16 and float32, else bfloat16 (GGUF: bfloat16).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierd.errors import FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    import torch

# Conversion targets, by the names clients use (torch's, as every dtype here; torch itself
# is imported only when a model is read: the daemon starts without it).
DTYPES = ("bfloat16", "float16", "float32")
_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "half": "float16",
            "fp32": "float32", "f32": "float32", "float": "float32"}  # fmt: skip
# safetensors dtype -> (torch name, bytes per element)
_ST_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2),
    "BF16": ("bfloat16", 2), "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1),
}  # fmt: skip
_FLOATS = {"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"}
_ITEMSIZE = {name: size for name, size in _ST_DTYPES.values()}
MAX_HEADER_BYTES = 100 << 20  # a safetensors header is JSON; larger is a damaged file
MAX_CONFIG_BYTES = 1 << 20
MAX_TENSORS = 1 << 20
MAX_FILES = 4096


@dataclass(frozen=True)
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # in the area (converted), torch's name
    itemsize: int
    load: Callable[[], torch.Tensor]  # the converted, contiguous tensor
    alias_of: str | None = None  # shares the storage of another tensor (tied weights)

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class Source:
    kind: str  # "safetensors" | "gguf"
    path: Path  # resolved
    dtype: str  # the float dtype tensors are converted to
    tensors: list[SourceTensor]
    config_json: str
    stamp: list[Any]  # the files read, with sizes and times: same stamp, same content
    _close: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for fn in self._close:
            fn()
        self._close.clear()


def resolve_dtype(name: str) -> str:
    """The canonical name of a requested dtype ("" stays ""), or InvalidArgument."""
    canon = _ALIASES.get(name.lower(), name.lower())
    if name and canon not in DTYPES:
        raise InvalidArgument(f"unknown dtype {name!r}; one of {', '.join(DTYPES)}",
                              field="dtype")  # fmt: skip
    return canon


def _stat(path: Path) -> list[Any]:
    st = path.stat()
    return [path.name, st.st_size, st.st_mtime_ns]


def within(roots: tuple[Path, ...], paths: list[Path]) -> list[Path]:
    """`paths` resolved, each inside one of `roots` (no roots: anywhere). Every file a
    model is read from passes here, so a symlink placed in an allowed directory cannot
    make the daemon read (and map to a client) a file outside them."""
    out = []
    for p in paths:
        real = p.resolve()
        if roots and not any(real == r or r in real.parents for r in roots):
            raise FailedPrecondition(f"{p} lies outside the directories weights.roots names",
                                     field="path")  # fmt: skip
        out.append(real)
    return out


def open_source(path: Path, dtype: str, roots: tuple[Path, ...] = ()) -> Source:
    """The model at `path` (absolute), with its float tensors to become `dtype` ("":
    the default above), read only from files inside `roots` (see `within`). Errors say
    what is wrong with the path."""
    dtype = resolve_dtype(dtype)
    if not path.is_absolute():
        raise InvalidArgument(f"{path} is not an absolute path", field="path")
    try:
        resolved = path.resolve(strict=True)
        is_dir = resolved.is_dir()
    except FileNotFoundError:
        raise NotFound(f"{path} does not exist on the daemon's host", field="path") from None
    except OSError as e:
        raise FailedPrecondition(f"the daemon cannot read {path}: {e.strerror}",
                                 field="path") from None  # fmt: skip
    if is_dir:
        files = sorted(resolved.glob("*.safetensors"))
        if not files:
            raise InvalidArgument(f"{path} is a directory with no .safetensors files",
                                  field="path")  # fmt: skip
        if len(files) > MAX_FILES:
            raise InvalidArgument(f"{path} holds more than {MAX_FILES} files", field="path")
        config = resolved / "config.json"
        has_config = config.is_file()
        files = within(roots, files + [config] if has_config else files)
        return _safetensors(resolved, files[:-1] if has_config else files,
                            files[-1] if has_config else None, dtype)  # fmt: skip
    (resolved,) = within(roots, [resolved])
    head = _read_head(resolved, 8)
    if head[:4] == b"GGUF":
        return _gguf(resolved, dtype or "bfloat16")
    config = resolved.parent / "config.json"
    if not config.is_file():
        return _safetensors(resolved, [resolved], None, dtype)
    return _safetensors(resolved, [resolved], within(roots, [config])[0], dtype)


def _read_head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise FailedPrecondition(f"the daemon cannot read {path}: {e.strerror}",
                                 field="path") from None  # fmt: skip


def _not_a_model(path: Path, why: str) -> InvalidArgument:
    return InvalidArgument(f"{path} is not a model file (safetensors or GGUF): {why}",
                           field="path")  # fmt: skip


@dataclass(frozen=True)
class _StEntry:
    name: str
    shape: tuple[int, ...]
    src: str  # torch's name
    begin: int  # absolute offset in the file
    end: int


def _st_header(path: Path, size: int, f: Any) -> list[_StEntry]:
    raw = f.read(8)
    if len(raw) != 8:
        raise _not_a_model(path, "shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if n < 2 or n > MAX_HEADER_BYTES or 8 + n > size:
        raise _not_a_model(path, f"a {n}-byte header does not fit the file")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _not_a_model(path, "its header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_a_model(path, "its header is not a JSON object")
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            src, itemsize = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise _not_a_model(path, f"tensor {name!r} is malformed or of an unknown dtype") \
                from None  # fmt: skip
        count = 1
        for d in shape:
            count *= d
        if min(shape, default=0) < 0 or not 0 <= begin <= end or 8 + n + end > size \
                or end - begin != count * itemsize:  # fmt: skip
            raise _not_a_model(path, f"tensor {name!r} lies outside the file or has the "
                               "wrong length")  # fmt: skip
        out.append(_StEntry(name, shape, src, 8 + n + begin, 8 + n + end))
    return out


def _safetensors(root: Path, files: list[Path], config: Path | None, dtype: str) -> Source:
    entries: list[tuple[_StEntry, mmap.mmap | None]] = []
    maps: list[mmap.mmap] = []
    stamp: list[Any] = [str(root)]
    try:
        for path in files:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                found = _st_header(path, size, f)
                mm = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if size else None
            if mm is not None:
                maps.append(mm)
            entries += [(e, mm) for e in found]
            stamp.append(_stat(path))
            if len(entries) > MAX_TENSORS:
                raise InvalidArgument(f"more than {MAX_TENSORS} tensors", field="path")
        names = [e.name for e, _ in entries]
        if len(set(names)) != len(names):
            raise _not_a_model(root, "a tensor name appears in two files")
        floats = {e.src for e, _ in entries if e.src in _FLOATS}
        if not dtype:
            only = next(iter(floats)) if len(floats) == 1 else ""
            dtype = only if only in DTYPES else "bfloat16"
        config_json = ""
        if config is not None:
            config_json = _read_config(config)
            stamp.append(_stat(config))
    except BaseException:
        for mm in maps:
            mm.close()
        raise
    tensors = []
    for e, mm in entries:
        out = dtype if e.src in _FLOATS else e.src
        tensors.append(SourceTensor(e.name, e.shape, out, _ITEMSIZE[out],
                                    _st_loader(e, mm, out)))  # fmt: skip
    src = Source("safetensors", root, dtype, tensors, config_json, stamp)
    src._close += [mm.close for mm in maps]
    return src


def _st_loader(e: _StEntry, mm: mmap.mmap | None, out: str) -> Callable:
    def load() -> torch.Tensor:
        import torch

        if e.end == e.begin or mm is None:
            return torch.empty(e.shape, dtype=getattr(torch, out))
        with warnings.catch_warnings():  # read-only on purpose: nothing writes the file
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(mm, dtype=getattr(torch, e.src), count=(e.end - e.begin)
                                 // _ITEMSIZE[e.src], offset=e.begin).reshape(e.shape)  # fmt: skip
        # The same cast as from_pretrained(dtype=...); none when the dtype is already right.
        return t.to(getattr(torch, out))

    return load


def _read_config(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise InvalidArgument(f"{path} is larger than {MAX_CONFIG_BYTES} bytes", field="path")
        doc = json.loads(data)
    except OSError as e:
        raise FailedPrecondition(f"the daemon cannot read {path}: {e.strerror}",
                                 field="path") from None  # fmt: skip
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidArgument(f"{path} is not JSON", field="path") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{path} is not a JSON object", field="path")
    return json.dumps(doc, sort_keys=True)


def _gguf(path: Path, dtype: str) -> Source:
    try:
        import torch
        from transformers import AutoModelForCausalLM, GgufConfig
    except ImportError:
        raise FailedPrecondition("reading GGUF needs transformers, gguf and accelerate in the "
                                 "daemon's environment", field="path") from None  # fmt: skip
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never the network
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype),
            local_files_only=True,
            quantization_config=GgufConfig(dequantize=True),
        )  # fmt: skip
    except ImportError as e:
        raise FailedPrecondition(f"reading GGUF: {e}", field="path") from None
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise InvalidArgument(f"{path}: transformers cannot read this GGUF: {e}",
                              field="path") from None  # fmt: skip
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the area holds dense tensors
    config.pop("_name_or_path", None)
    state = model.state_dict()
    first: dict[tuple, str] = {}
    tensors = []
    for name, t in state.items():
        if t.device.type == "meta":
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 t.stride(), t.dtype)  # fmt: skip
        alias = first.setdefault(ident, name)
        tensors.append(SourceTensor(name, tuple(t.shape), str(t.dtype).removeprefix("torch."),
                                    t.element_size(), _held(t),
                                    alias if alias != name else None))  # fmt: skip
    return Source("gguf", path, dtype, tensors, json.dumps(config, sort_keys=True, default=str),
                  [str(path), _stat(path)])  # fmt: skip


def _held(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: t.detach().contiguous()
