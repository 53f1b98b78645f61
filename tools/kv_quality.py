"""What a tier's KV codec does to a real model's predictions, when the model attends to KV
stored through the codec.

Primitives (the model itself comes from `smollm2`): `StoredKV(codecs, block_tokens)` with
`seal(cache)` and `stats`, `teacher_forced(model, ids, codecs, steps, block_tokens)` ->
`TeacherForced`, `perplexity(model, ids, codecs, block_tokens, chunk)` -> `Perplexity`,
`kl_rows(logits)`.

Every evaluation runs one batch with one row per variant: row 0 is full precision (codec
None: no round trip), each other row stores its sealed blocks through its codec. All rows
get the same input tokens, so they share each forward pass (a decode step on CPU costs the
weights' memory traffic, about the same for one row or six); rows do not interact, and the
`raw` row, whose round trip is exact, must match row 0 bit for bit.

What a tier stores, simulated on a transformers `DynamicCache` ([rows, kv_heads, tokens,
dim] per layer, keys after RoPE as tierd stores them): once a block of `block_tokens`
tokens is full, its KV over all layers ([layers, 2, kv_heads, tokens, dim], the tier's block)
goes through `encode` then `decode`, and the decoded values replace the cache's, so every
later token attends to what the tier would return. The partial last block stays at full
precision: it is the open tail, held raw in the top tier until it fills. The tokens of one
forward pass attend to each other at full precision (a prefill computes attention on its
own fresh KV; a decode step's new token is in the raw tail) and are sealed after it.
Blocks sealed together (a prompt's prefill) are encoded in one call over their
concatenated tokens, kivi's key group fixed at the block size: the records differ in
layout only, the decoded values are the same as block by block (tests check it).

Prompts: the prompt's full blocks (leaving at least one token) run first at full precision
with batch 1, as a worker's prefill does before storing them; the rest of the prompt then
runs in the batch against the stored blocks, so even the first new token sees stored KV.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tierd_kernels.codecs import Codec, Kivi


def _multi_block(codec: Codec, block_tokens: int) -> Codec:
    """The codec for several whole blocks concatenated along tokens: kivi's default key
    group is the block's tokens, so it is made explicit; the others work per token."""
    if isinstance(codec, Kivi) and codec.k_group is None:
        return Kivi(codec.bits, k_group=block_tokens, v_group=codec.v_group)
    return codec


@dataclass
class SealStats:
    """How far the stored KV, read back from the cache the model attends to, is from the KV
    the model produced for those tokens."""

    tokens: int = 0
    max_abs: float = 0.0
    err_sq: float = 0.0
    ref_sq: float = 0.0

    def add(self, stored: torch.Tensor, produced: torch.Tensor) -> None:
        diff = (stored.double() - produced.double()).flatten()
        self.tokens += produced.shape[3]
        self.max_abs = max(self.max_abs, float(diff.abs().max()))
        self.err_sq += float(diff.square().sum())
        self.ref_sq += float(produced.double().square().sum())

    @property
    def rel_err(self) -> float:
        return math.sqrt(self.err_sq / self.ref_sq) if self.ref_sq else 0.0


class StoredKV:
    """Seals the full blocks of a batch's DynamicCache through each row's codec."""

    def __init__(self, codecs: Sequence[Codec | None], block_tokens: int) -> None:
        self.codecs = [None if c is None else _multi_block(c, block_tokens) for c in codecs]
        self.block_tokens = block_tokens
        self.sealed = 0  # tokens already stored (rows advance together)
        self.stats = [SealStats() for _ in codecs]

    def seal(self, cache: Any) -> None:
        length = cache.get_seq_length()
        a, b = self.sealed, length - length % self.block_tokens
        if b <= a:
            return
        layers = cache.layers
        for row, codec in enumerate(self.codecs):
            if codec is None:
                continue
            kv = self._read(layers, row, a, b)
            back = codec.decode(codec.encode(kv), tuple(kv.shape), kv.dtype)
            for i, layer in enumerate(layers):
                layer.keys[row, :, a:b] = back[i, 0]
                layer.values[row, :, a:b] = back[i, 1]
            self.stats[row].add(self._read(layers, row, a, b), kv)
        self.sealed = b

    @staticmethod
    def _read(layers: Any, row: int, a: int, b: int) -> torch.Tensor:
        """[layers, 2, kv_heads, b - a, dim]: a tier's block layout."""
        return torch.stack(
            [torch.stack([layer.keys[row, :, a:b], layer.values[row, :, a:b]]) for layer in layers]
        )


def _new_cache(model: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _widen(cache: Any, rows: int) -> None:
    """A batch-1 cache copied into `rows` rows of their own (each is rewritten on its own)."""
    for layer in cache.layers:
        layer.keys = layer.keys.expand(rows, -1, -1, -1).contiguous()
        layer.values = layer.values.expand(rows, -1, -1, -1).contiguous()


def kl_rows(logits: torch.Tensor) -> torch.Tensor:
    """KL(row 0 || row r) of the next-token distributions, per row, in float64. Exactly 0
    for a row whose logits equal row 0's."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    return (lp[0].exp() * (lp[0] - lp)).sum(-1)


@dataclass
class TeacherForced:
    tokens: list[int]  # full precision's greedy tokens: the inputs of every row
    argmax: list[list[int]]  # per row, per step
    kl: list[list[float]]  # per row, per step: KL(full || row)
    stats: list[SealStats]

    def agreement(self, row: int) -> float:
        return sum(a == t for a, t in zip(self.argmax[row], self.tokens)) / len(self.tokens)

    def first_divergence(self, row: int) -> int | None:
        """The first step where the row's greedy token differs, or None. Until that step the
        row has seen exactly the inputs its own free-running greedy decode would have fed it,
        so its free-running text equals full precision's iff this is None."""
        return next((i for i, (a, t) in enumerate(zip(self.argmax[row], self.tokens)) if a != t),
                    None)  # fmt: skip


@torch.no_grad()
def teacher_forced(
    model: Any, ids: Sequence[int], codecs: Sequence[Codec | None], steps: int, block_tokens: int
) -> TeacherForced:
    """`steps` next-token predictions per row after the prompt `ids`, each row fed full
    precision's greedy prefix (the first prediction is the prompt's)."""
    if codecs[0] is not None:
        raise ValueError("row 0 is the full-precision reference (codec None)")
    rows = len(codecs)
    stored = StoredKV(codecs, block_tokens)
    cache = _new_cache(model)
    head = (len(ids) - 1) // block_tokens * block_tokens
    if head:
        model(torch.tensor([list(ids[:head])]), past_key_values=cache, use_cache=True,
              logits_to_keep=1)  # fmt: skip
        _widen(cache, rows)
        stored.seal(cache)
    x = torch.tensor([list(ids[head:])]).expand(rows, -1)
    out = TeacherForced([], [[] for _ in codecs], [[] for _ in codecs], stored.stats)
    for _ in range(steps):
        logits = model(x, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        stored.seal(cache)
        top, kl = logits.argmax(-1).tolist(), kl_rows(logits).tolist()
        for r in range(rows):
            out.argmax[r].append(int(top[r]))
            out.kl[r].append(float(kl[r]))
        out.tokens.append(int(top[0]))
        x = torch.tensor([[top[0]]]).expand(rows, 1)
    return out


@dataclass
class Perplexity:
    nll: list[float]  # per row: mean negative log-likelihood (nats) over the scored tokens
    scored: int
    stats: list[SealStats] = field(default_factory=list)

    def ppl(self, row: int) -> float:
        return math.exp(self.nll[row])


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[rows, n, vocab], [n] -> [rows] summed NLL (float64), one row at a time (memory)."""
    out = torch.empty(logits.shape[0], dtype=torch.float64)
    for r in range(logits.shape[0]):
        lp = torch.log_softmax(logits[r].double(), dim=-1)
        out[r] = -lp.gather(1, targets.view(-1, 1)).sum()
    return out


@torch.no_grad()
def perplexity(
    model: Any, ids: Sequence[int], codecs: Sequence[Codec | None], block_tokens: int, chunk: int
) -> Perplexity:
    """Perplexity of `ids` per row, in chunks of `chunk` tokens: each chunk attends to the
    stored KV of the chunks before it and to its own tokens at full precision. With `chunk`
    equal to the block size a token sees exactly what a decode step sees (sealed blocks
    through the codec, its own block raw). Every token but the first is scored."""
    if chunk % block_tokens:
        raise ValueError(f"chunk {chunk} is not a multiple of the block size {block_tokens}")
    rows, n = len(codecs), len(ids)
    stored = StoredKV(codecs, block_tokens)
    cache = _new_cache(model)
    all_ids = torch.tensor(list(ids))
    total = torch.zeros(rows, dtype=torch.float64)
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        x = all_ids[start:end].view(1, -1)
        # The first chunk sees no stored KV: the same for every row, computed once.
        logits = model(x if start == 0 else x.expand(rows, -1), past_key_values=cache,
                       use_cache=True).logits  # fmt: skip
        if start == 0:
            _widen(cache, rows)
        stored.seal(cache)
        targets = all_ids[start + 1 : end + 1]  # the last chunk has no next token
        total += _nll_sum(logits[:, : targets.numel()], targets)
    return Perplexity([float(t) / (n - 1) for t in total], n - 1, stored.stats)
