"""WeightStreamer: a transformers model streamed layer by layer under a budget gives the
same logits as the resident model, bit for bit, and never holds more than its ring."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tierd_client.streaming import WeightStreamer, decoder_layers, layer_bytes


def tiny_llama(seed: int = 0, layers: int = 5) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def greedy(
    model: torch.nn.Module, ids: list[int], steps: int
) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill then `steps` decode steps with the model's own cache: every step's logits."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        logits, cache = [out.logits[0, -1]], out.past_key_values
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(steps):
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            tokens.append(int(out.logits[0, -1].argmax()))
    return logits, tokens


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("slots", "lookahead"), [(2, 1), (3, 2), (4, 1), (5, 4)])
def test_streamed_logits_equal_resident_logits(slots, lookahead):
    model = tiny_llama()
    ids = list(range(3, 40))
    want_logits, want_tokens = greedy(model, ids, 6)
    before = snapshot(model)
    budget = slots * layer_bytes(decoder_layers(model)[0])
    with WeightStreamer(model, budget, lookahead=lookahead, device="cpu") as streamer:
        got_logits, got_tokens = greedy(model, ids, 6)
        assert streamer.stats.slots == slots
        n = len(decoder_layers(model))
        if slots < n:  # layers come and go: more copies than layers, at most one per run
            # (+ lookahead: the last forward prefetches the next forward's first layers)
            assert n < streamer.stats.copies <= 7 * n + lookahead
        else:  # the whole model fits: each layer is copied once and stays
            assert streamer.stats.copies == n
    assert got_tokens == want_tokens
    for g, w in zip(got_logits, want_logits):
        assert torch.equal(g, w)
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights untouched


def test_layers_point_at_ring_slots_only_while_they_compute():
    model = tiny_llama(layers=4)
    layers = decoder_layers(model)
    budget = 2 * layer_bytes(layers[0])
    seen: list[tuple[int, bool]] = []
    with WeightStreamer(model, budget, lookahead=1, device="cpu") as streamer:
        slot_ptrs = {s.buf.data_ptr() for s in streamer.slots}
        span = streamer.stats.slot_bytes

        def in_ring(t: torch.Tensor) -> bool:
            return any(p <= t.data_ptr() < p + span for p in slot_ptrs)

        def probe(i: int):
            def hook(module, args):  # runs after the streamer's own pre-hook
                seen.append((i, in_ring(module.self_attn.q_proj.weight)))

            return hook

        handles = [layer.register_forward_pre_hook(probe(i)) for i, layer in enumerate(layers)]
        greedy(model, [5, 6, 7], 1)
        for h in handles:
            h.remove()
        # Between forwards, no layer points into the ring.
        assert not any(in_ring(layer.self_attn.q_proj.weight) for layer in layers)
    assert seen and all(inside for _, inside in seen)


def test_a_budget_below_two_layers_is_refused():
    model = tiny_llama()
    one = layer_bytes(decoder_layers(model)[0])
    with pytest.raises(ValueError, match="at least 2"):
        WeightStreamer(model, one + one // 2, device="cpu")
    with pytest.raises(ValueError, match="lookahead"):
        WeightStreamer(model, 4 * one, lookahead=0, device="cpu")


def test_close_leaves_a_working_resident_model():
    model = tiny_llama(seed=3)
    ids = [1, 2, 3, 4, 5]
    want, _ = greedy(model, ids, 2)
    streamer = WeightStreamer(model, 3 * layer_bytes(decoder_layers(model)[0]), device="cpu")
    greedy(model, ids, 2)
    streamer.close()
    got, _ = greedy(model, ids, 2)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert not any(layer._forward_pre_hooks for layer in decoder_layers(model))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_to_a_gpu_equals_resident_on_the_gpu():
    ids = list(range(3, 40))
    resident = tiny_llama(seed=5).cuda()
    want_logits, want_tokens = greedy_device(resident, ids, 6)
    model = tiny_llama(seed=5)  # weights on the host, streamed to the GPU
    budget = 2 * layer_bytes(decoder_layers(model)[0])
    with WeightStreamer(model, budget, lookahead=1, device="cuda") as streamer:
        got_logits, got_tokens = greedy_device(model, ids, 6)
        assert streamer.stats.copies >= 7 * len(decoder_layers(model)) - 2
    assert got_tokens == want_tokens
    for g, w in zip(got_logits, want_logits):
        assert torch.equal(g, w)


def greedy_device(model: torch.nn.Module, ids: list[int], steps: int):
    with torch.no_grad():
        out = model(torch.tensor([ids], device="cuda"), use_cache=True)
        logits, cache = [out.logits[0, -1].cpu()], out.past_key_values
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(steps):
            out = model(torch.tensor([[tokens[-1]]], device="cuda"), past_key_values=cache,
                        use_cache=True)  # fmt: skip
            logits.append(out.logits[0, -1].cpu())
            tokens.append(int(out.logits[0, -1].argmax()))
    return logits, tokens
