"""Decode attention computed on codes: the torch reference of the compressed-domain math.

Primitives: `attend_codes(records, codec, shape, q, *, scale, valid_tokens) ->
AttentionOutput`.

`records` are one layer's encoded records of consecutive blocks (see `codecs`), each of
layer shape `shape` = (2, kv_heads, tokens, dim). Dequantized K or V are never formed:

  kivi  K[t, d] = z[g(t), d] + s[g(t), d] * c[t, d]   (per channel, groups of tokens)
        q.K[t]  = q.z[g] + (q * s[g]).c[t]             the key scales fold into q, once
                                                        per group, not per token
        V[t, d] = zv[t, e(d)] + sv[t, e(d)] * cv[t, d] (per token, groups of channels)
        p.V[d]  = sum_t p_t zv[t, e(d)] + sum_t (p_t sv[t, e(d)]) cv[t, d]
                                                        the value scales fold into p
  int8, fp8
        q.K[t]  = s_k[t] * (q.c[t]),  p.V = sum_t (p_t s_v[t]) cv[t]

so the products run over the codes themselves. Two implementations answer alike: the
compiled kernel (kernels/csrc/codes.cpp through `_native`: reads the packed codes in
place, online softmax in float32, threads over KV heads and block ranges), used whenever
it loads, and the torch reference below (codes as float tensors), which serves otherwise
or when TIERD_KERNELS=torch. Both equal decode-then-attend up to float32 rounding; the
tests check them against `attention_reference` over the decoded blocks and each other.

Arguments are checked here, before either path runs: a record of the wrong length or
dtype, a shape the codec cannot encode (groups that do not divide), or a q that does not
fit are refused with ValueError (TypeError for raw and unknown codecs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _native
from .codecs import Codec, Kivi, Raw, Shape, _PerToken
from .reference import AttentionOutput, check_query


def _scores_values(codec: Codec, record: torch.Tensor, shape: Shape, q: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, object]:  # fmt: skip
    """Scores [kv_heads, group*q_tokens, T] (unscaled) and what p.V needs."""
    _, heads, tokens, dim = shape
    if isinstance(codec, Kivi):
        kg, vg = codec.groups(shape)
        s = codec.sections(record, shape)
        kc = s["k_codes"].float().view(heads, tokens // kg, kg, dim)
        ks, kz = s["k_scale"].float(), s["k_zero"].float()  # [H, T/kg, D]
        # q [H, R, D]: fold the key scales into q per token group.
        qs = q.unsqueeze(1) * ks.unsqueeze(2)  # [H, T/kg, R, D]
        scores = torch.einsum("hgrd,hgtd->hrgt", qs, kc).reshape(heads, q.shape[1], tokens)
        scores = scores + torch.einsum("hrd,hgd->hrg", q, kz).repeat_interleave(kg, dim=2)
        return scores, s, (kg, vg)
    if isinstance(codec, _PerToken):
        n = math.prod(shape)
        codes = record[:n].view(codec.code_dtype).view(shape).float()
        scales = record[n:].view(torch.float32).view(shape[:3])  # [2, H, T]
        scores = torch.einsum("hrd,htd->hrt", q, codes[0]) * scales[0].unsqueeze(1)
        return scores, (codes[1], scales[1]), None
    if isinstance(codec, Raw):
        raise TypeError("raw blocks go through attend_blocks, not attend_codes")
    raise TypeError(f"no compressed-domain attention for codec {codec.name!r}")


def _weighted_values(codec: Codec, p: torch.Tensor, parts: object, extra: object,
                     shape: Shape) -> torch.Tensor:  # fmt: skip
    """p [H, R, T] -> sum_t p_t V[t] as [H, R, D], from the codes."""
    _, heads, tokens, dim = shape
    if isinstance(codec, Kivi):
        s = parts
        assert isinstance(s, dict) and isinstance(extra, tuple)
        _, vg = extra
        vc = s["v_codes"].float().view(heads, tokens, dim // vg, vg)
        vs, vz = s["v_scale"].float(), s["v_zero"].float()  # [H, T, D/vg]
        ps = p.unsqueeze(-1) * vs.unsqueeze(1)  # [H, R, T, D/vg]: the scales fold into p
        out = torch.einsum("hrte,htev->hrev", ps, vc).reshape(heads, p.shape[1], dim)
        zero = torch.einsum("hrt,hte->hre", p, vz).repeat_interleave(vg, dim=2)
        return out + zero
    codes, scales = parts  # type: ignore[misc]
    return torch.einsum("hrt,htd->hrd", p * scales.unsqueeze(1), codes)


def _check_records(records: Sequence[torch.Tensor], codec: Codec, shape: Shape) -> None:
    if isinstance(codec, Raw):
        raise TypeError("raw blocks go through attend_blocks, not attend_codes")
    if not isinstance(codec, Kivi | _PerToken):
        raise TypeError(f"no compressed-domain attention for codec {codec.name!r}")
    codec.check(shape)  # a layer shape, and kivi groups that divide it
    size = codec.record_bytes(shape, torch.float32)  # the dtype only sizes raw records
    for i, r in enumerate(records):
        if not isinstance(r, torch.Tensor) or r.dtype != torch.uint8 or r.dim() != 1:
            what = f"{r.dtype} {list(r.shape)}" if isinstance(r, torch.Tensor) else type(r)
            raise ValueError(f"record {i} must be a 1-d uint8 tensor, got {what}")
        if r.numel() != size:
            raise ValueError(f"record {i} holds {r.numel()} bytes; a {codec.name} record of "
                             f"layer shape {list(shape)} holds {size}")  # fmt: skip
        if r.device.type != "cpu":
            raise ValueError(f"record {i} is on {r.device}; this path runs on the CPU")


def attend_codes(
    records: Sequence[torch.Tensor],
    codec: Codec,
    shape: Shape,
    q: torch.Tensor,
    *,
    scale: float | None = None,
    valid_tokens: int | None = None,
) -> AttentionOutput:
    """Attention of q [q_tokens, heads, dim] over the blocks whose layer records are given
    (every query sees every key: a decode step). The last block holds `valid_tokens`
    tokens (None: all). Returns out [q_tokens, heads, dim] and lse [q_tokens, heads]."""
    if not records:
        raise ValueError("no blocks to attend over")
    _check_records(records, codec, shape)
    _, kv_heads, tokens, dim = shape
    q_tokens, group = check_query(q, kv_heads, dim)
    if q.device.type != "cpu":
        raise ValueError(f"q is on {q.device}; this path runs on the CPU")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    last = tokens if valid_tokens is None else valid_tokens
    if not 1 <= last <= tokens:
        raise ValueError(f"valid_tokens must be in [1, {tokens}], got {valid_tokens}")
    kg, vg = codec.groups(shape) if isinstance(codec, Kivi) else (1, 1)
    fused = _native.attend_codes(records, codec.name, shape, q.reshape(q_tokens, -1, dim),
                                 k_group=kg, v_group=vg, scale=scale, valid_tokens=last)  # fmt: skip
    if fused is not None:
        return fused
    # [q_tokens, heads, dim] -> [kv_heads, group * q_tokens, dim]: rows share a KV head.
    qh = q.float().view(q_tokens, kv_heads, group, dim).permute(1, 2, 0, 3)
    qh = qh.reshape(kv_heads, group * q_tokens, dim)
    scores, parts = [], []
    for i, record in enumerate(records):
        s, p, extra = _scores_values(codec, record, shape, qh)
        if i == len(records) - 1 and last < tokens:
            s = s.clone()
            s[:, :, last:] = -math.inf
        scores.append(s * scale)
        parts.append((p, extra))
    all_scores = torch.cat(scores, dim=2)  # [H, R, blocks*T]
    m = all_scores.amax(dim=2, keepdim=True)
    w = torch.exp(all_scores - m)
    total = w.sum(dim=2, keepdim=True)
    out = torch.zeros(kv_heads, group * q_tokens, dim)
    for i, (p, extra) in enumerate(parts):
        wi = w[:, :, i * tokens : (i + 1) * tokens]
        out += _weighted_values(codec, wi, p, extra, shape)
    out = out / total
    lse = (m + torch.log(total)).squeeze(2)
    # back to [q_tokens, heads, ...]
    out = out.view(kv_heads, group, q_tokens, dim).permute(2, 0, 1, 3).reshape(q_tokens, -1, dim)
    lse = lse.view(kv_heads, group, q_tokens).permute(2, 0, 1).reshape(q_tokens, -1)
    return AttentionOutput(out, lse)
