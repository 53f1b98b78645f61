"""Partial decode attention over the layer bytes a shard read: (out, lse) for one worker.

Primitives: `attend_batch(batch, layout, q, scale) -> (out, lse)`,
`partial_attention(q, kv, scale) -> (out, lse)`.

No mask: every key a worker holds precedes the query positions. `out` is
[q_tokens, heads, dim] float32 and `lse` [q_tokens, heads] float32 (natural log), so
partials of several tiers merge exactly: lse = logsumexp_i lse_i,
out = sum_i exp(lse_i - lse) out_i. With no keys, out is 0 and lse is -inf (weight 0).

The math runs in float32 whatever the KV dtype (fp16 matmul is slow on CPUs, and float32
keeps the result within 1e-5 of a float64 oracle); GQA maps query head h to kv head
h // (heads / kv_heads), as `repeat_interleave` of the kv heads does.
"""

from __future__ import annotations

import math

import torch
from tierd_client.layout import KVLayout

from tierd.csd.shard import LayerBatch
from tierd.csd.tensors import torch_dtype
from tierd.errors import InvalidArgument

_ATTENDABLE = ("float16", "bfloat16", "float32", "float8_e4m3")


def check_query(q: torch.Tensor, layout: KVLayout) -> None:
    if layout.dtype not in _ATTENDABLE:
        raise InvalidArgument(f"cannot attend over {layout.dtype} blocks", field="layout.dtype")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidArgument(f"q must be float16, bfloat16 or float32, not {q.dtype}",
                              field="q.dtype")  # fmt: skip
    if q.dim() != 3 or q.shape[0] < 1 or q.shape[2] != layout.head_dim:
        raise InvalidArgument(
            f"q has shape {list(q.shape)}; expected [q_tokens, heads, {layout.head_dim}]",
            field="q.shape",
        )
    if q.shape[1] < 1 or q.shape[1] % layout.num_kv_heads:
        raise InvalidArgument(
            f"{q.shape[1]} query heads is not a multiple of {layout.num_kv_heads} kv heads",
            field="q.shape",
        )


def batch_kv(batch: LayerBatch, layout: KVLayout) -> torch.Tensor:
    """The found blocks' layer as one [n, 2, kv_heads, block_tokens, dim] view (no copy
    unless some slots were left out)."""
    h, t, d = layout.num_kv_heads, layout.block_tokens, layout.head_dim
    n_slots = len(batch.buffer) // batch.stride if batch.stride else 0
    raw = torch.from_numpy(batch.buffer[: n_slots * batch.stride]).view(n_slots, batch.stride)
    # `pad` and `stride` are multiples of the itemsize, so the dtype view is legal.
    kv = raw[:, batch.pad : batch.pad + batch.nbytes].view(torch_dtype(layout.dtype))
    kv = kv.view(n_slots, 2, h, t, d)
    if batch.slots != list(range(n_slots)):
        kv = kv[torch.tensor(batch.slots, dtype=torch.long)]
    return kv


def attend_batch(
    batch: LayerBatch, layout: KVLayout, q: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    check_query(q, layout)
    return partial_attention(q, batch_kv(batch, layout), scale or 1.0 / math.sqrt(layout.head_dim))


def partial_attention(
    q: torch.Tensor, kv: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [Tq, Hq, D] over kv [n, 2, Hkv, T, D] (all keys visible)."""
    tq, hq, d = q.shape
    n, _, hkv, t, _ = kv.shape
    g = hq // hkv
    if n == 0:
        return (torch.zeros(tq, hq, d, dtype=torch.float32),
                torch.full((tq, hq), -math.inf, dtype=torch.float32))  # fmt: skip
    # One pass each for K and V: gather kv-head-major and convert to float32 together.
    k = torch.empty(hkv, n, t, d, dtype=torch.float32)
    k.copy_(kv[:, 0].permute(1, 0, 2, 3))
    v = torch.empty(hkv, n, t, d, dtype=torch.float32)
    v.copy_(kv[:, 1].permute(1, 0, 2, 3))
    k, v = k.view(hkv, n * t, d), v.view(hkv, n * t, d)
    # [Tq, Hkv, G, D] -> [Hkv, Tq*G, D]: each kv head meets its group's queries in one bmm.
    qg = (q.to(torch.float32) * scale).reshape(tq, hkv, g, d).permute(1, 0, 2, 3)
    qg = qg.reshape(hkv, tq * g, d)
    s = torch.bmm(qg, k.transpose(1, 2))  # [Hkv, Tq*G, N]
    lse = torch.logsumexp(s, dim=-1)
    p = s.sub_(lse.unsqueeze(-1)).exp_()
    o = torch.bmm(p, v)  # [Hkv, Tq*G, D]
    out = o.view(hkv, tq, g, d).permute(1, 0, 2, 3).reshape(tq, hq, d)
    lse = lse.view(hkv, tq, g).permute(1, 0, 2).reshape(tq, hq)
    return out.contiguous(), lse.contiguous()
