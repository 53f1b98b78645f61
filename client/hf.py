"""Hugging Face transformers on tierd: every layer's KV lives in the daemon, attention runs there.

Primitives: `TierdNamespaceParams`, `kv_layout(config, params)`, `register_attention()`,
`TierdKVSession(model, client, params, ...)` with `start(prompt_ids) -> logits`,
`step(token_id) -> logits`, `close()` (also a context manager), and
`generate_with_tierd(model, tokenizer_or_ids, client, params, max_new_tokens, ...)`
-> `TierdGeneration`.

How it fits into transformers (checked against 5.x `modeling_llama.py`):
- The model runs with `attn_implementation="tierd"`, an `AttentionInterface` entry, only
  for the duration of a session's forward passes, so the same model object still serves
  `model.generate` with its own implementation in between.
- Forward passes get `use_cache=False` and no cache object, so each attention layer
  receives exactly the new tokens' K and V, already RoPE-rotated (RoPE positions come
  from the `position_ids` we pass, starting at the length already in tierd). Nothing is
  kept in the process: a no-op Cache would only add a layer of indirection.
- The attention function finds its session through a forward kwarg (`tierd_session`):
  transformers passes unknown kwargs down to the attention interface untouched, which
  keeps the function free of globals and lets several sessions use one model in turn.
- Each layer's call is one Attend item: the new K/V are appended to that layer's tail
  (layer 0 also carries the token ids, which is how the daemon keys sealed blocks), then
  q attends over the sequence's blocks plus the tail, causal inside the tail. A prefill
  is therefore just a multi-token forward; full blocks seal inside the daemon, keyed by
  the prefix chain, and a later request finds them with `lookup`.
- Prefix reuse: `lookup(prompt)` gives the cached leading blocks; the sequence opens over
  them and only the rest of the prompt runs through the model, at positions that start
  at the cached length. At least one prompt token is always recomputed, since the first
  decode step needs the logits of the last prompt position.

Placement (`placement="nvme"` or `"csd"`): a sequence holds a reader reference on its
blocks, and the daemon never drops the host copy of a block that has readers (a Move
writes the new copy but keeps the host one, and attend prefers host). So at each block
boundary, where the open tail is empty, the session closes the sequence, moves the new
blocks, and reopens it over the same keys; nothing is lost and attend then really reads
from the target tier. A prompt is prefilled in two forwards (its full blocks, then the
rest) so the prompt's blocks are placed before decoding starts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .attend import AttendItem, AttendOutput, AttendStream
from .layout import KVLayout

if TYPE_CHECKING:
    from .client import TierdClient
    from .results import Namespace

ATTN_IMPLEMENTATION = "tierd"
_SESSION_KWARG = "tierd_session"
_PLACEMENTS = (None, "host", "nvme", "csd")


@dataclass(frozen=True)
class TierdNamespaceParams:
    """Which namespace a model's KV goes into; the shape comes from the model's config.

    `model` is the fingerprint (name plus weights/quantization): two models whose KV
    differs must never share it. float32 keeps a float32 model's KV round trip exact.
    """

    model: str
    block_tokens: int = 16
    dtype: str = "float32"
    extra_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class TierdGeneration:
    prompt_tokens: list[int]
    new_tokens: list[int]
    reused_tokens: int  # prompt tokens whose KV came from the cache, not the model
    ttft_s: float  # from the call to the first new token (lookup and prefill included)
    total_s: float

    @property
    def tokens(self) -> list[int]:
        return self.prompt_tokens + self.new_tokens


def kv_layout(config: Any, params: TierdNamespaceParams) -> KVLayout:
    """The tierd layout of a decoder-only transformers config (Llama-style names)."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return KVLayout(int(config.num_hidden_layers), int(kv_heads), int(head_dim),
                    params.dtype, params.block_tokens)  # fmt: skip


def _tierd_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, heads, q_tokens, dim], RoPE applied
    key: torch.Tensor,  # [batch, kv_heads, q_tokens, dim]: only the new tokens (no cache)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    session = kwargs.get(_SESSION_KWARG)
    if not isinstance(session, TierdKVSession):
        raise RuntimeError(
            "attn_implementation='tierd' runs only inside a TierdKVSession forward "
            f"(the `{_SESSION_KWARG}` kwarg is missing)"
        )
    out = session.attend_layer(int(module.layer_idx), query, key, value, scaling)
    return out, None  # [batch, q_tokens, heads, dim], as eager/sdpa return it


def register_attention() -> None:
    """Make "tierd" a valid attn_implementation (idempotent; imports transformers)."""
    from transformers import AttentionInterface

    if ATTN_IMPLEMENTATION not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTN_IMPLEMENTATION, _tierd_attention)


class TierdKVSession:
    """One sequence of one model held in tierd: start (prefill), step (decode), close.

    Batch size 1. `stream` sends each layer's item over one AttendStream (no per-call
    setup); `placement` puts full blocks in that tier (see the module docstring);
    `reuse_prefix` opens the sequence over the prompt's cached blocks.
    """

    def __init__(
        self,
        model: Any,
        client: TierdClient,
        params: TierdNamespaceParams,
        *,
        stream: bool = True,
        placement: str | None = None,
        reuse_prefix: bool = True,
        ttl_ms: int = 0,
    ) -> None:
        if placement not in _PLACEMENTS:
            raise ValueError(f"placement must be one of {_PLACEMENTS}, got {placement!r}")
        register_attention()
        self.model = model
        self.client = client
        self.layout = kv_layout(model.config, params)
        self.ns: Namespace = client.open_namespace(
            params.model, self.layout, extra_keys=params.extra_keys
        )
        self.placement = placement
        self.reuse_prefix = reuse_prefix
        self.ttl_ms = ttl_ms
        self.tokens: list[int] = []  # tokens whose KV is in tierd, in order
        self.reused_tokens = 0
        self.sequence_id: int | None = None
        self._stream: AttendStream | None = client.attend_stream() if stream else None
        self._pending: Sequence[int] = ()  # ids of the forward in flight, for layer 0
        self._placed_blocks = 0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Open the sequence (over cached prefix blocks) and prefill; last logits."""
        if self.sequence_id is not None:
            raise RuntimeError("session already started")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        t = self.layout.block_tokens
        keys: list[bytes] = []
        if self.reuse_prefix:
            hit = self.client.lookup(self.ns, prompt)
            # Keep at least one prompt token to run: its logits give the first new token.
            n_blocks = min(hit.cached_tokens, len(prompt) - 1) // t
            keys = [b.key for b in hit.blocks[:n_blocks]]
        self.sequence_id = self.client.open_sequence(self.ns, keys, ttl_ms=self.ttl_ms)
        self.reused_tokens = len(keys) * t
        self.tokens = prompt[: self.reused_tokens]
        rest = prompt[self.reused_tokens :]
        boundary = len(prompt) // t * t
        if self.placement and self.reused_tokens < boundary < len(prompt):
            # Full blocks first, so they are placed before the rest attends over them.
            self._forward(prompt[self.reused_tokens : boundary])
            rest = prompt[boundary:]
        elif self.placement and self.reused_tokens:
            self._rebase()  # reused blocks go to the target tier too
        return self._forward(rest)

    def step(self, token_id: int) -> torch.Tensor:
        """Append one token (its KV goes to tierd) and return the next logits."""
        if self.sequence_id is None:
            raise RuntimeError("session not started")
        return self._forward([int(token_id)])

    def close(self) -> None:
        """Release the sequence (its sealed blocks stay cached) and the stream."""
        stream, self._stream = self._stream, None
        seq, self.sequence_id = self.sequence_id, None
        try:
            if stream is not None:
                stream.close()
        finally:
            if seq is not None:
                self.client.close_sequence(seq)

    def __enter__(self) -> TierdKVSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- forward --------------------------------------------------------------------------

    def _forward(self, ids: list[int]) -> torch.Tensor:
        pos = len(self.tokens)
        input_ids = torch.tensor([ids], dtype=torch.long)
        position_ids = torch.arange(pos, pos + len(ids), dtype=torch.long).unsqueeze(0)
        self._pending = ids
        try:
            with _attn_implementation(self.model, ATTN_IMPLEMENTATION), torch.no_grad():
                out = self.model(
                    input_ids=input_ids,
                    position_ids=position_ids,
                    use_cache=False,
                    logits_to_keep=1,
                    **{_SESSION_KWARG: self},
                )
        finally:
            self._pending = ()
        self.tokens.extend(ids)
        if self.placement and len(self.tokens) % self.layout.block_tokens == 0:
            self._rebase()
        return out.logits[0, -1]

    def attend_layer(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scaling: float | None,
    ) -> torch.Tensor:
        """One layer of the forward in flight: append K/V, attend in tierd."""
        if query.shape[0] != 1:
            raise ValueError(f"TierdKVSession runs batch size 1, got {query.shape[0]}")
        assert self.sequence_id is not None
        item = AttendItem(
            sequence_id=self.sequence_id,
            layer=layer,
            q=query[0].transpose(0, 1),  # [q_tokens, heads, dim]
            k_new=key[0],  # [kv_heads, n, dim]
            v_new=value[0],
            new_tokens=self._pending if layer == 0 else (),
            scale=float(scaling or 0.0),
        )
        out: AttendOutput = self._send(item)
        return out.out.to(query.dtype).unsqueeze(0)

    def _send(self, item: AttendItem) -> AttendOutput:
        if self._stream is not None:
            return self._stream.send([item])[0]
        return self.client.attend([item])[0]

    # -- placement ------------------------------------------------------------------------

    def _rebase(self) -> None:
        """At a block boundary: close, move the new full blocks, reopen over the keys."""
        t = self.layout.block_tokens
        n_full = len(self.tokens) // t
        if n_full == self._placed_blocks or self.sequence_id is None:
            return
        covered = n_full * t
        if len(self.tokens) != covered:
            return  # the tail holds tokens that closing would lose
        # A block stays in the tail when host had no room to seal it; then wait.
        if self.client.lookup(self.ns, self.tokens[:covered]).cached_tokens < covered:
            return
        keys = self.client.block_keys(self.ns, self.tokens[:covered])
        self.client.close_sequence(self.sequence_id)
        self.sequence_id = None
        self.client.move(self.ns, keys[self._placed_blocks :], str(self.placement))
        self.sequence_id = self.client.open_sequence(self.ns, keys, ttl_ms=self.ttl_ms)
        self._placed_blocks = n_full


class _attn_implementation:
    """Switch a model's attention implementation for a block, then restore it."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name
        self.prev: str | None = None

    def __enter__(self) -> None:
        self.prev = self.model.config._attn_implementation
        if self.prev != self.name:
            self.model.set_attn_implementation(self.name)

    def __exit__(self, *exc: object) -> None:
        if self.prev is not None and self.prev != self.name:
            self.model.set_attn_implementation(self.prev)


def _prompt_ids(tokenizer_or_ids: Any, prompt: str | None) -> list[int]:
    if isinstance(tokenizer_or_ids, torch.Tensor):
        ids = tokenizer_or_ids
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError("batch size 1: one prompt at a time")
            ids = ids[0]
        return [int(t) for t in ids.tolist()]
    if isinstance(tokenizer_or_ids, Sequence) and not isinstance(tokenizer_or_ids, str):
        return [int(t) for t in tokenizer_or_ids]
    if prompt is None:
        raise ValueError("given a tokenizer, pass the text as prompt=")
    return [int(t) for t in tokenizer_or_ids(prompt)["input_ids"]]


def _eos_ids(model: Any, eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        cfg = getattr(model, "generation_config", None)
        eos_token_id = getattr(cfg, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def generate_with_tierd(
    model: Any,
    tokenizer_or_ids: Any,
    client: TierdClient,
    params: TierdNamespaceParams,
    max_new_tokens: int,
    *,
    prompt: str | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop_at_eos: bool = True,
    placement: str | None = None,
    reuse_prefix: bool = True,
    stream: bool = True,
) -> TierdGeneration:
    """Greedy decoding with all KV in tierd; stops at EOS like `model.generate`.

    `tokenizer_or_ids`: token ids (list, 1-D or [1, n] tensor), or a tokenizer with the
    text in `prompt`. `eos_token_id` defaults to the model's generation config.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    ids = _prompt_ids(tokenizer_or_ids, prompt)
    eos = _eos_ids(model, eos_token_id) if stop_at_eos else set()
    t0 = time.perf_counter()
    new: list[int] = []
    with TierdKVSession(model, client, params, stream=stream, placement=placement,
                        reuse_prefix=reuse_prefix) as session:  # fmt: skip
        logits = session.start(ids)
        ttft = 0.0
        while True:
            token = int(torch.argmax(logits).item())
            new.append(token)
            if len(new) == 1:
                ttft = time.perf_counter() - t0
            if len(new) >= max_new_tokens or token in eos:
                break
            logits = session.step(token)
        reused = session.reused_tokens
    return TierdGeneration(ids, new, reused, ttft, time.perf_counter() - t0)
