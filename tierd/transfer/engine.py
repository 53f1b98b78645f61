"""The transfer engine: every byte move between tiers, and the checks that guard them.

Primitives: `TransferEngine(tiers)`, `ingest(src, tenant, location) -> checksum` (staging
or a sealed tail into the memory tier), `copy_many(moves) -> [Future[Outcome]]`,
`read_ranges(reads, scratch) -> [memoryview]`, `start_ranges` (the same, not waited for),
`Move`, `Outcome`; `ROUTES` keyed by
(source kind, destination kind).

Puts, promotions, demotions, explicit moves, flushes and attend reads all come here, so
integrity is checked in one place (`tierd.transfer.integrity`): a source copy is verified
before its bytes are written anywhere (damage never spreads), and bytes read from a tier
are verified before anyone uses them. Moves run asynchronously: a caller submits a batch
and waits on the futures, so the reads and writes of a batch overlap.

Codecs are applied here too (`tierd.transfer.encoding`): a move writes the block in the
destination's encoding for its namespace, decoding the source copy first when it is
encoded otherwise, and reports the copy it made (`Move.result`: stored length, checksum
of the stored bytes, encoding). The memory tier always holds raw blocks.

A route is chosen by the kinds at both ends. Without a registered route, the engine uses
what the tiers can do: from a memory tier the destination writes straight from the
source's bytes in place; into a memory tier the source reads straight into the
destination's bytes; between two storage tiers the bytes pass through a bounce buffer.
"""

from __future__ import annotations

import enum
import logging
import mmap
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace

from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.core.tierset import TierSet
from tierd.tiers.base import BlockRef, Copy, CopyLost, Location, MemoryTier, Tier
from tierd.tiers.checksum import checksum, layer_checksums
from tierd.transfer.encoding import RAW, decode_into, encode, encoding_for, stored_bytes
from tierd.transfer.integrity import as_put, copy_intact, source_intact

log = logging.getLogger("tierd.transfer")


class Outcome(enum.Enum):
    OK = "ok"
    CORRUPT = "corrupt"  # the source copy failed its checksum: drop it
    UNREACHABLE = "unreachable"  # the source or destination could not be reached or
    # written (an I/O error, a worker down): nothing is known to be wrong with the copy


@dataclass
class Move:
    entry: BlockEntry
    src: Copy
    dst: Tier
    location: Location  # where in `dst` (space the caller reserved: `stored_bytes`)
    result: Copy | None = None  # the copy made in `dst`, once the move is OK


@dataclass(frozen=True)
class _Stored:
    """What a tier is told of a copy whose bytes are not the block's as put (its header
    describes the stored bytes)."""

    ns: NamespaceInfo
    key: bytes
    nbytes: int
    checksum: int
    layer_sums: tuple[int, ...] | None
    encoding: str  # what the stored bytes are: with the block's size and checksum, a
    block_nbytes: int  # header says enough for a rebuild to read them back
    block_checksum: int


Route = Callable[["TransferEngine", Sequence[Move]], list["Future[Outcome]"]]
ROUTES: dict[tuple[str, str], Route] = {}


def _done(outcome: Outcome) -> Future[Outcome]:
    f: Future[Outcome] = Future()
    f.set_result(outcome)
    return f


class TransferEngine:
    def __init__(self, tiers: TierSet) -> None:
        self.tiers = tiers

    def stored_bytes(self, tier: Tier, entry: BlockEntry) -> int:
        """Room a copy of `entry` takes in `tier` (its encoded size there)."""
        return stored_bytes(encoding_for(tier, entry.ns), entry.ns.layout)

    # -- into the memory tier from outside the chain ---------------------------------------

    def ingest(self, src: memoryview, tenant: str, location: int) -> int:
        """Copy bytes a client staged (or the daemon built) into the memory tier; returns
        the checksum of the copy, which is what is served from then on."""
        top = self.tiers.top
        dst = top.view(tenant, location, len(src))
        dst[:] = src
        return checksum(dst)

    # -- between tiers -----------------------------------------------------------------------

    def copy_many(self, moves: Sequence[Move]) -> list[Future[Outcome]]:
        """Start every move; one future per move, in order. Grouped by route so a tier that
        batches (one request per worker) gets its batch."""
        results: list[Future[Outcome] | None] = [None] * len(moves)
        groups: dict[tuple[str, str], list[int]] = {}
        for i, m in enumerate(moves):
            src = self.tiers.get(m.src.tier)
            assert src is not None, f"copy in unknown tier {m.src.tier}"
            groups.setdefault((src.kind, m.dst.kind), []).append(i)
        for key, idx in groups.items():
            route = ROUTES.get(key) or self._default_route(moves[idx[0]])
            for i, fut in zip(idx, route(self, [moves[i] for i in idx])):
                results[i] = fut
        return [f for f in results if f is not None]

    def _default_route(self, move: Move) -> Route:
        src = self.tiers.get(move.src.tier)
        if isinstance(src, MemoryTier):
            return _from_memory
        if isinstance(move.dst, MemoryTier):
            return _into_memory
        return _bounced

    def read_ranges(
        self, reads: Sequence[tuple[BlockEntry, Copy, int, int]], scratch: memoryview
    ) -> list[memoryview]:
        """Byte ranges (entry, copy, start, length) of copies in storage tiers, read in
        parallel into `scratch` (aligned as each tier needs); the views of exactly the
        asked bytes, in order. `scratch` must hold `scratch_bytes(reads)`. Unverified: the
        caller checks what it reads (per-layer sums)."""
        futures, views = self.start_ranges(reads, scratch)
        for f in futures:
            f.result()
        return views

    def start_ranges(
        self, reads: Sequence[tuple[BlockEntry, Copy, int, int]], scratch: memoryview
    ) -> tuple[list[Future[None]], list[memoryview]]:
        """`read_ranges` without the wait: the reads' futures and the views they fill.
        `scratch` must not be reused before every future is done."""
        futures, views, at = [], [], 0
        for entry, copy, start, length in reads:
            tier = self.tiers.get(copy.tier)
            assert tier is not None
            lo, hi = _aligned(tier, start, length)
            futures.append(tier.read_range(entry, copy, lo, scratch[at : at + hi - lo]))
            views.append(scratch[at + start - lo : at + start - lo + length])
            at += hi - lo
        return futures, views

    def scratch_bytes(self, reads: Sequence[tuple[BlockEntry, Copy, int, int]]) -> int:
        total = 0
        for _, copy, start, length in reads:
            tier = self.tiers.get(copy.tier)
            assert tier is not None
            lo, hi = _aligned(tier, start, length)
            total += hi - lo
        return total


def _aligned(tier: Tier, start: int, length: int) -> tuple[int, int]:
    """The range a read of [start, start + length) covers in `tier` (its alignment)."""
    align = tier.read_align
    return start // align * align, -(-(start + length) // align) * align


def _from_memory(engine: TransferEngine, moves: Sequence[Move]) -> list[Future[Outcome]]:
    """The destination writes from the source's bytes in place, once they check out."""
    top = engine.tiers.top
    out: list[Future[Outcome] | None] = [None] * len(moves)
    writes: list[tuple[int, BlockRef, Location, memoryview]] = []
    for i, m in enumerate(moves):
        view = top.view(m.entry.ns.tenant, int(m.src.location), m.src.length)
        if not source_intact(m.entry, m.src, view):
            out[i] = _done(Outcome.CORRUPT)
            continue
        stored = _stored_form(m, view)
        if stored is None:
            out[i] = _done(Outcome.UNREACHABLE)
        else:
            writes.append((i, stored[0], m.location, stored[1]))
    if writes:
        dst = moves[writes[0][0]].dst
        try:
            futures = dst.write_many([(e, loc, v) for _, e, loc, v in writes])
        except Exception as e:  # noqa: BLE001 - a batch that failed to start fails each move
            futures = [_failed(e) for _ in writes]
        for (i, _, _, _), fut in zip(writes, futures):
            out[i] = _outcome_of(fut, lambda: Outcome.OK)
    return [f for f in out if f is not None]


def _into_memory(engine: TransferEngine, moves: Sequence[Move]) -> list[Future[Outcome]]:
    """The source reads straight into the destination's bytes; checked after. An encoded
    copy is read into a bounce buffer, checked, and decoded into the destination."""
    out = []
    for m in moves:
        src = engine.tiers.get(m.src.tier)
        assert src is not None and isinstance(m.dst, MemoryTier)
        if m.src.encoding != RAW:
            out.append(_decoded_into_memory(src, m))
            continue
        view = m.dst.view(m.entry.ns.tenant, int(m.location), m.src.length)
        fut = _started(lambda s=src, m=m, v=view: s.read(m.entry, m.src, v))
        out.append(_outcome_of(fut, lambda m=m, v=view: _judged_in_place(m, v), reading=True))
    return out


def _judged_in_place(m: Move, view: memoryview) -> Outcome:
    if not copy_intact(m.src, view):
        return Outcome.CORRUPT
    m.result = replace(m.src, tier=m.dst.name, location=m.location, verified=True)
    return Outcome.OK


def _decoded_into_memory(src: Tier, m: Move) -> Future[Outcome]:
    assert isinstance(m.dst, MemoryTier)
    buf = memoryview(mmap.mmap(-1, max(m.src.length, 1)))[: m.src.length]
    try:
        src.read(m.entry, m.src, buf).result()
    except Exception as e:  # noqa: BLE001 - judged like any failed read
        return _done(_read_failure(e))
    if not copy_intact(m.src, buf):
        return _done(Outcome.CORRUPT)
    layout = m.entry.ns.layout
    view = m.dst.view(m.entry.ns.tenant, int(m.location), layout.block_bytes)
    try:
        decode_into(m.src.encoding, layout, buf, view)
    except ValueError as e:  # an encoding this build cannot read: the copy is useless
        log.warning("decoding a %s copy failed: %s", m.src.encoding, e)
        return _done(Outcome.CORRUPT)
    m.result = _made(m, view, RAW)
    return _done(Outcome.OK)


def _made(m: Move, data: memoryview, encoding: str) -> Copy:
    """The copy `data` (bytes just made for `m.dst`) will be, with its own per-layer sums
    when it is not the block as put."""
    copy = Copy(m.dst.name, m.location, len(data), checksum(data), encoding)
    if not as_put(m.entry, copy):
        copy.layer_sums = layer_checksums(data, m.entry.ns.layout.num_layers)
    return copy


def _stored_form(m: Move, data: memoryview) -> tuple[BlockRef, memoryview] | None:
    """From the (checked) bytes of `m.src`: what to tell the destination and the bytes to
    write there, in its encoding; sets `m.result`. None when they cannot be made."""
    entry, layout = m.entry, m.entry.ns.layout
    want = encoding_for(m.dst, entry.ns)
    if m.src.encoding == want:
        m.result = replace(m.src, tier=m.dst.name, location=m.location, verified=True)
    else:
        try:
            if m.src.encoding != RAW:
                # Decode, then encode: a lossy source's error and the target's add up
                # (tierd.transfer.encoding); an equal encoding never gets here.
                raw = memoryview(bytearray(layout.block_bytes))
                decode_into(m.src.encoding, layout, data, raw)
                data = raw
            if want != RAW:
                data = encode(want, layout, data)
        except ValueError as e:
            log.warning("encoding a block for %s failed: %s", m.dst.name, e)
            return None
        m.result = _made(m, data, want)
    copy = m.result
    if as_put(entry, copy):
        return entry, data
    return _Stored(entry.ns, entry.key, copy.length, copy.checksum, copy.layer_sums,
                   copy.encoding, entry.nbytes, entry.checksum), data  # fmt: skip


def _bounced(engine: TransferEngine, moves: Sequence[Move]) -> list[Future[Outcome]]:
    """Storage to storage: read into a bounce buffer, check, then write."""
    out = []
    for m in moves:
        src = engine.tiers.get(m.src.tier)
        assert src is not None
        buf = memoryview(mmap.mmap(-1, max(m.src.length, 1)))[: m.src.length]
        try:
            src.read(m.entry, m.src, buf).result()
        except Exception as e:  # noqa: BLE001 - judged like any failed read
            out.append(_done(_read_failure(e)))
            continue
        if not source_intact(m.entry, m.src, buf):
            out.append(_done(Outcome.CORRUPT))
            continue
        stored = _stored_form(m, buf)
        if stored is None:
            out.append(_done(Outcome.UNREACHABLE))
            continue
        ref, data = stored
        out.append(_outcome_of(_started(lambda m=m, r=ref, d=data: m.dst.write(r, m.location, d)),
                               lambda: Outcome.OK))  # fmt: skip
    return out


def _started(start: Callable[[], Future[None]]) -> Future[None]:
    """`start()`, with a failure to even start turned into a failed future."""
    try:
        return start()
    except Exception as e:  # noqa: BLE001 - handed to the waiter
        f: Future[None] = Future()
        f.set_exception(e)
        return f


def _failed(e: BaseException) -> Future[None]:
    f: Future[None] = Future()
    f.set_exception(e)
    return f


def _read_failure(e: BaseException) -> Outcome:
    """A read that failed: an I/O error on local storage or a copy its tier lost is
    CORRUPT (drop it); anything else (a worker down, a timeout) is UNREACHABLE."""
    log.warning("reading a copy failed: %s", e)
    return Outcome.CORRUPT if isinstance(e, (OSError, CopyLost)) else Outcome.UNREACHABLE


def _outcome_of(
    io: Future[None], judge: Callable[[], Outcome], *, reading: bool = False
) -> Future[Outcome]:
    """OK/CORRUPT as `judge` says once the I/O is done. A failed write is UNREACHABLE (the
    destination failed, the source is fine); a failed read as `_read_failure` says."""
    done: Future[Outcome] = Future()

    def finish(f: Future[None]) -> None:
        exc = f.exception()
        if exc is not None:
            if reading:
                done.set_result(_read_failure(exc))
            else:
                log.warning("writing a copy failed: %s", exc)
                done.set_result(Outcome.UNREACHABLE)
            return
        try:
            done.set_result(judge())
        except BaseException as e:  # noqa: BLE001 - handed to the waiter
            done.set_exception(e)

    io.add_done_callback(finish)
    return done
