"""The compiled fused CPU attention kernel (kernels/csrc/attention.cpp), called through ctypes.

Primitives: `mode() -> "auto" | "torch" | "cpp"`, `available() -> bool`,
`attend(blocks, layer, q, *, scale, seq, causal_offset, threads) -> AttentionOutput | None`,
`attend_codes(records, codec, shape, q, *, k_group, v_group, scale, valid_tokens, threads)
-> AttentionOutput | None` (kernels/csrc/codes.cpp: attention on encoded layer records).

`TIERD_KERNELS` picks the path of `attend_blocks` and `attend_codes`, read on every call: unset or `auto`
uses this kernel when it loads and the torch path otherwise; `torch` forces the torch
path; `cpp` insists on this kernel (an error when it cannot load, so a test of it never
passes on the fallback by accident).

The library is found, or compiled once, on first use (`tierd_kernels.build`), or loaded
from `TIERD_KERNELS_LIBRARY` when that names one (a build for another -march, in tests);
when the compiler is missing or the build fails that is logged once and the torch path
serves.
ctypes releases the GIL for the whole call, so other Python threads run while it computes;
the kernel runs on the calling thread plus a persistent pool of `threads - 1` native
threads (default: the CPUs this process may run on).
"""

from __future__ import annotations

import array
import ctypes
import logging
import os
import threading
from collections.abc import Sequence

import torch

from .reference import AttentionOutput

log = logging.getLogger("tierd_kernels")

# Storage dtype codes of the C++ side (enum Dtype in attention.cpp).
DTYPE_CODES = {
    torch.float32: 0,
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float8_e4m3fn: 3,
    torch.float8_e5m2: 4,
}


class _TkArgs(ctypes.Structure):
    """struct TkArgs in attention.cpp, field for field."""

    _fields_ = [
        ("k", ctypes.c_void_p),
        ("v", ctypes.c_void_p),
        ("n_blocks", ctypes.c_int64),
        ("block_tokens", ctypes.c_int64),
        ("seq", ctypes.c_int64),
        ("head_stride", ctypes.c_int64),
        ("token_stride", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("q", ctypes.c_void_p),
        ("q_tokens", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("causal_offset", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("causal", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


# Codecs of the C++ side (enum Codec in codes.cpp).
CODEC_CODES = {"int8": 0, "fp8": 1, "kivi4": 2, "kivi2": 3}


class _TkCodesArgs(ctypes.Structure):
    """struct TkCodesArgs in codes.cpp, field for field."""

    _fields_ = [
        ("records", ctypes.c_void_p),
        ("n_blocks", ctypes.c_int64),
        ("block_tokens", ctypes.c_int64),
        ("last_tokens", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("dim", ctypes.c_int64),
        ("k_group", ctypes.c_int64),
        ("v_group", ctypes.c_int64),
        ("q", ctypes.c_void_p),
        ("q_tokens", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("out", ctypes.c_void_p),
        ("lse", ctypes.c_void_p),
        ("codec", ctypes.c_int32),
        ("threads", ctypes.c_int32),
    ]


# Causal offsets are clamped to this: far enough to mean "all" or "none" of any sequence,
# near enough that the kernel's offset + query index cannot overflow an int64.
_FAR = 1 << 62

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_why_not = ""
_dtype_mask = 0
_codec_mask = 0  # 0 for a library from before attention on codes (TIERD_KERNELS_LIBRARY)


def _load() -> ctypes.CDLL | None:
    global _lib, _tried, _why_not, _dtype_mask, _codec_mask
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        from . import build  # here: `python -m tierd_kernels.build` must find it unloaded

        try:
            path = os.environ.get("TIERD_KERNELS_LIBRARY") or str(build.build())
            lib = ctypes.CDLL(path)
            lib.tk_attend.argtypes = [ctypes.POINTER(_TkArgs)]
            lib.tk_attend.restype = ctypes.c_int32
            lib.tk_dtypes.restype = ctypes.c_int32
            _dtype_mask = lib.tk_dtypes()
            if hasattr(lib, "tk_attend_codes"):
                lib.tk_attend_codes.argtypes = [ctypes.POINTER(_TkCodesArgs)]
                lib.tk_attend_codes.restype = ctypes.c_int32
                lib.tk_codes_codecs.restype = ctypes.c_int32
                _codec_mask = lib.tk_codes_codecs()
            _lib = lib
        except (build.BuildError, OSError) as e:
            _why_not = str(e)
            log.warning("fused CPU attention unavailable, using the torch path: %s", e)
        _tried = True
    return _lib


def mode() -> str:
    value = os.environ.get("TIERD_KERNELS", "auto").strip().lower() or "auto"
    if value not in ("auto", "torch", "cpp"):
        raise ValueError(f"TIERD_KERNELS={value!r}: expected auto, torch or cpp")
    return value


def available() -> bool:
    """Whether the compiled kernel loads (building it first if needed)."""
    return _load() is not None


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _library(what: str) -> ctypes.CDLL | None:
    """The library when the compiled path should serve, None for the torch path."""
    want = mode()
    if want == "torch":
        return None
    lib = _load()
    if lib is None and want == "cpp":
        raise RuntimeError(f"TIERD_KERNELS=cpp but the {what} kernel is unavailable: {_why_not}")
    return lib


def _check_rc(rc: int, what: str) -> None:
    if rc == 2:
        raise MemoryError(f"the {what} kernel ran out of memory")
    if rc != 0:
        raise RuntimeError(f"the {what} kernel refused its arguments (code {rc})")


def attend(
    blocks: Sequence[torch.Tensor],
    layer: int,
    q: torch.Tensor,
    *,
    scale: float,
    seq: int,
    causal_offset: int | None,
    threads: int | None = None,
) -> AttentionOutput | None:
    """q [q_tokens, heads, dim] over the first `seq` keys of `layer` of the blocks (already
    validated by attend_blocks): the result, or None when the torch path must serve (no
    library, a dtype it does not read, or blocks whose strides differ)."""
    lib = _library("fused")
    if lib is None:
        return None
    first = blocks[0]
    code = DTYPE_CODES.get(first.dtype)
    strides = first.stride()
    if code is None or not _dtype_mask >> code & 1 or strides[4] != 1:
        return None
    es = first.element_size()
    k_off = layer * strides[0] * es
    v_off = k_off + strides[1] * es
    k_ptrs = array.array("Q")
    for b in blocks:
        if b.stride() != strides:
            return None
        k_ptrs.append(b.data_ptr() + k_off)
    v_ptrs = array.array("Q", (p + v_off - k_off for p in k_ptrs))
    q_tokens, heads, dim = q.shape
    qs = (q.float() * scale).contiguous()
    out = torch.empty(q_tokens, heads, dim, dtype=torch.float32)
    lse = torch.empty(q_tokens, heads, dtype=torch.float32)
    args = _TkArgs(
        k=k_ptrs.buffer_info()[0], v=v_ptrs.buffer_info()[0],
        n_blocks=len(blocks), block_tokens=first.shape[3], seq=seq,
        head_stride=strides[2], token_stride=strides[3], kv_heads=first.shape[2], dim=dim,
        q=qs.data_ptr(), q_tokens=q_tokens, heads=heads,
        causal_offset=0 if causal_offset is None else max(-_FAR, min(_FAR, causal_offset)),
        out=out.data_ptr(), lse=lse.data_ptr(), dtype=code,
        causal=0 if causal_offset is None else 1,
        threads=default_threads() if threads is None else threads,
    )  # fmt: skip
    _check_rc(lib.tk_attend(ctypes.byref(args)), "fused attention")
    return AttentionOutput(out, lse)


def attend_codes(
    records: Sequence[torch.Tensor],
    codec: str,
    shape: tuple[int, int, int, int],
    q: torch.Tensor,
    *,
    k_group: int,
    v_group: int,
    scale: float,
    valid_tokens: int,
    threads: int | None = None,
) -> AttentionOutput | None:
    """q [q_tokens, heads, dim] over one layer record per block (already validated by
    codes_attention.attend_codes: lengths, shape, groups): the result, or None when the
    torch path must serve (no library, a codec it does not read, or a record that is not
    one contiguous buffer)."""
    lib = _library("codes attention")
    if lib is None:
        return None
    code = CODEC_CODES.get(codec)
    if code is None or not _codec_mask >> code & 1:
        if mode() == "cpp" and code is not None:
            raise RuntimeError("TIERD_KERNELS=cpp but the loaded library predates attention "
                               "on codes")  # fmt: skip
        return None
    if not all(r.is_contiguous() for r in records):
        return None
    ptrs = array.array("Q", (r.data_ptr() for r in records))
    _, kv_heads, tokens, dim = shape
    q_tokens, heads = q.shape[0], q.shape[1]
    qs = (q.float() * scale).contiguous()
    out = torch.empty(q_tokens, heads, dim, dtype=torch.float32)
    lse = torch.empty(q_tokens, heads, dtype=torch.float32)
    args = _TkCodesArgs(
        records=ptrs.buffer_info()[0], n_blocks=len(records), block_tokens=tokens,
        last_tokens=valid_tokens, kv_heads=kv_heads, dim=dim, k_group=k_group,
        v_group=v_group, q=qs.data_ptr(), q_tokens=q_tokens, heads=heads,
        out=out.data_ptr(), lse=lse.data_ptr(), codec=code,
        threads=default_threads() if threads is None else threads,
    )  # fmt: skip
    _check_rc(lib.tk_attend_codes(ctypes.byref(args)), "codes attention")
    return AttentionOutput(out, lse)
