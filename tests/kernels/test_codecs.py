"""The KV codecs' torch references: sizes, round trips, error bounds, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from tierd_kernels import attention_reference
from tierd_kernels.codecs import ENCODINGS, Kivi, make_codec, pack, unpack
from tierd_kernels.codes_attention import attend_codes

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def block(shape=(2, 2, 3, 32, 64), dtype=torch.bfloat16, seed=0, spread=1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * spread
    # Outlier channels in the keys, as trained models have: what per-channel grouping is for.
    x[:, 0, :, :, :4] *= 8
    return x.to(dtype)


@pytest.mark.parametrize("name", ENCODINGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_shape_size_and_layers(name, dtype):
    codec = make_codec(name)
    b = block(dtype=dtype, seed=hash((name, str(dtype))) % 1000)
    enc = codec.encode(b)
    assert enc.dtype == torch.uint8
    assert enc.numel() == codec.block_bytes(tuple(b.shape), dtype)
    dec = codec.decode(enc, tuple(b.shape), dtype)
    assert dec.shape == b.shape and dec.dtype == dtype
    # A layer's record sits at its offset and decodes alone to that layer.
    size = codec.record_bytes(tuple(b.shape[1:]), dtype)
    for i in range(b.shape[0]):
        alone = codec.decode_layer(enc[i * size : (i + 1) * size], tuple(b.shape[1:]), dtype)
        assert torch.equal(alone, dec[i])
    if codec.lossless:
        assert torch.equal(dec.view(torch.uint8), b.view(torch.uint8))


def test_int8_error_is_at_most_half_a_step_per_row():
    b = block(dtype=torch.float32, seed=3)
    dec = make_codec("int8").decode(make_codec("int8").encode(b), tuple(b.shape), torch.float32)
    step = b.abs().amax(dim=-1, keepdim=True) / 127
    assert bool(((dec - b).abs() <= step / 2 + 1e-6 * step).all())


def test_fp8_error_is_e4m3_rounding_of_the_scaled_value():
    b = block(dtype=torch.float32, seed=4)
    dec = make_codec("fp8").decode(make_codec("fp8").encode(b), tuple(b.shape), torch.float32)
    scale = b.abs().amax(dim=-1, keepdim=True) / 448
    # e4m3 keeps 3 mantissa bits (relative half-step 2^-4); below 2^-6 it is subnormal
    # with absolute steps of 2^-9 (in scaled units).
    bound = torch.maximum(b.abs() * 2.0**-4, scale * 2.0**-10)
    assert bool(((dec - b).abs() <= bound * 1.0001).all())


@pytest.mark.parametrize("bits", (4, 2))
@pytest.mark.parametrize(("k_group", "v_group"), [(None, None), (8, 16), (32, 64), (1, 4)])
def test_kivi_error_is_at_most_half_a_step_of_its_group(bits, k_group, v_group):
    codec = Kivi(bits, k_group=k_group, v_group=v_group)
    b = block(dtype=torch.float32, seed=bits * 10 + (k_group or 0))
    shape = tuple(b.shape[1:])
    levels = (1 << bits) - 1
    for layer in range(b.shape[0]):
        kv = b[layer]
        rec = codec.encode_layer(kv)
        dec = codec.decode_layer(rec, shape, torch.float32)
        kg, vg = codec.groups(shape)
        _, heads, tokens, dim = shape
        k = kv[0].view(heads, tokens // kg, kg, dim)
        k_range = (k.amax(2, keepdim=True) - k.amin(2, keepdim=True)).expand_as(k)
        v = kv[1].view(heads, tokens, dim // vg, vg)
        v_range = (v.amax(3, keepdim=True) - v.amin(3, keepdim=True)).expand_as(v)
        for got, want, rng in ((dec[0], kv[0], k_range), (dec[1], kv[1], v_range)):
            rng = rng.reshape(want.shape)
            # half a step, plus float16's rounding of the stored zero point and scale
            bound = rng / levels / 2 + 2.0**-10 * (want.abs() + rng) + 1e-6
            assert bool(((got - want).abs() <= bound).all())


def test_kivi_keeps_outlier_channels_apart():
    """Per-channel key ranges: a channel 8x the others does not coarsen their codes."""
    b = block(dtype=torch.float32, seed=7)
    codec = make_codec("kivi4")
    dec = codec.decode(codec.encode(b), tuple(b.shape), torch.float32)
    normal = b[:, 0, :, :, 4:]
    err = (dec[:, 0, :, :, 4:] - normal).norm() / normal.norm()
    # Measured 0.077 with per-channel ranges; per-token ranges over all channels: 0.37.
    assert err < 0.1


@pytest.mark.parametrize("name", ["int8", "fp8", "kivi4", "kivi2"])
def test_constant_groups_decode_exactly(name):
    b = torch.full((1, 2, 2, 16, 8), 0.75)
    b[0, 1] = -2.5
    codec = make_codec(name)
    dec = codec.decode(codec.encode(b), tuple(b.shape), torch.float32)
    assert torch.equal(dec, b)
    zero = torch.zeros(1, 2, 2, 16, 8)
    assert torch.equal(codec.decode(codec.encode(zero), tuple(zero.shape), torch.float32), zero)


@pytest.mark.parametrize(("name", "ratio"), [("int8", 1.88), ("fp8", 1.88), ("kivi4", 3.55),
                                             ("kivi2", 6.4)])  # fmt: skip
def test_compression_ratio_against_bf16(name, ratio):
    """64-token blocks of dim 64 (SmolLM2's head dim), default groups."""
    shape = (30, 2, 3, 64, 64)
    got = math.prod(shape) * 2 / make_codec(name).block_bytes(shape, torch.bfloat16)
    assert got == pytest.approx(ratio, abs=0.01)


@pytest.mark.parametrize("bits", (2, 4))
def test_pack_unpack_are_inverse(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", ["int8", "kivi4"])
def test_non_finite_blocks_are_refused(name, bad):
    b = block(dtype=torch.float32)
    b[1, 1, 2, 5, 7] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        make_codec(name).encode(b)


@pytest.mark.parametrize("value", [-1e5, 2e6])
@pytest.mark.parametrize("name", ["kivi4", "kivi2"])
def test_kivi_refuses_ranges_its_float16_scales_cannot_hold(name, value):
    b = block(dtype=torch.float32)
    b[1, 0, 1, 3, 9] = value  # finite, but no float16 zero point or scale reaches it
    with pytest.raises(ValueError, match="float16"):
        make_codec(name).encode(b)


@pytest.mark.parametrize(
    ("name", "params", "shape", "match"),
    [
        ("kivi4", {"k_group": 24}, (1, 2, 2, 32, 64), "k_group 24 does not divide"),
        ("kivi4", {"v_group": 48}, (1, 2, 2, 32, 64), "v_group 48 does not divide"),
        ("kivi2", {}, (1, 2, 2, 32, 6), "multiple of 4"),
    ],
)
def test_shapes_a_codec_cannot_encode_are_refused(name, params, shape, match):
    with pytest.raises(ValueError, match=match):
        make_codec(name, **params).encode(torch.zeros(shape))


def test_unknown_codecs_and_options_are_refused():
    with pytest.raises(ValueError, match="unknown codec 'zstd'"):
        make_codec("zstd")
    with pytest.raises(ValueError, match="does not take"):
        make_codec("int8", k_group=4)
    with pytest.raises(ValueError, match="positive integer"):
        make_codec("kivi4", k_group=0)
    with pytest.raises(ValueError, match="2 or 4 bits"):
        Kivi(3)


def test_decode_checks_the_length():
    codec = make_codec("kivi4")
    shape = (1, 2, 2, 32, 64)
    enc = codec.encode(torch.ones(shape))
    with pytest.raises(ValueError, match="expected"):
        codec.decode(enc[:-1], shape, torch.float32)


# -- attention on codes ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int8", "fp8", "kivi4", "kivi2"])
@pytest.mark.parametrize(("group", "q_tokens", "valid", "groups"),
                         [(3, 1, 32, {}), (1, 1, 7, {}), (4, 2, 32, {}),
                          (3, 1, 20, {"k_group": 8, "v_group": 16})])  # fmt: skip
def test_attention_on_codes_equals_decode_then_attend(name, group, q_tokens, valid, groups):
    params = groups if name.startswith("kivi") else {}
    codec = make_codec(name, **params)
    kv_heads, tokens, dim, nblocks = 2, 32, 64, 3
    shape = (2, kv_heads, tokens, dim)
    g = torch.Generator().manual_seed(hash((name, group, q_tokens, valid)) % 10_000)
    blocks = [torch.randn(1, *shape, generator=g).to(torch.bfloat16) for _ in range(nblocks)]
    records = [codec.encode(b) for b in blocks]
    q = torch.randn(q_tokens, kv_heads * group, dim, generator=g) * 3
    got = attend_codes(records, codec, shape, q, valid_tokens=valid)
    decoded = [codec.decode(r, (1, *shape), torch.float32)[0] for r in records]
    k = torch.cat([d[0] for d in decoded], dim=1)[:, : (nblocks - 1) * tokens + valid]
    v = torch.cat([d[1] for d in decoded], dim=1)[:, : (nblocks - 1) * tokens + valid]
    want = attention_reference(q, k, v, causal_offset=k.shape[1])
    assert got.out.shape == want.out.shape and got.lse.shape == want.lse.shape
    rel = (got.out.double() - want.out).norm() / want.out.norm()
    assert rel < 1e-5
    assert torch.allclose(got.lse.double(), want.lse.double(), rtol=1e-5, atol=1e-5)


def test_attention_on_codes_refuses_raw_and_empty():
    shape = (2, 1, 16, 8)
    with pytest.raises(TypeError, match="attend_blocks"):
        attend_codes([make_codec("raw").encode(torch.ones(1, *shape))], make_codec("raw"), shape,
                     torch.ones(1, 1, 8))  # fmt: skip
    with pytest.raises(ValueError, match="no blocks"):
        attend_codes([], make_codec("int8"), shape, torch.ones(1, 1, 8))
