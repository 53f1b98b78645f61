"""`[weights] roots`: the daemon reads a model or an adapter only from files inside the
configured directories, whether the path is named directly or reached by a symlink placed
inside an allowed directory (whose bytes would otherwise be held and mapped to a client)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_models import small_model
from tests.lora_files import SMALL_Q, write_adapter
from tierd.errors import FailedPrecondition
from tierd.weights.registry import ModelRegistry


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    return allowed, outside


@pytest.fixture
def reg(tmp_path: Path, dirs: tuple[Path, Path]) -> Iterator[ModelRegistry]:
    """A registry reading from the allowed directory only."""
    registry = ModelRegistry(1 << 30, tmp_path / "weights", roots=(dirs[0],))
    try:
        yield registry
    finally:
        registry.close()


def test_a_model_inside_the_roots_registers_and_one_outside_is_refused(
    dirs: tuple[Path, Path], reg: ModelRegistry
) -> None:
    allowed, outside = dirs
    small_model(allowed / "m")
    small_model(outside / "m")
    assert reg.register("t", str(allowed / "m"), "", "m", False)[1]
    with pytest.raises(FailedPrecondition, match="weights.roots"):
        reg.register("t", str(outside / "m"), "", "o", False)


@pytest.mark.parametrize("linked", ["model.safetensors", "config.json"])
def test_a_symlink_in_an_allowed_model_dir_to_a_file_outside_is_refused(
    dirs: tuple[Path, Path], reg: ModelRegistry, linked: str
) -> None:
    allowed, outside = dirs
    small_model(outside / "m")
    (outside / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    target = allowed / "m"
    small_model(target)
    (target / linked).unlink(missing_ok=True)
    (target / linked).symlink_to(outside / "m" / linked)
    with pytest.raises(FailedPrecondition, match="weights.roots"):
        reg.register("t", str(target), "", "m", False)
    assert reg.list("t") == []


def test_a_symlink_between_files_inside_the_roots_is_followed(
    dirs: tuple[Path, Path], reg: ModelRegistry
) -> None:
    """A hub cache's layout: the snapshot's file links to a blob in the same root."""
    allowed, _ = dirs
    small_model(allowed / "blobs")
    snap = allowed / "snapshot"
    snap.mkdir()
    (snap / "model.safetensors").symlink_to(allowed / "blobs" / "model.safetensors")
    view, created = reg.register("t", str(snap), "", "m", False)
    assert created and view.manifest.size > 0


@pytest.mark.parametrize("linked", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_symlinked_adapter_file_outside_the_roots_is_refused(
    dirs: tuple[Path, Path], reg: ModelRegistry, linked: str
) -> None:
    allowed, outside = dirs
    small_model(allowed / "base")
    write_adapter(outside / "lora", SMALL_Q, seed=1)
    write_adapter(allowed / "lora", SMALL_Q, seed=1)
    (allowed / "lora" / linked).unlink()
    (allowed / "lora" / linked).symlink_to(outside / "lora" / linked)
    reg.register("t", str(allowed / "base"), "", "base", False)
    with pytest.raises(FailedPrecondition, match="weights.roots"):
        reg.register("t", str(allowed / "lora"), "", "lora", False, base_model="base")
