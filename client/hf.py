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
  q attends over the sequence's blocks plus the tail, causal inside the tail. Full
  blocks seal inside the daemon, keyed by the prefix chain, so a later request finds
  them with `lookup`.

Prefill. With nothing cached (`prefill="local"`, the default), the prompt's full blocks
run through the model with attention computed in-process (transformers' SDPA): none of
their KV is in tierd yet, so this is what a worker does on its accelerator; their K/V
are then `put` as blocks and the sequence opens over them. The rest of the prompt (at
least one token: its logits give the first new token) goes through attend. With a
cached prefix, `lookup(prompt)` gives the leading blocks, the sequence opens over them
and only the rest of the prompt runs, at positions starting at the cached length,
through attend (multi-token q, causal in the tail) in chunks of `prefill_chunk_tokens`.
`prefill="attend"` sends the whole prompt through attend (the daemon's multi-token tail
path is quadratic in memory: fine for short prompts, slow for long ones).

Placement (`placement="nvme"` or `"csd"`): a sequence holds a reader reference on its
blocks, and the daemon never drops the host copy of a block that has readers (a Move
writes the new copy but keeps the host one, and attend prefers host). So at each block
boundary, where the open tail is empty, the session closes the sequence, moves the new
blocks, and reopens it over the same keys; nothing is lost and attend then really reads
from the target tier: the prompt's blocks before decoding, each block sealed during
decode as soon as it is full.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import torch

from .attend import AttendItem, AttendOutput, AttendStream
from .layout import KVLayout

if TYPE_CHECKING:
    from .client import TierdClient
    from .results import Namespace

ATTN_IMPLEMENTATION = "tierd"
_SESSION_KWARG = "tierd_session"
_PLACEMENTS = (None, "nvme", "csd")


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
        raise TypeError(
            "attn_implementation='tierd' runs only inside a TierdKVSession forward "
            f"(the `{_SESSION_KWARG}` kwarg is missing)"
        )
    out = session.attend_layer(module, query, key, value, scaling)
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
        prefill: str = "local",
        prefill_chunk_tokens: int = 256,
        ttl_ms: int = 0,
    ) -> None:
        if placement not in _PLACEMENTS:
            raise ValueError(f"placement must be one of {_PLACEMENTS}, got {placement!r}")
        if prefill not in ("local", "attend"):
            raise ValueError(f"prefill must be 'local' or 'attend', got {prefill!r}")
        register_attention()
        self.model = model
        self.client = client
        self.layout = kv_layout(model.config, params)
        self.ns: Namespace = client.open_namespace(
            params.model, self.layout, extra_keys=params.extra_keys
        )
        self.placement = placement
        self.reuse_prefix = reuse_prefix
        self.prefill = prefill
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.ttl_ms = ttl_ms
        self.tokens: list[int] = []  # tokens whose KV is in tierd, in order
        self.reused_tokens = 0
        self.sequence_id: int | None = None
        self._stream: AttendStream | None = client.attend_stream() if stream else None
        self._pending: Sequence[int] = ()  # ids of the forward in flight, for layer 0
        self._placed_blocks = 0
        # Set during a local prefill: each layer's (K, V) of the forward, [kv_heads, n, dim].
        self._local_kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, prompt_ids: Sequence[int]) -> torch.Tensor:
        """Open the sequence (over cached prefix blocks) and prefill; last logits."""
        if self.sequence_id is not None:
            raise RuntimeError("session already started")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("empty prompt")
        t = self.layout.block_tokens
        # Keep at least one prompt token to run through attend: its logits give the
        # first new token, and it leaves the sequence's tail in the daemon's hands.
        limit = (len(prompt) - 1) // t
        keys: list[bytes] = []
        if self.reuse_prefix:
            hit = self.client.lookup(self.ns, prompt)
            keys = [b.key for b in hit.blocks[: min(hit.cached_tokens // t, limit)]]
        self.reused_tokens = len(keys) * t
        if not keys and self.prefill == "local" and limit:
            keys = self._prefill_local(prompt[: limit * t])
        if self.placement and keys:  # before opening: a held block keeps its host copy
            self.client.move(self.ns, keys, self.placement)
            self._placed_blocks = len(keys)
        self.sequence_id = self.client.open_sequence(self.ns, keys, ttl_ms=self.ttl_ms)
        self.tokens = prompt[: len(keys) * t]
        # Chunks end on block boundaries, so with a placement each chunk's full blocks
        # are placed before the next attends over them.
        chunk = max(t, self.prefill_chunk_tokens // t * t)
        pos = len(self.tokens)
        while len(prompt) - pos > chunk:
            self._forward(prompt[pos : pos + chunk])
            pos += chunk
        return self._forward(prompt[pos:])

    def _prefill_local(self, ids: list[int]) -> list[bytes]:
        """Prefill full blocks in-process and put them; returns their keys.

        Nothing of this prompt is in tierd yet, so its attention needs only K/V this very
        forward produces: computing it here (transformers' own SDPA path) is what any
        worker does on its accelerator, and avoids the daemon's quadratic tail path.
        """
        lay = self.layout
        self._local_kv = [None] * lay.num_layers
        try:
            self._run_model(ids, 0)
            n = len(ids) // lay.block_tokens
            blocks = torch.empty((n, *lay.block_shape), dtype=lay.torch_dtype())
            for layer, kv in enumerate(self._local_kv):
                assert kv is not None, f"layer {layer} produced no K/V"
                for i, t in enumerate(kv):  # [kv_heads, n * T, dim] -> [n, kv_heads, T, dim]
                    split = t.reshape(lay.num_kv_heads, n, lay.block_tokens, lay.head_dim)
                    blocks[:, layer, i] = split.transpose(0, 1)
        finally:
            self._local_kv = None
        keys = self.client.block_keys(self.ns, ids)
        self.client.put(self.ns, keys, blocks)
        return keys

    def step(self, token_id: int) -> torch.Tensor:
        """Append one token (its KV goes to tierd) and return the next logits."""
        if self.sequence_id is None:
            raise RuntimeError("session not started")
        return self._forward([int(token_id)])

    def close(self, *, quiet: bool = False) -> None:
        """Release the sequence (its sealed blocks stay cached) and the stream.

        `quiet`: on a path that is already failing, errors here are dropped so the
        original one surfaces (the daemon expires an abandoned sequence anyway).
        """
        stream, self._stream = self._stream, None
        seq, self.sequence_id = self.sequence_id, None
        try:
            try:
                if stream is not None:
                    stream.close()
            finally:
                if seq is not None:
                    self.client.close_sequence(seq)
        except Exception:
            if not quiet:
                raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        self.close(quiet=exc_type is not None)

    # -- forward --------------------------------------------------------------------------

    def _forward(self, ids: list[int]) -> torch.Tensor:
        logits = self._run_model(ids, len(self.tokens))
        self.tokens.extend(ids)
        if self.placement and len(self.tokens) % self.layout.block_tokens == 0:
            self._rebase()
        return logits

    def _run_model(self, ids: list[int], pos: int) -> torch.Tensor:
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
        return out.logits[0, -1]

    def attend_layer(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
        value: torch.Tensor, scaling: float | None,
    ) -> torch.Tensor:  # fmt: skip
        """One layer of the forward in flight: append K/V and attend, in tierd."""
        if query.shape[0] != 1:
            raise ValueError(f"TierdKVSession runs batch size 1, got {query.shape[0]}")
        layer = int(module.layer_idx)  # type: ignore[arg-type]
        if self._local_kv is not None:  # a local prefill: keep K/V, attend in-process
            from transformers.integrations.sdpa_attention import sdpa_attention_forward

            self._local_kv[layer] = (key[0], value[0])
            out, _ = sdpa_attention_forward(module, query, key, value, None, scaling=scaling)
            return out  # type: ignore[no-any-return]
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
        res: AttendOutput = (
            self._stream.send([item])[0] if self._stream is not None
            else self.client.attend([item])[0]
        )  # fmt: skip
        return res.out.to(query.dtype).unsqueeze(0)  # [1, q_tokens, heads, dim]

    # -- placement ------------------------------------------------------------------------

    def _rebase(self) -> None:
        """At a block boundary: close, move the new full blocks, reopen over the keys."""
        t = self.layout.block_tokens
        n_full = len(self.tokens) // t
        if n_full == self._placed_blocks or self.sequence_id is None:
            return
        covered = n_full * t
        if len(self.tokens) != covered:
            return  # the tail holds tokens that closing the sequence would lose
        # A block stays in the tail when host had no room to seal it; then wait.
        if self.client.lookup(self.ns, self.tokens[:covered]).cached_tokens < covered:
            return
        keys = self.client.block_keys(self.ns, self.tokens[:covered])
        self.client.close_sequence(self.sequence_id)
        self.sequence_id = None
        try:
            self.client.move(self.ns, keys[self._placed_blocks :], str(self.placement))
            self._placed_blocks = n_full
        finally:  # a failed move leaves the blocks where they were: decoding goes on
            self.sequence_id = self.client.open_sequence(self.ns, keys, ttl_ms=self.ttl_ms)


@contextmanager
def _attn_implementation(model: Any, name: str) -> Iterator[None]:
    """Switch a model's attention implementation for a block, then restore it."""
    register_attention()
    prev = model.config._attn_implementation
    if prev == name:
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(prev)


def _prompt_ids(tokenizer_or_ids: Any, prompt: str | None) -> list[int]:
    ids = tokenizer_or_ids
    if isinstance(ids, torch.Tensor):
        if ids.dim() == 2 and ids.shape[0] != 1:
            raise ValueError("batch size 1: one prompt at a time")
        return [int(t) for t in ids.reshape(-1).tolist()]
    if isinstance(ids, Sequence) and not isinstance(ids, str):
        return [int(t) for t in ids]
    if prompt is None:
        raise ValueError("given a tokenizer, pass the text as prompt=")
    return [int(t) for t in ids(prompt)["input_ids"]]


def _eos_ids(model: Any, eos_token_id: int | Sequence[int] | None) -> set[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return set()
    return {eos_token_id} if isinstance(eos_token_id, int) else {int(t) for t in eos_token_id}


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
    prefill: str = "local",
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
    # Switched once here rather than on every forward (it walks all modules).
    with _attn_implementation(model, ATTN_IMPLEMENTATION), \
            TierdKVSession(model, client, params, stream=stream, placement=placement,
                           reuse_prefix=reuse_prefix, prefill=prefill) as session:  # fmt: skip
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
