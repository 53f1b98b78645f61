"""The oracle against independent formulations: SDPA in float64 and explicit per-head scores."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.helpers import DTYPES, assert_attention_close, rel_err, seed_of
from tierd_kernels import attention_reference, gather_layer_kv

KV_HEADS = 2


def sdpa_oracle(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float | None = None
) -> torch.Tensor:
    """torch's SDPA with GQA in float64; query i sees keys at positions <= offset + i."""
    q_tokens, seq = q.shape[0], k.shape[1]
    visible = torch.arange(seq)[None, :] <= offset + torch.arange(q_tokens)[:, None]
    out = F.scaled_dot_product_attention(
        q.double().transpose(0, 1).unsqueeze(0),  # [1, heads, q_tokens, dim]
        k.double().unsqueeze(0),
        v.double().unsqueeze(0),
        attn_mask=visible,
        enable_gqa=True,
        scale=scale,
    )
    return out[0].transpose(0, 1)  # [q_tokens, heads, dim]


def loop_lse(q: torch.Tensor, k: torch.Tensor, offset: int, scale: float) -> torch.Tensor:
    """logsumexp of explicitly built scores, one query head at a time, in float64."""
    q_tokens, heads, _ = q.shape
    group = heads // k.shape[0]
    lse = torch.empty(q_tokens, heads, dtype=torch.float64)
    for h in range(heads):
        for i in range(q_tokens):
            scores = k[h // group].double() @ q[i, h].double() * scale  # [seq]
            lse[i, h] = torch.logsumexp(scores[: max(0, offset + i + 1)], dim=0)
    return lse


CASES = [
    (group, dim, q_tokens, seq, dtype)
    for group, dim, q_tokens, seq, dtype in itertools.product(
        (1, 3, 4), (64, 128), (1, 3, 5), (1, 17, 64), DTYPES
    )
    if q_tokens <= seq
]


@pytest.mark.parametrize(("group", "dim", "q_tokens", "seq", "dtype"), CASES)
def test_matches_sdpa_and_explicit_lse(group, dim, q_tokens, seq, dtype):
    g = torch.Generator().manual_seed(seed_of(group, dim, q_tokens, seq, str(dtype)))
    q = torch.randn(q_tokens, KV_HEADS * group, dim, generator=g).to(dtype)
    k = torch.randn(KV_HEADS, seq, dim, generator=g).to(dtype)
    v = torch.randn(KV_HEADS, seq, dim, generator=g).to(dtype)
    got = attention_reference(q, k, v)
    offset = seq - q_tokens  # the default: the queries are the last positions
    assert got.out.dtype == torch.float32 and got.out.shape == (q_tokens, KV_HEADS * group, dim)
    assert rel_err(got.out, sdpa_oracle(q, k, v, offset)) <= 1e-6
    assert rel_err(got.lse, loop_lse(q, k, offset, 1 / math.sqrt(dim))) <= 1e-6


@pytest.mark.parametrize("offset", [-3, 0, 5, 20, 40])
def test_causal_offset_and_rows_that_see_nothing(offset):
    g = torch.Generator().manual_seed(offset + 100)
    q = torch.randn(4, 6, 64, generator=g)
    k, v = torch.randn(2, 2, 30, 64, generator=g)
    got = attention_reference(q, k, v, causal_offset=offset, scale=0.3)
    seen = offset + torch.arange(4) >= 0
    assert torch.isinf(got.lse[~seen]).all() and (got.out[~seen] == 0).all()
    want_lse = loop_lse(q, k, offset, 0.3)
    assert rel_err(got.lse[seen], want_lse[seen]) <= 1e-6
    # SDPA gives nan for a row that sees nothing: ask it only for the rows that see keys.
    want = sdpa_oracle(q[seen], k, v, offset + int((~seen).sum()), scale=0.3)
    assert rel_err(got.out[seen], want) <= 1e-6


def test_single_token_query_keeps_rank_and_sees_everything():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(8, 64, generator=g)
    k, v = torch.randn(2, 2, 9, 64, generator=g)
    one = attention_reference(q, k, v)
    assert one.out.shape == (8, 64) and one.lse.shape == (8,)
    full = attention_reference(q.unsqueeze(0), k, v)
    assert torch.equal(one.out, full.out[0]) and torch.equal(one.lse, full.lse[0])
    assert rel_err(one.out, sdpa_oracle(q.unsqueeze(0), k, v, 8)[0]) <= 1e-6


def test_no_keys_is_empty():
    q = torch.randn(2, 4, 64)
    res = attention_reference(q, torch.empty(2, 0, 64), torch.empty(2, 0, 64))
    assert (res.out == 0).all() and torch.isinf(res.lse).all() and (res.lse < 0).all()


def test_rejects_bad_shapes():
    k = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="multiple"):
        attention_reference(torch.randn(1, 3, 64), k, k)
    with pytest.raises(ValueError, match="head dim"):
        attention_reference(torch.randn(1, 4, 32), k, k)
    with pytest.raises(ValueError):
        attention_reference(torch.randn(1, 4, 64), k, k[:, :3])


@pytest.mark.parametrize("valid", [None, 0, 1, 7, 16])
def test_gather_layer_kv_concatenates_blocks(valid):
    g = torch.Generator().manual_seed(7)
    layers, kv_heads, bt, dim, n = 3, 2, 16, 8, 4
    whole = torch.randn(layers, 2, kv_heads, n * bt, dim, generator=g).to(torch.bfloat16)
    blocks = [whole[:, :, :, i * bt : (i + 1) * bt].contiguous() for i in range(n)]
    seq = n * bt if valid is None else (n - 1) * bt + valid
    got = gather_layer_kv(blocks, 2, valid)
    assert torch.equal(got.k, whole[2, 0, :, :seq]) and torch.equal(got.v, whole[2, 1, :, :seq])
    assert got.k.is_contiguous() and got.k.dtype == torch.bfloat16
    k, v = got  # a pair, as callers unpack it
    assert k is got.k and v is got.v


def test_gather_layer_kv_checks():
    b = torch.zeros(2, 2, 1, 4, 8)
    with pytest.raises(ValueError, match="layer"):
        gather_layer_kv([b], 2)
    with pytest.raises(ValueError, match="valid_tokens"):
        gather_layer_kv([b], 0, 5)
    with pytest.raises(ValueError, match="same shape"):
        gather_layer_kv([b, torch.zeros(2, 2, 1, 8, 8)], 0)


def test_output_is_a_named_pair():
    q = torch.randn(1, 2, 8)
    k = torch.randn(1, 3, 8)
    res = attention_reference(q, k, k)
    out, lse = res
    assert out is res.out and lse is res.lse
    assert_attention_close(res, res, 0.0)
