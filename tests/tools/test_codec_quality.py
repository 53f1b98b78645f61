"""KV codec quality (tools/codec_quality.py, tools/kv_quality.py): the simulated tier stores
exactly what the codec returns for full blocks, keeps the open block raw, and the quick run
on SmolLM2 measures real differences (raw exact, lossy codecs attended to different KV)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierd_kernels.codecs import ENCODINGS, make_codec

TOOLS = Path(__file__).resolve().parents[2] / "tools"
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))
import kv_quality
import smollm2

BLOCK = 16
LAYERS, HEADS, DIM = 3, 3, 64


def _kv(tokens: int, seed: int) -> torch.Tensor:
    """[layers, 2, heads, tokens, dim] with a few outlier key channels, as real keys have."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(LAYERS, 2, HEADS, tokens, DIM, generator=g)
    kv[:, 0, :, :, ::9] *= 12
    return kv


@pytest.mark.parametrize("name", ENCODINGS)
def test_blocks_sealed_together_decode_as_block_by_block(name: str) -> None:
    kv = _kv(5 * BLOCK, 1)
    tier = make_codec(name)  # what a tier stores, one block per call
    together = kv_quality._multi_block(tier, BLOCK)
    got = together.decode(together.encode(kv), tuple(kv.shape), kv.dtype)
    for b in range(5):
        block = kv[:, :, :, b * BLOCK : (b + 1) * BLOCK].contiguous()
        want = tier.decode(tier.encode(block), tuple(block.shape), block.dtype)
        assert torch.equal(got[:, :, :, b * BLOCK : (b + 1) * BLOCK], want), (name, b)


def _cache(rows: int, tokens: int, seed: int) -> object:
    from transformers import DynamicCache

    cache = DynamicCache()
    kv = _kv(tokens, seed).unsqueeze(2).expand(-1, -1, rows, -1, -1, -1).contiguous()
    for i in range(LAYERS):
        cache.update(kv[i, 0], kv[i, 1], i)
    return cache


def _row(cache: object, row: int) -> torch.Tensor:
    return kv_quality.StoredKV._read(cache.layers, row, 0, cache.get_seq_length())  # type: ignore[attr-defined]


def test_seal_stores_full_blocks_through_the_codec_and_keeps_the_open_block_raw() -> None:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install transformers gguf accelerate)")
    int8 = make_codec("int8")
    stored = kv_quality.StoredKV([None, make_codec("raw"), int8], BLOCK)
    cache = _cache(3, 2 * BLOCK + 5, 2)
    before = _row(cache, 0).clone()
    stored.seal(cache)
    assert stored.sealed == 2 * BLOCK
    assert torch.equal(_row(cache, 0), before)  # full precision: no round trip
    assert torch.equal(_row(cache, 1), before)  # raw: exact
    got = _row(cache, 2)
    for b in range(2):
        block = before[:, :, :, b * BLOCK : (b + 1) * BLOCK].contiguous()
        want = int8.decode(int8.encode(block), tuple(block.shape), block.dtype)
        assert torch.equal(got[:, :, :, b * BLOCK : (b + 1) * BLOCK], want)
    assert not torch.equal(got[:, :, :, : 2 * BLOCK], before[:, :, :, : 2 * BLOCK])
    assert torch.equal(got[:, :, :, 2 * BLOCK :], before[:, :, :, 2 * BLOCK :])  # open block
    assert stored.stats[2].tokens == 2 * BLOCK and stored.stats[2].max_abs > 0
    assert stored.stats[1].tokens == 2 * BLOCK and stored.stats[1].max_abs == 0

    # Decode appends one token at a time: the third block seals once full, and only it.
    sealed = got[:, :, :, : 2 * BLOCK].clone()
    for t in range(BLOCK - 5):
        step = _kv(1, 10 + t)
        for i in range(LAYERS):
            k, v = (step[i, j].unsqueeze(0).expand(3, -1, -1, -1).contiguous() for j in (0, 1))
            cache.update(k, v, i)
        stored.seal(cache)
        assert stored.sealed == (2 * BLOCK if t < BLOCK - 6 else 3 * BLOCK)
    assert torch.equal(_row(cache, 2)[:, :, :, : 2 * BLOCK], sealed)  # not stored twice
    third = _row(cache, 0)[:, :, :, 2 * BLOCK :].contiguous()
    want = int8.decode(int8.encode(third), tuple(third.shape), third.dtype)
    assert torch.equal(_row(cache, 2)[:, :, :, 2 * BLOCK :], want)
    assert stored.stats[2].tokens == 3 * BLOCK


@pytest.mark.e2e
def test_quick_run_on_smollm2(tmp_path: Path) -> None:
    reason = smollm2.missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    out = tmp_path / "quality.json"
    proc = subprocess.run(
        [sys.executable, str(TOOLS / "codec_quality.py"), "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    report = json.loads(out.read_text())
    cfg, codecs = report["config"], report["codecs"]
    assert set(codecs) == {"raw", "int8", "fp8", "kivi4", "kivi2"}
    assert "LICENSE" in report["text_source"]

    # Every full block is stored, the prompt's and those the decode fills; the open one not.
    context = [n + cfg["steps"] - 1 for n in cfg["prompt_tokens"]] + [cfg["ppl_tokens"]]
    sealed = sum(n - n % cfg["block_tokens"] for n in context)
    for name, r in codecs.items():
        assert r["stored_tokens"] == sealed, name

    raw = codecs["raw"]
    assert raw["greedy_agreement"] == 1.0 and raw["kl_mean"] == 0.0 and raw["kl_max"] == 0.0
    assert raw["ppl"] == report["full_precision"]["ppl"] and raw["ppl_delta_pct"] == 0.0
    assert all(raw["free_running_identical"]) and raw["kv_max_abs_err"] == 0.0
    for name in ("int8", "fp8", "kivi4", "kivi2"):
        # The KV the model attended to is not what it produced, and its predictions moved.
        assert codecs[name]["kv_rel_err"] > 0 and codecs[name]["kl_mean"] > 0, name
    assert codecs["int8"]["greedy_agreement"] >= 0.9
    # Fewer bits, larger error in what is attended to, and further from full precision.
    assert codecs["int8"]["kv_rel_err"] < codecs["kivi4"]["kv_rel_err"]
    assert codecs["kivi4"]["kv_rel_err"] < codecs["kivi2"]["kv_rel_err"]
    assert codecs["int8"]["kl_mean"] < codecs["kivi2"]["kl_mean"]
    assert "raw" in report["pass"] and "int8" in report["pass"] and "kivi2" not in report["pass"]
    assert "offered as defaults" in proc.stdout
