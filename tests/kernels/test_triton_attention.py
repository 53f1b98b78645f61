"""decode_attention (Triton) against the oracle: on the CPU through Triton's interpreter in a
subprocess, and on a GPU when there is one."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.kernels.helpers import DTYPES, TOL, assert_attention_close, seed_of
from tierd_kernels import attention_reference, decode_attention, gather_layer_kv, triton_available
from tierd_kernels.reference import empty_output

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")

LAYERS, KV_HEADS, POOL_BLOCKS = 2, 2, 24
SWEEP = list(itertools.product((1, 3, 4), (64, 128), (16, 32), DTYPES))


def case_id(group: int, dim: int, bt: int, dtype: torch.dtype) -> str:
    return f"g{group}-d{dim}-bt{bt}-{str(dtype)[6:]}"


def make_case(group: int, dim: int, bt: int, dtype: torch.dtype, lens: list[int],
              split_tokens: int) -> dict:  # fmt: skip
    """A shared pool, and per sequence a random choice of distinct blocks."""
    g = torch.Generator().manual_seed(seed_of(group, dim, bt, str(dtype), *lens))
    pool = torch.randn(POOL_BLOCKS, LAYERS, 2, KV_HEADS, bt, dim, generator=g).to(dtype)
    width = max(1, max(-(-n // bt) for n in lens))
    table = torch.stack([torch.randperm(POOL_BLOCKS, generator=g)[:width] for _ in lens])
    q = torch.randn(len(lens), KV_HEADS * group, dim, generator=g).to(dtype)
    return {"q": q, "pool": pool, "table": table.to(torch.int32), "layer": 1,
            "lens": torch.tensor(lens, dtype=torch.int32), "split_tokens": split_tokens}  # fmt: skip


def sweep_case(group: int, dim: int, bt: int, dtype: torch.dtype) -> dict:
    # A partial tail, whole blocks, one token; splits of two blocks, so several per sequence.
    return make_case(group, dim, bt, dtype, [3 * bt + 5, 2 * bt, 1], split_tokens=2 * bt)


def int64_case() -> dict:
    case = make_case(3, 64, 32, torch.bfloat16, [70, 9], split_tokens=32)
    return {**case, "table": case["table"].long(), "lens": case["lens"].long()}


EDGE = {  # an empty sequence with one split covering everything; int64 tables
    "edge-empty-seq": make_case(4, 64, 16, torch.float32, [0, 37], split_tokens=4096),
    "edge-int64-tables": int64_case(),
}


def check_against_oracle(case: dict, out: torch.Tensor, lse: torch.Tensor) -> None:
    q, pool, table, lens = case["q"], case["pool"], case["table"], case["lens"]
    bt = pool.shape[4]
    for b, n in enumerate(lens.tolist()):
        if n == 0:
            want = empty_output(q[b].shape)
        else:
            used = -(-n // bt)
            blocks = [pool[i] for i in table[b, :used].tolist()]
            k, v = gather_layer_kv(blocks, case["layer"], n - (used - 1) * bt)
            want = attention_reference(q[b], k, v)
        got = type(want)(out[b].cpu(), lse[b].cpu())
        assert_attention_close(got, want, TOL[pool.dtype])


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """Every case run once in one interpreter subprocess (startup costs seconds)."""
    cases = {case_id(*c): sweep_case(*c) for c in SWEEP} | EDGE
    tmp = tmp_path_factory.mktemp("triton")
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
@pytest.mark.parametrize("name", [case_id(*c) for c in SWEEP] + list(EDGE))
def test_interpreter_matches_oracle(interpreted, name):
    case, res = interpreted[name]
    check_against_oracle(case, res["out"], res["lse"])


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", [case_id(*c) for c in SWEEP] + list(EDGE))
def test_gpu_matches_oracle(name):
    case = EDGE.get(name) or sweep_case(*SWEEP[[case_id(*c) for c in SWEEP].index(name)])
    dev = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    res = decode_attention(dev["q"], dev["pool"], dev["table"], dev["lens"], dev["layer"],
                           split_tokens=dev["split_tokens"])  # fmt: skip
    check_against_oracle(case, res.out, res.lse)


# -- input checks: these raise before any kernel is imported --------------------------------


def checked(monkeypatch, **changes):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check
    case = {**make_case(1, 64, 16, torch.float32, [20, 3], split_tokens=16), **changes}
    return decode_attention(case["q"], case["pool"], case["table"], case["lens"], case["layer"])


@needs_triton
@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"q": torch.zeros(2, 2, 32)}, ValueError, "head dim"),
        ({"q": torch.zeros(2, 3, 64)}, ValueError, "multiple"),
        ({"q": torch.zeros(2, 64)}, ValueError, "batch, heads, dim"),
        ({"q": torch.zeros(2, 2, 64, dtype=torch.float64)}, TypeError, "float"),
        ({"pool": torch.zeros(4, 2, 2, 2, 16, 64).transpose(0, 1)}, ValueError, "contiguous"),
        ({"table": torch.zeros(3, 2, dtype=torch.int32)}, ValueError, "block_table"),
        ({"table": torch.zeros(2, 2)}, TypeError, "int32"),
        ({"lens": torch.tensor([20, 40], dtype=torch.int32)}, ValueError, "seq_lens"),
        ({"table": torch.tensor([[0, 99], [1, 2]], dtype=torch.int32)}, ValueError, "indices"),
        ({"layer": 2}, ValueError, "layer"),
    ],
)
def test_rejects_bad_input(monkeypatch, changes, error, match):
    with pytest.raises(error, match=match):
        checked(monkeypatch, **changes)


@needs_triton
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = make_case(1, 64, 16, torch.float32, [5], split_tokens=16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        decode_attention(case["q"], case["pool"], case["table"], case["lens"], 1)


def test_package_works_without_triton():
    """Importing tierd_kernels never imports triton, and without it only decode_attention
    refuses, with a message that says what to install."""
    code = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now fails
        "import torch, tierd_kernels as k\n"
        "assert not k.triton_available()\n"
        "q = torch.randn(1, 4, 8); b = [torch.randn(1, 2, 2, 4, 8)]\n"
        "k.attend_blocks(b, 0, q)\n"
        "try:\n"
        "    k.decode_attention(q, b[0][None], torch.zeros(1, 1, dtype=torch.int32),\n"
        "                       torch.ones(1, dtype=torch.int32), 0)\n"
        "except ImportError as e:\n"
        "    assert 'pip install triton' in str(e)\n"
        "else:\n"
        "    raise SystemExit('decode_attention ran without triton')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
