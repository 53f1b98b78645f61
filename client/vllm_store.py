"""The parts of tierd's vLLM connector that do not need vLLM: settings, the namespace a
request's KV lives in, a guarded link to the daemon, and block copies between tierd's
shared memory and vLLM's paged KV cache.

Primitives: `ConnectorSettings.from_extra(dict)`, `namespace_spec(settings, model, salt)`,
`TierdLink(settings, layout, model)` (`.lookup_tiers`, `.keys`, `.load`, `.save`,
`.commit`, `.up`), `PagedKV.from_caches(kv_caches, block_tokens)` (`.write_block`,
`.read_block`, `.read_layer`), `read_blocks(client, ns, keys, visit)`,
`write_blocks(client, ns, keys, fill)`.

Namespaces. A request's KV lives in the namespace (tenant, `<prefix><model>`, layout,
extra keys): the tenant is the connector's (`tenant` in the config, with its bearer
token), the model is vLLM's served model name, and a request's `cache_salt` is an extra
key, so requests with different salts (or tenants) never share a block, whatever their
tokens. tierd's `block_tokens` equals vLLM's block size: one tierd block is one vLLM
block for every layer, so a hit, a load and a save are whole vLLM blocks.

Copies. vLLM's CPU attention keeps one tensor per layer, `[blocks, kv_heads, T, 2*D]`,
whose block is laid out `[kv_head][K|V][token][dim]`; a tierd block is
`[layer][K|V][kv_head][token][dim]`. When the layers are equally strided views of one
allocation (vLLM allocates them so) all layers of a block are one strided view and a
block moves in one `copy_`, straight between the daemon's mapped slot and vLLM's KV.

The link fails soft: a daemon that cannot be reached (or times out) is left alone for
`retry_after_s`, during which lookups answer 0 and saves are skipped, so vLLM keeps serving
(recomputing) without it; an error of one call (a corrupt block, a full tier) only fails
that call.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from . import keys as _keys
from ._proto import tierd_pb2 as pb
from .arrays import as_tensor
from .client import TierdClient
from .errors import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TierdError,
    Unavailable,
)
from .layout import KVLayout, dtype_to_proto
from .results import Namespace
from .shm import slot_view

log = logging.getLogger("tierd_client.vllm")

TORCH_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
SAVE_MODES = ("end", "layer")
# Failures of one call (a corrupt or vanished block, a full tier): that call is a miss or a
# skipped save. Anything else (unreachable, timed out, refused) leaves the daemon alone for
# `retry_after_s`.
_ONE_CALL = (DataLoss, NotFound, ResourceExhausted, FailedPrecondition, InvalidArgument)


@dataclass(frozen=True)
class ConnectorSettings:
    """`kv_connector_extra_config` of the connector, checked once."""

    address: str = ""  # tierd's address ("unix:/path" or "host:port"); "" disables
    tenant: str = "default"
    token: str | None = None  # the tenant's bearer token, when the daemon has tenants
    namespace_prefix: str = "vllm/"
    model: str = ""  # the model part of namespaces; "" = vLLM's served model name
    timeout_s: float = 5.0  # per RPC
    retry_after_s: float = 10.0  # how long a failed daemon is left alone
    save: str = "end"  # "end": after the forward; "layer": layer by layer in it
    transport: str = "auto"

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any]) -> ConnectorSettings:
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ValueError(f"tierd connector: unknown kv_connector_extra_config keys {unknown}")
        values: dict[str, Any] = {}
        for name, value in extra.items():
            default = known[name].default
            if isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                    raise ValueError(f"tierd connector: {name} must be a positive number")
                value = float(value)
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"tierd connector: {name} must be a string")
            values[name] = value
        out = cls(**values)
        if out.save not in SAVE_MODES:
            raise ValueError(f"tierd connector: save must be one of {SAVE_MODES}")
        return out


def namespace_spec(
    settings: ConnectorSettings, model: str, salt: str | None
) -> tuple[str, tuple[str, ...]]:
    """(model, extra_keys) of the namespace for `model` and a request's `cache_salt`."""
    name = settings.namespace_prefix + (settings.model or model)
    return name, ((f"cache_salt={salt}",) if salt else ())


# -- the daemon, guarded -----------------------------------------------------------------------


class TierdLink:
    """One TierdClient, the namespaces opened through it, and a breaker around both."""

    def __init__(self, settings: ConnectorSettings, layout: KVLayout, model: str) -> None:
        self.settings = settings
        self.layout = layout
        self.model = model
        self._lock = threading.Lock()
        self._spaces: dict[str | None, Namespace] = {}
        self._down_until = 0.0
        self._client: TierdClient | None = None
        if settings.address:
            self._client = TierdClient(
                settings.address, tenant=settings.tenant, token=settings.token,
                transport=settings.transport, timeout=settings.timeout_s, max_retries=0,
                fast_attend=False,
            )  # fmt: skip
        self.failures = 0

    @property
    def up(self) -> bool:
        return self._client is not None and time.monotonic() >= self._down_until

    def _failed(self, what: str, err: BaseException) -> None:
        self.failures += 1
        if isinstance(err, _ONE_CALL):
            log.warning("tierd %s failed: %s", what, err)
            return
        self._down_until = time.monotonic() + self.settings.retry_after_s
        log.warning("tierd %s failed (%s); serving without tierd for %.0f s",
                    what, err, self.settings.retry_after_s)  # fmt: skip

    def guarded(self, what: str, fn: Callable[[], Any], default: Any) -> Any:
        """`fn()`, or `default` when the daemon is down or the call fails."""
        if not self.up:
            return default
        try:
            self._check_socket()
            return fn()
        except (TierdError, OSError, ValueError) as e:
            self._failed(what, e)
            return default

    def _check_socket(self) -> None:
        # A daemon that is not running has no socket: fail now rather than after a timeout
        # (a first call waits up to timeout_s for the channel to become ready).
        assert self._client is not None
        path = self._client.address.unix_path
        if path and not os.path.exists(path):
            raise Unavailable(f"no tierd socket at {path}", field="address")

    def namespace(self, salt: str | None) -> Namespace:
        ns = self._spaces.get(salt)
        if ns is None:
            assert self._client is not None
            model, extra = namespace_spec(self.settings, self.model, salt)
            ns = self._client.open_namespace(model, self.layout, extra_keys=extra)
            with self._lock:
                self._spaces[salt] = ns
        return ns

    def keys(self, salt: str | None, tokens: Sequence[int]) -> list[bytes]:
        """Keys of the full blocks of `tokens` (pure hashing once the namespace is open)."""
        return _keys.block_keys(self.namespace(salt).id, tokens, self.layout.block_tokens)

    def lookup_tiers(self, salt: str | None, tokens: Sequence[int]) -> list[str]:
        """The tier of each leading whole block of `tokens` tierd holds ([] when it cannot
        say)."""

        def ask() -> list[str]:
            assert self._client is not None
            hit = self._client.lookup(self.namespace(salt), tokens)
            n = hit.cached_tokens // self.layout.block_tokens
            return [b.tier for b in hit.blocks[:n]]

        return list(self.guarded("lookup", ask, []))

    def load(self, salt: str | None, keys: list[bytes],
             visit: Callable[[int, torch.Tensor], None]) -> list[bool]:  # fmt: skip
        """Feed each found block to `visit(i, block)`; raises on failure (caller reports)."""
        if not self.up:
            raise Unavailable("tierd is marked down", field="address")
        assert self._client is not None
        try:
            return read_blocks(self._client, self.namespace(salt), keys, visit)
        except (TierdError, OSError, ValueError) as e:
            self._failed("load", e)
            raise

    def save(self, salt: str | None, keys: list[bytes],
             fill: Callable[[int, torch.Tensor], None]) -> PendingPut | None:  # fmt: skip
        """Copy blocks into staging through `fill(i, slot)`; the commit is left to the
        caller (`PendingPut.commit`), so it can run off the critical path."""

        def run() -> PendingPut:
            assert self._client is not None
            return write_blocks(self._client, self.namespace(salt), keys, fill)

        return self.guarded("save", run, None)  # type: ignore[no-any-return]

    def commit(self, put: PendingPut) -> int:
        """Commit a put; returns the blocks stored (0 on failure, which is only a miss)."""
        return int(self.guarded("commit", put.commit, 0))

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


# -- zero-copy block access on the shared-memory path ---------------------------------------------


def _tensor(view: np.ndarray, layout: KVLayout) -> torch.Tensor:
    with warnings.catch_warnings():
        # The store mapping is read-only; the tensor over it is only ever read from.
        warnings.simplefilter("ignore", UserWarning)
        return as_tensor(view, layout)  # type: ignore[no-any-return]


def read_blocks(client: TierdClient, ns: Namespace, keys: list[bytes],
                visit: Callable[[int, torch.Tensor], None]) -> list[bool]:  # fmt: skip
    """Call `visit(i, block)` for every found key with the block as a tensor over the
    daemon's read-only segment (shared memory) while the get lease holds it; in-band, over
    a received copy. Returns found per key."""
    if not keys:
        return []
    if ns.transport != "shm":
        got = client.get(ns, keys, as_torch=True)
        for i, found in enumerate(got.found):
            if found:
                visit(i, got.blocks[i])
        return list(got.found)
    req = pb.PrepareGetRequest(namespace_id=ns.id, keys=keys)
    resp = client._unary("PrepareGet", req)
    try:
        if len(resp.slots) != len(keys):
            raise Internal(f"{len(resp.slots)} slots for {len(keys)} keys", field="slots")
        store = None
        for i, slot in enumerate(resp.slots):
            if slot.found:
                if store is None:
                    store = client._segment_map(resp, ns).store
                visit(i, _tensor(slot_view(store, slot.offset, ns.layout), ns.layout))
    except BaseException:
        if resp.lease_id:
            client._release_quietly(resp.lease_id)
        raise
    if resp.lease_id:
        # Not quiet: a lease that ended early no longer protected the slots we read.
        client._unary("Release", pb.ReleaseRequest(lease_id=resp.lease_id))
    return [s.found for s in resp.slots]


@dataclass
class PendingPut:
    """Blocks copied into staging (or held for an in-band put), not yet committed."""

    client: TierdClient
    ns: Namespace
    lease_id: int
    stored: int
    inband: tuple[list[bytes], torch.Tensor] | None = None

    def commit(self) -> int:
        if self.inband is not None:
            keys, blocks = self.inband
            return sum(o == "stored" for o in self.client.put(self.ns, keys, blocks))
        if self.lease_id:
            self.client._unary("CommitPut", pb.CommitPutRequest(lease_id=self.lease_id))
        return self.stored

    def abort(self) -> None:
        if self.lease_id:
            self.client._release_quietly(self.lease_id)


def write_blocks(client: TierdClient, ns: Namespace, keys: list[bytes],
                 fill: Callable[[int, torch.Tensor], None]) -> PendingPut:  # fmt: skip
    """Lease staging slots for `keys` and call `fill(i, slot)` for each block the daemon
    lacks, `slot` a writable tensor over the slot; the caller commits the result."""
    if ns.transport != "shm":
        blocks = torch.empty((len(keys), *ns.layout.block_shape), dtype=ns.layout.torch_dtype())
        for i in range(len(keys)):
            fill(i, blocks[i])
        return PendingPut(client, ns, 0, len(keys), (keys, blocks))
    dtype = dtype_to_proto(ns.layout.dtype)
    shape = pb.BlockShape(dims=list(ns.layout.block_shape), dtype=dtype)  # type: ignore[arg-type]
    req = pb.PreparePutRequest(namespace_id=ns.id, keys=keys, shape=shape)
    resp = client._unary("PreparePut", req)
    stored = 0
    try:
        if len(resp.slots) != len(keys):
            raise Internal(f"{len(resp.slots)} slots for {len(keys)} keys", field="slots")
        staging = None
        for i, slot in enumerate(resp.slots):
            if slot.state == pb.SLOT_STATE_ALREADY_PRESENT:
                continue
            if slot.state != pb.SLOT_STATE_LEASED or not resp.lease_id:
                raise Internal(f"slot {i}: state {slot.state}", field="slots")
            if staging is None:
                staging = client._segment_map(resp, ns).staging
            fill(i, as_tensor(slot_view(staging, slot.offset, ns.layout), ns.layout))
            stored += 1
    except BaseException:
        if resp.lease_id:
            client._release_quietly(resp.lease_id)
        raise
    return PendingPut(client, ns, resp.lease_id, stored)


# -- vLLM's paged KV ----------------------------------------------------------------------------


class PagedKV:
    """vLLM's per-layer KV tensors seen block by block in tierd's block layout."""

    def __init__(self, layers: list[torch.Tensor], joint: torch.Tensor | None) -> None:
        self.layers = layers  # each [num_blocks, kv_heads, 2, T, D]
        self.joint = joint  # [L, num_blocks, kv_heads, 2, T, D] when one strided allocation

    @classmethod
    def from_caches(cls, kv_caches: Mapping[str, torch.Tensor], layer_names: Sequence[str],
                    block_tokens: int) -> PagedKV:  # fmt: skip
        layers = []
        for name in layer_names:
            kv = kv_caches[name]
            if kv.device.type != "cpu" or kv.dim() != 4 or kv.shape[2] != block_tokens:
                raise ValueError(
                    f"tierd connector: layer {name} has a KV cache of shape {tuple(kv.shape)} "
                    f"on {kv.device}; only vLLM's CPU layout [blocks, kv_heads, "
                    f"{block_tokens}, 2*head_dim] is supported"
                )
            nb, heads, t, two_d = kv.shape
            # [T, 2D] per head is a shape carrier: the bytes are K[T, D] then V[T, D].
            layers.append(kv.view(nb, heads, 2 * t, two_d // 2).unflatten(2, (2, t)))
        return cls(layers, _joint_view(layers))

    def write_block(self, block_id: int, block: torch.Tensor) -> None:
        """tierd block [L, 2, H, T, D] -> vLLM block `block_id` of every layer."""
        if self.joint is not None:
            self.joint[:, block_id].copy_(block.transpose(1, 2))
            return
        for layer, kv in enumerate(self.layers):
            kv[block_id].copy_(block[layer].transpose(0, 1))

    def read_block(self, block_id: int, out: torch.Tensor) -> None:
        """vLLM block `block_id` of every layer -> tierd block `out` [L, 2, H, T, D]."""
        if self.joint is not None:
            out.copy_(self.joint[:, block_id].transpose(1, 2))
            return
        for layer, kv in enumerate(self.layers):
            out[layer].copy_(kv[block_id].transpose(0, 1))

    def read_layer(self, layer: int, block_id: int, out: torch.Tensor) -> None:
        """One layer of a vLLM block -> `out` [2, H, T, D] (a layer of a tierd block)."""
        out.copy_(self.layers[layer][block_id].transpose(0, 1))


def _joint_view(layers: list[torch.Tensor]) -> torch.Tensor | None:
    """All layers as one strided tensor when they are equally spaced in one allocation."""
    first = layers[0]
    if len(layers) < 2:
        return first.unsqueeze(0)
    base = first.untyped_storage().data_ptr()
    step = layers[1].data_ptr() - first.data_ptr()
    item = first.element_size()
    if step <= 0 or step % item:
        return None
    for i, kv in enumerate(layers):
        same = kv.untyped_storage().data_ptr() == base and kv.stride() == first.stride()
        if not same or kv.shape != first.shape or kv.data_ptr() - first.data_ptr() != i * step:
            return None
    return first.as_strided((len(layers), *first.shape), (step // item, *first.stride()))
