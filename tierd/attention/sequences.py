"""Sequences: the blocks a decode stream attends over, plus its growing tail.

Primitives: `Sequence` (blocks held, tail per layer), `Sequence.append(layer, k, v)`,
`Sequence.tail_block(layer)`, `Sequence.sealable()`, `peek_block()`, `drop_block()`,
`tail_bytes`, `growth_bytes(layer, n, capacity)`, `SequenceTable.add/get/pop/expired/of_tenant`.

The tail keeps each layer's K and V for the tokens not yet in a full block, in the
block's own layout ([K|V][kv_head][token][dim]) so sealing is a copy per layer. Layers
are appended one at a time during a decode step, so a block is sealed only when every
layer (and the token ids, given with layer 0) reached `block_tokens`.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.errors import InvalidArgument


@dataclass(eq=False)
class Sequence:
    id: int
    ns: NamespaceInfo
    blocks: list[BlockEntry]
    parent_key: bytes
    ttl: float
    deadline: float = 0.0
    tail_tokens: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _tail: list[torch.Tensor] = field(default_factory=list, repr=False)
    _lens: list[int] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        lay = self.ns.layout
        self._tail = [
            torch.empty((2, lay.num_kv_heads, lay.block_tokens, lay.head_dim),
                        dtype=lay.torch_dtype())
            for _ in range(lay.num_layers)
        ]  # fmt: skip
        self._lens = [0] * lay.num_layers
        self.touch()

    def touch(self) -> None:
        self.deadline = time.monotonic() + self.ttl

    @property
    def block_tokens_cached(self) -> int:
        return len(self.blocks) * self.ns.layout.block_tokens

    def tail_len(self, layer: int) -> int:
        return self._lens[layer]

    @property
    def tail_bytes(self) -> int:
        """Memory the open tail holds, every layer's buffer (what limits count)."""
        return sum(buf.numel() * buf.element_size() for buf in self._tail)

    def _grown_tokens(self, layer: int, n: int, capacity: int) -> int:
        have = self._tail[layer].shape[2]
        need = self._lens[layer] + n
        return have if need <= have else min(max(2 * have, need), max(capacity, need))

    def growth_bytes(self, layer: int, n: int, capacity: int) -> int:
        """Bytes appending `n` tokens to `layer` would allocate (0 when they fit)."""
        buf = self._tail[layer]
        extra = self._grown_tokens(layer, n, capacity) - buf.shape[2]
        return extra * buf.numel() // buf.shape[2] * buf.element_size()

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, tokens: list[int], capacity: int
    ) -> None:
        """Add `k`, `v` ([kv_heads, n, dim]) to one layer's tail (tokens ids with layer 0);
        a grown buffer stops at `capacity` tokens (the caller checked the append fits)."""
        lay = self.ns.layout
        want = (lay.num_kv_heads, k.shape[1] if k.dim() == 3 else -1, lay.head_dim)
        for name, t in (("k_new", k), ("v_new", v)):
            if t.dim() != 3 or tuple(t.shape) != want:
                raise InvalidArgument(
                    f"expected [kv_heads={lay.num_kv_heads}, tokens, head_dim={lay.head_dim}], "
                    f"got {list(t.shape)}", field=name,
                )
        if layer == 0:
            if len(tokens) != k.shape[1]:
                raise InvalidArgument(
                    f"layer 0 appends carry one token id per new token ({k.shape[1]}), "
                    f"got {len(tokens)}", field="new_tokens",
                )
            self.tail_tokens.extend(tokens)
        n, start = k.shape[1], self._lens[layer]
        buf = self._tail[layer]
        if start + n > buf.shape[2]:
            size = self._grown_tokens(layer, n, capacity)
            grown = torch.empty((*buf.shape[:2], size, buf.shape[3]), dtype=buf.dtype)
            grown[:, :, :start] = buf[:, :, :start]
            self._tail[layer] = buf = grown
        buf[0, :, start : start + n] = k.to(buf.dtype)
        buf[1, :, start : start + n] = v.to(buf.dtype)
        self._lens[layer] = start + n

    def tail_block(self, layer: int) -> tuple[torch.Tensor, int]:
        """This layer's tail as one block [1, 2, kv_heads, capacity, dim] (a view) and how
        many of its tokens are valid: the CPU kernel takes it like any other block."""
        return self._tail[layer].unsqueeze(0), self._lens[layer]

    def sealable(self) -> bool:
        t = self.ns.layout.block_tokens
        return min(self._lens) >= t and len(self.tail_tokens) >= t

    def peek_block(self) -> tuple[list[int], torch.Tensor]:
        """The first full block of the tail: token ids and [layers, 2, kv_heads, T, dim]."""
        t = self.ns.layout.block_tokens
        block = torch.stack([buf[:, :, :t] for buf in self._tail]).contiguous()
        return self.tail_tokens[:t], block

    def drop_block(self) -> None:
        """Remove the first full block from the tail (it is now a cached block)."""
        t = self.ns.layout.block_tokens
        del self.tail_tokens[:t]
        for layer, buf in enumerate(self._tail):
            rest = self._lens[layer] - t
            buf[:, :, :rest] = buf[:, :, t : t + rest].clone()
            self._lens[layer] = rest


class SequenceTable:
    def __init__(self) -> None:
        self._seqs: dict[int, Sequence] = {}
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 16 | 1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seqs)

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self._seqs[seq.id] = seq

    def get(self, seq_id: int) -> Sequence | None:
        with self._lock:
            return self._seqs.get(seq_id)

    def pop(self, seq_id: int) -> Sequence | None:
        with self._lock:
            return self._seqs.pop(seq_id, None)

    def of_tenant(self, tenant: str) -> list[Sequence]:
        with self._lock:
            return [s for s in self._seqs.values() if s.ns.tenant == tenant]

    def expired(self, now: float | None = None) -> list[Sequence]:
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [s for s in self._seqs.values() if s.deadline <= now]
            for s in gone:
                del self._seqs[s.id]
        return gone
