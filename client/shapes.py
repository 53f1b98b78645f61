"""What a namespace's tensors must look like: one check each, shared by the client, the
daemon and its CSD workers, so all three accept and refuse the same shapes.

Primitives: `check_block_shape(layout, shape, field)` (a whole block),
`check_query_shape(layout, shape, field)` (an attention query). Each raises
`InvalidArgument` naming `field`.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InvalidArgument
from .layout import KVLayout


def check_block_shape(layout: KVLayout, shape: Sequence[int], field: str) -> None:
    if tuple(shape) != layout.block_shape:
        raise InvalidArgument(
            f"blocks of this layout have shape {list(layout.block_shape)} "
            f"[layers, 2, kv_heads, block_tokens, head_dim], got {list(shape)}",
            field=field,
        )


def check_query_shape(layout: KVLayout, shape: Sequence[int], field: str) -> None:
    """q is [q_tokens >= 1, heads, head_dim]; GQA: heads a (nonzero) multiple of kv_heads."""
    kv_heads = layout.num_kv_heads
    if (
        len(shape) != 3
        or shape[0] < 1
        or shape[1] < 1
        or shape[1] % kv_heads
        or shape[2] != layout.head_dim
    ):
        raise InvalidArgument(
            f"expected [q_tokens >= 1, heads (a multiple of {kv_heads}), {layout.head_dim}], "
            f"got {list(shape)}",
            field=field,
        )
