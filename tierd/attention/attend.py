"""AttendService: sequences and the Attend call, on top of the core's blocks.

Primitives: `open_sequence(ns_id, keys, ttl_ms) -> (id, cached_tokens)`,
`close_sequence(id)`, `attend(calls) -> [(out, lse)]`, `reap(now)`, `close()`.

A sequence holds a reader reference on each of its blocks, so nothing it attends over is
moved or evicted while it lives; closing it (or its idle timeout) lets go. After each
call the tail is sealed into keyed blocks once every layer has a full block, so a later
request with the same prefix finds them by lookup.
"""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from tierd.attention.engine import AttentionEngine
from tierd.attention.sequences import Sequence, SequenceTable
from tierd.core import limits, validate
from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.errors import FailedPrecondition, InvalidArgument, NotFound
from tierd_client.keys import next_block_key
from tierd_client.shapes import check_query_shape

if TYPE_CHECKING:
    from tierd.core.service import CacheService


@dataclass(frozen=True)
class AttendCall:
    sequence_id: int
    layer: int
    q: torch.Tensor  # [q_tokens, heads, dim]
    k_new: torch.Tensor | None = None  # [kv_heads, n, dim]
    v_new: torch.Tensor | None = None
    new_tokens: tuple[int, ...] = ()
    scale: float | None = None


class AttendService:
    def __init__(self, service: CacheService) -> None:
        self.svc = service
        self.sequences = SequenceTable()
        self.engine = AttentionEngine(service)

    def close(self) -> None:
        for seq in self.sequences.expired(now=math.inf):
            self._release(seq)
        self.engine.close()

    # -- sequences --------------------------------------------------------------------

    def open_sequence(self, ns_id: bytes, keys: Seq[bytes], ttl_ms: int = 0) -> tuple[int, int]:
        svc = self.svc
        ns = svc.namespace(ns_id)
        validate.check_keys(keys, svc.config.leases.max_keys_per_call)
        leases = svc.config.leases
        if ttl_ms > leases.max_ttl_ms:
            raise InvalidArgument(f"at most {leases.max_ttl_ms} ms", field="ttl_ms")
        ttl = (ttl_ms or leases.sequence_idle_ms) / 1000.0
        self._check_new_sequence(ns)
        held: list[BlockEntry] = []
        with svc.cond:
            for i, key in enumerate(keys):
                entry = svc.index.get(ns.id, key)
                if entry is None:
                    for e in held:
                        svc.drop_reader(e)
                    raise FailedPrecondition("block is not cached", field=f"keys[{i}]")
                entry.readers += 1
                held.append(entry)
        # Host copies adopted after a restart are checked once before anyone attends.
        svc.placer.make_resident(held, promote=False)
        lost = [i for i, e in enumerate(held) if e.deleted]
        if lost:
            with svc.cond:
                for e in held:
                    svc.drop_reader(e)
            raise FailedPrecondition("block is no longer cached (deleted, or failed its "
                                     "checksum)", field=f"keys[{lost[0]}]")
        seq = Sequence(self.sequences.next_id(), ns, held, keys[-1] if keys else b"", ttl)
        self.sequences.add(seq)
        return seq.id, seq.block_tokens_cached

    def _check_new_sequence(self, ns: NamespaceInfo) -> None:
        """Sequences per tenant, and the tail a new one allocates (one block, every layer);
        the layout again, for namespaces the catalog kept from before a limit changed."""
        lim = self.svc.config.limits
        limits.check_layout(self.svc.config, ns.layout, self.svc.top.capacity)
        mine = self.sequences.of_tenant(ns.tenant)
        limits.check_sequences(lim, len(mine))
        limits.check_tail_bytes(lim, sum(s.tail_bytes for s in mine), ns.block_bytes)

    def _tail_held(self, tenant: str) -> int:
        return sum(s.tail_bytes for s in self.sequences.of_tenant(tenant))

    def sequence_tenant(self, seq_id: int) -> str | None:
        seq = self.sequences.get(seq_id)
        return seq.ns.tenant if seq is not None else None

    def close_sequence(self, seq_id: int) -> None:
        seq = self.sequences.pop(seq_id)
        if seq is None:
            raise NotFound("no such sequence (closed or expired)", field="sequence_id")
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        with seq.lock, self.svc.cond:
            for entry in seq.blocks:
                self.svc.drop_reader(entry)
            seq.blocks.clear()

    def reap(self, now: float) -> None:
        for seq in self.sequences.expired(now):
            self._release(seq)

    # -- attend -----------------------------------------------------------------------

    def attend(self, calls: Seq[AttendCall]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        results = []
        for i, call in enumerate(calls):
            seq = self.sequences.get(call.sequence_id)
            if seq is None:
                raise NotFound("no such sequence (closed or expired)",
                               field=f"items[{i}].sequence_id")
            self.svc.namespace(seq.ns.id)  # refused once its adapter (if any) is gone
            with seq.lock:
                seq.touch()
                self._check(seq, call, i)
                if call.k_new is not None and call.v_new is not None:
                    n = call.k_new.shape[1] if call.k_new.dim() == 3 else 0
                    lim, held = self.svc.config.limits, partial(self._tail_held, seq.ns.tenant)
                    limits.check_tail(lim, seq, call.layer, n, held)
                    cap = limits.tail_capacity(lim, seq.ns.layout.block_tokens)
                    seq.append(call.layer, call.k_new, call.v_new, list(call.new_tokens), cap)
                q_tokens = call.q.shape[0]
                if q_tokens > 1 and q_tokens > seq.tail_len(call.layer):
                    raise InvalidArgument(
                        "a multi-token query must be the tokens appended with it",
                        field=f"items[{i}].q",
                    )
                results.append(self.engine.attend(seq, call.layer, call.q.float(), call.scale))
                if seq.sealable():
                    self._seal(seq)
        return results

    def _check(self, seq: Sequence, call: AttendCall, i: int) -> None:
        lay = seq.ns.layout
        if not 0 <= call.layer < lay.num_layers:
            raise InvalidArgument(f"must be in [0, {lay.num_layers})", field=f"items[{i}].layer")
        q = call.q
        check_query_shape(lay, q.shape, f"items[{i}].q")
        new = call.k_new.shape[1] if call.k_new is not None and call.k_new.dim() == 3 else 0
        limits.check_attend_item(self.svc.config.limits, q.shape[0], new, i)
        if (call.k_new is None) != (call.v_new is None):
            raise InvalidArgument("k_new and v_new come together", field=f"items[{i}].v_new")

    def _seal(self, seq: Sequence) -> None:
        """Turn full tail blocks into cached blocks; on a full host tier, keep the tail."""
        svc = self.svc
        while seq.sealable():
            tokens, block = seq.peek_block()
            key = next_block_key(seq.ns.id, seq.parent_key or None, tokens)
            data = memoryview(block.view(torch.uint8).numpy()).cast("B")
            entry = svc.store_block(seq.ns, key, data)
            if entry is None:
                return
            seq.drop_block()
            seq.blocks.append(entry)
            seq.parent_key = key

