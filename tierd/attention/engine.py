"""AttentionEngine: one layer's decode attention for a sequence, computed where its KV is.

Primitives: `AttentionEngine(service)`, `attend(seq, layer, q, scale) -> (out, lse)`.

Each block is read from its fastest copy; a partial (out, lse) is computed per tier and
the partials merge exactly by log-sum-exp:
  memory tier     the blocks are read in place (no copy);
  computing tier  (CSD workers) each location reduces its own blocks, returns one partial;
  other tiers     only this layer's K|V range of each block is read (one contiguous range
                  per block thanks to the [layer][K|V][head][token][dim] layout), through
                  the transfer engine, in parallel, checked against that layer's
                  checksum, then reduced here; the bytes never leave the daemon. A copy
                  encoded by its tier's codec is read the same way (one layer's record)
                  and attended over on its codes (`tierd_kernels.codes_attention`): no
                  dequantized K|V is formed;
  tail            the open tail, causal over the query tokens just appended.
"""

from __future__ import annotations

import mmap
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NoReturn

import torch

from tierd.attention.sequences import Sequence
from tierd.core.catalog import plan_set_layer_sums
from tierd.core.index import BlockEntry
from tierd.errors import DataLoss, FailedPrecondition, Unavailable
from tierd.tiers.base import Copy, CopyLost, Location
from tierd.tiers.checksum import checksum, layer_checksums
from tierd.tiers.extents import align_up
from tierd.transfer.encoding import RAW, codec_of, layer_shape
from tierd.transfer.integrity import as_put, layer_intact, layer_sums_of

if TYPE_CHECKING:
    from tierd.core.service import CacheService

_ALIGN = 4096


# Layer bytes read per pipeline step: the reads of steps i+1 and i+2 are queued while step
# i is reduced, so the I/O threads always have the next step's reads waiting when one step's
# last reads finish (with only i+1 queued, the queue drained at every step's end: codes'
# small layer ranges lost about a fifth of the disk's rate to that). Large enough that a
# step's reads keep the device's queue busy, small enough that a long sequence has several
# steps to overlap.
PIPELINE_BYTES = 8 << 20
PIPELINE_DEPTH = 3  # steps with a buffer: one reduced, two being read


class _Scratch(threading.local):
    """Page-aligned buffers per thread for storage layer reads (one being reduced while the
    others are read into), grown on demand."""

    bufs: list[mmap.mmap | None]

    def __init__(self) -> None:
        self.bufs = [None] * PIPELINE_DEPTH

    def get(self, nbytes: int, slot: int = 0) -> mmap.mmap:
        buf = self.bufs[slot]
        if buf is None or len(buf) < nbytes:
            if buf is not None:
                buf.close()
            buf = self.bufs[slot] = mmap.mmap(-1, align_up(max(nbytes, 1), 2 << 20))
        return buf


def _settle(futures: list[Future[None]]) -> None:
    """Wait until every future is done, whatever its outcome (raised by the caller)."""
    for f in futures:
        try:
            f.result()
        except Exception:  # noqa: BLE001, S110 - judged by the caller, after all are done
            pass


class AttentionEngine:
    def __init__(self, service: CacheService) -> None:
        self.svc = service
        self._scratch = _Scratch()
        self._fanout = ThreadPoolExecutor(8, thread_name_prefix="tierd-attend")

    def close(self) -> None:
        self._fanout.shutdown(wait=True)

    def attend(
        self, seq: Sequence, layer: int, q: torch.Tensor, scale: float | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from tierd_kernels import attend_blocks, merge_partials

        tiers = self.svc.tiers
        top = tiers.top.name
        memory: list[tuple[BlockEntry, Copy]] = []
        stored: list[tuple[BlockEntry, Copy]] = []
        remote: dict[tuple[str, Location], list[BlockEntry]] = {}
        unchecked: list[BlockEntry] = []
        for entry in seq.blocks:
            copy = self.svc.directory.best(entry)
            if copy is None:
                raise FailedPrecondition(
                    "a block of this sequence is no longer cached; recompute it",
                    field="sequence_id",
                )
            tier = tiers.get(copy.tier)
            if copy.tier == top:
                if not copy.verified:
                    unchecked.append(entry)
                memory.append((entry, copy))
            elif tier is not None and tier.attends:
                remote.setdefault((copy.tier, copy.location), []).append(entry)
            else:
                stored.append((entry, copy))
        if unchecked:
            # A read elsewhere found these damaged while this sequence held them (they were
            # only marked): checked now, and a damaged copy is dropped, never attended over.
            self.svc.placer.make_resident(unchecked, promote=False)
            return self.attend(seq, layer, q, scale)
        pending: list[Future[tuple[torch.Tensor, torch.Tensor]]] = [
            self._fanout.submit(self._remote_partial, name, where, entries, layer, q, scale)
            for (name, where), entries in remote.items()
        ]
        partials: list[tuple[torch.Tensor, torch.Tensor]] = []
        if memory:
            partials.append(attend_blocks(self._memory_blocks(memory), layer, q, scale=scale))
        if stored:
            partials.extend(self._stored_partials(stored, layer, q, scale))
        tail, n = seq.tail_block(layer)
        if n:
            # The query tokens are the tail's last ones: causal within the tail.
            partials.append(attend_blocks([tail], 0, q, scale=scale, valid_tokens=n,
                                          causal_offset=n - q.shape[0]))  # fmt: skip
        partials.extend(f.result() for f in pending)
        served: dict[str, int] = {}
        for _, copy in memory + stored:
            served[copy.tier] = served.get(copy.tier, 0) + 1
        for (name, _), entries in remote.items():
            served[name] = served.get(name, 0) + len(entries)
        self._count(seq.ns.layout.block_bytes // seq.ns.layout.num_layers, served)
        if not partials:
            raise FailedPrecondition("the sequence holds no tokens yet", field="sequence_id")
        return merge_partials(partials)

    def _count(self, span: int, served: dict[str, int]) -> None:
        """Attend reads count as hits of the tier that served them (one layer's bytes)."""
        with self.svc.cond:
            for tier, n in served.items():
                counters = self.svc.counters.tier(tier)
                counters.hits += n
                counters.bytes_read += n * span

    # -- per tier ---------------------------------------------------------------------

    def _memory_blocks(self, blocks: list[tuple[BlockEntry, Copy]]) -> list[torch.Tensor]:
        lay = blocks[0][0].ns.layout
        dtype = lay.torch_dtype()
        top = self.svc.tiers.top
        return [
            torch.frombuffer(top.view(e.ns.tenant, int(c.location), e.nbytes), dtype=dtype).view(
                lay.block_shape
            )
            for e, c in blocks
        ]

    def _stored_partials(
        self, blocks: list[tuple[BlockEntry, Copy]], layer: int, q: torch.Tensor,
        scale: float | None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """Partials over blocks in storage tiers, one run per encoding."""
        runs: dict[str, list[tuple[BlockEntry, Copy]]] = {}
        for entry, copy in blocks:
            runs.setdefault(copy.encoding, []).append((entry, copy))
        partials = []
        for encoding, run in runs.items():
            partials.extend(self._stored_run(run, encoding, layer, q, scale))
        return partials

    def _stored_run(
        self, blocks: list[tuple[BlockEntry, Copy]], encoding: str, layer: int,
        q: torch.Tensor, scale: float | None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
        """Partials over blocks of one encoding, a pipeline step at a time: the layer
        ranges of steps i+1 and i+2 are read (I/O threads) while step i is reduced (the
        kernel gives the GIL up), each step into its own of three scratch buffers."""
        from tierd_kernels import attend_blocks
        from tierd_kernels.codes_attention import attend_codes

        lay = blocks[0][0].ns.layout
        per_step = max(1, PIPELINE_BYTES // (blocks[0][1].length // lay.num_layers))
        steps = [blocks[i : i + per_step] for i in range(0, len(blocks), per_step)]
        partials = []
        inflight: deque[tuple[list[Future[None]], list[memoryview]]] = deque()
        try:
            for i in range(min(PIPELINE_DEPTH - 1, len(steps))):
                inflight.append(self._start_layer_reads(steps[i], layer, i))
            for i, step in enumerate(steps):
                futures, views = inflight.popleft()
                _settle(futures)
                for (entry, copy), f in zip(step, futures):
                    # A failed read raises here, once none is in flight; a copy its tier
                    # lost (gone, or rewritten as other bytes or another encoding) or could
                    # not read (an I/O error of local storage) is dropped like a damaged
                    # one, as a whole read's failure is, or every later attend would hit it.
                    if isinstance(f.exception(), (OSError, CopyLost)):
                        self._corrupt(entry, copy)
                    f.result()
                ahead = i + PIPELINE_DEPTH - 1
                if ahead < len(steps):  # into the buffer step i - 1 was reduced from
                    inflight.append(self._start_layer_reads(steps[ahead], layer,
                                                            ahead % PIPELINE_DEPTH))  # fmt: skip
                tensors = self._checked_layer(step, layer, views, encoding)
                if encoding == RAW:
                    partials.append(attend_blocks(tensors, 0, q, scale=scale))
                else:
                    partials.append(attend_codes(tensors, codec_of(encoding), layer_shape(lay),
                                                 q, scale=scale))  # fmt: skip
        finally:
            for futures, _ in inflight:  # never leave a read writing into a buffer reused later
                _settle(futures)
        return partials

    def _start_layer_reads(
        self, blocks: list[tuple[BlockEntry, Copy]], layer: int, slot: int
    ) -> tuple[list[Future[None]], list[memoryview]]:
        lay = blocks[0][0].ns.layout
        # One layer's bytes of each copy: its K|V range, or its codec's record of the layer
        # (records are of one size, so a copy splits into equal layer spans either way).
        reads = [(e, c, layer * (span := c.length // lay.num_layers), span) for e, c in blocks]
        engine = self.svc.transfer
        scratch = self._scratch.get(engine.scratch_bytes(reads), slot)
        return engine.start_ranges(reads, memoryview(scratch))

    def _checked_layer(
        self, blocks: list[tuple[BlockEntry, Copy]], layer: int, views: list[memoryview],
        encoding: str = RAW,
    ) -> list[torch.Tensor]:  # fmt: skip
        """The layer ranges read for `blocks` as tensors [1, 2, heads, T, dim] (raw), or
        as the layer's records (uint8, encoded copies).

        Every range is checked against the copy's checksum for that layer before the
        kernel sees it. A block without per-layer checksums (catalog rows of an older
        release) is read whole once, checked against its copy's checksum, and given them.
        """
        lay = blocks[0][0].ns.layout
        for (e, c), got in zip(blocks, views):
            if layer_sums_of(e, c) is None:
                self._verify_whole(e, c)
            if not layer_intact(e, c, layer, got):
                self._corrupt(e, c)
        if encoding != RAW:
            return [torch.frombuffer(v, dtype=torch.uint8) for v in views]
        dtype = lay.torch_dtype()
        shape = (1, 2, lay.num_kv_heads, lay.block_tokens, lay.head_dim)
        return [torch.frombuffer(v, dtype=dtype).view(shape) for v in views]

    def _verify_whole(self, entry: BlockEntry, copy: Copy) -> None:
        """Read a copy whole, check it, and record its per-layer checksums."""
        buf = mmap.mmap(-1, align_up(copy.length, _ALIGN))
        with memoryview(buf) as whole:
            data = whole[: copy.length]
            (view,) = self.svc.transfer.read_ranges([(entry, copy, 0, copy.length)], data)
            intact = checksum(view) == copy.checksum
            sums = layer_checksums(view, entry.ns.layout.num_layers)
            view.release()
            data.release()
        buf.close()
        if not intact:
            self._corrupt(entry, copy)
        with self.svc.cond:
            if not as_put(entry, copy):  # the copy's own sums, on record with its row
                if entry.copies.get(copy.tier) is copy and copy.layer_sums is None:
                    copy.layer_sums = sums
                    self.svc.directory.record_copies(entry)
                return
            if entry.copies.get(copy.tier) is copy and entry.layer_sums is None:
                entry.layer_sums = sums
                self.svc.directory.log.add(
                    plan_set_layer_sums([(entry.ns.id, entry.key, entry.checksum, sums)])
                )

    def _corrupt(self, entry: BlockEntry, copy: Copy | None, tier: str = "") -> NoReturn:
        if copy is not None:
            self.svc.drop_corrupt_copy(entry, copy.tier, copy.location)
        raise DataLoss(
            f"block {entry.key.hex()} is missing or failed its checksum in the "
            f"{copy.tier if copy is not None else tier} tier and was dropped; recompute it",
            field="sequence_id",
        )

    def _remote_partial(
        self,
        name: str,
        where: Location,
        entries: list[BlockEntry],
        layer: int,
        q: torch.Tensor,
        scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        tier = self.svc.tiers.get(name)
        result = tier.partial_attend(where, entries, layer, q, scale) if tier else None
        if result is None:
            raise Unavailable(f"the {name} tier cannot attend", field="sequence_id")
        out, lse, missing = result
        if missing:
            # The location dropped what failed its checksum; forget those copies here too.
            by_key = {e.key: e for e in entries}
            for key in missing:
                if key in by_key:
                    self.svc.drop_corrupt_copy(by_key[key], name, where)
            self._corrupt(by_key.get(missing[0], entries[0]), None, f"{name} ({where})")
        return out, lse
