"""Merging partials over disjoint key sets gives dense attention's result."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.kernels.helpers import assert_attention_close, rel_err
from tierd_kernels import (
    AttentionOutput,
    attention_reference,
    empty_output,
    merge_into_,
    merge_partials,
    merge_stacked,
)

SEEDS = range(12)


def random_qkv(g: torch.Generator, q_tokens: int, seq: int, group: int = 3, dim: int = 64):
    q = torch.randn(q_tokens, 2 * group, dim, generator=g)
    k, v = torch.randn(2, 2, seq, dim, generator=g)
    return q, k, v


@pytest.mark.parametrize("seed", SEEDS)
def test_random_disjoint_key_sets_merge_to_dense(seed):
    g = torch.Generator().manual_seed(seed)
    seq = int(torch.randint(1, 80, (1,), generator=g))
    q, k, v = random_qkv(g, 2, seq)
    dense = attention_reference(q, k, v, causal_offset=seq)  # every key visible
    parts = int(torch.randint(1, 6, (1,), generator=g))
    owner = torch.randint(0, parts, (seq,), generator=g)  # any split, not only ranges
    partials = [
        attention_reference(q, k[:, owner == p], v[:, owner == p], causal_offset=seq)
        for p in range(parts)
    ]
    assert_attention_close(merge_partials(partials), dense, 1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_causal_ranges_merge_to_dense(seed):
    """Contiguous pieces of a causal sequence: later pieces are invisible to early queries,
    so some partials have rows with lse = -inf."""
    g = torch.Generator().manual_seed(seed)
    seq, q_tokens = 40, 6
    q, k, v = random_qkv(g, q_tokens, seq)
    parts = int(torch.randint(1, 6, (1,), generator=g))
    cuts = sorted(torch.randint(0, seq + 1, (parts - 1,), generator=g).tolist())
    bounds = [0, *cuts, seq]
    offset = seq - q_tokens
    partials = [
        attention_reference(q, k[:, a:b], v[:, a:b], causal_offset=offset - a)
        for a, b in itertools.pairwise(bounds)
    ]
    assert_attention_close(merge_partials(partials), attention_reference(q, k, v), 1e-5)


def test_empty_partials_weigh_nothing_even_holding_nan():
    g = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(g, 1, 20)
    dense = attention_reference(q, k, v)
    junk = AttentionOutput(
        torch.full_like(dense.out, math.nan), torch.full_like(dense.lse, -math.inf)
    )
    assert_attention_close(merge_partials([junk, dense, empty_output(q.shape)]), dense, 1e-6)


def test_all_empty_is_empty():
    res = merge_partials([empty_output((2, 4, 8)), empty_output((2, 4, 8))])
    assert (res.out == 0).all() and (res.lse == -math.inf).all()


def test_large_lse_does_not_overflow():
    g = torch.Generator().manual_seed(4)
    q, k, v = random_qkv(g, 1, 30)
    a = attention_reference(q, k[:, :10], v[:, :10], causal_offset=30)
    b = attention_reference(q, k[:, 10:], v[:, 10:], causal_offset=30)
    dense = attention_reference(q, k, v)
    shift = 100.0  # exp(100) overflows float32; larger shifts would cost lse its precision
    res = merge_partials([(a.out, a.lse + shift), (b.out, b.lse + shift)])
    assert rel_err(res.out, dense.out) <= 1e-5
    assert rel_err(res.lse - shift, dense.lse) <= 1e-5


def test_variants_agree():
    g = torch.Generator().manual_seed(5)
    q, k, v = random_qkv(g, 3, 50)
    pieces = [(0, 7), (7, 30), (30, 30), (30, 50)]
    partials = [attention_reference(q, k[:, a:b], v[:, a:b], causal_offset=47 - a)
                for a, b in pieces]  # fmt: skip
    merged = merge_partials(partials)
    stacked = merge_stacked(torch.stack([p.out for p in partials]),
                            torch.stack([p.lse for p in partials]))  # fmt: skip
    acc = empty_output(q.shape)
    for p in partials:
        merge_into_(acc, p)
    dense = attention_reference(q, k, v)
    for res in (merged, stacked, acc):
        assert_attention_close(res, dense, 1e-5)


def test_single_partial_and_tuples():
    out, lse = torch.randn(4, 8, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    res = merge_partials([(out, lse)])
    assert res.out.dtype == torch.float32 and torch.allclose(res.out, out.float())


def test_rejects_mismatch_and_nothing():
    with pytest.raises(ValueError):
        merge_partials([])
    with pytest.raises(ValueError):
        merge_partials([empty_output((2, 8)), empty_output((3, 8))])
