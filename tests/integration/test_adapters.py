"""LoRA adapters held in tierd with the KV that depends on them, against a real daemon.

Registered from PEFT directories against a held base model and checked against it;
listed, shared and dropped like models; a namespace naming an adapter is its own, and no
call on it ever answers with a hit once its adapter is gone (dropped or evicted); room in
`[weights] capacity` is made by evicting cold adapters, their KV first, never hot ones.
The last test applies an adapter mapped from tierd to a tiny Llama built on tierd's
weights and compares its logits with PEFT's on the same directories.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.conftest import DaemonProcess, weights_daemon
from tests.integration.test_models import _tiny_llama, small_model
from tests.lora_files import SMALL_Q, area_bytes, write_adapter
from tierctl.cli import main as tierctl
from tierd_client import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TierdClient,
)
from tierd_client.layout import KVLayout

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", block_tokens=4)
TOKENS = list(range(16))  # four blocks


def _client(d: DaemonProcess, tenant: str) -> TierdClient:
    return TierdClient(d.address, tenant=tenant, timeout=60)


def _blocks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, *LAYOUT.block_shape)).astype(np.float16)


def _fill(c: TierdClient, ns, seed: int = 0) -> list[bytes]:  # type: ignore[no-untyped-def]
    keys = c.block_keys(ns, TOKENS)
    assert c.put(ns, keys, _blocks(len(keys), seed)) == ["stored"] * len(keys)
    assert c.lookup(ns, TOKENS).cached_tokens == len(TOKENS)
    return keys


def test_adapters_are_registered_against_their_base_and_listed(
    models_daemon: DaemonProcess, tmp_path: Path, capsys
) -> None:
    small_model(tmp_path / "base")
    want = write_adapter(tmp_path / "lora", SMALL_Q, rank=2, alpha=8.0)
    with _client(models_daemon, "reg") as c:
        base = c.register_model(str(tmp_path / "base"))
        info = c.register_adapter(str(tmp_path / "lora"), "base", name="lora")
        assert info.adapter is not None and base.adapter is None
        assert (info.adapter.base_model, info.adapter.rank, info.adapter.alpha,
                info.adapter.target_modules) == (base.fingerprint, 2, 8.0, ("q_proj",))  # fmt: skip
        assert info.fingerprint != base.fingerprint and info.tensor_count == 4
        # Idempotent, and the same content against another base is other content.
        assert c.register_adapter(str(tmp_path / "lora"), base.fingerprint,
                                  name="lora").fingerprint == info.fingerprint  # fmt: skip
        small_model(tmp_path / "base2", seed=1)
        c.register_model(str(tmp_path / "base2"))
        other = c.register_adapter(str(tmp_path / "lora"), "base2", name="lora-b2")
        assert other.fingerprint != info.fingerprint
        assert other.adapter is not None and other.adapter.base_model != base.fingerprint
        mapped = c.load_adapter("lora")
        assert set(mapped) == set(want)
        for name, t in want.items():
            assert torch.equal(mapped[name], t), name
        with pytest.raises(FailedPrecondition):
            c.load_adapter("base")  # a model, not an adapter
        # Checked against the base: missing module, wrong sides, unknown base, bad config.
        write_adapter(tmp_path / "nomod", {"model.layers.0.mlp.down_proj": (16, 16)})
        with pytest.raises(InvalidArgument, match="no model.layers.0.mlp.down_proj.weight"):
            c.register_adapter(str(tmp_path / "nomod"), "base")
        write_adapter(tmp_path / "sides", {"model.layers.1.mlp.up_proj": (16, 7)})
        with pytest.raises(InvalidArgument, match="up_proj.weight is"):
            c.register_adapter(str(tmp_path / "sides"), "base")
        with pytest.raises(NotFound):
            c.register_adapter(str(tmp_path / "lora"), "no-such-base")
        with pytest.raises(InvalidArgument, match="adapter_config.json"):
            c.register_adapter(str(tmp_path / "base"), "base")
        (tmp_path / "lora" / "adapter_config.json").write_text(
            '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_dora": true}'
        )
        with pytest.raises(InvalidArgument, match="use_dora"):
            c.register_adapter(str(tmp_path / "lora"), "base", name="dora")
    with _client(models_daemon, "other") as o:
        with pytest.raises(NotFound):
            o.model_info("lora")  # another tenant's, unshared
        with pytest.raises(NotFound):
            o.register_adapter(str(tmp_path / "lora"), base.fingerprint)  # nor its base
    assert tierctl(["models", "--address", models_daemon.address, "--tenant", "reg"]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and f"adapter of {base.fingerprint[:12]}" in out


def test_a_namespace_names_its_adapter_and_loses_its_kv_with_it(
    models_daemon: DaemonProcess, tmp_path: Path
) -> None:
    small_model(tmp_path / "base")
    write_adapter(tmp_path / "lora", SMALL_Q)
    with _client(models_daemon, "ns") as c:
        base = c.register_model(str(tmp_path / "base"), name="base")
        lora = c.register_adapter(str(tmp_path / "lora"), "base", name="lora")
        plain = c.open_namespace(base.fingerprint, LAYOUT)
        ns = c.open_namespace(base.fingerprint, LAYOUT, adapter="lora")
        assert ns.id != plain.id  # KV of different adapters never mixes
        assert c.open_namespace(base.fingerprint, LAYOUT, adapter=lora.fingerprint).id == ns.id
        with pytest.raises(InvalidArgument, match="adapts model"):
            c.open_namespace("f" * 64, LAYOUT, adapter="lora")
        with pytest.raises(InvalidArgument, match="not an adapter"):
            c.open_namespace(base.fingerprint, LAYOUT, adapter="base")
        with pytest.raises(NotFound):
            c.open_namespace(base.fingerprint, LAYOUT, adapter="nothing")
        keys = _fill(c, ns)
        _fill(c, plain)
        assert c.model_info("lora").adapter.dependent_blocks == len(keys)  # type: ignore[union-attr]
        c.drop_model("lora")
        # Gone with it: no call on the namespace answers, least of all with a hit.
        with pytest.raises(FailedPrecondition, match="no longer held"):
            c.lookup(ns, TOKENS)
        with pytest.raises(FailedPrecondition):
            c.put(ns, keys[:1], _blocks(1, 9))
        assert c.lookup(plain, TOKENS).cached_tokens == len(TOKENS)  # others keep theirs
        # The same content again: the same namespace, without the KV that was dropped.
        c.register_adapter(str(tmp_path / "lora"), "base", name="lora-again")
        assert c.open_namespace(base.fingerprint, LAYOUT, adapter="lora-again").id == ns.id
        assert c.lookup(ns, TOKENS).cached_tokens == 0


def test_a_shared_adapter_unshared_or_dropped_takes_the_kv_of_other_tenants(
    models_daemon: DaemonProcess, tmp_path: Path
) -> None:
    small_model(tmp_path / "base")
    write_adapter(tmp_path / "lora", SMALL_Q, seed=5)
    with _client(models_daemon, "owner") as owner, _client(models_daemon, "user") as user:
        base = owner.register_model(str(tmp_path / "base"), name="base", shared=True)
        owner.register_adapter(str(tmp_path / "lora"), "base", name="pub", shared=True)
        ns = user.open_namespace(base.fingerprint, LAYOUT, adapter="pub")
        _fill(user, ns)
        mine = owner.open_namespace(base.fingerprint, LAYOUT, adapter="pub")
        _fill(owner, mine)
        # Each tenant counts its own KV only: the user's 4 blocks are not the owner's to see.
        assert owner.model_info("pub").adapter.dependent_blocks == 4  # type: ignore[union-attr]
        assert user.model_info("pub").adapter.dependent_blocks == 4  # type: ignore[union-attr]
        # Registered again unshared: the other tenant's KV goes, the owner's stays.
        owner.register_adapter(str(tmp_path / "lora"), "base", name="pub")
        with pytest.raises(FailedPrecondition):
            user.lookup(ns, TOKENS)
        assert owner.model_info("pub").adapter.dependent_blocks == 4  # type: ignore[union-attr]
        assert owner.lookup(mine, TOKENS).cached_tokens == len(TOKENS)
        owner.register_adapter(str(tmp_path / "lora"), "base", name="pub", shared=True)
        assert user.lookup(ns, TOKENS).cached_tokens == 0  # usable again, its KV gone
        owner.drop_model("pub")
        with pytest.raises(FailedPrecondition):
            user.lookup(ns, TOKENS)
        with pytest.raises(FailedPrecondition):
            owner.lookup(mine, TOKENS)


def test_room_is_made_from_cold_adapters_kv_first_never_from_hot_ones(tmp_path: Path) -> None:
    small_model(tmp_path / "base")
    for i in range(3):
        write_adapter(tmp_path / f"lora{i}", SMALL_Q, seed=i)
    base_size = area_bytes(tmp_path / "base")
    lora_size = area_bytes(tmp_path / "lora0", adapter=True)
    d = weights_daemon(base_size + 2 * lora_size)  # the base and two adapters; a third needs room
    try:
        d.start()
        with _client(d, "cap") as c:
            base = c.register_model(str(tmp_path / "base"), name="base")
            c.register_adapter(str(tmp_path / "lora0"), "base", name="lora0")
            c.register_adapter(str(tmp_path / "lora1"), "base", name="lora1")
            ns0 = c.open_namespace(base.fingerprint, LAYOUT, adapter="lora0")
            ns1 = c.open_namespace(base.fingerprint, LAYOUT, adapter="lora1")
            keys0 = _fill(c, ns0, 0)
            _fill(c, ns1, 1)
            # Both adapters' KV is in memory: both are hot, and nothing is evicted.
            with pytest.raises(ResourceExhausted, match="cold adapters"):
                c.register_adapter(str(tmp_path / "lora2"), "base", name="lora2")
            assert [m.name for m in c.list_models()] == ["base", "lora0", "lora1"]
            assert c.lookup(ns0, TOKENS).cached_tokens == len(TOKENS)
            # lora0's KV moves to NVMe: lora0 is cold now; its KV goes, then lora0 does.
            assert c.move(ns0, keys0, "nvme") == len(keys0)
            assert set(c.locate(ns0, keys0)) == {"nvme"}
            c.register_adapter(str(tmp_path / "lora2"), "base", name="lora2")
            assert [m.name for m in c.list_models()] == ["base", "lora1", "lora2"]
            with pytest.raises(FailedPrecondition, match="no longer held"):
                c.lookup(ns0, TOKENS)
            assert c.lookup(ns1, TOKENS).cached_tokens == len(TOKENS)
            # Registered again (room made from lora2, now the coldest), its KV is not back.
            c.register_adapter(str(tmp_path / "lora0"), "base", name="lora0")
            assert c.lookup(c.open_namespace(base.fingerprint, LAYOUT, adapter="lora0"),
                            TOKENS).cached_tokens == 0  # fmt: skip
            assert [m.name for m in c.list_models()] == ["base", "lora0", "lora1"]
    finally:
        d.discard()


def test_namespaces_keep_their_adapter_across_a_restart(tmp_path: Path) -> None:
    small_model(tmp_path / "base")
    write_adapter(tmp_path / "lora", SMALL_Q)
    d = weights_daemon("64MiB")
    try:
        d.start()
        with _client(d, "r") as c:
            base = c.register_model(str(tmp_path / "base"), name="base")
            c.register_adapter(str(tmp_path / "lora"), "base", name="lora")
            ns = c.open_namespace(base.fingerprint, LAYOUT, adapter="lora")
            keys = _fill(c, ns)
            c.move(ns, keys, "nvme")  # survives the restart
        d.restart()
        with _client(d, "r") as c:
            assert c.model_info("lora").adapter.dependent_blocks == len(keys)  # type: ignore[union-attr]
            c.drop_model("lora")
            with pytest.raises(FailedPrecondition):
                c.lookup(ns, TOKENS)
    finally:
        d.discard()


def test_an_adapter_from_tierd_computes_what_peft_computes(
    models_daemon: DaemonProcess, tmp_path: Path
) -> None:
    peft = pytest.importorskip("peft")
    _tiny_llama(tmp_path / "llama")
    from transformers import LlamaForCausalLM

    from tierd_client.hf_lora import apply_adapter
    from tierd_client.hf_weights import model_on_weights

    ref = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )  # random B: the adapter changes outputs
    torch.manual_seed(1)
    peft.get_peft_model(ref, config).save_pretrained(tmp_path / "lora")
    ids = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 8]])
    with _client(models_daemon, "hf") as c:
        c.register_model(str(tmp_path / "llama"), name="llama", dtype="float32")
        c.register_adapter(str(tmp_path / "lora"), "llama", name="llama-lora")
        net = model_on_weights(c.load_weights("llama"))
        adapter = c.load_adapter("llama-lora")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    local = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        plain = net(ids).logits
        applied = apply_adapter(net, adapter)
        assert len(applied.modules) == 3 * 3
        got = net(ids).logits
        want = local(ids).logits
        applied.remove()
        again = net(ids).logits
    assert not torch.allclose(got, plain, atol=1e-3)  # the adapter does change the outputs
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(again, plain)


def _adapter_refused(daemon: DaemonProcess, tenant: str, tmp_path: Path, match: str) -> None:
    """The base at tmp_path/base registers; the adapter at tmp_path/lora is refused."""
    with _client(daemon, tenant) as c:
        c.register_model(str(tmp_path / "base"), name="base")
        with pytest.raises(InvalidArgument, match=match):
            c.register_adapter(str(tmp_path / "lora"), "base", name="lora")


@pytest.mark.parametrize("config", [
    '{"peft_type": "LORA", "r": 1e400, "lora_alpha": 4}',
    '{"peft_type": "LORA", "r": 2, "lora_alpha": NaN}',
    '{"peft_type": "LORA", "r": 2, "lora_alpha": Infinity}',
])  # fmt: skip
def test_an_adapter_config_with_a_rank_or_alpha_out_of_range_is_refused(
    models_daemon: DaemonProcess, tmp_path: Path, config: str
) -> None:
    small_model(tmp_path / "base")
    write_adapter(tmp_path / "lora", SMALL_Q)
    (tmp_path / "lora" / "adapter_config.json").write_text(config)
    _adapter_refused(models_daemon, "bad-config", tmp_path, "r or lora_alpha")


def test_lora_matrices_that_are_not_floating_point_are_refused(
    models_daemon: DaemonProcess, tmp_path: Path
) -> None:
    small_model(tmp_path / "base")
    write_adapter(tmp_path / "lora", SMALL_Q, dtype=torch.int64)
    _adapter_refused(models_daemon, "int-lora", tmp_path, "not floating point")


def test_an_adapter_saved_in_bfloat16_computes_what_peft_computes(
    models_daemon: DaemonProcess, tmp_path: Path
) -> None:
    # PEFT loads half-precision LoRA matrices into float32 (autocast_adapter_dtype) and
    # computes the LoRA term there; the area keeps the file's bfloat16.
    peft = pytest.importorskip("peft")
    _tiny_llama(tmp_path / "llama")
    from transformers import LlamaForCausalLM

    from tierd_client.hf_lora import apply_adapter
    from tierd_client.hf_weights import model_on_weights

    ref = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)  # fmt: skip
    torch.manual_seed(2)
    peft.get_peft_model(ref, config).to(torch.bfloat16).save_pretrained(tmp_path / "lora")
    ids = torch.tensor([[1, 17, 42, 99, 3, 250, 7, 8]])
    with _client(models_daemon, "hf-bf16") as c:
        c.register_model(str(tmp_path / "llama"), name="llama", dtype="float32")
        info = c.register_adapter(str(tmp_path / "lora"), "llama", name="lora")
        assert info.dtype == "bfloat16"
        net = model_on_weights(c.load_weights("llama"))
        adapter = c.load_adapter("lora")
    base = LlamaForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32).eval()
    local = peft.PeftModel.from_pretrained(base, tmp_path / "lora").eval()
    with torch.no_grad():
        apply_adapter(net, adapter)
        torch.testing.assert_close(net(ids).logits, local(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("option", [
    {"alora_invocation_tokens": [5, 6]}, {"layer_replication": [[0, 2]]},
    {"arrow_config": {"top_k": 2}}, {"use_bdlora": {"lora_a_is_blockdiagonal": True}},
])  # fmt: skip
def test_lora_variants_whose_forward_is_not_plain_lora_are_refused(
    models_daemon: DaemonProcess, tmp_path: Path, option: dict
) -> None:
    small_model(tmp_path / "base")
    write_adapter(tmp_path / "lora", SMALL_Q)
    (tmp_path / "lora" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **option}))  # fmt: skip
    _adapter_refused(models_daemon, "variants", tmp_path, "is not supported")
