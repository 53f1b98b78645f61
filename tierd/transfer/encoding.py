"""How a copy's bytes are encoded in a tier: each tier's codec, applied per namespace.

Primitives: `RAW`, `encoding_for(tier, ns) -> str`, `stored_bytes(encoding, layout) -> int`,
`codec_of(encoding) -> Codec`, `lossy(encoding)`, `encode(encoding, layout, raw) ->
memoryview`, `decode_into(encoding, layout, stored, out)`, `layer_shape(layout)`.

An encoding names a codec of `tierd_kernels.codecs` with its options ("kivi4",
"kivi4;k_group=8;v_group=32"), so a copy's catalog row alone says how to read it, whatever
its tier is configured with later. A tier configured with codec C stores a namespace's
blocks raw instead when:
  - the namespace asked for lossless blocks and C is lossy;
  - C cannot encode the namespace's layout (kivi groups that do not divide the block's
    tokens or the head dim), or would not shrink it (a KV dtype of one byte);
so `encoding_for` is the one place that decides, and every copy records what it got.

Error: an encoded copy is as exact as its codec (`tierd_kernels.codecs` states each
bound). Decoding yields the namespace's dtype. A block decoded from a lossy copy and
encoded again (promoted, then demoted to another lossy tier, or moved between two lossy
tiers) is re-quantized from the decoded values: its error is at most the sum of both
codecs' bounds, never compounded silently past that, and a copy that is already in the
target encoding is never re-encoded (the bytes are copied as they are). Non-finite values,
which no usable cache holds, are stored as 0 by lossy codecs, so such a block still moves
down instead of staying stuck above. A finite block a codec cannot represent (kivi's
float16 ranges) is refused: the move fails and the block keeps the copies it had.
"""

from __future__ import annotations

import functools
import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from tierd.core.index import NamespaceInfo
    from tierd.tiers.base import Tier
    from tierd_client.layout import KVLayout
    from tierd_kernels.codecs import Codec

RAW = "raw"
_ENCODED_DTYPES = ("float16", "bfloat16", "float32")  # the codecs' inputs that they shrink


def name_of(codec: str, params: tuple[tuple[str, int], ...] = ()) -> str:
    """The encoding a codec with these options writes."""
    if codec == RAW:
        return RAW
    return ";".join([codec, *(f"{k}={v}" for k, v in sorted(params))])


@functools.lru_cache(maxsize=64)
def codec_of(encoding: str) -> Codec:
    """The codec that reads (and writes) `encoding`; ValueError for a name it cannot be."""
    from tierd_kernels.codecs import make_codec

    name, *opts = encoding.split(";")
    try:
        params = {k: int(v) for k, v in (o.split("=", 1) for o in opts)}
    except ValueError:
        raise ValueError(f"malformed encoding {encoding!r}") from None
    return make_codec(name, **params)


def lossy(encoding: str) -> bool:
    return encoding != RAW and not codec_of(encoding).lossless


def layer_shape(layout: KVLayout) -> tuple[int, int, int, int]:
    return (2, layout.num_kv_heads, layout.block_tokens, layout.head_dim)


def encoding_for(tier: Tier, ns: NamespaceInfo) -> str:
    """How `ns`'s blocks are stored in `tier` (see the module docstring)."""
    wanted = name_of(tier.spec.codec, tier.spec.codec_params)
    if wanted == RAW:
        return RAW
    return _fitting(wanted, ns.layout, ns.lossless)


@functools.lru_cache(maxsize=1024)
def _fitting(encoding: str, layout: KVLayout, lossless: bool) -> str:
    codec = codec_of(encoding)
    if (lossless and not codec.lossless) or layout.dtype not in _ENCODED_DTYPES:
        return RAW
    try:
        size = stored_bytes(encoding, layout)
    except ValueError:  # groups that do not divide this layout
        return RAW
    return encoding if size < layout.block_bytes else RAW


def stored_bytes(encoding: str, layout: KVLayout) -> int:
    """Bytes of one block of `layout` in `encoding`."""
    if encoding == RAW:
        return layout.block_bytes
    return codec_of(encoding).block_bytes(layout.block_shape, layout.torch_dtype())


def _tensor(buf: memoryview, dtype: torch.dtype) -> torch.Tensor:
    import torch

    with warnings.catch_warnings():  # read-only views: nothing here writes through them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(buf, dtype=dtype)


def encode(encoding: str, layout: KVLayout, raw: memoryview) -> memoryview:
    """A raw block's bytes in `encoding` (a new buffer of `stored_bytes`)."""
    import torch

    block = _tensor(raw, layout.torch_dtype()).view(layout.block_shape)
    codec = codec_of(encoding)
    if not codec.lossless:
        block = torch.nan_to_num(block.float(), nan=0.0, posinf=0.0, neginf=0.0)
    return memoryview(codec.encode(block).numpy()).cast("B")


def decode_into(encoding: str, layout: KVLayout, stored: memoryview, out: memoryview) -> None:
    """Decode a copy's bytes into `out` (the raw block: `layout.block_bytes`, its dtype)."""
    import torch

    dtype = layout.torch_dtype()
    block = codec_of(encoding).decode(_tensor(stored, torch.uint8), layout.block_shape, dtype)
    _tensor(out, torch.uint8).copy_(block.contiguous().view(-1).view(torch.uint8))
