"""What every shared-store tier kind has in common: a budget in the store, copies written
by this daemon or found from others, self-describing values checked on every read, and
a link that keeps the daemon serving while the store is down.

Primitives: `StoreTier` (a Tier; a kind subclasses it, supplies `key_of`, `open` (with
`StoreTier.open_link`), `backend`, `details` and the five store calls `_io_set`,
`_io_get`, `_io_heads`, `_io_range`, `_io_flush`), `StoreOptions` (what this part reads from a kind's options),
`OWN`, `FOUND`.

Copies. Location "own" is a copy this daemon wrote: it counts against the tier's
capacity (the daemon's budget in the store) and is deleted when it goes. "found" is a
copy another daemon wrote, found by a lookup: it counts too, but going only forgets it.
Two daemons that write the same key share one value (a later write replaces it; a read
that finds other bytes than it recorded is a lost copy), and one that deletes its copy
deletes it for the others, whose next read is then a miss.

Values are self-describing (`tierd.tiers.remote_value`): a header naming the namespace,
key, length, checksum and per-layer checksums (and, for a copy encoded by the tier's
codec, its encoding and the block it decodes to), then the bytes. Every read checks the
header, that it names the copy's encoding, and the checksum; a value missing (evicted by the store, dropped by another
daemon) or failing a check raises CopyLost: the copy is dropped and the read is a miss,
never served.

Availability (`tierd.tiers.remote_link`): every call has a deadline of `timeout_ms`; a
store that refuses connections or does not answer in time makes the tier unavailable:
reads fail at once (misses), writes are queued in memory up to `max_queued_bytes` (and
served to reads from there) or refused, and a probe with a backoff brings the tier back,
which then writes out the queue and the deletions held meanwhile.
"""

from __future__ import annotations

import logging
import threading
from abc import abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol

import xxhash

from tierd.config import TierSpec
from tierd.errors import Unavailable
from tierd.tiers.base import BlockRef, Copy, CopyLost, Found, Location, NamespaceRef, Tier
from tierd.tiers.remote_link import Link
from tierd.tiers.remote_value import (
    RAW,
    RemoteHeader,
    decode,
    encode,
    header_bytes,
    max_header_bytes,
)

log = logging.getLogger("tierd.tiers")

OWN, FOUND = "own", "found"
# Deletions held while the store is down (beyond: left to the store's own eviction).
MAX_DROPS = 1 << 16
# What one background round writes out of the queue, or deletes.
FLUSH_BYTES = 64 << 20
DROP_BATCH = 512


class StoreOptions(Protocol):
    write: str  # demote | through
    max_queued_bytes: int


def _done(value: Any = None, error: BaseException | None = None) -> Future[Any]:
    f: Future[Any] = Future()
    if error is not None:
        f.set_exception(error)
    else:
        f.set_result(value)
    return f


class StoreTier(Tier):
    shared = True

    def __init__(self, spec: TierSpec, opts: StoreOptions, link: Link[Any]) -> None:
        super().__init__(spec)
        self.opts, self.link = opts, link
        self.write_through = opts.write == "through"
        self._lock = threading.Lock()
        self._used = 0
        self._queued: OrderedDict[str, bytes] = OrderedDict()  # writes held while down
        self._queued_bytes = 0
        self._drops: OrderedDict[str, None] = OrderedDict()  # deletions not sent yet
        link.background = self._background

    # -- what a kind supplies -------------------------------------------------------------

    @abstractmethod
    def key_of(self, ns: NamespaceRef, key: bytes) -> str:
        """The store's key of a block: under the tenant and namespace, never another's."""

    @abstractmethod
    def _io_set(self, client: Any, rkey: str, value: bytes) -> None: ...

    @abstractmethod
    def _io_get(self, client: Any, rkey: str) -> bytes | None:
        """The whole value, or None/empty when there is none."""

    @abstractmethod
    def _io_heads(self, client: Any, rkeys: Sequence[str], hlen: int) -> list[bytes | None]:
        """The first `hlen` bytes of each value (None/empty where there is none), in as
        few round trips as the store allows."""

    @abstractmethod
    def _io_range(self, client: Any, rkey: str, hlen: int, lo: int, hi: int
                  ) -> tuple[bytes | None, bytes]:  # fmt: skip
        """The header and bytes [lo, hi] (inclusive) of one value."""

    @abstractmethod
    def _io_flush(self, client: Any, writes: Sequence[tuple[str, bytes]],
                  drops: Sequence[str]) -> Sequence[str]:  # fmt: skip
        """Write these values and delete these keys (a deleted key that is absent is no
        error); returns the keys the store would not delete now (tried again later)."""

    @staticmethod
    def open_link(name: str, connect: Callable[[], Any], probe: Callable[[Any], None],
                  is_outage: Callable[[BaseException], bool], timeout_ms: int, io_threads: int,
                  fatal: Callable[[Exception], Exception | None] = lambda e: None
                  ) -> Link[Any]:  # fmt: skip
        """The store's link, connected now if it answers; a store that does not starts the
        tier unavailable (the link keeps trying). `fatal(e)`: an error that must stop the
        daemon instead (refused credentials), raised after the link is closed."""
        link: Link[Any] = Link(name, connect, probe, is_outage, timeout_ms / 1000, io_threads)
        try:
            link.connect_now()
        except Exception as e:  # noqa: BLE001 - sorted below
            stop = fatal(e)
            if stop is not None:
                link.close()
                raise stop from None
            link.reason = f"{type(e).__name__}: {e}"
            log.warning("tier %s starts unavailable (retrying in the background): %s",
                        name, link.reason)  # fmt: skip
        return link

    # -- facts -----------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return self.spec.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self._used

    def available(self) -> bool:
        return self.link.up

    def held(self) -> tuple[int, int]:
        """Bytes queued while down, and deletions not sent yet."""
        with self._lock:
            return self._queued_bytes, len(self._drops)

    # -- space -----------------------------------------------------------------------------

    def reserve(self, tenant: str, nbytes: int) -> Location | None:
        with self._lock:
            if self._used + nbytes > self.capacity:
                return None
            if not self.link.up and self._queued_bytes + nbytes > self.opts.max_queued_bytes:
                return None  # down, and no room to hold it until it is back: dropped
            self._used += nbytes
            return OWN

    def adopt(self, tenant: str, location: Location, nbytes: int) -> bool:
        if location not in (OWN, FOUND):
            return False
        with self._lock:
            self._used += nbytes
        return True

    def release(self, tenant: str, location: Location, nbytes: int) -> None:
        with self._lock:
            self._used -= nbytes

    def free(self, block: BlockRef, copy: Copy) -> None:
        with self._lock:
            self._used -= copy.length
            if copy.location != OWN:
                return  # another daemon's value: forgotten here, left to its writer
            rkey = self.key_of(block.ns, block.key)
            held = self._queued.pop(rkey, None)
            if held is not None:
                self._queued_bytes -= len(held)
            if len(self._drops) < MAX_DROPS:
                self._drops[rkey] = None
        self.link.wake()

    # -- bytes -----------------------------------------------------------------------------

    def write(self, block: BlockRef, location: Location, data: memoryview) -> Future[None]:
        lay = block.ns.layout
        # One buffer of header and bytes, copied now: the caller's memory may be reused
        # once its future is settled, even if the store answers later.
        # An encoded copy's ref (tierd.transfer.engine) names its encoding and the block.
        value = encode(block.ns.id, block.key, data, block.checksum, block.layer_sums,
                       lay.num_layers, getattr(block, "encoding", RAW),
                       getattr(block, "block_nbytes", 0),
                       getattr(block, "block_checksum", 0))  # fmt: skip
        rkey = self.key_of(block.ns, block.key)
        with self._lock:
            self._drops.pop(rkey, None)  # a deletion of an older copy must not follow it
        if not self.link.up:
            return _done(None, None if self._hold(rkey, value) else self.link.unavailable())
        done: Future[None] = Future()

        def finish(f: Future[None]) -> None:
            exc = f.exception()
            if isinstance(exc, Unavailable) and self._hold(rkey, value):
                exc = None  # the store went down meanwhile: held until it is back
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        self.link.call(lambda c: self._io_set(c, rkey, value), lambda _: None
                       ).add_done_callback(finish)  # fmt: skip
        return done

    def _hold(self, rkey: str, value: bytes) -> bool:
        """Queue a write while the store is down, if `max_queued_bytes` has room."""
        with self._lock:
            old = self._queued.pop(rkey, None)
            room = self.opts.max_queued_bytes - self._queued_bytes + (len(old) if old else 0)
            if len(value) > room:
                if old is not None:
                    self._queued[rkey] = old
                return False
            self._queued[rkey] = value
            self._queued_bytes += len(value) - (len(old) if old else 0)
            return True

    def read(self, block: BlockRef, copy: Copy, out: memoryview) -> Future[None]:
        rkey = self.key_of(block.ns, block.key)
        with self._lock:
            held = self._queued.get(rkey)
        if held is not None:
            try:
                self._deliver(block, copy, held, out)
            except CopyLost as e:
                return _done(None, e)
            return _done()
        return self.link.call(lambda c: self._io_get(c, rkey),
                              lambda v: self._deliver(block, copy, v, out))  # fmt: skip

    def _deliver(self, block: BlockRef, copy: Copy, value: bytes | None, out: memoryview) -> None:
        """Check a whole value and copy its bytes into `out`."""
        head = self._header(block, copy, value)
        assert value is not None
        data = memoryview(value)[head.size :]
        if len(data) != head.nbytes or len(out) != head.nbytes:
            raise CopyLost(f"{self.key_of(block.ns, block.key)}: {len(data)} bytes, expected "
                           f"{len(out)}")  # fmt: skip
        if xxhash.xxh3_64_intdigest(data) != head.checksum:
            raise CopyLost(f"{self.key_of(block.ns, block.key)}: bytes fail their checksum")
        out[:] = data

    def _header(self, block: BlockRef, copy: Copy, value: bytes | None) -> Any:
        """The value's header if it is this copy's (else CopyLost: gone, replaced or
        damaged)."""
        rkey = self.key_of(block.ns, block.key)
        if not value:
            raise CopyLost(f"{rkey} is gone from the store")
        head = decode(value, block.ns.id, block.key, block.ns.layout.num_layers)
        if head is None:
            raise CopyLost(f"{rkey}: not an intact value of this block")
        if (head.checksum != copy.checksum or head.nbytes != copy.length
                or head.encoding != copy.encoding):  # fmt: skip
            raise CopyLost(f"{rkey} holds other bytes than this copy (written again since)")
        return head

    def read_range(self, block: BlockRef, copy: Copy, start: int, out: memoryview) -> Future[None]:
        """Bytes [start, start + len(out)) behind the header, and the header to check
        they belong to this copy."""
        if not len(out):
            return _done()
        rkey = self.key_of(block.ns, block.key)
        with self._lock:
            held = self._queued.get(rkey)
        hlen = header_bytes(block.ns.layout.num_layers, copy.encoding)
        lo, hi = hlen + start, hlen + start + len(out) - 1

        def deliver(got: tuple[bytes | None, bytes]) -> None:
            head, part = got
            self._header(block, copy, head)
            if len(part) != len(out):
                raise CopyLost(f"{rkey}: shorter than its header says")
            out[:] = part

        if held is not None:
            try:
                deliver((held, held[lo : hi + 1]))
            except CopyLost as e:
                return _done(None, e)
            return _done()
        return self.link.call(lambda c: self._io_range(c, rkey, hlen, lo, hi), deliver)

    # -- lookup ----------------------------------------------------------------------------

    def find(self, ns: NamespaceRef, keys: Sequence[bytes]) -> list[Found | None]:
        """Each key's header in one batch; a value whose header is not an intact one of
        that block is not found."""
        nothing: list[Found | None] = [None] * len(keys)
        if not keys or not self.link.up:
            return nothing
        layers = ns.layout.num_layers
        hlen = max_header_bytes(layers)  # a raw value's header is shorter: decode cuts it
        rkeys = [self.key_of(ns, k) for k in keys]

        def deliver(heads: list[bytes | None]) -> list[Found | None]:
            found: list[Found | None] = []
            for key, head in zip(keys, heads):
                h = decode(head, ns.id, key, layers) if head else None
                found.append(_found(ns, h) if h is not None else None)
            return found

        try:
            return self.link.call(lambda c: self._io_heads(c, rkeys, hlen), deliver).result()
        except Exception as e:  # noqa: BLE001 - a lookup finds nothing rather than fail
            log.debug("tier %s: lookup probe failed: %s", self.name, e)
            return nothing

    # -- the link's background work ------------------------------------------------------

    def _background(self, client: Any) -> bool:
        """Write out what was queued while the store was down, and send deletions."""
        with self._lock:
            writes: list[tuple[str, bytes]] = []
            size = 0
            for rkey, value in self._queued.items():
                if writes and size + len(value) > FLUSH_BYTES:
                    break
                writes.append((rkey, value))
                size += len(value)
            drops = list(self._drops)[:DROP_BATCH]
        if not writes and not drops:
            return False
        kept = set(self._io_flush(client, writes, drops))
        with self._lock:
            for rkey, value in writes:
                if self._queued.get(rkey) is value:  # not freed or written again meanwhile
                    del self._queued[rkey]
                    self._queued_bytes -= len(value)
            for rkey in drops:
                if rkey in kept and rkey in self._drops:
                    self._drops.move_to_end(rkey)  # after the others: tried again later
                else:
                    self._drops.pop(rkey, None)
        # Busy only if something moved: deletions the store keeps refusing are retried on
        # the link's idle tick, not in a loop.
        return bool(writes) or len(kept) < len(drops)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> list[str]:
        self.link.start()
        return [] if self.link.up else [self.link.reason]

    def close(self) -> None:
        self.link.close()


def _found(ns: NamespaceRef, h: RemoteHeader) -> Found | None:
    """A found value as a copy of `ns`'s block, if it can be one: the block's size, codes
    of the size its encoding makes of the layout, and never lossy codes for a namespace
    that asked for lossless blocks."""
    from tierd.transfer.encoding import lossy, stored_bytes

    layout = ns.layout
    if h.block_nbytes != layout.block_bytes:
        return None
    if h.encoding != RAW:
        try:
            if h.nbytes != stored_bytes(h.encoding, layout) or (
                getattr(ns, "lossless", False) and lossy(h.encoding)
            ):
                return None
        except ValueError:  # groups that do not divide this layout
            return None
    return Found(FOUND, h.nbytes, h.checksum, h.layer_sums, h.encoding, h.block_checksum)
