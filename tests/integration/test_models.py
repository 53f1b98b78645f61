"""Models held in tierd, against a real daemon: register once, map read-only everywhere.

Most tests use a small safetensors model written here with random weights (no
transformers needed); the worker test builds a tiny Llama with transformers (skipped
without it) and runs it in three processes on the one mapped area.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.conftest import DaemonProcess, weights_daemon
from tierctl.cli import main as tierctl
from tierd_client import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TierdClient,
)

WORKER = Path(__file__).with_name("models_worker.py")
WORKERS = 2
_ST = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}  # fmt: skip
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def small_model(directory: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A directory with one safetensors file of float32 tensors in two decoder layers,
    odd sizes (so alignment shows), and an integer tensor (never converted)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(33, 16, generator=g),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.0.input_layernorm.weight": torch.randn(5, generator=g),
        "model.layers.1.self_attn.q_proj.weight": torch.randn(16, 16, generator=g),
        "model.layers.1.mlp.up_proj.weight": torch.randn(7, 16, generator=g),
        "model.norm.weight": torch.randn(3, generator=g),
        "model.position_ids": torch.arange(11, dtype=torch.int64),
    }
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    return tensors


def _client(d: DaemonProcess, tenant: str) -> TierdClient:
    return TierdClient(d.address, tenant=tenant, timeout=60)


def _mapping(address: int) -> tuple[str, dict[str, int]]:
    """This process's mapping starting at `address`: its permissions and sizes (kB)."""
    return _smaps("self", address)


def _smaps(pid: str | int, address: int) -> tuple[str, dict[str, int]]:
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        fields = line.split()
        if "-" in fields[0] and int(fields[0].split("-")[0], 16) == address:
            sizes = {}
            for more in lines[i + 1 :]:
                key, _, rest = more.partition(":")
                if not rest.strip().endswith("kB"):
                    break
                sizes[key] = int(rest.split()[0])
            return fields[1], sizes
    raise AssertionError(f"no mapping at {address:#x} in process {pid}")


def test_register_and_load_maps_views_without_copy(models_daemon: DaemonProcess, tmp_path: Path):
    src = small_model(tmp_path / "m")
    with _client(models_daemon, "views") as c:
        info = c.register_model(str(tmp_path / "m"), dtype="bfloat16")
        assert (info.name, info.dtype, info.layers, info.tensor_count) == ("m", "bfloat16", 2, 7)
        assert len(info.fingerprint) == 64
        weights = c.load_weights("m")
    assert set(weights) == set(src)
    for name, t in src.items():
        want = t.to(torch.bfloat16) if t.is_floating_point() else t
        assert weights[name].dtype == want.dtype and torch.equal(weights[name], want), name
        # A view into the one mapping, at an aligned offset: nothing was copied.
        offset = weights[name].data_ptr() - weights.address
        assert 0 <= offset < weights.size and offset % 64 == 0
    perms, _ = _mapping(weights.address)
    assert perms == "r--s"  # read-only, MAP_SHARED
    groups = weights.info.layer_groups()
    assert groups[0] == ["model.layers.0.input_layernorm.weight",
                         "model.layers.0.self_attn.q_proj.weight"]  # fmt: skip
    assert sorted(groups) == [-1, 0, 1]


def test_default_dtype_is_the_files(models_daemon: DaemonProcess, tmp_path: Path) -> None:
    small_model(tmp_path / "f32")
    with _client(models_daemon, "dtype") as c:
        info = c.register_model(str(tmp_path / "f32"))
        assert info.dtype == "float32"
        assert c.load_weights("f32")["model.embed_tokens.weight"].dtype == torch.float32


def test_same_content_twice_is_one_area(tmp_path: Path) -> None:
    d = weights_daemon("8KiB")  # room for one area, not two
    try:
        d.start()
        small_model(tmp_path / "m")
        with _client(d, "twice") as c:
            first = c.register_model(str(tmp_path / "m"), dtype="float32")
            again = c.register_model(str(tmp_path / "m"), dtype="float32")
            other = c.register_model(str(tmp_path / "m"), dtype="float32", name="alias")
            assert first.fingerprint == again.fingerprint == other.fingerprint
            assert 4096 < first.size <= 8192
            assert sorted(m.name for m in c.list_models()) == ["alias", "m"]
            # Other content does not fit beside it: the bound counts the area once.
            small_model(tmp_path / "n", seed=1)
            with pytest.raises(ResourceExhausted):
                c.register_model(str(tmp_path / "n"), dtype="float32")
            c.drop_model("m")
            with pytest.raises(ResourceExhausted):  # "alias" still holds the area
                c.register_model(str(tmp_path / "n"), dtype="float32")
            c.drop_model("alias")
            assert c.register_model(str(tmp_path / "n"), dtype="float32").name == "n"
            assert [m.name for m in c.list_models()] == ["n"]
    finally:
        d.discard()


def test_bad_input_gets_clear_errors(models_daemon: DaemonProcess, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model at all, just some text\n")
    (tmp_path / "empty").mkdir()
    small_model(tmp_path / "ok")
    with _client(models_daemon, "bad") as c:
        with pytest.raises(NotFound) as e:
            c.register_model(str(tmp_path / "missing"))
        assert e.value.field == "path"
        with pytest.raises(InvalidArgument, match="not a model file") as e:
            c.register_model(str(tmp_path / "notes.txt"))
        assert e.value.field == "path"
        with pytest.raises(InvalidArgument, match="no .safetensors"):
            c.register_model(str(tmp_path / "empty"))
        with pytest.raises(InvalidArgument, match="absolute"):
            c.register_model("relative/model")
        with pytest.raises(InvalidArgument, match="unknown dtype") as e:
            c.register_model(str(tmp_path / "ok"), dtype="int3")
        assert e.value.field == "dtype"
        with pytest.raises(NotFound):
            c.load_weights("never-registered")
        assert c.list_models() == []


def test_tenants_see_only_their_own_and_shared_models(models_daemon: DaemonProcess, tmp_path: Path):
    small_model(tmp_path / "private")
    small_model(tmp_path / "public", seed=2)
    with _client(models_daemon, "alice") as a, _client(models_daemon, "bob") as b:
        mine = a.register_model(str(tmp_path / "private"))
        shared = a.register_model(str(tmp_path / "public"), shared=True)
        assert [m.name for m in b.list_models()] == ["public"]
        for ref in ("private", mine.fingerprint):
            with pytest.raises(NotFound):
                b.load_weights(ref)
            with pytest.raises(NotFound):
                b.drop_model(ref)
        assert torch.equal(b.load_weights("public")["model.norm.weight"],
                           a.load_weights(shared.fingerprint)["model.norm.weight"])  # fmt: skip
        with pytest.raises(FailedPrecondition, match="only it can drop"):
            b.drop_model("public")
        a.drop_model("public")
        assert b.list_models() == []
        assert [m.name for m in a.list_models()] == ["private"]


def test_tierctl_models_lists_them(models_daemon: DaemonProcess, tmp_path: Path, capsys) -> None:
    small_model(tmp_path / "listed")
    with _client(models_daemon, "ctl") as c:
        info = c.register_model(str(tmp_path / "listed"), dtype="float16")
    capsys.readouterr()
    assert tierctl(["models", "--address", models_daemon.address, "--tenant", "ctl"]) == 0
    out = capsys.readouterr().out
    for word in ("name", "fingerprint", "layers", "listed", info.fingerprint, "float16", "ctl"):
        assert word in out
    assert tierctl(["models", "--address", models_daemon.address, "--tenant", "ctl", "--json"]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert (doc["fingerprint"], doc["layers"], doc["size"]) == (info.fingerprint, 2, info.size)


def test_restart_keeps_models_and_refuses_damaged_ones(tmp_path: Path) -> None:
    d = weights_daemon("1MiB")
    try:
        d.start()
        src = small_model(tmp_path / "kept")
        small_model(tmp_path / "hurt", seed=3)
        with _client(d, "r") as c:
            kept = c.register_model(str(tmp_path / "kept"))
            hurt = c.register_model(str(tmp_path / "hurt"))
        d.restart()
        with _client(d, "r") as c:
            assert {m.fingerprint for m in c.list_models()} == {kept.fingerprint, hurt.fingerprint}
            w = c.load_weights("kept")
            assert all(torch.equal(w[n], t) for n, t in src.items())
        d.stop()
        area = d.base / "data" / "weights" / f"{hurt.fingerprint}.bin"
        data = bytearray(area.read_bytes())
        data[100] ^= 0xFF
        area.write_bytes(bytes(data))
        d.start()
        with _client(d, "r") as c:
            with pytest.raises(DataLoss):
                c.load_weights("hurt")
            assert [m.name for m in c.list_models()] == ["kept"]
            again = c.register_model(str(tmp_path / "hurt"))  # read from its source again
            assert again.fingerprint == hurt.fingerprint
            assert c.load_weights("hurt")["model.norm.weight"].shape == (3,)
    finally:
        d.discard()


def _tiny_llama(directory: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(directory)


def test_workers_share_one_mapped_model_with_identical_logits(
    models_daemon: DaemonProcess, tmp_path: Path
) -> None:
    _tiny_llama(tmp_path / "llama")
    from transformers import LlamaForCausalLM

    with _client(models_daemon, "default") as c:
        info = c.register_model(str(tmp_path / "llama"), dtype="bfloat16")
    assert info.layers == 3 and info.size > 2 << 20
    procs = [subprocess.Popen([sys.executable, str(WORKER), models_daemon.address, "llama",
                               str(tmp_path / f"logits{i}.pt")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(WORKERS)]  # fmt: skip
    try:
        reports = [json.loads(p.stdout.readline() or "null") for p in procs]  # type: ignore[union-attr]
        assert all(reports), [p.poll() for p in procs]
        # Every worker holds every page (it read all weights), and shares each with the
        # other one: its proportional share is half of the area.
        for r in reports:
            perms, sizes = _smaps(r["pid"], r["address"])
            assert perms == "r--s"
            assert sizes["Rss"] * 1024 >= info.size - 4096
            assert abs(sizes["Pss"] * 1024 - info.size / WORKERS) < 8 * 1024, sizes
    finally:
        for p in procs:
            p.stdin.close()  # type: ignore[union-attr]
        for p in procs:
            p.wait(timeout=60)
    ref = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.bfloat16).eval()
    with torch.no_grad():
        want = ref(torch.tensor([[1, 17, 42, 99, 3, 250, 7, 8]])).logits
    for i in range(WORKERS):
        assert torch.equal(torch.load(tmp_path / f"logits{i}.pt"), want)
