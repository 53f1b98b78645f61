"""attend_blocks against the oracle over the same blocks, across shapes, dtypes and masks."""

from __future__ import annotations

import itertools

import pytest
import torch

from tests.kernels.helpers import DTYPES, TOL, assert_attention_close, random_blocks, seed_of
from tierd_kernels import attend_blocks, attention_reference, gather_layer_kv

# Every test here runs on the torch path and on the fused C++ kernel (conftest.py).
pytestmark = pytest.mark.usefixtures("kernel_path")

LAYERS, KV_HEADS = 2, 2

# (blocks, valid tokens in the last block): full blocks, a partial tail, a one-token tail.
SEQUENCES = [(5, None), (4, 5), (3, 1)]
CASES = [
    pytest.param(
        g, d, bt, seq, qt, dt, id=f"g{g}-d{d}-bt{bt}-{seq[0]}x{seq[1]}-q{qt}-{str(dt)[6:]}"
    )
    for g, d, bt, seq, qt, dt in itertools.product(
        (1, 3, 4), (64, 128), (16, 32), SEQUENCES, (1, 4), DTYPES
    )
]


def oracle(blocks, layer, q, valid, causal_offset):
    k, v = gather_layer_kv(blocks, layer, valid)
    # attend_blocks' None means "every key precedes the queries".
    offset = k.shape[1] if causal_offset is None else causal_offset
    return attention_reference(q, k, v, causal_offset=offset)


@pytest.mark.parametrize(("group", "dim", "bt", "sequence", "q_tokens", "dtype"), CASES)
def test_matches_oracle(group, dim, bt, sequence, q_tokens, dtype):
    n, valid = sequence
    g = torch.Generator().manual_seed(seed_of(group, dim, bt, n, q_tokens, str(dtype)))
    blocks = random_blocks(n, LAYERS, KV_HEADS, bt, dim, dtype, g)
    q = torch.randn(q_tokens, KV_HEADS * group, dim, generator=g).to(dtype)
    seq = (n - 1) * bt + (bt if valid is None else valid)
    # A decode step (no mask), and the causal case where q's tokens end the sequence.
    for causal_offset in (None, seq - q_tokens):
        want = oracle(blocks, 1, q, valid, causal_offset)
        # Chunks of one block, and of two blocks (the last one short).
        for chunk_tokens in (bt, 2 * bt):
            got = attend_blocks(blocks, 1, q, valid_tokens=valid, causal_offset=causal_offset,
                                chunk_tokens=chunk_tokens)  # fmt: skip
            assert_attention_close(got, want, TOL[dtype])


@pytest.mark.parametrize("offset", [-5, -1, 0, 3, 16, 30, 47, 60])
def test_any_causal_offset(offset):
    """Queries in the middle of the keys (later keys hidden), before them (rows that see
    nothing), and after them (everything visible)."""
    g = torch.Generator().manual_seed(offset + 50)
    blocks = random_blocks(3, LAYERS, KV_HEADS, 16, 64, torch.float32, g)
    q = torch.randn(5, 6, 64, generator=g)
    got = attend_blocks(blocks, 0, q, valid_tokens=2, causal_offset=offset, chunk_tokens=16)
    assert_attention_close(got, oracle(blocks, 0, q, 2, offset), TOL[torch.float32])


def test_two_dim_query_and_scale():
    g = torch.Generator().manual_seed(2)
    blocks = random_blocks(3, LAYERS, KV_HEADS, 16, 64, torch.bfloat16, g)
    q = torch.randn(8, 64, generator=g).to(torch.bfloat16)
    got = attend_blocks(blocks, 1, q, scale=0.05)
    assert got.out.shape == (8, 64) and got.lse.shape == (8,)
    k, v = gather_layer_kv(blocks, 1)
    assert_attention_close(got, attention_reference(q, k, v, scale=0.05), TOL[torch.bfloat16])


def test_blocks_viewing_shared_bytes():
    """Blocks as the host tier hands them over: dtype views of one byte buffer."""
    g = torch.Generator().manual_seed(3)
    shape = (LAYERS, 2, KV_HEADS, 32, 128)
    src = random_blocks(6, *shape[:1], KV_HEADS, 32, 128, torch.bfloat16, g)
    arena = bytearray(b"".join(b.contiguous().view(torch.uint8).numpy().tobytes() for b in src))
    flat = torch.frombuffer(arena, dtype=torch.bfloat16)
    per = src[0].numel()
    blocks = [flat[i * per : (i + 1) * per].view(shape) for i in (4, 0, 5, 2)]
    q = torch.randn(1, 8, 128, generator=g).to(torch.bfloat16)
    got = attend_blocks(blocks, 1, q, valid_tokens=9)
    assert_attention_close(got, oracle(blocks, 1, q, 9, None), TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bt", [32, 128])
def test_long_sequence_many_chunks(bt, dtype):
    """Real sizes (8 KV heads x 128 dims) and the default chunking; 128-token blocks take
    the converting-copy gather, 32-token ones the gather-then-convert one."""
    g = torch.Generator().manual_seed(bt)
    blocks = random_blocks(2048 // bt, 1, 8, bt, 128, dtype, g)
    q = torch.randn(1, 32, 128, generator=g).to(dtype)
    for causal_offset in (None, 2048 - bt + 16):
        got = attend_blocks(blocks, 0, q, valid_tokens=17, causal_offset=causal_offset)
        assert_attention_close(got, oracle(blocks, 0, q, 17, causal_offset), TOL[dtype])


def test_float32_blocks_read_in_place_and_gathered_agree_with_oracle():
    g = torch.Generator().manual_seed(5)
    blocks = random_blocks(4, LAYERS, KV_HEADS, 32, 64, torch.float32, g)
    q = torch.randn(2, 8, 64, generator=g)
    for chunk_tokens in (1, 32, 64):  # one block per chunk: read in place, no gather
        got = attend_blocks(blocks, 1, q, chunk_tokens=chunk_tokens)
        assert_attention_close(got, oracle(blocks, 1, q, None, None), 1e-5)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_blocks(dtype):
    """The CSD tier may hold float8 KV: the gather converts it like any other dtype."""
    g = torch.Generator().manual_seed(6)
    blocks = random_blocks(3, LAYERS, KV_HEADS, 16, 64, dtype, g)
    q = torch.randn(2, 6, 64, generator=g)
    got = attend_blocks(blocks, 1, q, valid_tokens=11, causal_offset=41)
    assert_attention_close(got, oracle(blocks, 1, q, 11, 41), 1e-5)


def test_no_keys_is_empty():
    q = torch.randn(1, 4, 64)
    for got in (attend_blocks([], 0, q),
                attend_blocks([torch.zeros(1, 2, 2, 16, 64)], 0, q, valid_tokens=0)):  # fmt: skip
        assert got.out.shape == (1, 4, 64)
        assert (got.out == 0).all() and (got.lse == float("-inf")).all()


def test_rejects_bad_input():
    b = torch.zeros(2, 2, 2, 16, 64)
    q = torch.zeros(1, 4, 64)
    with pytest.raises(ValueError, match="layer"):
        attend_blocks([b], 2, q)
    with pytest.raises(ValueError, match="valid_tokens"):
        attend_blocks([b], 0, q, valid_tokens=17)
    with pytest.raises(ValueError, match="multiple"):
        attend_blocks([b], 0, torch.zeros(1, 3, 64))
    with pytest.raises(ValueError, match="head dim"):
        attend_blocks([b], 0, torch.zeros(1, 4, 32))
    with pytest.raises(ValueError, match="block 1"):
        attend_blocks([b, torch.zeros(2, 2, 2, 8, 64)], 0, q)
    with pytest.raises(TypeError):
        attend_blocks([b.to(torch.int32)], 0, q)
    with pytest.raises(ValueError, match="chunk_tokens"):
        attend_blocks([b], 0, q, chunk_tokens=0)
