"""ExpertStreamer: a synthetic MoE layer (router + E experts, top-k) whose experts stream
one by one under a budget gives the resident layer's outputs bit for bit, and moves fewer
expert bytes than streaming every expert (or every picked expert) each step."""

from __future__ import annotations

import pytest
import torch

from tierd_client.moe_streaming import ExpertStreamer
from tierd_client.streaming import layer_bytes

HIDDEN, FFN, EXPERTS, TOP_K = 32, 64, 8, 2
POPULAR = (1, 4, 6)  # the router's bias favours these: ~90 % of decode picks are theirs
BIAS = 1.0


class Expert(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(HIDDEN, FFN)
        self.down = torch.nn.Linear(FFN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.silu(self.up(x)))


class MoE(torch.nn.Module):
    """Top-k routing as transformers' sparse MoE blocks do it: softmax over the router's
    logits, the k largest per token, and a loop over the experts that some token picked."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.router = torch.nn.Linear(HIDDEN, EXPERTS)
        self.experts = torch.nn.ModuleList(Expert() for _ in range(EXPERTS))
        with torch.no_grad():
            self.router.bias.zero_()
            self.router.bias[list(POPULAR)] = BIAS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, picked = self.router(x).softmax(-1).topk(TOP_K, dim=-1)
        out = torch.zeros_like(x)
        for e in range(EXPERTS):
            rows, k = (picked == e).nonzero(as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, k, None])
        return out


def steps(n: int, seed: int = 1) -> list[torch.Tensor]:
    """A 24-token prefill (it picks every expert), then `n` one-token decode steps."""
    g = torch.Generator().manual_seed(seed)
    return [3 * torch.randn(24, HIDDEN, generator=g)] + [torch.randn(1, HIDDEN, generator=g)
                                                     for _ in range(n)]  # fmt: skip


def run(block: MoE, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [block(x) for x in inputs]


def picked_per_step(block: MoE, inputs: list[torch.Tensor]) -> list[set[int]]:
    with torch.no_grad():
        return [set(block.router(x).topk(TOP_K, dim=-1).indices.flatten().tolist())
                for x in inputs]  # fmt: skip


@pytest.mark.parametrize("slots", [2, 3, 4, 6])
def test_streamed_experts_give_the_resident_outputs(slots: int) -> None:
    block = MoE()
    inputs = steps(40)
    want = run(block, inputs)
    expert = layer_bytes(block.experts[0])
    host = [p.data_ptr() for p in block.experts.parameters()]
    with ExpertStreamer(block, slots * expert + expert // 2, TOP_K, device="cpu") as s:
        got = run(block, inputs)
        assert s.stats.slots == slots and len(s.resident()) <= slots
        # The prefill picks more experts than the ring holds: some were copied as they ran.
        assert max(len(p) for p in picked_per_step(block, inputs)) > slots
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert [p.data_ptr() for p in block.experts.parameters()] == host  # back on the host


def test_fewer_expert_bytes_move_than_streaming_each_step() -> None:
    block = MoE()
    inputs = steps(60)
    want = run(block, inputs)
    expert = layer_bytes(block.experts[0])
    picked = picked_per_step(block, inputs)
    with ExpertStreamer(block, 4 * expert, TOP_K, device="cpu") as s:
        got = run(block, inputs)
        stats = s.stats
        resident = s.resident()
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    every_expert = len(inputs) * EXPERTS * expert  # all experts, every step
    every_pick = sum(len(p) for p in picked) * expert  # the picked ones, nothing kept
    moved = stats.copied_bytes
    assert moved < every_pick < every_expert, (moved, every_pick, every_expert)
    assert moved * 3 < every_pick  # most picks found their expert resident
    assert stats.steps == len(inputs) and stats.hits + stats.misses == sum(map(len, picked))
    assert stats.hits > 2 * stats.misses
    assert set(POPULAR) <= resident  # what recent tokens picked most stays


def test_the_most_picked_experts_come_back_after_a_detour() -> None:
    """A step that picks only other experts takes every slot to run them; the prefetch
    after it brings back the experts recent tokens picked most, before the router picks
    them again."""
    block = MoE()
    expert = layer_bytes(block.experts[0])
    decode = steps(12)[1:]
    picks = picked_per_step(block, decode)
    g = torch.Generator().manual_seed(7)
    detour = torch.randn(2, HIDDEN, generator=g)
    with ExpertStreamer(block, 3 * expert, TOP_K, decay=0.8, device="cpu") as s:
        run(block, decode)  # scores build up on POPULAR
        assert s.resident() == set(POPULAR)
        with torch.no_grad():
            block.router.bias[list(POPULAR)] = -20.0  # two tokens that pick none of them
            detoured = set(block.router(detour).topk(TOP_K, dim=-1).indices.flatten().tolist())
            block(detour)
            block.router.bias[list(POPULAR)] = BIAS
        assert len(detoured) == 3 and not detoured & set(POPULAR)  # they took every slot
        top = set(sorted(range(EXPERTS), key=lambda e: -s.scores[e])[:3])
        back = top - detoured  # evicted by the detour, and among the most picked
        assert s.resident() == top and back
        assert s.stats.prefetches >= len(back)  # copied back before the router asked
        usual = next(x for x, p in zip(decode, picks) if p <= top)
        misses, copies = s.stats.misses, s.stats.copies
        run(block, [usual])
        assert (s.stats.misses, s.stats.copies) == (misses, copies)


def test_a_budget_below_two_experts_is_refused() -> None:
    block = MoE()
    with pytest.raises(ValueError, match="at least 2"):
        ExpertStreamer(block, layer_bytes(block.experts[0]) + 1, TOP_K, device="cpu")
    with pytest.raises(ValueError, match="top_k"):
        ExpertStreamer(block, 1 << 20, 0, device="cpu")
