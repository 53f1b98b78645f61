"""tierd as a KV store of vLLM (V1 connector API, checked against vLLM 0.32.0).

    python -m vllm.entrypoints.openai.api_server --model MODEL \
        --kv-transfer-config '{"kv_connector": "TierdConnector",
        "kv_connector_module_path": "tierd_client.vllm_connector", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"address": "unix:/run/tierd/tierd.sock"}}'

Extra config keys (`tierd_client.vllm_store.ConnectorSettings`): `address`, `tenant`,
`token`, `namespace_prefix`, `model`, `timeout_s`, `retry_after_s`, `save` ("end" or
"layer"), `transport`.

Scheduler side. When a request arrives (`on_new_request`) its prompt is looked up in a
background thread; `get_num_new_matched_tokens` answers None (vLLM asks again next step)
until the lookup is back, then the whole blocks tierd holds beyond vLLM's own prefix-cache
hit, to be loaded asynchronously. Blocks are vLLM's blocks: tierd's `block_tokens` is set
to vLLM's block size. Each step's metadata names the blocks to load (keys and vLLM block
ids) and the blocks that become full in this step and tierd lacks, to save.

Worker side. Loads run on a thread: the daemon leases the blocks in its shared memory and
each block is copied once, from the mapped slot straight into vLLM's KV tensors (all
layers in one strided copy). A request is reported finished receiving when its load is
done; blocks that were not found or whose read failed are reported through
`get_block_ids_with_load_errors`, so vLLM recomputes from the first of them (the connector
sets `kv_load_failure_policy` to "recompute" unless told otherwise: a miss of a cache
must not fail a request). Saves copy each new full block out of vLLM's KV into a leased
staging slot after the forward (`save="end"`, default; or layer by layer as each layer's
attention finishes, `save="layer"`); the commit RPC runs on a thread, off the step.

If tierd is unreachable the connector reports no hits and saves nothing for
`retry_after_s`, then tries again; vLLM serves on by computing.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.metrics.cache_hit_source import CacheHitSource

from .errors import TierdError
from .layout import KVLayout
from .vllm_store import TORCH_DTYPES, ConnectorSettings, PagedKV, PendingPut, TierdLink

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("tierd_client.vllm")

F = TypeVar("F", bound=Callable[..., Any])
LOOKUP_WAIT_S = 0.02  # how long a scheduler step waits for a lookup before asking later
_TIER_SOURCE = {"host": CacheHitSource.HOST, "nvme": CacheHitSource.DISK}


@dataclass
class BlockMove:
    """Blocks of one request to move, tierd keys beside vLLM block ids."""

    req_id: str
    salt: str | None
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class TierdMeta(KVConnectorMetadata):
    loads: list[BlockMove] = field(default_factory=list)
    saves: list[BlockMove] = field(default_factory=list)


@dataclass
class _Tracked:
    """The scheduler's view of one request."""

    request: Request
    lookup: Future[list[str]] | None = None
    hit_tiers: list[str] = field(default_factory=list)  # tier of each block tierd holds
    local: int = 0  # vLLM's own hit when the load was planned (tokens)
    saved: int = 0  # leading blocks known to be in tierd
    load: BlockMove | None = None  # planned, not yet in a step's metadata
    load_ids: set[int] = field(default_factory=set)  # vLLM blocks of the last load
    failed: bool = False  # a load of it failed: recompute, never load it again


def _timed(fn: F) -> F:
    """Adds the hook's time to the connector's `hook_ns` counter (what it costs a step)."""

    @functools.wraps(fn)
    def wrapper(self: TierdConnector, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter_ns()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.counters["hook_ns"] += time.perf_counter_ns() - t0

    return wrapper  # type: ignore[return-value]


def _served_model(vllm_config: VllmConfig) -> str:
    name = vllm_config.model_config.served_model_name or vllm_config.model_config.model
    return str(name[0] if isinstance(name, (list, tuple)) else name)


def _layout(kv_cache_config: KVCacheConfig) -> tuple[KVLayout, list[str]]:
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"tierd connector: one KV cache group is supported, got {len(groups)}")
    spec = groups[0].kv_cache_spec
    dtype = TORCH_DTYPES.get(spec.dtype)
    if dtype is None or getattr(spec, "head_size_v", spec.head_size) != spec.head_size:
        raise ValueError(f"tierd connector: unsupported KV cache spec {spec}")
    names = list(groups[0].layer_names)
    return KVLayout(len(names), spec.num_kv_heads, spec.head_size, dtype, spec.block_size), names


class TierdConnector(KVConnectorBase_V1):
    """A `KVConnectorBase_V1` that keeps vLLM's KV blocks in a tierd daemon."""

    _cache_hit_source = CacheHitSource.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig) -> None:  # fmt: skip
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        if vllm_config.parallel_config.tensor_parallel_size != 1:
            raise ValueError("tierd connector: tensor parallelism is not supported yet")
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self.settings = ConnectorSettings.from_extra(extra)
        self.layout, self._layer_names = _layout(kv_cache_config)
        self._block = self.layout.block_tokens
        self._link = TierdLink(self.settings, self.layout, _served_model(vllm_config))
        if self._kv_transfer_config.kv_load_failure_policy == "fail":
            # A block tierd lost is a cache miss, never a failed request.
            self._kv_transfer_config.kv_load_failure_policy = "recompute"
        self._lock = threading.Lock()
        self.counters: dict[str, int] = dict.fromkeys(
            ("lookups", "hit_blocks", "loaded_blocks", "load_failed_blocks", "saved_blocks",
             "save_skipped_blocks", "hook_ns"), 0)  # fmt: skip
        # scheduler
        self._reqs: dict[str, _Tracked] = {}
        # worker
        self._paged: PagedKV | None = None
        self._layer_index = {name: i for i, name in enumerate(self._layer_names)}
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="tierd-kv")
        self._loads_done: list[tuple[str, list[int]]] = []  # (request, blocks that failed)
        self._bad_blocks: set[int] = set()  # of loads already reported finished
        self._step_puts: list[tuple[PendingPut, list[tuple[int, torch.Tensor]]]] | None = None
        log.info("tierd connector (%s): %s, block %d tokens, save=%s", role.name,
                 self.settings.address or "no address", self._block, self.settings.save)  # fmt: skip

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    # ---- scheduler side -------------------------------------------------------------------

    def on_new_request(self, request: Request) -> None:
        tracked = self._reqs[request.request_id] = _Tracked(request)
        self._start_lookup(tracked)

    def _start_lookup(self, t: _Tracked) -> None:
        request = t.request
        prompt = request.prompt_token_ids
        if not self._link.up or not prompt or len(prompt) < self._block or request.mm_features:
            # Down, shorter than a block, or multimodal (placeholder ids do not identify
            # their inputs, so such prompts are never cached).
            return
        t.lookup = self._threads.submit(self._link.lookup_tiers, request.cache_salt, list(prompt))

    @_timed
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:  # fmt: skip
        t = self._reqs.get(request.request_id)
        if t is None:
            t = self._reqs[request.request_id] = _Tracked(request)
        if t.failed:
            return 0, False
        if t.lookup is None:
            self._start_lookup(t)
            if t.lookup is None:
                return 0, False
        try:
            tiers = t.lookup.result(timeout=LOOKUP_WAIT_S)
        except FutureTimeout:
            return None, False  # asked again next step
        except Exception as e:  # noqa: BLE001 - a cache must never take the scheduler down
            log.warning("tierd connector: lookup for %s failed: %r", request.request_id, e)
            tiers = []
        t.hit_tiers = tiers
        t.saved = max(t.saved, len(tiers))
        self._count("lookups")
        need = len(tiers) * self._block - num_computed_tokens
        if need <= 0:
            return 0, False
        t.local = num_computed_tokens
        return need, True

    def get_external_cache_hit_sources(self, request: Request,
                                       num_external_tokens: int) -> dict[CacheHitSource, int]:  # fmt: skip
        t = self._reqs.get(request.request_id)
        if not num_external_tokens or t is None:
            return {}
        first = t.local // self._block
        tiers = t.hit_tiers[first : first + num_external_tokens // self._block]
        out: dict[CacheHitSource, int] = {}
        for tier in tiers:
            source = _TIER_SOURCE.get(tier, CacheHitSource.EXTERNAL_UNSPECIFIED)
            out[source] = out.get(source, 0) + self._block
        return out if sum(out.values()) == num_external_tokens else {}

    @_timed
    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:  # fmt: skip
        t = self._reqs.get(request.request_id)
        if t is None or num_external_tokens <= 0:
            return
        first = t.local // self._block
        end = first + num_external_tokens // self._block
        keys = self._keys(t, end)
        ids = list(blocks.get_block_ids()[0][first:end])
        # Without keys (tierd went away) the load has nothing to read: every block fails.
        keys = keys[first:end] if keys is not None else []
        self._count("hit_blocks", end - first)
        t.load = BlockMove(request.request_id, request.cache_salt, keys, ids)
        t.load_ids = set(ids)

    def _keys(self, t: _Tracked, n_blocks: int) -> list[bytes] | None:
        tokens = t.request.all_token_ids[: n_blocks * self._block]
        return self._link.guarded("keys", lambda: self._link.keys(t.request.cache_salt, tokens),
                                  None)  # fmt: skip

    @_timed
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = TierdMeta()
        for t in self._reqs.values():
            if t.load is not None:
                meta.loads.append(t.load)
                t.load = None
        scheduled = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            self._plan_save(new.req_id, new.num_computed_tokens + scheduled[new.req_id], meta)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            self._plan_save(req_id, cached.num_computed_tokens[i] + scheduled[req_id], meta)
        return meta

    def _plan_save(self, req_id: str, computed: int, meta: TierdMeta) -> None:
        t = self._reqs.get(req_id)
        if t is None or t.request.mm_features:
            return
        full = min(computed, len(t.request.all_token_ids)) // self._block
        if full <= t.saved or not self._link.up or self._kv_cache_manager is None:
            return
        ids = self._kv_cache_manager.get_block_ids(req_id)[0]
        full = min(full, len(ids))
        keys = self._keys(t, full)
        if keys is None or full <= t.saved:
            return
        meta.saves.append(BlockMove(req_id, t.request.cache_salt, keys[t.saved : full],
                                    list(ids[t.saved : full])))  # fmt: skip
        t.saved = full

    @_timed
    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        # A failed load sends the request back to be scheduled afresh, which asks for its
        # hits again: the same answer would load the same failing blocks forever.
        bad = connector_output.invalid_block_ids
        if not bad:
            return
        for req_id in connector_output.finished_recving or ():
            t = self._reqs.get(req_id)
            if t is not None and t.load_ids & bad:
                t.failed = True
                t.saved = 0  # what it recomputes is stored again (present blocks cost nothing)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:  # fmt: skip
        self._reqs.pop(request.request_id, None)
        return False, None

    # ---- worker side: loads ----------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._paged = PagedKV.from_caches(kv_caches, self._layer_names, self._block)

    @_timed
    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, TierdMeta):
            return
        for move in meta.loads:
            self._threads.submit(self._load, move)

    def _load(self, move: BlockMove) -> None:
        paged = self._paged
        done = 0  # leading blocks written completely
        try:
            if paged is not None and move.keys:

                def visit(i: int, block: torch.Tensor) -> None:
                    nonlocal done
                    paged.write_block(move.block_ids[i], block)
                    if i == done:
                        done += 1

                self._link.load(move.salt, move.keys, visit)
        except (TierdError, OSError, ValueError, RuntimeError) as e:
            log.warning("tierd connector: load for %s failed: %s", move.req_id, e)
            done = 0  # a lease that ended early did not protect what was read
        except BaseException:
            done = 0
            raise
        finally:
            with self._lock:
                self._loads_done.append((move.req_id, move.block_ids[done:]))
                self.counters["loaded_blocks"] += done
                self.counters["load_failed_blocks"] += len(move.block_ids) - done

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads are asynchronous: vLLM schedules a request once its load is reported

    @_timed
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        with self._lock:
            done, self._loads_done = self._loads_done, []
            # A request's failed blocks go out in the same step as its "finished" (vLLM
            # reads the errors right after this), so the scheduler sees both together.
            for _req, bad in done:
                self._bad_blocks.update(bad)
        loaded = {req for req, _bad in done}
        return None, (loaded or None)

    @_timed
    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._lock:
            bad, self._bad_blocks = self._bad_blocks, set()
        return bad

    # ---- worker side: saves ----------------------------------------------------------------

    @_timed
    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:  # fmt: skip
        if self.settings.save != "layer":
            return
        if self._step_puts is None:
            self._step_puts = self._lease_saves()
        layer = self._layer_index.get(layer_name)
        if layer is None or self._paged is None:
            return
        for _put, slots in self._step_puts:
            for block_id, slot in slots:
                self._paged.read_layer(layer, block_id, slot[layer])

    def _lease_saves(self) -> list[tuple[PendingPut, list[tuple[int, torch.Tensor]]]]:
        meta = self._connector_metadata
        out: list[tuple[PendingPut, list[tuple[int, torch.Tensor]]]] = []
        if not isinstance(meta, TierdMeta) or self._paged is None:
            return out
        for move in meta.saves:
            slots: list[tuple[int, torch.Tensor]] = []

            def keep(i: int, slot: torch.Tensor, move: BlockMove = move,
                     slots: list[tuple[int, torch.Tensor]] = slots) -> None:  # fmt: skip
                slots.append((move.block_ids[i], slot))

            put = self._link.save(move.salt, move.keys, keep)
            if put is None:
                self._count("save_skipped_blocks", len(move.keys))
            else:
                out.append((put, slots))
        return out

    @_timed
    def wait_for_save(self) -> None:
        meta = self._connector_metadata
        if not isinstance(meta, TierdMeta) or self._paged is None:
            return
        puts = self._step_puts
        self._step_puts = None
        if puts is None:
            if self.settings.save == "layer" or not meta.saves:
                return
            paged = self._paged
            puts = []
            for move in meta.saves:

                def fill(i: int, slot: torch.Tensor, move: BlockMove = move) -> None:
                    paged.read_block(move.block_ids[i], slot)

                put = self._link.save(move.salt, move.keys, fill)
                if put is None:
                    self._count("save_skipped_blocks", len(move.keys))
                else:
                    puts.append((put, []))
        for put, _slots in puts:
            # vLLM's blocks are already copied out: the commit needs nothing of this step.
            self._threads.submit(self._commit, put)

    def _commit(self, put: PendingPut) -> None:
        self._count("saved_blocks", self._link.commit(put))

    def shutdown(self) -> None:
        self._threads.shutdown(wait=True)
        log.info("tierd connector (%s) counters: %s", self.role.name, self.counters)
        self._link.close()
