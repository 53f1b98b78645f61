"""The vLLM-free half of the vLLM connector: settings, namespaces, and block copies between
tierd's block layout and vLLM's CPU paged KV layout (checked against how vLLM's CPU
attention reads its cache: `[blocks, heads, T, 2D]` viewed `[blocks, heads, 2T, D]` and
split into K and V along the token axis)."""

from __future__ import annotations

import pytest
import torch

from tierd_client.vllm_store import ConnectorSettings, PagedKV, namespace_spec

L, NB, H, T, D = 3, 5, 2, 4, 8


def _vllm_caches(joint: bool) -> dict[str, torch.Tensor]:
    names = [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    if joint:  # one allocation, layer outermost, as vLLM allocates them
        whole = torch.zeros(L, NB, H, T, 2 * D)
        return {n: whole[i] for i, n in enumerate(names)}
    return {n: torch.zeros(NB, H, T, 2 * D) for n in names}


def _k_v(kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V caches the way vLLM's CPU attention backend sees them."""
    k, v = kv.view(NB, H, 2 * T, D).chunk(2, dim=2)
    return k, v


@pytest.mark.parametrize("joint", [True, False])
def test_block_written_where_vllm_attention_reads_it(joint: bool) -> None:
    caches = _vllm_caches(joint)
    names = list(caches)
    paged = PagedKV.from_caches(caches, names, T)
    assert (paged.joint is not None) == joint
    block = torch.randn(L, 2, H, T, D)
    paged.write_block(3, block)
    for layer, name in enumerate(names):
        k, v = _k_v(caches[name])
        assert torch.equal(k[3], block[layer, 0])
        assert torch.equal(v[3], block[layer, 1])
        assert not k[2].any() and not v[4].any()  # other blocks untouched


@pytest.mark.parametrize("joint", [True, False])
def test_block_read_back_whole_and_by_layer(joint: bool) -> None:
    caches = _vllm_caches(joint)
    names = list(caches)
    for name in names:
        caches[name].copy_(torch.randn_like(caches[name]))
    paged = PagedKV.from_caches(caches, names, T)
    out = torch.empty(L, 2, H, T, D)
    paged.read_block(1, out)
    by_layer = torch.empty(L, 2, H, T, D)
    for layer in range(L):
        paged.read_layer(layer, 1, by_layer[layer])
    for layer, name in enumerate(names):
        k, v = _k_v(caches[name])
        assert torch.equal(out[layer, 0], k[1]) and torch.equal(out[layer, 1], v[1])
    assert torch.equal(out, by_layer)
    # and back into another block: a round trip through tierd's layout is exact
    paged.write_block(0, out)
    for name in names:
        assert torch.equal(caches[name][0], caches[name][1])


def test_other_kv_layouts_are_refused() -> None:
    caches = {"a": torch.zeros(2, NB, T, H, D)}  # a GPU-style [2, blocks, T, H, D] cache
    with pytest.raises(ValueError, match="only vLLM's CPU layout"):
        PagedKV.from_caches(caches, ["a"], T)


def test_settings_parsed_and_checked() -> None:
    s = ConnectorSettings.from_extra({"address": "unix:/x.sock", "tenant": "a", "timeout_s": 2})
    assert (s.address, s.tenant, s.timeout_s, s.save) == ("unix:/x.sock", "a", 2.0, "end")
    with pytest.raises(ValueError, match="unknown"):
        ConnectorSettings.from_extra({"adress": "unix:/x.sock"})
    with pytest.raises(ValueError, match="save"):
        ConnectorSettings.from_extra({"save": "sometimes"})
    with pytest.raises(ValueError, match="positive"):
        ConnectorSettings.from_extra({"retry_after_s": 0})


def test_cache_salt_and_model_pick_the_namespace() -> None:
    s = ConnectorSettings.from_extra({"namespace_prefix": "p/"})
    assert namespace_spec(s, "m", None) == ("p/m", ())
    assert namespace_spec(s, "m", "team-a") == ("p/m", ("cache_salt=team-a",))
    assert namespace_spec(s, "m", "team-a") != namespace_spec(s, "m", "team-b")
    named = ConnectorSettings.from_extra({"model": "smollm2@f32"})
    assert namespace_spec(named, "/some/dir", None) == ("vllm/smollm2@f32", ())
