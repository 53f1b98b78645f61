"""Partial decode attention over the layer bytes a shard read: (out, lse) for one worker.

Primitives: `check_query(q, layout)`, `layer_blocks(batch, layout) -> [block views]`,
`attend_batch(batch, layout, q, scale) -> (out, lse)`, `attend_runs(runs, layout, q,
scale) -> (out, lse)` (batches of several encodings, merged).

No mask: every key a worker holds precedes the query positions. `out` is
[q_tokens, heads, dim] float32 and `lse` [q_tokens, heads] float32 (natural log), so
partials of several tiers merge exactly: lse = logsumexp_i lse_i,
out = sum_i exp(lse_i - lse) out_i. With no keys, out is 0 and lse is -inf (weight 0).

The math is `tierd_kernels.attend_blocks`, the fast CPU path: it reads K and V in their
storage dtype and computes in float32 whatever that dtype is, within 1e-5 of a float64
oracle. GQA maps query head h to kv head h // (heads / kv_heads). The blocks are handed
over as views into the shard's read buffer, which the kernel reads in place.

Blocks stored encoded by a codec are attended over on their codes with the compiled codes
kernel the daemon's NVMe path uses (`tierd_kernels.codes_attention.attend_codes`): each
layer's record is handed over as it was read, and no dequantized K|V is formed. The
result equals decode-then-attend up to float32 rounding.
"""

from __future__ import annotations

import math

import torch

from tierd.csd.shard import LayerBatch
from tierd.errors import InvalidArgument
from tierd.transfer.encoding import RAW, codec_of, layer_shape
from tierd_client.layout import KVLayout
from tierd_client.shapes import check_query_shape
from tierd_kernels import attend_blocks, merge_partials

_ATTENDABLE = ("float16", "bfloat16", "float32", "float8_e4m3")


def check_query(q: torch.Tensor, layout: KVLayout) -> None:
    if layout.dtype not in _ATTENDABLE:
        raise InvalidArgument(f"cannot attend over {layout.dtype} blocks", field="layout.dtype")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidArgument(f"q must be float16, bfloat16 or float32, not {q.dtype}",
                              field="q.dtype")  # fmt: skip
    check_query_shape(layout, q.shape, "q.shape")


def layer_blocks(batch: LayerBatch, layout: KVLayout) -> list[torch.Tensor]:
    """Each found block's layer as a [1, 2, kv_heads, block_tokens, dim] view of the read
    buffer (the block layout with one layer), in request order."""
    h, t, d = layout.num_kv_heads, layout.block_tokens, layout.head_dim
    n_slots = len(batch.buffer) // batch.stride if batch.stride else 0
    raw = torch.from_numpy(batch.buffer[: n_slots * batch.stride]).view(n_slots, batch.stride)
    # `pad` and `stride` are multiples of the itemsize, so the dtype view is legal.
    kv = raw[:, batch.pad : batch.pad + batch.nbytes].view(layout.torch_dtype())
    kv = kv.view(n_slots, 1, 2, h, t, d)
    return [kv[slot] for slot in batch.slots]


def attend_batch(
    batch: LayerBatch, layout: KVLayout, q: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [Tq, Hq, D], lse [Tq, Hq]) float32 over every found block; scale 0: 1/sqrt(D)."""
    check_query(q, layout)
    tq, hq, d = q.shape
    if not batch.slots:
        return (torch.zeros(tq, hq, d, dtype=torch.float32),
                torch.full((tq, hq), -math.inf, dtype=torch.float32))  # fmt: skip
    scale = scale or 1.0 / math.sqrt(layout.head_dim)
    if batch.encoding != RAW:
        from tierd_kernels.codes_attention import attend_codes

        out, lse = attend_codes(layer_records(batch), codec_of(batch.encoding),
                                layer_shape(layout), q, scale=scale)  # fmt: skip
        return out, lse
    out, lse = attend_blocks(layer_blocks(batch, layout), 0, q, scale=scale)
    return out, lse


def layer_records(batch: LayerBatch) -> list[torch.Tensor]:
    """Each found block's record of the layer (uint8, its codec's), in request order."""
    return [torch.from_numpy(batch.layer_bytes(i)) for i in range(len(batch.slots))]


def attend_runs(
    runs: list[LayerBatch], layout: KVLayout, q: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`attend_batch` over each encoding's batch, merged exactly by log-sum-exp."""
    partials = [attend_batch(run, layout, q, scale) for run in runs]
    if len(partials) == 1:
        return partials[0]
    out, lse = merge_partials(partials)
    return out, lse
