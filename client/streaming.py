"""Streaming a model's decoder layers onto the compute device under a memory budget.

Primitives: `WeightStreamer(model, budget_bytes, lookahead=1, device=None)` (also a context
manager), `.close()`, `.stats` (`StreamStats`), `layer_bytes(layer)`,
`decoder_layers(model)`, `streamer_for_slice(model, slice)` and `slice_device(slice)` (a
config's `[[slices]]`: the budget and device of a GPU or MIG instance).

Only the layers in flight are resident on the compute device: while layer i computes,
layers i+1..i+k (k = `lookahead`) are copied into a bounded ring of device buffers, and
the slot of a finished layer is reused. Everything that is not a decoder layer
(embeddings, final norm, head) stays resident. The layers' weights stay in host memory
(a tierd mapping, or tensors the model was loaded with; pinned on a GPU host so copies
are asynchronous) and are never modified.

How it runs inside a transformers model: a forward pre-hook on each decoder layer waits
for that layer's copy and points the layer's parameters at the slot (`param.data`, no
copy), then starts the copies of the next layers into free slots; a forward hook gives
the layer's slot back. On a GPU the copies run on their own CUDA stream: each copy
records an event the compute stream waits on before using the layer, and a slot is
written again only after an event recorded when the layer that used it finished. On the
CPU the "device" is host memory and the copies run on one background thread (torch's
copy gives the GIL up): the same code path, which is what the tests exercise; it is
slower than computing in place, and is there so the streaming logic runs everywhere.

Buffers are one flat byte buffer per slot, sized to the largest layer; a layer's tensors
are views into it at aligned offsets, so a slot is reused by any layer. Layer order is
the model's: decode runs the layers 0..L-1 for every token, so after the last layer the
first ones are prefetched again (the ring wraps).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

import torch

_ALIGN = 256  # bytes: a CUDA allocation's alignment, and a cache line multiple


@dataclass
class StreamStats:
    copies: int = 0  # layers copied onto the device
    copied_bytes: int = 0
    waits: int = 0  # times a layer was needed before its copy had finished
    slots: int = 0
    slot_bytes: int = 0


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (Llama-style `model.model.layers`)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError("no decoder layers found (expected model.model.layers)")
    return list(layers)


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def layer_bytes(layer: torch.nn.Module) -> int:
    """Bytes a layer's parameters and buffers take in a slot (each tensor aligned)."""
    return sum(_align(t.numel() * t.element_size()) for t in _tensors(layer).values())


def _tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = dict(layer.named_parameters(recurse=True))
    out.update(dict(layer.named_buffers(recurse=True)))
    return out


class _Slot:
    def __init__(self, nbytes: int, device: torch.device) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.layer: int | None = None  # whose weights it holds (or is receiving)
        self.ready: Any = None  # CUDA event / Future: the copy into it is done
        self.free_after: Any = None  # CUDA event: the last layer that used it finished
        self.busy = False  # its layer is computing


class WeightStreamer:
    """See the module docstring. `budget_bytes` bounds the device memory of the ring; it
    must hold at least two slots (one computing, one being filled)."""

    def __init__(self, model: Any, budget_bytes: int, lookahead: int = 1,
                 device: torch.device | str | None = None,
                 layers: list[torch.nn.Module] | None = None) -> None:  # fmt: skip
        """`layers`: the modules streamed (default: the decoder layers); a subclass streams
        other units (`moe_streaming` streams one MoE layer's experts)."""
        if lookahead < 1:
            raise ValueError("lookahead must be at least 1")
        self.layers = decoder_layers(model) if layers is None else list(layers)
        self.device = torch.device(device) if device is not None else _param_device(model)
        self._cuda = self.device.type == "cuda"
        self.host: list[dict[str, torch.Tensor]] = []
        for layer in self.layers:
            host = {}
            for name, t in _tensors(layer).items():
                h = t.detach()
                if h.device.type != "cpu":
                    h = h.cpu()
                if self._cuda and not h.is_pinned():
                    h = h.pin_memory()
                host[name] = h
            self.host.append(host)
        slot_bytes = max(layer_bytes(layer) for layer in self.layers)
        # Every slot the budget allows: beyond the lookahead's, they keep layers resident
        # between passes (the victim is the layer needed furthest ahead).
        nslots = min(len(self.layers), budget_bytes // slot_bytes)
        if nslots < 2 and len(self.layers) > 1:
            raise ValueError(
                f"a budget of {budget_bytes} bytes holds {budget_bytes // slot_bytes} layers of "
                f"{slot_bytes} bytes; streaming needs at least 2 (one computing, one arriving)"
            )
        self.lookahead = lookahead
        self.stats = StreamStats(slots=nslots, slot_bytes=slot_bytes)
        # Non-layer weights go to the device once and stay.
        layer_ids = {id(t) for layer in self.layers for t in _tensors(layer).values()}
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) not in layer_ids and t.device != self.device:
                t.data = t.data.to(self.device)
        self.slots = [_Slot(slot_bytes, self.device) for _ in range(nslots)]
        self._by_layer: dict[int, _Slot] = {}
        self._lock = threading.Lock()
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._pool = (
            None if self._cuda else ThreadPoolExecutor(1, thread_name_prefix="tierd-stream")
        )
        self._hooks: list[Any] = []
        for i in range(len(self.layers)):
            self._detach(i)
        self._install_hooks()

    def _install_hooks(self) -> None:
        for i, layer in enumerate(self.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._before(i)))
            self._hooks.append(layer.register_forward_hook(self._after(i)))

    # -- hooks --------------------------------------------------------------------------------

    def _before(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            slot = self._fetch(i, i)
            self._wait(slot)
            slot.busy = True
            self._bind(i, slot)
            for j in range(1, self.lookahead + 1):
                if self._fetch((i + j) % len(self.layers), i, optional=True) is None:
                    break  # no slot free now: the rest wait for a later layer's turn

        return hook

    def _after(self, i: int) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            slot = self._by_layer[i]
            if self._cuda:
                slot.free_after = torch.cuda.Event()
                slot.free_after.record(torch.cuda.current_stream(self.device))
            slot.busy = False
            self._detach(i)

        return hook

    # -- the ring -----------------------------------------------------------------------------

    def _fetch(self, i: int, current: int, optional: bool = False) -> _Slot | None:
        """The slot holding (or receiving) layer i, starting its copy if needed, while
        layer `current` computes. With `optional`, None when no slot may be taken (a
        prefetch that must wait its turn)."""
        with self._lock:
            slot = self._by_layer.get(i)
            if slot is not None:
                return slot
            slot = self._victim(current)
            if slot is None:
                if optional:
                    return None
                raise RuntimeError("every slot is computing: the ring is too small")
            if slot.layer is not None:
                del self._by_layer[slot.layer]
            slot.layer = i
            self._by_layer[i] = slot
        self._copy(i, slot)
        return slot

    def _victim(self, current: int) -> _Slot | None:
        """A slot to reuse while layer `current` computes: a free one, else the one whose
        layer is needed furthest ahead (layers run in order and wrap: the optimal choice
        for that order), never the computing layer's or one in the lookahead window."""
        n = len(self.layers)
        best, best_dist = None, -1
        for slot in self.slots:
            if slot.busy:
                continue
            if slot.layer is None:
                return slot
            dist = (slot.layer - current) % n  # how long until that layer runs again
            if dist <= self.lookahead:
                continue
            if dist > best_dist:
                best, best_dist = slot, dist
        return best

    def _copy(self, i: int, slot: _Slot) -> None:
        views = self._views(i, slot)
        self.stats.copies += 1
        self.stats.copied_bytes += sum(t.numel() * t.element_size() for t in self.host[i].values())
        if self._cuda:
            assert self._stream is not None
            with torch.cuda.stream(self._stream):
                if slot.free_after is not None:
                    self._stream.wait_event(slot.free_after)
                for name, host in self.host[i].items():
                    views[name].copy_(host, non_blocking=True)
                slot.ready = torch.cuda.Event()
                slot.ready.record(self._stream)
            return
        assert self._pool is not None

        def run() -> None:
            for name, host in self.host[i].items():
                views[name].copy_(host)

        slot.ready = self._pool.submit(run)

    def _wait(self, slot: _Slot) -> None:
        ready = slot.ready
        if self._cuda:
            if ready is not None and not ready.query():
                self.stats.waits += 1
            torch.cuda.current_stream(self.device).wait_event(ready)
            return
        assert isinstance(ready, Future)
        if not ready.done():
            self.stats.waits += 1
        ready.result()

    def _views(self, i: int, slot: _Slot) -> dict[str, torch.Tensor]:
        views, at = {}, 0
        for name, host in self.host[i].items():
            n = host.numel() * host.element_size()
            views[name] = slot.buf[at : at + n].view(host.dtype).view(host.shape)
            at += _align(n)
        return views

    def _bind(self, i: int, slot: _Slot) -> None:
        tensors = _tensors(self.layers[i])
        for name, view in self._views(i, slot).items():
            tensors[name].data = view

    def _detach(self, i: int) -> None:
        """Point layer i's tensors back at the host copies: a layer used outside its
        turn reads correct weights (on the host), never a slot another layer owns now."""
        tensors = _tensors(self.layers[i])
        for name, host in self.host[i].items():
            tensors[name].data = host

    # -- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the hooks, leave every layer on its host weights, free the ring."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if self._cuda:
            torch.cuda.synchronize(self.device)
        for slot in self.slots:
            if isinstance(slot.ready, Future):
                slot.ready.result()
        for i in range(len(self.layers)):
            self._detach(i)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.slots.clear()
        self._by_layer.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _param_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def slice_device(slice: str) -> str:
    """The torch device of a `[[slices]]` slice: a GPU index is `cuda:N`; a MIG instance is
    `cuda:0` of a process started with CUDA_VISIBLE_DEVICES=<its UUID>, the only way CUDA
    addresses one (checked: any other device 0 would be the wrong memory)."""
    if not slice.startswith("MIG-"):
        return f"cuda:{int(slice)}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible != slice:
        raise ValueError(f"MIG instance {slice}: start the process with "
                         f"CUDA_VISIBLE_DEVICES={slice} (now {visible or 'unset'})")  # fmt: skip
    return "cuda:0"


def streamer_for_slice(model: Any, slice: Any, lookahead: int = 1,
                       device: torch.device | str | None = None) -> WeightStreamer:  # fmt: skip
    """A `WeightStreamer` whose ring is `slice.weight_budget` bytes, on the slice's device
    unless `device` is given (`slice`: a `tierd.slice_config.SliceConfig`)."""
    return WeightStreamer(model, slice.weight_budget, lookahead,
                          device if device is not None else slice_device(slice.slice))  # fmt: skip
