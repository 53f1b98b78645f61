"""Streaming a mixture-of-experts layer's experts one by one under a budget.

Primitives: `ExpertStreamer(block, budget_bytes, top_k, router="router", experts="experts",
select=None, decay=0.5, prefetch=None, device=None)` (a `WeightStreamer`: a context
manager, `.close()`), `.stats` (`ExpertStats`), `.scores`, `.resident()`.

A MoE layer runs only the experts its router picked (top-k per token), so the unit that
streams is one expert, not the layer: the ring holds `budget_bytes // expert_bytes`
experts (each expert's tensors in one slot, as `WeightStreamer` holds a layer), the rest
stay in host memory (a tierd mapping, or what the model was loaded with).

- When: the router runs before any expert of the step, so its output names the experts
  about to run. A forward hook on the router starts their copies at once, in the order
  the block runs them (ascending index, as transformers' MoE blocks loop over experts).
  Each expert's pre-hook waits for its copy and points its parameters at the slot; its
  post-hook gives the slot back and starts the copy of the next expert still to run.
- What stays: each expert has a score, `decay * score + tokens that picked it this
  step`: how much the router picked it for recent tokens. A slot is taken from the
  resident expert with the lowest score; an expert still to run in this step is never
  taken while another can be (when more experts run in a step than the ring holds, the
  one that runs last gives its slot up and is copied again when its turn comes).
- Prefetch: after the block's forward (a forward hook on it), up to `prefetch` copies
  (default `top_k`) bring in the highest-scoring experts that are not resident, into a
  free slot or over a resident one that scores lower: the experts recent tokens picked
  most are on the device before the router picks them again.

`stats.copied_bytes` counts every byte moved; `hits` the router's picks that were already
resident (or arriving) when it picked them, `misses` the others. `select(router_output)`
returns the picked expert ids (default: `output.topk(top_k, dim=-1).indices`); it must pick
what the block picks, or the experts it misses are copied when they run (still correct).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

import torch

from .streaming import StreamStats, WeightStreamer, _Slot


@dataclass
class ExpertStats(StreamStats):
    steps: int = 0  # router calls
    hits: int = 0  # picked experts resident (or arriving) when the router picked them
    misses: int = 0
    prefetches: int = 0  # copies started by score, before the router asked


class ExpertStreamer(WeightStreamer):
    """See the module docstring. `block`: the MoE layer (its `router` and `experts`
    attributes name the router module and the experts' ModuleList)."""

    def __init__(self, block: torch.nn.Module, budget_bytes: int, top_k: int, *,
                 router: str = "router", experts: str = "experts",
                 select: Callable[[Any], torch.Tensor] | None = None, decay: float = 0.5,
                 prefetch: int | None = None,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        if not 0.0 <= decay < 1.0:
            raise ValueError("decay must be in [0, 1)")
        self.block = block
        self.router: torch.nn.Module = getattr(block, router)
        expert_list = list(getattr(block, experts))
        self.top_k = top_k
        self.decay = decay
        self.prefetch = top_k if prefetch is None else prefetch
        self._select = select or (lambda out: out.topk(top_k, dim=-1).indices)
        self.scores = [0.0] * len(expert_list)
        self._pending: list[int] = []  # this step's experts that have not run, in run order
        super().__init__(block, budget_bytes, lookahead=1, device=device, layers=expert_list)
        self.stats = ExpertStats(**dataclasses.asdict(self.stats))

    def resident(self) -> set[int]:
        """The experts whose weights are in (or on their way into) the ring."""
        with self._lock:
            return set(self._by_layer)

    # -- hooks --------------------------------------------------------------------------------

    def _install_hooks(self) -> None:
        self._hooks.append(self.router.register_forward_hook(self._routed))
        for i, expert in enumerate(self.layers):
            self._hooks.append(expert.register_forward_pre_hook(self._before_expert(i)))
            self._hooks.append(expert.register_forward_hook(self._after_expert(i)))
        self._hooks.append(self.block.register_forward_hook(self._step_done))

    def _routed(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        ids = self._select(output).reshape(-1).to("cpu", torch.long)
        counts = torch.bincount(ids, minlength=len(self.layers)).tolist()
        self.scores = [self.decay * s + c for s, c in zip(self.scores, counts, strict=False)]
        stats = self.stats
        assert isinstance(stats, ExpertStats)
        stats.steps += 1
        with self._lock:
            self._pending = [e for e, c in enumerate(counts) if c]
            resident = set(self._by_layer)
        stats.hits += sum(e in resident for e in self._pending)
        stats.misses += sum(e not in resident for e in self._pending)
        self._prefetch_pending()

    def _before_expert(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            slot = self._fetch(i, i)
            assert slot is not None
            self._wait(slot)
            slot.busy = True
            self._bind(i, slot)

        return hook

    def _after_expert(self, i: int) -> Callable[..., None]:
        release = self._after(i)  # WeightStreamer's: mark the slot reusable, detach

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            release(module, args, output)
            with self._lock:
                if i in self._pending:
                    self._pending.remove(i)
            self._prefetch_pending()

        return hook

    def _step_done(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        with self._lock:
            self._pending = []
        stats = self.stats
        assert isinstance(stats, ExpertStats)
        ranked = sorted(range(len(self.layers)), key=lambda e: -self.scores[e])
        started = 0
        for e in ranked[: len(self.slots)]:
            if started >= self.prefetch or self.scores[e] <= 0:
                break
            with self._lock:
                if e in self._by_layer:
                    continue
                slot = self._lower_than(self.scores[e])
                if slot is None:
                    break
                self._assign(e, slot)
            self._copy(e, slot)
            started += 1
            stats.prefetches += 1

    # -- the ring -----------------------------------------------------------------------------

    def _prefetch_pending(self) -> None:
        """Start the copies of this step's experts still to run, in run order, while a slot
        can be had without taking one another of them holds."""
        with self._lock:
            todo = [e for e in self._pending if e not in self._by_layer]
        for e in todo:
            if self._fetch(e, -1, optional=True) is None:
                break

    def _free_or_lowest(self, spare: Container[int]) -> _Slot | None:
        """A free idle slot, else the idle one whose expert (not in `spare`) scores lowest."""
        best: _Slot | None = None
        for slot in self.slots:
            if slot.busy:
                continue
            if slot.layer is None:
                return slot
            if slot.layer in spare:
                continue
            if best is None or self.scores[slot.layer] < self.scores[best.layer]:  # type: ignore[index]
                best = slot
        return best

    def _victim(self, current: int) -> _Slot | None:
        """A slot for expert `current` (-1: a prefetch): a free one, else the one whose
        expert scores lowest and is not to run in this step. For an expert about to run
        (`current` >= 0) and nothing else, the slot of the one that runs last."""
        best = self._free_or_lowest(self._pending)
        if best is not None or current < 0:
            return best
        rank = {e: r for r, e in enumerate(self._pending)}
        waiting = [s for s in self.slots if not s.busy and s.layer in rank]
        return max(waiting, key=lambda s: rank[s.layer], default=None)  # type: ignore[index]

    def _lower_than(self, score: float) -> _Slot | None:
        """A free slot, else the idle one whose expert scores lowest, if below `score`."""
        best = self._free_or_lowest(())
        if best is None or best.layer is None or self.scores[best.layer] < score:
            return best
        return None

    def _assign(self, i: int, slot: _Slot) -> None:
        if slot.layer is not None:
            del self._by_layer[slot.layer]
        slot.layer = i
        self._by_layer[i] = slot
