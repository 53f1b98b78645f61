"""tierctl capacity: GPUs and MIG instances from nvidia-smi, and a config's [[slices]] shown
against them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tierctl import probe
from tierctl.capacity import gpu_tiers, place_slices, render_slices
from tierctl.cli import main
from tierd.config import config_from_dict

# Printed verbatim by an H200 (MIG off): `nvidia-smi -L`, and
# `nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,mig.mode.current
# --format=csv`.
H200_LIST = "GPU 0: NVIDIA H200 (UUID: GPU-a267d29a-9786-72fd-1e44-bf85190413fb)\n"
H200_QUERY = """index, uuid, name, memory.total [MiB], memory.used [MiB], mig.mode.current
0, GPU-a267d29a-9786-72fd-1e44-bf85190413fb, NVIDIA H200, 143771 MiB, 0 MiB, Disabled
"""

# CONSTRUCTED, not captured: two H200s, the first in MIG mode with two instances, written
# after nvidia-smi's documented formats (MIG devices indented under their GPU in `-L`).
MIG_LIST = """GPU 0: NVIDIA H200 (UUID: GPU-a267d29a-9786-72fd-1e44-bf85190413fb)
  MIG 3g.71gb     Device  0: (UUID: MIG-5c1d6f0e-3b2a-5d4c-8e9f-0a1b2c3d4e5f)
  MIG 1g.18gb     Device  1: (UUID: MIG-7e2f8a1b-4c3d-5e6f-9a0b-1c2d3e4f5a6b)
GPU 1: NVIDIA H200 (UUID: GPU-0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e)
"""
MIG_QUERY = """index, uuid, name, memory.total [MiB], memory.used [MiB], mig.mode.current
0, GPU-a267d29a-9786-72fd-1e44-bf85190413fb, NVIDIA H200, 143771 MiB, 120 MiB, Enabled
1, GPU-0b1c2d3e-4f5a-6b7c-8d9e-0f1a2b3c4d5e, NVIDIA H200, 143771 MiB, 2048 MiB, Disabled
"""
MIG_A = "MIG-5c1d6f0e-3b2a-5d4c-8e9f-0a1b2c3d4e5f"
MIG_B = "MIG-7e2f8a1b-4c3d-5e6f-9a0b-1c2d3e4f5a6b"


def test_a_real_h200_parses() -> None:
    (gpu,) = probe.parse_nvidia_smi(H200_QUERY, H200_LIST)
    assert (gpu.index, gpu.name, gpu.uuid) == (
        0, "NVIDIA H200", "GPU-a267d29a-9786-72fd-1e44-bf85190413fb")  # fmt: skip
    assert gpu.total == gpu.free == 143771 << 20
    assert not gpu.mig_enabled and gpu.mig == []
    (tier,) = gpu_tiers([gpu])
    assert (tier.name, tier.kind, tier.total_bytes, tier.uuid) == (
        "gpu0", "gpu", 143771 << 20, gpu.uuid)  # fmt: skip


def test_mig_instances_parse_under_their_gpu() -> None:
    g0, g1 = probe.parse_nvidia_smi(MIG_QUERY, MIG_LIST)
    assert g0.mig_enabled and not g1.mig_enabled
    assert [(s.gpu_index, s.index, s.profile, s.memory, s.uuid) for s in g0.mig] == [
        (0, 0, "3g.71gb", 71 * 10**9, MIG_A), (0, 1, "1g.18gb", 18 * 10**9, MIG_B)]  # fmt: skip
    assert g1.free == (143771 - 2048) << 20 and g1.uuid.endswith("3c4d5e")
    tiers = gpu_tiers([g0, g1])
    assert [(t.name, t.kind, t.uuid) for t in tiers] == [
        ("gpu0/mig0", "mig", MIG_A), ("gpu0/mig1", "mig", MIG_B), ("gpu1", "gpu", g1.uuid)]  # fmt: skip


def test_slices_are_placed_on_the_gpus_found() -> None:
    slices = config_from_dict({"slices": [
        {"slice": MIG_B, "models": ["smollm2"], "weight_budget": "8GiB"},
        {"slice": 1, "models": ["a" * 64, "llama"], "weight_budget": 200 << 30},
        {"slice": 3, "models": ["smollm2"], "weight_budget": "1GiB"},
    ]}).slices  # fmt: skip
    placed = place_slices(slices, gpu_tiers(probe.parse_nvidia_smi(MIG_QUERY, MIG_LIST)))
    mig, whole, absent = placed
    assert (mig["tier"], mig["memory_bytes"], mig["weight_budget"], mig["over_memory"]) == (
        "gpu0/mig1", 18 * 10**9, 8 << 30, False)  # fmt: skip
    assert whole["tier"] == "gpu1" and whole["over_memory"]  # 200 GiB on a 140 GiB GPU
    assert whole["models"] == ["a" * 64, "llama"]
    assert absent["tier"] is None and absent["memory_bytes"] is None
    text = render_slices(placed)
    assert "gpu0/mig1" in text and "(over memory)" in text and "not on this machine" in text


def test_capacity_shows_the_configs_slices(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    cfg = tmp_path / "tierd.toml"
    cfg.write_text(f'[[slices]]\nslice = "{MIG_A}"\nmodels = ["smollm2"]\n'
                   'weight_budget = "2GiB"\n')  # fmt: skip
    assert main(["capacity", "--no-bench", "--json", "--config", str(cfg)]) == 0
    (s,) = json.loads(capsys.readouterr().out)["slices"]
    assert (s["slice"], s["models"], s["weight_budget"]) == (MIG_A, ["smollm2"], 2 << 30)
    assert main(["capacity", "--no-bench", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "weight budget" in out and MIG_A in out and "2.0 GiB" in out
    cfg.write_text('[[slices]]\nslice = "gpu0"\nmodels = ["m"]\nweight_budget = 1\n')
    assert main(["capacity", "--no-bench", "--config", str(cfg)]) == 2
    assert "slices[0].slice" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_no_gpu_is_said_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    gpus, note = probe.find_gpus()
    if gpus:
        pytest.skip("torch finds a GPU here")
    assert note is not None and note.startswith("no GPU:") and "\n" not in note
    assert main(["capacity", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if "GPU" in line] == [f"note: {note}"]
