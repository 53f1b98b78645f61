"""A WeightStreamer built from a config's [[slices]] entry: the slice's budget is its ring,
the slice names its device."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.client.test_streaming import greedy, tiny_llama
from tierd.config import config_from_dict
from tierd_client.streaming import layer_bytes, slice_device, streamer_for_slice

MIG = "MIG-5c1d6f0e-3b2a-5d4c-8e9f-0a1b2c3d4e5f"


def test_slice_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    assert slice_device("3") == "cuda:3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-0000aaaa-1111")
    with pytest.raises(ValueError, match=f"CUDA_VISIBLE_DEVICES={MIG}"):
        slice_device(MIG)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", MIG)
    assert slice_device(MIG) == "cuda:0"


def test_a_streamer_from_a_slice_budget_gives_the_resident_logits() -> None:
    model = tiny_llama(layers=6)
    want, tokens = greedy(model, [5, 9, 11, 2], steps=4)
    per_layer = layer_bytes(model.model.layers[0])
    (s,) = config_from_dict({"slices": [
        {"slice": 0, "models": ["tiny"], "weight_budget": 3 * per_layer + 100}]}).slices  # fmt: skip
    with streamer_for_slice(model, s, device="cpu") as streamer:
        got, got_tokens = greedy(model, [5, 9, 11, 2], steps=4)
        assert streamer.stats.slots == 3  # the budget, in whole layers
        assert streamer.stats.copies > 6  # fewer slots than layers: layers were streamed
    assert got_tokens == tokens
    assert all(torch.equal(a, b) for a, b in zip(got, want))
