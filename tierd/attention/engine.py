"""AttentionEngine: one layer's decode attention for a sequence, computed where its KV is.

Primitives: `AttentionEngine(service)`, `attend(seq, layer, q, scale) -> (out, lse)`.

Each tier computes a partial (out, lse) over the blocks it holds, and the partials merge
exactly by log-sum-exp:
  host  the blocks are read in place from the shared-memory arena (no copy);
  nvme  only this layer's K|V range of each block is read (one contiguous range per block
        thanks to the [layer][K|V][head][token][dim] layout), in parallel, then reduced
        here; the bytes never leave the daemon;
  csd   each worker reduces its own blocks and returns one partial;
  tail  the open tail, causal over the query tokens just appended.
"""

from __future__ import annotations

import mmap
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, NoReturn

import torch

from tierd.attention.sequences import Sequence
from tierd.core.index import BlockEntry
from tierd.errors import DataLoss, FailedPrecondition, Unavailable
from tierd.tiers.checksum import checksum, layer_checksums
from tierd.tiers.extents import align_up

if TYPE_CHECKING:
    from tierd.core.service import CacheService

_ALIGN = 4096


class _Scratch(threading.local):
    """A page-aligned buffer per thread for NVMe layer reads, grown on demand."""

    buf: mmap.mmap | None = None

    def get(self, nbytes: int) -> mmap.mmap:
        if self.buf is None or len(self.buf) < nbytes:
            if self.buf is not None:
                self.buf.close()
            self.buf = mmap.mmap(-1, align_up(max(nbytes, 1), 2 << 20))
        return self.buf


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

        host: list[BlockEntry] = []
        nvme: list[BlockEntry] = []
        csd: dict[str, list[BlockEntry]] = {}
        for entry in seq.blocks:
            if entry.host_off is not None:
                host.append(entry)
            elif entry.nvme_off is not None:
                nvme.append(entry)
            elif entry.csd is not None:
                csd.setdefault(entry.csd, []).append(entry)
            else:
                raise FailedPrecondition(
                    "a block of this sequence is no longer cached; recompute it", field="sequence_id"
                )
        remote: list[Future[tuple[torch.Tensor, torch.Tensor]]] = [
            self._fanout.submit(self._csd_partial, name, entries, layer, q, scale)
            for name, entries in csd.items()
        ]
        partials: list[tuple[torch.Tensor, torch.Tensor]] = []
        if host:
            partials.append(attend_blocks(self._host_blocks(host), layer, q, scale=scale))
        if nvme:
            partials.append(attend_blocks(self._nvme_layer_blocks(nvme, layer), 0, q, scale=scale))
        tail, n = seq.tail_block(layer)
        if n:
            # The query tokens are the tail's last ones: causal within the tail.
            partials.append(attend_blocks([tail], 0, q, scale=scale, valid_tokens=n,
                                          causal_offset=n - q.shape[0]))  # fmt: skip
        partials.extend(f.result() for f in remote)
        self._count(seq.ns.layout.block_bytes // seq.ns.layout.num_layers,
                    host=len(host), nvme=len(nvme),
                    csd=sum(len(v) for v in csd.values()))  # fmt: skip
        if not partials:
            raise FailedPrecondition("the sequence holds no tokens yet", field="sequence_id")
        return merge_partials(partials)

    def _count(self, span: int, **blocks: int) -> None:
        """Attend reads count as hits of the tier that served them (one layer's bytes)."""
        with self.svc.cond:
            for tier, n in blocks.items():
                if n and tier in ("host", "nvme"):
                    counters = self.svc.counters.tier(tier)
                    counters.hits += n
                    counters.bytes_read += n * span

    # -- per tier ---------------------------------------------------------------------

    def _host_blocks(self, entries: list[BlockEntry]) -> list[torch.Tensor]:
        lay = entries[0].ns.layout
        dtype = lay.torch_dtype()
        host = self.svc.host
        return [
            torch.frombuffer(host.view(e.ns.tenant, e.host_off or 0, e.nbytes), dtype=dtype)
            .view(lay.block_shape)
            for e in entries
        ]

    def _nvme_layer_blocks(self, entries: list[BlockEntry], layer: int) -> list[torch.Tensor]:
        """Read this layer's K|V of each block into scratch: [1, 2, heads, T, dim] each.

        Every range is checked against the block's checksum for that layer before the
        kernel sees it. A block without per-layer checksums (catalog rows of an older
        release) is read whole once, checked against its block checksum, and given them.
        """
        lay = entries[0].ns.layout
        span = lay.block_bytes // lay.num_layers
        plans = []
        total = 0
        for e in entries:
            start = (e.nvme_off or 0) + layer * span
            lo = start // _ALIGN * _ALIGN
            hi = align_up(start + span, _ALIGN)
            plans.append((e, e.nvme_off, lo, hi, start - lo, total))
            total += hi - lo
        scratch = self._scratch.get(total)
        view = memoryview(scratch)
        nvme = self.svc.nvme
        reads = [nvme.read_async(lo, view[at : at + hi - lo]) for _, _, lo, hi, _, at in plans]
        for f in reads:
            f.result()
        for e, offset, _, _, skip, at in plans:
            got = view[at + skip : at + skip + span]
            sums = e.layer_sums or self._verify_whole(e, offset)
            if checksum(got) != sums[layer]:
                self._corrupt(e, "nvme", offset)
        dtype = lay.torch_dtype()
        shape = (1, 2, lay.num_kv_heads, lay.block_tokens, lay.head_dim)
        return [
            torch.frombuffer(view[at + skip : at + skip + span], dtype=dtype).view(shape)
            for _, _, _, _, skip, at in plans
        ]

    def _verify_whole(self, entry: BlockEntry, offset: int | None) -> tuple[int, ...]:
        """Read a block whole, check it, and record its per-layer checksums."""
        buf = mmap.mmap(-1, align_up(entry.nbytes, _ALIGN))
        with memoryview(buf) as whole:
            data = whole[: entry.nbytes]
            self.svc.nvme.read_into(offset or 0, data)
            intact = checksum(data) == entry.checksum
            sums = layer_checksums(data, entry.ns.layout.num_layers)
            data.release()
        buf.close()
        if not intact:
            self._corrupt(entry, "nvme", offset)
        with self.svc.cond:
            if entry.nvme_off == offset and entry.layer_sums is None:
                entry.layer_sums = sums
                self.svc.catalog.set_layer_sums([(entry.ns.id, entry.key, sums)])
        return sums

    def _corrupt(self, entry: BlockEntry, tier: str, where: int | str | None) -> NoReturn:
        if where is not None:
            self.svc.drop_corrupt_copy(entry, tier, where)
        raise DataLoss(
            f"block {entry.key.hex()} is missing or failed its checksum in the {tier} tier "
            "and was dropped; recompute it", field="sequence_id",
        )

    def _csd_partial(
        self, name: str, entries: list[BlockEntry], layer: int, q: torch.Tensor,
        scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.svc.csd
        if pool is None:
            raise Unavailable("no CSD workers are configured", field="sequence_id")
        ns = entries[0].ns
        out, lse, missing = pool.partial_attend(
            name, ns.id, ns.layout, [e.key for e in entries], layer, q, scale or 0.0
        )
        if missing:
            # The worker dropped what failed its checksum; forget those copies here too.
            by_key = {e.key: e for e in entries}
            for key in missing:
                if key in by_key:
                    self.svc.drop_corrupt_copy(by_key[key], "csd", name)
            self._corrupt(by_key.get(missing[0], entries[0]), f"csd ({name})", None)
        return out, lse
