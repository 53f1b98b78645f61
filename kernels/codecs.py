"""KV block codecs: how a copy of a block is encoded in a tier, with torch references.

Primitives: `Codec` (`name`, `lossless`, `record_bytes(shape)`, `encode_layer(kv)`,
`decode_layer(record, shape, dtype)`, `encode(block)`, `decode(buf, shape, dtype)`),
`CODECS` (name -> constructor), `make_codec(name, **params)`, `ENCODINGS` (the names).

A block is `[layers, 2, kv_heads, tokens, dim]`; an encoded block is its layers' records
one after another, each of a fixed size that depends only on the layer's shape and the
codec's parameters, so a tier can read one layer's record by offset (attend reads one
layer per step) and capacity counts encoded bytes exactly.

Codecs:
  raw    the bytes as they are (lossless).
  int8   symmetric per (K|V, head, token): codes int8, one float32 scale per token row.
  fp8    e4m3 per (K|V, head, token) with one float32 scale (amax maps to 448).
  kivi4, kivi2
         KIVI's asymmetric quantization: keys per channel, grouped over `k_group` tokens
         (outlier channels keep their own range), values per token, grouped over
         `v_group` channels; a float16 scale and zero point per group beside packed
         codes (two 4-bit or four 2-bit codes per byte, packed along dim).

Record layout of kivi (every section contiguous, in this order): K codes [H, T, D*b/8],
V codes [H, T, D*b/8], K scale and K zero [H, T/k_group, D] float16 each, V scale and V
zero [H, T, D/v_group] float16 each. int8/fp8: K|V codes [2, H, T, D] then scales
[2, H, T] float32.

Error: a kivi element is off by at most half its group's step (scale / 2) plus the
float16 rounding of the group's range; int8 by half of amax/127; fp8 by e4m3's relative
rounding (2^-4) of the scaled value. Non-finite inputs are refused: a NaN would poison a
whole group's range; so are inputs kivi's float16 scales and zero points cannot reach.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

Shape = tuple[int, int, int, int]  # one layer: (2, kv_heads, tokens, dim)

FP8_MAX = 448.0  # largest finite float8_e4m3fn


class Codec(ABC):
    name: str = ""
    lossless: bool = False

    @abstractmethod
    def record_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        """Bytes of one encoded layer of this shape (raw data of `dtype`)."""

    @abstractmethod
    def encode_layer(self, kv: torch.Tensor) -> torch.Tensor:
        """[2, H, T, D] -> uint8 [record_bytes]."""

    @abstractmethod
    def decode_layer(self, record: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        """uint8 [record_bytes] -> [2, H, T, D] of `dtype`."""

    def check(self, shape: Shape) -> None:
        """Raise ValueError if this codec cannot encode layers of `shape`."""
        if len(shape) != 4 or shape[0] != 2 or min(shape) < 1:
            raise ValueError(f"a layer is [2, kv_heads, tokens, dim], got {list(shape)}")

    def block_bytes(self, block_shape: tuple[int, ...], dtype: torch.dtype) -> int:
        layers, *layer = block_shape
        return layers * self.record_bytes(tuple(layer), dtype)  # type: ignore[arg-type]

    def encode(self, block: torch.Tensor) -> torch.Tensor:
        """[L, 2, H, T, D] -> uint8 [L * record_bytes]."""
        if block.dim() != 5:
            raise ValueError(f"a block is [layers, 2, heads, tokens, dim], got {list(block.shape)}")
        if block.is_floating_point() and not bool(torch.isfinite(block.float()).all()):
            raise ValueError("the block holds NaN or infinite values: not encoded")
        return torch.cat([self.encode_layer(block[i]) for i in range(block.shape[0])])

    def decode(self, buf: torch.Tensor, block_shape: tuple[int, ...], dtype: torch.dtype
               ) -> torch.Tensor:  # fmt: skip
        layers, *layer = block_shape
        shape: Shape = tuple(layer)  # type: ignore[assignment]
        size = self.record_bytes(shape, dtype)
        if buf.dtype != torch.uint8 or buf.numel() != layers * size:
            raise ValueError(f"{self.name}: expected {layers * size} bytes, got {buf.numel()}")
        return torch.stack(
            [self.decode_layer(buf[i * size : (i + 1) * size], shape, dtype) for i in range(layers)]
        )


class Raw(Codec):
    name = "raw"
    lossless = True

    def record_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        return math.prod(shape) * dtype.itemsize

    def encode_layer(self, kv: torch.Tensor) -> torch.Tensor:
        return kv.contiguous().view(-1).view(torch.uint8).clone()

    def decode_layer(self, record: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        return record.view(dtype).view(shape).clone()


class _PerToken(Codec):
    """One float32 scale per (K|V, head, token) row; codes one byte per element."""

    code_dtype: torch.dtype = torch.int8
    code_max: float = 127.0

    def record_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        return math.prod(shape) + 4 * math.prod(shape[:3])

    def _quantize(self, scaled: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_layer(self, kv: torch.Tensor) -> torch.Tensor:
        self.check(tuple(kv.shape))  # type: ignore[arg-type]
        x = kv.float()
        scale = x.abs().amax(dim=-1) / self.code_max  # [2, H, T]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = self._quantize(x / scale.unsqueeze(-1))
        return torch.cat([codes.reshape(-1).view(torch.uint8), scale.reshape(-1).view(torch.uint8)])

    def decode_layer(self, record: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        n = math.prod(shape)
        codes = record[:n].view(self.code_dtype).view(shape).float()
        scale = record[n:].view(torch.float32).view(shape[:3])
        return (codes * scale.unsqueeze(-1)).to(dtype)


class Int8(_PerToken):
    name = "int8"

    def _quantize(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.round().clamp(-127, 127).to(torch.int8)


class Fp8(_PerToken):
    name = "fp8"
    code_dtype = torch.float8_e4m3fn
    code_max = FP8_MAX

    def _quantize(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes < 2**bits along the last dim -> bytes holding 8 // bits codes each (the
    first code in the lowest bits)."""
    per = 8 // bits
    c = codes.to(torch.uint8).view(*codes.shape[:-1], codes.shape[-1] // per, per)
    out = torch.zeros(c.shape[:-1], dtype=torch.uint8)
    for i in range(per):
        out |= c[..., i] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes, last dim times 8 // bits."""
    per, mask = 8 // bits, (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask for i in range(per)]
    return torch.stack(parts, dim=-1).view(*packed.shape[:-1], packed.shape[-1] * per)


def _affine(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, ...]:
    """Asymmetric quantization of `x` with one range per slice along `dim`: codes (uint8),
    scale and zero (float16, what is stored; the codes are computed against the stored
    values so that decoding reproduces the encoder's grid)."""
    lo, hi = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    levels = (1 << bits) - 1
    zero = lo.to(torch.float16)
    scale = ((hi - zero.float()) / levels).to(torch.float16)
    # A constant slice has range 0: any scale decodes it exactly from code 0.
    scale = torch.where(scale.float() > 0, scale, torch.ones_like(scale))
    codes = ((x - zero.float()) / scale.float()).round().clamp(0, levels).to(torch.uint8)
    return codes, scale, zero


class Kivi(Codec):
    def __init__(self, bits: int, k_group: int | None = None, v_group: int | None = None) -> None:
        if bits not in (2, 4):
            raise ValueError(f"kivi codes are 2 or 4 bits, not {bits}")
        for what, g in (("k_group", k_group), ("v_group", v_group)):
            if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
                raise ValueError(f"{what} must be a positive integer, got {g!r}")
        self.bits = bits
        self.k_group = k_group  # None: the block's tokens (one range per channel per block)
        self.v_group = v_group  # None: the whole head dim (one range per token)
        self.name = f"kivi{bits}"

    def groups(self, shape: Shape) -> tuple[int, int]:
        _, _, tokens, dim = shape
        kg = tokens if self.k_group is None else self.k_group
        vg = dim if self.v_group is None else self.v_group
        return kg, vg

    def check(self, shape: Shape) -> None:
        super().check(shape)
        _, _, tokens, dim = shape
        kg, vg = self.groups(shape)
        if tokens % kg:
            raise ValueError(f"{self.name}: k_group {kg} does not divide {tokens} block tokens")
        if dim % vg:
            raise ValueError(f"{self.name}: v_group {vg} does not divide head dim {dim}")
        if dim % (8 // self.bits):
            raise ValueError(f"{self.name}: head dim {dim} is not a multiple of {8 // self.bits}")

    def record_bytes(self, shape: Shape, dtype: torch.dtype) -> int:
        self.check(shape)
        _, heads, tokens, dim = shape
        kg, vg = self.groups(shape)
        codes = 2 * heads * tokens * dim * self.bits // 8
        k_params = 2 * 2 * heads * (tokens // kg) * dim  # scale and zero, float16
        v_params = 2 * 2 * heads * tokens * (dim // vg)
        return codes + k_params + v_params

    def encode_layer(self, kv: torch.Tensor) -> torch.Tensor:
        shape: Shape = tuple(kv.shape)  # type: ignore[assignment]
        self.check(shape)
        _, heads, tokens, dim = shape
        kg, vg = self.groups(shape)
        k, v = kv[0].float(), kv[1].float()
        # Keys: per channel over groups of kg tokens.
        kc, ks, kz = _affine(k.view(heads, tokens // kg, kg, dim), 2, self.bits)
        # Values: per token over groups of vg channels.
        vc, vs, vz = _affine(v.view(heads, tokens, dim // vg, vg), 3, self.bits)
        # A finite float32/bfloat16 value past float16's range makes an infinite zero point
        # or scale, which would decode its whole group to inf/NaN.
        if not all(bool(torch.isfinite(p).all()) for p in (ks, kz, vs, vz)):
            raise ValueError(f"{self.name}: values past the range of its float16 scales and "
                             "zero points: not encoded")  # fmt: skip
        parts = [
            pack(kc.view(heads, tokens, dim), self.bits),
            pack(vc.view(heads, tokens, dim), self.bits),
            ks.reshape(-1).view(torch.uint8), kz.reshape(-1).view(torch.uint8),
            vs.reshape(-1).view(torch.uint8), vz.reshape(-1).view(torch.uint8),
        ]  # fmt: skip
        return torch.cat([p.reshape(-1) for p in parts])

    def sections(self, record: torch.Tensor, shape: Shape) -> dict[str, torch.Tensor]:
        """The record's parts as views: k_codes/v_codes (uint8 codes, unpacked) [H, T, D];
        k_scale/k_zero [H, T/kg, D]; v_scale/v_zero [H, T, D/vg] (float16)."""
        _, heads, tokens, dim = shape
        kg, vg = self.groups(shape)
        code_bytes = heads * tokens * dim * self.bits // 8
        kp, vp = heads * (tokens // kg) * dim, heads * tokens * (dim // vg)
        at, out = 0, {}
        for name, n, view in (
            ("k_codes", code_bytes, (heads, tokens, dim * self.bits // 8)),
            ("v_codes", code_bytes, (heads, tokens, dim * self.bits // 8)),
            ("k_scale", 2 * kp, (heads, tokens // kg, dim)),
            ("k_zero", 2 * kp, (heads, tokens // kg, dim)),
            ("v_scale", 2 * vp, (heads, tokens, dim // vg)),
            ("v_zero", 2 * vp, (heads, tokens, dim // vg)),
        ):
            part = record[at : at + n]
            at += n
            out[name] = (unpack(part.view(view), self.bits) if name.endswith("codes")
                         else part.view(torch.float16).view(view))  # fmt: skip
        return out

    def decode_layer(self, record: torch.Tensor, shape: Shape, dtype: torch.dtype) -> torch.Tensor:
        self.check(shape)
        _, heads, tokens, dim = shape
        kg, vg = self.groups(shape)
        s = self.sections(record, shape)
        k = s["k_codes"].float().view(heads, tokens // kg, kg, dim)
        k = k * s["k_scale"].float().unsqueeze(2) + s["k_zero"].float().unsqueeze(2)
        v = s["v_codes"].float().view(heads, tokens, dim // vg, vg)
        v = v * s["v_scale"].float().unsqueeze(3) + s["v_zero"].float().unsqueeze(3)
        return torch.stack([k.view(heads, tokens, dim), v.view(heads, tokens, dim)]).to(dtype)


CODECS: dict[str, Callable[..., Codec]] = {
    "raw": Raw,
    "int8": Int8,
    "fp8": Fp8,
    "kivi4": lambda **kw: Kivi(4, **kw),
    "kivi2": lambda **kw: Kivi(2, **kw),
}
ENCODINGS: tuple[str, ...] = tuple(CODECS)


def make_codec(name: str, **params: Any) -> Codec:
    """A codec by its configured name; `params` are its options (kivi: k_group, v_group)."""
    try:
        factory = CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; known: {', '.join(ENCODINGS)}") from None
    try:
        return factory(**params)
    except TypeError as e:
        raise ValueError(f"codec {name!r} does not take {sorted(params)}: {e}") from None
