"""decode_attention_codes (Triton, attention on encoded blocks) against decode-then-attend:
on the CPU through Triton's interpreter in a subprocess, and on a GPU when there is one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.helpers import assert_attention_close, rel_err, seed_of
from tierd_kernels import attention_reference, gather_layer_kv, triton_available
from tierd_kernels.codecs import make_codec
from tierd_kernels.reference import empty_output
from tierd_kernels.triton_codes import decode_attention_codes

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

LAYERS, KV_HEADS, POOL_BLOCKS = 2, 2, 12
TOL = 2e-5  # float32 products on both sides: rounding only, the codes are the same
# (codec, params, group, dim, block tokens, q dtype): every codec; kivi with default and
# narrow groups; grouped-query and single heads; q in each float dtype; tiles inside one
# block and tiles across blocks.
SWEEP = [
    ("int8", {}, 4, 64, 16, torch.float32),
    ("int8", {}, 1, 128, 32, torch.bfloat16),
    ("fp8", {}, 3, 64, 16, torch.float16),
    ("kivi4", {}, 4, 64, 16, torch.bfloat16),
    ("kivi4", {"k_group": 8, "v_group": 32}, 3, 128, 32, torch.float32),
    ("kivi2", {}, 1, 64, 32, torch.float16),
    ("kivi2", {"k_group": 16, "v_group": 16}, 4, 64, 32, torch.bfloat16),
    # 24-token blocks: tiles of 16 straddle blocks (each token's block looked up)
    ("kivi4", {}, 2, 64, 24, torch.float32),
    ("int8", {}, 2, 64, 24, torch.bfloat16),
]


def case_id(codec: str, params: dict, group: int, dim: int, bt: int, dtype: torch.dtype) -> str:
    extra = "".join(f"-{k[0]}{v}" for k, v in params.items())
    return f"{codec}{extra}-g{group}-d{dim}-bt{bt}-{str(dtype)[6:]}"


def make_case(codec: str, params: dict, group: int, dim: int, bt: int, dtype: torch.dtype,
              lens: list[int], split_tokens: int) -> dict:  # fmt: skip
    """An encoded pool of distinct random blocks, and per sequence a random choice of them."""
    g = torch.Generator().manual_seed(seed_of(codec, params, group, dim, bt, str(dtype), *lens))
    c = make_codec(codec, **params)
    shape = (LAYERS, 2, KV_HEADS, bt, dim)
    blocks = [torch.randn(shape, generator=g) * 2 for _ in range(POOL_BLOCKS)]
    width = max(1, max(-(-n // bt) for n in lens))
    table = torch.stack([torch.randperm(POOL_BLOCKS, generator=g)[:width] for _ in lens])
    return {"codec": codec, "params": params, "block_shape": shape, "layer": 1,
            "pool": torch.stack([c.encode(b) for b in blocks]), "raw": blocks,
            "q": torch.randn(len(lens), KV_HEADS * group, dim, generator=g).to(dtype),
            "table": table.to(torch.int32), "lens": torch.tensor(lens, dtype=torch.int32),
            "split_tokens": split_tokens}  # fmt: skip


def sweep_case(*spec) -> dict:
    bt = spec[4]
    # A partial tail, whole blocks, one token; splits of two blocks, so several per sequence.
    return make_case(*spec, [3 * bt + 5, 2 * bt, 1], split_tokens=2 * bt)


EDGE = {"edge-empty-seq": make_case("kivi4", {}, 2, 64, 16, torch.float32, [0, 37],
                                    split_tokens=4096)}  # fmt: skip
NAMES = [case_id(*c) for c in SWEEP] + list(EDGE)


def case_named(name: str) -> dict:
    return EDGE.get(name) or sweep_case(*SWEEP[NAMES.index(name)])


def check_against_decoded(case: dict, out: torch.Tensor, lse: torch.Tensor) -> None:
    """The oracle over the blocks as the codec decodes them (float64)."""
    c = make_codec(case["codec"], **case["params"])
    shape, q, table = case["block_shape"], case["q"], case["table"]
    bt = shape[3]
    decoded = [c.decode(r, shape, torch.float64) for r in case["pool"]]
    for b, n in enumerate(case["lens"].tolist()):
        if n == 0:
            want = empty_output(q[b].shape)
        else:
            used = -(-n // bt)
            blocks = [decoded[i] for i in table[b, :used].tolist()]
            k, v = gather_layer_kv(blocks, case["layer"], n - (used - 1) * bt)
            want = attention_reference(q[b].double(), k, v)
        got = type(want)(out[b].cpu(), lse[b].cpu())
        assert_attention_close(got, type(want)(want.out.float(), want.lse.float()), TOL)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Every case run once in one interpreter subprocess (startup costs seconds)."""
    cases = {name: case_named(name) for name in NAMES}
    tmp = tmp_path_factory.mktemp("triton-codes")
    torch.save(list(cases.values()), tmp / "cases.pt")
    runner = Path(__file__).with_name("triton_interpret_runner.py")
    proc = subprocess.run(
        [sys.executable, str(runner), str(tmp / "cases.pt"), str(tmp / "results.pt")],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout}\n{proc.stderr}"
    results = torch.load(tmp / "results.pt")
    return dict(zip(cases, zip(cases.values(), results)))


@needs_triton
@pytest.mark.parametrize("name", NAMES)
def test_interpreter_matches_decode_then_attend(interpreted, name):
    case, res = interpreted[name]
    check_against_decoded(case, res["out"], res["lse"])


@needs_triton
def test_a_lossy_codec_is_measured_not_hidden(interpreted):
    """Against the blocks before encoding, kivi4's result is off by a measurable amount
    (the decoded-block oracle above is what it must equal, not the raw blocks)."""
    case, res = interpreted[case_id(*SWEEP[3])]
    bt, n = case["block_shape"][3], case["lens"][1].item()
    blocks = [case["raw"][i] for i in case["table"][1, : n // bt].tolist()]
    k, v = gather_layer_kv(blocks, case["layer"], bt)
    want = attention_reference(case["q"][1].double(), k, v)
    err = rel_err(res["out"][1], want.out)
    assert 1e-3 < err < 0.5, err


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_gpu_matches_decode_then_attend(name):
    case = case_named(name)
    dev = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    res = decode_attention_codes(dev["q"], dev["pool"], make_codec(case["codec"], **case["params"]),
                                 case["block_shape"], dev["table"], dev["lens"], case["layer"],
                                 split_tokens=case["split_tokens"])  # fmt: skip
    check_against_decoded(case, res.out, res.lse)


# -- input checks: these raise before any kernel is imported --------------------------------


def checked(monkeypatch, codec: str = "kivi4", **changes):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check
    case = {**make_case("kivi4", {}, 2, 64, 16, torch.float32, [20, 3], split_tokens=16),
            **changes}  # fmt: skip
    return decode_attention_codes(case["q"], case["pool"], make_codec(codec),
                                  case["block_shape"], case["table"], case["lens"],
                                  case["layer"])  # fmt: skip


@needs_triton
@pytest.mark.parametrize(
    ("codec", "changes", "error", "match"),
    [
        ("raw", {}, TypeError, "decode_attention"),
        ("int8", {}, ValueError, "pool must be uint8"),
        ("kivi4", {"pool": torch.zeros(4, 100, dtype=torch.uint8)}, ValueError, "pool must"),
        ("kivi4", {"block_shape": (2, 2, 2, 16, 63)}, ValueError, "head dim 63"),
        ("kivi4", {"q": torch.zeros(2, 4, 32)}, ValueError, "head dim"),
        ("kivi4", {"q": torch.zeros(2, 3, 64)}, ValueError, "multiple"),
        ("kivi4", {"q": torch.zeros(2, 4, 64, dtype=torch.float64)}, TypeError, "float"),
        ("kivi4", {"table": torch.zeros(3, 2, dtype=torch.int32)}, ValueError, "block_table"),
        ("kivi4", {"lens": torch.tensor([20, 40], dtype=torch.int32)}, ValueError, "seq_lens"),
        ("kivi4", {"table": torch.tensor([[0, 99], [1, 2]], dtype=torch.int32)}, ValueError,
         "indices"),
        ("kivi4", {"layer": 2}, ValueError, "layer"),
    ],
)  # fmt: skip
def test_rejects_bad_input(monkeypatch, codec, changes, error, match):
    with pytest.raises(error, match=match):
        checked(monkeypatch, codec, **changes)
