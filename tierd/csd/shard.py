"""A CSD worker's storage: whole blocks in one NVMe data file, indexed by its own SQLite.

Primitives:
  `CsdShard(directory, capacity_bytes)`  opens (or recovers) `<dir>/blocks.dat` and
                                         `<dir>/shard.sqlite3`; one process per directory
  `store(layout, items) -> int`          all-or-nothing; bad checksum -> InvalidArgument,
                                         no room -> ResourceExhausted
  `read_blocks(ns_id, keys)`             iterator of verified (key, checksum, bytes, encoding)
  `read(ns_id, keys) -> dict`            key -> bytes
  `read_layer_runs(ns_id, layout, keys, layer) -> [LayerBatch]`  one layer's K|V (or its
                                         codec's record) of each block, a batch per encoding
  `read_layers(ns_id, layout, keys, layer) -> LayerBatch`   the same, for blocks of one
                                         encoding
  `drop(ns_id, keys) -> int`, `list_blocks()`, `stats() -> ShardStats`, `close()`

Blocks may be stored encoded by a codec (`StoreItem.encoding`, tierd.transfer.encoding):
the shard then holds the codes (their length is the codec's, and space, checksums and
stats count them), records the encoding in the block's row, and serves the codes as they
are; attend reads each layer's record and computes on the codes (tierd.csd.attend).

A block whose bytes fail their checksum is reported missing, counted in
`stats().corrupt_reads` and dropped (its bytes will not get better).

Blocks being read are pinned: a drop or an overwrite during the read retires the old
extent, and it returns to the allocator only when its last reader is done, so a read never
sees bytes of a block stored after it started.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np

from tierd.csd.catalog import ShardCatalog, ShardRow
from tierd.csd.files import aligned_buffer, lock_directory, wait_all
from tierd.errors import ExtentError, FailedPrecondition, InvalidArgument, ResourceExhausted
from tierd.tiers.checksum import checksum, layer_checksums
from tierd.tiers.extents import align_up
from tierd.tiers.io_backend import ALIGNMENT, IOBackend, as_bytes_view, select_backend
from tierd.tiers.nvme import NvmeStore
from tierd.transfer.encoding import RAW, stored_bytes
from tierd_client.layout import KVLayout

log = logging.getLogger("tierd.csd")

CATALOG_FILE = "shard.sqlite3"
LOCK_FILE = "shard.lock"


@dataclass(frozen=True)
class StoreItem:
    ns_id: bytes
    key: bytes
    checksum: int  # xxh3_64 of data, as the sender computed it
    data: Any  # any C-contiguous buffer: layout.block_bytes, or the encoding's size
    encoding: str = RAW


@dataclass(frozen=True)
class ShardStats:
    blocks: int
    used_bytes: int
    capacity_bytes: int
    corrupt_reads: int


@dataclass(frozen=True)
class LayerBatch:
    """One layer's K|V bytes of the found blocks, block i at `slot(i)` of `buffer`.

    Slots are `stride` bytes apart and the layer starts `pad` bytes into each, so all
    blocks together are one strided view (no gathering copy before the math).
    """

    keys: list[bytes]  # found, in request order
    missing: list[bytes]  # not held, or failed their checksum
    buffer: np.ndarray  # uint8
    slots: list[int]  # slot index of keys[i]
    stride: int
    pad: int
    nbytes: int  # bytes of one block's layer: 2 * kv_heads * block_tokens * head_dim * itemsize
    # (raw), or of the layer's record in `encoding`
    encoding: str = RAW

    def layer_bytes(self, i: int) -> np.ndarray:
        start = self.slots[i] * self.stride + self.pad
        return self.buffer[start : start + self.nbytes]


@dataclass(eq=False)
class _Entry:
    row: ShardRow
    readers: int = 0
    dead: bool = field(default=False)  # dropped or replaced: free when readers reach 0


class CsdShard:
    def __init__(
        self,
        directory: Path | str,
        capacity_bytes: int,
        *,
        backend: IOBackend | None = None,
        io_threads: int = 8,
        read_batch: int = 32,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = lock_directory(self.directory, LOCK_FILE)
        try:
            self._nvme = NvmeStore(
                self.directory, capacity_bytes, backend=backend or select_backend("auto"),
                io_threads=io_threads,
            )  # fmt: skip
            self._catalog = ShardCatalog(self.directory / CATALOG_FILE)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._read_batch = max(1, read_batch)
        self._lock = threading.Lock()
        self._entries: dict[tuple[bytes, bytes], _Entry] = {}
        self._corrupt_reads = 0
        self._closed = False
        self._recover()

    # -- life -------------------------------------------------------------------------------

    def _recover(self) -> None:
        dropped: list[tuple[bytes, bytes]] = []
        for row in self._catalog.rows():
            try:
                self._nvme.reserve(row.offset, row.nbytes)
            except ExtentError:
                # Past a smaller capacity, or overlapping another row: unusable.
                dropped.append((row.ns_id, row.key))
                continue
            self._entries[(row.ns_id, row.key)] = _Entry(row)
        self._catalog.delete(dropped)
        log.info("csd shard %s: recovered %d blocks (%d dropped)",
                 self.directory, len(self._entries), len(dropped))  # fmt: skip

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._nvme.close()
        self._catalog.close()
        os.close(self._lock_fd)  # releases the flock

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- facts ------------------------------------------------------------------------------

    @property
    def backend_name(self) -> str:
        return self._nvme.backend_name

    def stats(self) -> ShardStats:
        with self._lock:
            return ShardStats(len(self._entries), self._nvme.used_bytes, self._nvme.capacity,
                              self._corrupt_reads)  # fmt: skip

    def list_blocks(self) -> dict[bytes, list[bytes]]:
        out: dict[bytes, list[bytes]] = {}
        with self._lock:
            for ns_id, key in self._entries:
                out.setdefault(ns_id, []).append(key)
        return out

    # -- store and drop ---------------------------------------------------------------------

    def store(self, layout: KVLayout, items: Sequence[StoreItem]) -> int:
        """Store blocks; all of them or none. Returns how many distinct blocks are held."""
        unique: dict[tuple[bytes, bytes], tuple[StoreItem, memoryview]] = {}
        for i, it in enumerate(items):
            if not it.ns_id:
                raise InvalidArgument(
                    "a namespace id is required", field=f"blocks[{i}].namespace_id"
                )
            if not it.key:
                raise InvalidArgument("a block key is required", field=f"blocks[{i}].key")
            view = as_bytes_view(it.data)
            size = _stored_size(it.encoding, layout, i)
            if len(view) != size:
                raise InvalidArgument(
                    f"{len(view)} bytes, the layout's blocks have {size} in {it.encoding}",
                    field=f"blocks[{i}].data",
                )
            # Checked before anything is written: bytes damaged on the way never land.
            if checksum(view) != it.checksum:
                raise InvalidArgument("data does not match its checksum",
                                      field=f"blocks[{i}].checksum")  # fmt: skip
            unique[(it.ns_id, it.key)] = (it, view)
        with self._lock:
            self._check_open()
            todo = [(k, it, v) for k, (it, v) in unique.items()
                    if not self._holds(k, it, layout)]  # fmt: skip
            offsets: list[int] = []
            for _, _, v in todo:
                off = self._nvme.allocate(len(v))
                if off is None:
                    for o, (_, _, w) in zip(offsets, todo):
                        self._nvme.free(o, len(w))
                    need = sum(self._nvme.extent_bytes(len(w)) for _, _, w in todo)
                    raise ResourceExhausted(
                        f"csd shard {self.directory} is full: {len(todo)} blocks need {need} "
                        f"bytes, {self._nvme.capacity - self._nvme.used_bytes} of "
                        f"{self._nvme.capacity} free"
                    )
                offsets.append(off)
        # Bytes move outside the lock; the new extents are invisible until the rows land.
        futures = [self._nvme.write_async(off, v) for off, (_, _, v) in zip(offsets, todo)]
        try:
            wait_all(futures)
        except BaseException:
            with self._lock:
                for off, (_, _, v) in zip(offsets, todo):
                    self._nvme.free(off, len(v))
            raise
        # Per-layer sums of the stored bytes: a codec's records are of one size per layer,
        # so an encoded block splits into equal layer spans like a raw one.
        rows = [ShardRow(k[0], k[1], off, len(v), it.checksum, layout,
                         layer_checksums(v, layout.num_layers), it.encoding)
                for off, (k, it, v) in zip(offsets, todo)]  # fmt: skip
        with self._lock:
            # Row and in-memory entry change together under the lock, so two stores of
            # one key cannot leave the catalog naming the extent that memory freed.
            self._catalog.insert(rows)
            for row in rows:
                old = self._entries.get((row.ns_id, row.key))
                if old is not None:
                    self._retire(old)
                self._entries[(row.ns_id, row.key)] = _Entry(row)
        return len(unique)

    def drop(self, ns_id: bytes, keys: Sequence[bytes]) -> int:
        with self._lock:
            self._check_open()
            gone = [self._entries.pop((ns_id, k)) for k in dict.fromkeys(keys)
                    if (ns_id, k) in self._entries]  # fmt: skip
            self._catalog.delete((e.row.ns_id, e.row.key) for e in gone)
            for e in gone:
                self._retire(e)
        return len(gone)

    # -- reads ------------------------------------------------------------------------------

    def read(self, ns_id: bytes, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        return {k: data for k, _, data, _ in self.read_blocks(ns_id, keys)}

    def read_blocks(
        self, ns_id: bytes, keys: Sequence[bytes]
    ) -> Iterator[tuple[bytes, int, bytes, str]]:
        """(key, checksum, bytes, encoding) of each held, intact block (the stored bytes:
        an encoded block's codes); batches read in parallel."""
        keys = list(dict.fromkeys(keys))
        for start in range(0, len(keys), self._read_batch):
            # Pins last for one batch only: a consumer that stops iterating holds nothing.
            yield from self._read_batch_of(ns_id, keys[start : start + self._read_batch])

    def _read_batch_of(
        self, ns_id: bytes, keys: list[bytes]
    ) -> list[tuple[bytes, int, bytes, str]]:
        entries = self._pin(ns_id, keys)
        try:
            held = [e for e in entries if e is not None]
            return [
                (e.row.key, e.row.checksum, whole.tobytes(), e.row.encoding)
                for e, whole in zip(held, self._read_whole(held))
                if whole is not None
            ]
        finally:
            self._unpin(entries)

    def _read_whole(self, entries: Sequence[_Entry]) -> list[np.ndarray | None]:
        """Whole pinned blocks, read in parallel and checked; None for a corrupt one."""
        bufs = [aligned_buffer(e.row.nbytes) for e in entries]
        wait_all([self._nvme.read_async(e.row.offset, b) for e, b in zip(entries, bufs)])
        out: list[np.ndarray | None] = []
        for e, b in zip(entries, bufs):
            if checksum(b) == e.row.checksum:
                if e.row.layer_sums is None:
                    self._add_layer_sums(e, b)
                out.append(b)
            else:
                self._corrupted(e)
                out.append(None)
        return out

    def read_layers(
        self, ns_id: bytes, layout: KVLayout, keys: Sequence[bytes], layer: int
    ) -> LayerBatch:
        """`read_layer_runs` for blocks of one encoding (InvalidArgument if they mix)."""
        runs = self.read_layer_runs(ns_id, layout, keys, layer)
        if len(runs) != 1:
            raise InvalidArgument("the blocks are stored in several encodings", field="keys")
        return runs[0]

    def read_layer_runs(
        self, ns_id: bytes, layout: KVLayout, keys: Sequence[bytes], layer: int
    ) -> list[LayerBatch]:
        """Read one layer of each block: one contiguous range per block (its K|V, or its
        codec's record of the layer), in parallel; one batch per encoding held, the
        first also naming every missing key (at least one batch)."""
        if not 0 <= layer < layout.num_layers:
            raise InvalidArgument(f"layer {layer} outside [0, {layout.num_layers})", field="layer")
        if len(set(keys)) != len(keys):
            # Attending over a block twice would silently weigh it double.
            raise InvalidArgument("a key appears more than once", field="keys")
        entries = self._pin(ns_id, keys)
        try:
            for e in entries:
                if e is not None and e.row.layout != layout:
                    raise InvalidArgument(
                        f"block {e.row.key.hex()} was stored with layout {e.row.layout}",
                        field="layout",
                    )
            groups: dict[str, list[_Entry]] = {}
            for e in entries:
                if e is not None:
                    groups.setdefault(e.row.encoding, []).append(e)
            runs = [self._layer_run(layout, group, layer) for group in groups.values()]
        finally:
            self._unpin(entries)
        found = {k for run in runs for k in run.keys}
        missing = [k for k in keys if k not in found]
        if not runs:
            return [LayerBatch([], missing, aligned_buffer(0), [], 0, 0, 0)]
        return [dataclasses.replace(runs[0], missing=missing), *runs[1:]]

    def _layer_run(self, layout: KVLayout, held: list[_Entry], layer: int) -> LayerBatch:
        """One layer of each of `held` (pinned, of one encoding)."""
        encoding = held[0].row.encoding
        nbytes = held[0].row.nbytes // layout.num_layers
        layer_off = layer * nbytes
        # O_DIRECT wants aligned file offsets: read from the page holding the layer's first
        # byte, and find the layer `pad` bytes into the slot.
        pad = layer_off % ALIGNMENT
        stride = align_up(pad + nbytes, ALIGNMENT)
        buf = aligned_buffer(len(held) * stride)
        # Blocks with per-layer checksums are read one layer and checked against it.
        # Rows written before those existed are read whole once (num_layers x the
        # bytes, in bounded batches beside the layer reads), checked against the
        # block checksum, and given per-layer checksums for every later read.
        trusted: list[tuple[int, _Entry, tuple[int, ...]]] = []
        unverified: list[tuple[int, _Entry]] = []
        for slot, e in enumerate(held):
            sums = e.row.layer_sums  # read once: a concurrent whole read may set it
            if sums is None:
                unverified.append((slot, e))
            else:
                trusted.append((slot, e, sums))
        futures = [
            self._nvme.read_async(e.row.offset + layer_off - pad,
                                  buf[slot * stride : slot * stride + pad + nbytes])
            for slot, e, _ in trusted
        ]  # fmt: skip
        bad: set[int] = set()
        try:
            for at in range(0, len(unverified), self._read_batch):
                part = unverified[at : at + self._read_batch]
                for (slot, e), whole in zip(part, self._read_whole([e for _, e in part])):
                    if whole is None:
                        bad.add(slot)
                        continue
                    start = slot * stride + pad
                    buf[start : start + nbytes] = whole[layer_off : layer_off + nbytes]
        except BaseException:
            for f in futures:
                f.exception()  # let no read still fill `buf` after we gave up on it
            raise
        wait_all(futures)
        for slot, e, sums in trusted:
            start = slot * stride + pad
            if checksum(buf[start : start + nbytes]) != sums[layer]:
                bad.add(slot)
                self._corrupted(e)
        found = [(slot, e.row.key) for slot, e in enumerate(held) if slot not in bad]
        return LayerBatch(
            keys=[k for _, k in found], missing=[], buffer=buf, slots=[s for s, _ in found],
            stride=stride, pad=pad, nbytes=nbytes, encoding=encoding,
        )  # fmt: skip

    # -- internals --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition(f"csd shard {self.directory} is closed")

    def _holds(self, k: tuple[bytes, bytes], it: StoreItem, layout: KVLayout) -> bool:
        e = self._entries.get(k)
        return (e is not None and e.row.checksum == it.checksum and e.row.layout == layout
                and e.row.encoding == it.encoding)  # fmt: skip

    def _pin(self, ns_id: bytes, keys: Sequence[bytes]) -> list[_Entry | None]:
        with self._lock:
            self._check_open()
            entries = [self._entries.get((ns_id, k)) for k in keys]
            for e in entries:
                if e is not None:
                    e.readers += 1
        return entries

    def _unpin(self, entries: Sequence[_Entry | None]) -> None:
        with self._lock:
            for e in entries:
                if e is not None:
                    e.readers -= 1
                    if e.dead and e.readers == 0:
                        self._nvme.free(e.row.offset, e.row.nbytes)

    def _retire(self, e: _Entry) -> None:
        """Under the lock: `e` is no longer indexed; free its extent once nobody reads it."""
        e.dead = True
        if e.readers == 0:
            self._nvme.free(e.row.offset, e.row.nbytes)

    def _add_layer_sums(self, e: _Entry, whole: np.ndarray) -> None:
        """Record per-layer checksums of a block just read whole and found intact."""
        row = dataclasses.replace(e.row, layer_sums=layer_checksums(whole, e.row.layout.num_layers))
        with self._lock:
            if self._entries.get((row.ns_id, row.key)) is e:
                self._catalog.set_layer_sums(row)
                e.row = row

    def _corrupted(self, e: _Entry) -> None:
        with self._lock:
            self._corrupt_reads += 1
            k = (e.row.ns_id, e.row.key)
            if self._entries.get(k) is e:
                del self._entries[k]
                self._catalog.delete([k])
                self._retire(e)  # the caller still pins it: freed on unpin
        log.warning("csd shard %s: block %s failed its checksum; dropped",
                    self.directory, e.row.key.hex())  # fmt: skip


def _stored_size(encoding: str, layout: KVLayout, i: int) -> int:
    """Bytes a block of `layout` takes in `encoding` (InvalidArgument for one this worker
    cannot read or that cannot encode the layout)."""
    if encoding == RAW:
        return layout.block_bytes
    try:
        return stored_bytes(encoding, layout)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(
            f"encoding {encoding!r}: {e}", field=f"blocks[{i}].encoding"
        ) from None
