"""What every tier offers the core, whatever stores its bytes.

Primitives: `Tier` (space: `reserve`, `adopt`, `free`; bytes: `write`, `read`, `read_range`;
optional `partial_attend`; facts: `capacity`, `used_bytes`, `backend`, `available`;
`check_spec`; `close`), `MemoryTier` (a tier clients map: `view`, `client_fd`,
`segment_size`, `trim`), `Copy` (one block's bytes in one tier), `BlockRef` (what a tier
may know of a block), `Found` (a block a shared tier holds that this daemon did not put).

Capabilities the core consults, never a kind's name: `shared` (other daemons write and
read the same store: a lookup that misses asks it with `find`), `write_through` (every
committed block gets a copy here too, not only the blocks the tier above demotes).

A tier is a value built from its `TierSpec` (tierd.config) by the kind registered in
`tierd.tiers.registry`; the core holds them in chain order and never names one. A block
has one `Copy` per tier holding it. Locations are the tier's own: an offset in a tenant's
segment (host), an offset in a file (NVMe), a worker's name (CSD).

Tiers do no bookkeeping of blocks (that is the directory's) and take no core lock: space
calls are quick and thread-safe; byte calls return futures and may take milliseconds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from tierd_client.layout import KVLayout

if TYPE_CHECKING:
    import torch

    from tierd.config import TierSpec
    from tierd.tiers.registry import TierContext

Location = int | str


class NamespaceRef(Protocol):
    id: bytes
    tenant: str
    model: str
    layout: KVLayout
    extra_keys: tuple[str, ...]
    adapter: str  # "": none; NVMe block headers record it, so a rebuild finds the namespace


class BlockRef(Protocol):
    """What a tier may know of a block: whose it is, its size and its checksums."""

    ns: NamespaceRef
    key: bytes
    nbytes: int
    checksum: int
    layer_sums: tuple[int, ...] | None


class CopyLost(Exception):
    """A read found the copy gone or damaged (not merely unreachable): it must be dropped."""


@dataclass
class Copy:
    """One block's bytes in one tier."""

    tier: str  # the tier's configured name
    location: Location
    length: int  # stored bytes (the block's size when raw, its codec's size when encoded)
    checksum: int  # of the stored bytes
    encoding: str = "raw"  # tierd.transfer.encoding: "raw", a codec and its options
    # False for a copy adopted after a restart from memory that may have been written
    # after its catalog row (checked before anyone reads it).
    verified: bool = True
    # Per-layer checksums of the stored bytes, for a copy whose bytes are not the block's
    # as put (encoded, or decoded from a lossy copy); None: the block's own apply.
    layer_sums: tuple[int, ...] | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Found:
    """A block found in a shared tier: where it is and what its header vouches for."""

    location: Location
    length: int
    checksum: int  # of the stored bytes (the block's own when raw)
    layer_sums: tuple[int, ...] | None = None  # of the stored bytes
    encoding: str = "raw"  # an encoded copy's codec (tierd.transfer.encoding)
    block_checksum: int = 0  # of the block the stored bytes decode to (encoded copies)


@dataclass(frozen=True)
class TierUsage:
    capacity_bytes: int
    used_bytes: int
    backend: str
    available: bool = True


class Tier(ABC):
    """One tier of the chain. Subclasses set `kind` and implement the abstract methods."""

    kind: ClassVar[str] = ""
    # Copies adopted after a restart must be checked before use (memory a crash may have
    # left half-written); storage that checks every read anyway says False.
    verify_adopted: ClassVar[bool] = False
    # Byte-range reads start and end on multiples of this (O_DIRECT pages on NVMe).
    read_align: ClassVar[int] = 1
    # Whether `partial_attend` computes attention where the bytes are (else the core reads
    # the layer's bytes and reduces them itself).
    attends: ClassVar[bool] = False
    # Whether the first tier of a chain may be of this kind (clients map it).
    memory: ClassVar[bool] = False
    # The kind's own [[tiers]] keys and their defaults (the type of each is checked).
    OPTIONS: ClassVar[dict[str, Any]] = {}
    # Other daemons write and read the same store: a lookup asks it (`find`) for the keys
    # no tier of this daemon holds.
    shared: ClassVar[bool] = False
    # Every committed block is copied here too (asynchronously), not only demoted ones.
    write_through: bool = False

    def __init__(self, spec: TierSpec) -> None:
        self.spec = spec
        self.name = spec.name

    @classmethod
    @abstractmethod
    def open(cls, spec: TierSpec, context: TierContext) -> Tier:
        """Build the tier from its spec; a ConfigError names what keeps it from opening."""

    @classmethod
    def check_spec(cls, spec: TierSpec, where: str) -> None:
        """Check the kind's options beyond their types, at config load (a ConfigError
        naming `where`.key)."""

    # -- facts ----------------------------------------------------------------------------

    @property
    @abstractmethod
    def capacity(self) -> int: ...

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @property
    def backend(self) -> str:
        return self.kind

    def available(self) -> bool:
        """Whether the tier can serve now (a remote tier may be down for a while)."""
        return True

    def usage(self) -> TierUsage:
        return TierUsage(self.capacity, self.used_bytes, self.backend, self.available())

    def tenant_used(self, tenant: str) -> int | None:
        """Bytes `tenant` holds here, when the tier accounts per tenant itself (else None:
        the directory counts)."""
        return None

    # -- space ------------------------------------------------------------------------------

    @abstractmethod
    def reserve(self, tenant: str, nbytes: int) -> Location | None:
        """Room for one block, or None when the tier is full."""

    @abstractmethod
    def adopt(self, tenant: str, location: Location, nbytes: int) -> bool:
        """Claim space a catalog row names (recovery); False if it cannot be used."""

    def finish_recovery(self) -> None:
        """Every recorded copy has been adopted."""

    @abstractmethod
    def release(self, tenant: str, location: Location, nbytes: int) -> None:
        """Give back space `reserve` gave that never got a copy."""

    @abstractmethod
    def free(self, block: BlockRef, copy: Copy) -> None:
        """Give a copy's space back; quick and never blocking on I/O or the network (a
        remote drop is queued), so the core may call it under its lock."""

    # -- bytes --------------------------------------------------------------------------------

    @abstractmethod
    def write(self, block: BlockRef, location: Location, data: memoryview) -> Future[None]:
        """Store a block's bytes at space `reserve` gave."""

    def write_many(
        self, items: Sequence[tuple[BlockRef, Location, memoryview]]
    ) -> list[Future[None]]:
        """Several writes; a kind that batches (one request per worker) overrides this. A
        write that raises instead of returning a future fails its own item only (the
        others may be under way: their futures must reach the caller)."""
        out: list[Future[None]] = []
        for block, location, data in items:
            try:
                out.append(self.write(block, location, data))
            except Exception as e:  # noqa: BLE001 - handed to the waiter
                failed: Future[None] = Future()
                failed.set_exception(e)
                out.append(failed)
        return out

    @abstractmethod
    def read(self, block: BlockRef, copy: Copy, out: memoryview) -> Future[None]:
        """The whole copy into `out` (len == copy.length)."""

    def read_range(self, block: BlockRef, copy: Copy, start: int, out: memoryview) -> Future[None]:
        """Bytes [start, start + len(out)) of the copy; by default a whole read."""
        import mmap

        scratch = memoryview(mmap.mmap(-1, copy.length))
        done: Future[None] = Future()
        whole = self.read(block, copy, scratch)

        def finish(f: Future[None]) -> None:
            try:
                f.result()
                out[:] = scratch[start : start + len(out)]
                done.set_result(None)
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                done.set_exception(e)

        whole.add_done_callback(finish)
        return done

    def partial_attend(
        self, location: Location, blocks: Sequence[BlockRef], layer: int, q: torch.Tensor,
        scale: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor, list[bytes]] | None:
        """Attention over `blocks` computed where their bytes are: (out, lse, keys missing
        or corrupt), or None when this tier has no compute (the core reads and reduces)."""
        return None

    def find(self, ns: NamespaceRef, keys: Sequence[bytes]) -> list[Found | None]:
        """Which of `ns`'s `keys` a shared tier holds (another daemon's), in one bounded
        call; never raises (a tier that cannot answer finds nothing)."""
        return [None] * len(keys)

    def start(self) -> list[str]:
        """Bring up what the tier runs (workers); returns what is not serving yet."""
        return []

    def close(self) -> None:
        """Release what the tier holds open."""

    def details(self) -> dict[str, Any]:
        """Kind-specific facts for status pages."""
        return {}


class MemoryTier(Tier):
    """A tier whose bytes clients map: puts land here and gets are served from it."""

    verify_adopted = True
    memory = True

    @abstractmethod
    def view(self, tenant: str, location: int, nbytes: int) -> memoryview:
        """The bytes in place (no copy)."""

    @abstractmethod
    def client_fd(self, tenant: str) -> tuple[int, int]:
        """A read-only descriptor of the tenant's memory and its size."""

    @abstractmethod
    def segment_size(self, tenant: str) -> int:
        """Size of what `client_fd` maps (clients check they map all of it)."""

    def trim(self) -> None:
        """Give back pages clients faulted in by reading unallocated space."""

    def release_unused(self) -> None:
        """After recovery: drop memory no adopted copy uses."""

    def write(self, block: BlockRef, location: Location, data: memoryview) -> Future[None]:
        self.view(block.ns.tenant, int(location), len(data))[:] = data
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def read(self, block: BlockRef, copy: Copy, out: memoryview) -> Future[None]:
        return self.read_range(block, copy, 0, out)

    def read_range(self, block: BlockRef, copy: Copy, start: int, out: memoryview) -> Future[None]:
        out[:] = self.view(block.ns.tenant, int(copy.location) + start, len(out))
        done: Future[None] = Future()
        done.set_result(None)
        return done
