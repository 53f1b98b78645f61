"""Attention on compressed KV codes in the compiled kernel (kernels/csrc/codes.cpp) against
the torch reference of attend_codes and against decode-then-attend (the float64 oracle over
the decoded blocks): every codec, key and value group sizes, head dims, GQA ratios, block
sizes, partial last blocks, one to many blocks, peaked scores; its thread split and merge,
its GIL release, and the refusals that come before it runs."""

from __future__ import annotations

import itertools
import math
import threading
import time

import pytest
import torch

from tests.kernels.conftest import require_fused
from tests.kernels.helpers import assert_attention_close, seed_of
from tierd_kernels import AttentionOutput, _native, attention_reference
from tierd_kernels.codecs import Codec, Kivi, make_codec
from tierd_kernels.codes_attention import attend_codes

KV_HEADS = 2
# q scaled so scores have a standard deviation above 3 (checked per case).
PEAK = 4.5
# Both paths and the oracle read the same codes: what remains is float32 arithmetic.
TOL = 1e-5
# (block tokens, blocks, valid tokens in the last block)
LAYOUTS = [(16, 1, 7), (16, 37, None), (48, 5, 1), (64, 3, 63), (128, 9, 100), (256, 6, 17)]
# kivi (k_group, v_group); None: the block's tokens, the head dim
KIVI_GROUPS = [(None, None), (8, 16), (16, 32), (None, 64), (32, None)]


def _cases() -> list[object]:
    cases = []
    for i, (name, dim, group) in enumerate(
        itertools.product(("int8", "fp8", "kivi4", "kivi2"), (64, 128), (1, 3, 4))
    ):
        layout = LAYOUTS[i % len(LAYOUTS)]
        kg, vg = KIVI_GROUPS[i % len(KIVI_GROUPS)] if name.startswith("kivi") else (None, None)
        if kg is not None and layout[0] % kg:
            kg = None
        cases.append(pytest.param(name, kg, vg, dim, group, layout,
                                  id=f"{name}-k{kg}-v{vg}-d{dim}-g{group}-bt{layout[0]}x"
                                     f"{layout[1]}-v{layout[2]}"))  # fmt: skip
    # Group sizes of both kivi widths over 256-token blocks of head dim 128; and value groups
    # narrower than a code byte's dims (each vector lane its own scale).
    for bits, kg, vg in itertools.product((4, 2), (8, 16, 64, 256), (16, 32, 128)):
        cases.append(pytest.param(f"kivi{bits}", kg, vg, 128, 4, (256, 3, 200),
                                  id=f"kivi{bits}-k{kg}-v{vg}-d128-g4"))  # fmt: skip
    for name, kg, vg in (("kivi4", 8, 1), ("kivi4", 16, 2), ("kivi2", 8, 2), ("kivi2", 32, 4),
                         ("kivi2", 16, 8)):  # fmt: skip
        cases.append(pytest.param(name, kg, vg, 64, 3, (64, 4, 30), id=f"{name}-k{kg}-v{vg}-d64"))
    return cases


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    require_fused()
    monkeypatch.setenv("TIERD_KERNELS", "cpp")


def encoded(codec: Codec, n: int, shape: tuple[int, int, int, int], g: torch.Generator
            ) -> list[torch.Tensor]:  # fmt: skip
    """n blocks of bf16 KV (key channels with outliers, as trained models have) encoded,
    one layer record each, as views into one buffer."""
    kv = torch.randn(n, *shape, generator=g)
    kv[:, 0, :, :, :4] *= 8
    records = [codec.encode(kv[i : i + 1].to(torch.bfloat16)) for i in range(n)]
    pool = torch.cat(records)
    size = records[0].numel()
    return [pool[i * size : (i + 1) * size] for i in range(n)]


def decoded_kv(codec: Codec, records: list[torch.Tensor], shape, valid: int
               ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    layers = [codec.decode(r, (1, *shape), torch.float32)[0] for r in records]
    seq = (len(records) - 1) * shape[2] + valid
    k = torch.cat([d[0] for d in layers], dim=1)[:, :seq]
    v = torch.cat([d[1] for d in layers], dim=1)[:, :seq]
    return k, v


def decode_then_attend(codec, records, shape, q, valid, scale=None):
    k, v = decoded_kv(codec, records, shape, valid)
    return attention_reference(q, k, v, scale=scale, causal_offset=k.shape[1])


def score_std(k: torch.Tensor, q: torch.Tensor) -> float:
    group = q.shape[1] // k.shape[0]
    kk = k.double().repeat_interleave(group, dim=0)
    return (torch.einsum("qhd,hsd->hqs", q.double(), kk) / math.sqrt(q.shape[-1])).std().item()


def both_paths(monkeypatch, records, codec, shape, q, **kw):
    monkeypatch.setenv("TIERD_KERNELS", "cpp")
    got = attend_codes(records, codec, shape, q, **kw)
    monkeypatch.setenv("TIERD_KERNELS", "torch")
    ref = attend_codes(records, codec, shape, q, **kw)
    monkeypatch.setenv("TIERD_KERNELS", "cpp")
    return got, ref


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize(("name", "k_group", "v_group", "dim", "group", "layout"), _cases())
def test_compiled_equals_reference_and_decode_then_attend(
    monkeypatch, name, k_group, v_group, dim, group, layout
):
    bt, n, valid = layout
    valid = bt if valid is None else valid
    params = {"k_group": k_group, "v_group": v_group} if name.startswith("kivi") else {}
    codec = make_codec(name, **params)
    shape = (2, KV_HEADS, bt, dim)
    g = torch.Generator().manual_seed(seed_of(name, k_group, v_group, dim, group, layout))
    records = encoded(codec, n, shape, g)
    q = torch.randn(1, KV_HEADS * group, dim, generator=g) * PEAK
    k, _ = decoded_kv(codec, records, shape, valid)
    assert score_std(k, q) >= 3
    want = decode_then_attend(codec, records, shape, q, valid)
    got, ref = both_paths(monkeypatch, records, codec, shape, q, valid_tokens=valid)
    assert_attention_close(got, want, TOL)
    assert_attention_close(got, ref, TOL)


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("name", ["int8", "fp8", "kivi4", "kivi2"])
@pytest.mark.parametrize("dim", [40, 80])
def test_head_dims_off_the_vector_width(monkeypatch, name, dim):
    """Code rows that are no whole number of vectors (copied into padded rows inside the
    kernel: reading past them could leave the record)."""
    codec = make_codec(name, **({"k_group": 16, "v_group": 20} if name.startswith("kivi") else {}))
    shape = (2, KV_HEADS, 32, dim)
    g = torch.Generator().manual_seed(seed_of(name, dim))
    records = encoded(codec, 3, shape, g)
    q = torch.randn(1, KV_HEADS * 3, dim, generator=g) * PEAK
    got, ref = both_paths(monkeypatch, records, codec, shape, q, valid_tokens=9, scale=0.3)
    assert_attention_close(got, decode_then_attend(codec, records, shape, q, 9, 0.3), TOL)
    assert_attention_close(got, ref, TOL)


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("name", ["int8", "kivi4", "kivi2"])
def test_many_query_tokens_span_several_row_tiles(monkeypatch, name):
    """40 query tokens x GQA 4 = 160 rows: three row tiles per KV head; every query sees
    every key. A 2-d q is one query token."""
    codec = make_codec(name)
    shape = (2, KV_HEADS, 64, 128)
    g = torch.Generator().manual_seed(seed_of("rows", name))
    records = encoded(codec, 5, shape, g)
    q = torch.randn(40, KV_HEADS * 4, 128, generator=g) * PEAK
    got, ref = both_paths(monkeypatch, records, codec, shape, q, valid_tokens=50)
    assert_attention_close(got, decode_then_attend(codec, records, shape, q, 50), TOL)
    assert_attention_close(got, ref, TOL)
    one, ref1 = both_paths(monkeypatch, records, codec, shape, q[0], valid_tokens=50)
    assert one.out.shape == ref1.out.shape == (1, KV_HEADS * 4, 128)
    assert_attention_close(one, AttentionOutput(got.out[:1], got.lse[:1]), TOL)


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
@pytest.mark.parametrize("name", ["fp8", "kivi4"])
def test_split_block_ranges_merge_exactly(name, threads):
    """One KV head over 41 blocks: with several threads its blocks split into ranges whose
    partials merge by max and sum."""
    codec = make_codec(name, **({"k_group": 32, "v_group": 32} if name == "kivi4" else {}))
    shape = (2, 1, 64, 128)
    g = torch.Generator().manual_seed(seed_of("split", name, threads))
    records = encoded(codec, 41, shape, g)
    q = torch.randn(2, 4, 128, generator=g) * PEAK
    kg, vg = codec.groups(shape) if isinstance(codec, Kivi) else (1, 1)
    for rows in (1, 2):
        got = _native.attend_codes(records, name, shape, q[:rows], k_group=kg, v_group=vg,
                                   scale=1 / math.sqrt(128), valid_tokens=33, threads=threads)  # fmt: skip
        assert got is not None
        assert_attention_close(got, decode_then_attend(codec, records, shape, q[:rows], 33), TOL)


def test_torch_mode_never_runs_the_compiled_path(monkeypatch):
    require_fused()
    codec = make_codec("int8")
    shape = (2, 1, 16, 64)
    records = encoded(codec, 2, shape, torch.Generator().manual_seed(1))
    q = torch.randn(1, 2, 64)
    args = {"k_group": 1, "v_group": 1, "scale": 0.125, "valid_tokens": 16}
    monkeypatch.setenv("TIERD_KERNELS", "torch")
    assert _native.attend_codes(records, "int8", shape, q, **args) is None
    monkeypatch.setenv("TIERD_KERNELS", "cpp")
    assert _native.attend_codes(records, "int8", shape, q, **args) is not None


@pytest.mark.usefixtures("compiled")
@pytest.mark.parametrize(
    ("name", "params", "shape", "fix", "match"),
    [
        ("int8", {}, (2, 2, 16, 64), "short", "record 0 holds 4351 bytes; .* holds 4352"),
        ("kivi4", {}, (2, 2, 16, 64), "long", "record 0 holds 2689 bytes; .* holds 2688"),
        ("kivi2", {}, (2, 2, 16, 64), "float", "1-d uint8"),
        ("fp8", {}, (2, 2, 16, 64), "2d", "1-d uint8"),
        ("kivi4", {"k_group": 24}, (2, 2, 32, 64), None, "k_group 24 does not divide"),
        ("kivi2", {"v_group": 48}, (2, 2, 32, 64), None, "v_group 48 does not divide"),
        ("kivi2", {}, (2, 2, 32, 6), None, "multiple of 4"),
        ("int8", {}, (2, 2, 16), None, "a layer is"),
    ],
)  # fmt: skip
def test_malformed_inputs_are_refused_before_the_kernel_runs(
    monkeypatch, name, params, shape, fix, match
):
    codec = make_codec(name, **params)
    good = len(shape) == 4 and not codec_refuses(codec, shape)
    size = codec.record_bytes(shape, torch.float32) if good else 64
    record = torch.zeros(size, dtype=torch.uint8)
    record = {"short": record[:-1], "long": torch.zeros(size + 1, dtype=torch.uint8),
              "float": record.float(), "2d": record.view(1, -1)}.get(fix, record)  # fmt: skip
    calls = []
    real = _native.attend_codes
    monkeypatch.setattr(_native, "attend_codes", lambda *a, **k: calls.append(a) or real(*a, **k))
    heads, dim = 2 * (shape[1] if len(shape) > 1 else 1), shape[-1]
    with pytest.raises(ValueError, match=match):
        attend_codes([record, record], codec, shape, torch.randn(1, heads, dim))
    assert calls == []


def codec_refuses(codec: Codec, shape) -> bool:
    try:
        codec.check(shape)
    except ValueError:
        return True
    return False


@pytest.mark.usefixtures("compiled")
def test_the_call_releases_the_gil():
    """While the kernel computes, other Python threads run: the main thread's timestamps
    leave no gap as long as half a kernel call (in at least one call of five: another
    process may take this thread's core for a while; a held GIL stalls it in every call)."""
    codec = make_codec("kivi4")
    shape = (2, 8, 256, 128)
    g = torch.Generator().manual_seed(13)
    one = codec.encode(torch.randn(1, *shape, generator=g).to(torch.bfloat16))
    records = [one] * 256  # 64k tokens
    q = torch.randn(1, 32, 128, generator=g)
    calls: list[tuple[float, float]] = []

    def attend() -> None:
        for _ in range(5):
            t0 = time.perf_counter()
            _native.attend_codes(records, "kivi4", shape, q, k_group=256, v_group=128,
                                 scale=0.088, valid_tokens=256, threads=1)  # fmt: skip
            calls.append((t0, time.perf_counter()))

    worker = threading.Thread(target=attend)
    stamps = []
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
    worker.join()
    gaps = []
    for t0, t1 in calls:
        inside = [t0] + [s for s in stamps if t0 < s < t1] + [t1]
        gaps.append(max(b - a for a, b in itertools.pairwise(inside)) / (t1 - t0))
    assert min(gaps) < 0.5, f"the main thread stalled through every call: {gaps}"


@pytest.mark.usefixtures("compiled")
def test_calls_from_many_threads_at_once():
    """Concurrent calls (their own scratch per thread, one shared pool) each get their own
    answer."""
    cases = []
    for i, name in enumerate(["int8", "fp8", "kivi4", "kivi2", "kivi4", "kivi2"]):
        g = torch.Generator().manual_seed(100 + i)
        codec = make_codec(name, **({"v_group": 16 * (1 + i % 2)} if "kivi" in name else {}))
        shape = (2, KV_HEADS, 64, 64 * (1 + i % 2))
        records = encoded(codec, 6 + i, shape, g)
        q = torch.randn(1 + i % 3, KV_HEADS * 4, shape[3], generator=g) * PEAK
        cases.append((codec, records, shape, q, decode_then_attend(codec, records, shape, q, 20)))
    errors: list[BaseException] = []

    def attend(codec, records, shape, q, want) -> None:
        try:
            for _ in range(20):
                got = attend_codes(records, codec, shape, q, valid_tokens=20)
                assert_attention_close(got, want, TOL)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=attend, args=case) for case in cases]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[0]
