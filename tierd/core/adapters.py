"""LoRA adapters and the KV that depends on them: which adapter is kept, which KV goes first.

Primitives: `AdapterBook(directory, weights)` (`open(tenant, adapter, model)`,
`count(tenant) -> {fingerprint: blocks}`, `reclaim(need)`, `sweep()`),
`dependents(directory, fingerprint=None) -> {fingerprint: blocks}`,
`reclaim_order(adapters, dependents, need, top) -> [(fingerprint, blocks)]`,
`is_hot(entry, top)`.

A namespace that names an adapter (`NamespaceInfo.adapter`, its fingerprint, part of the
namespace id) holds KV computed through that adapter: each of its blocks *depends* on the
adapter. The adapter itself is an area in the weights registry, counted against
`[weights] capacity`; models (base weights) are never evicted, adapters may be. The rule,
after FastLibra's dependency-aware caching (an adapter is the parent of its KV; only a
node without children in the cache may leave):

1. A block is *hot* while it has a copy in the memory tier (the placer keeps what is hot
   there and demotes the rest), is pinned, or is in use (read, written out or loaded). An
   adapter is *hot* while one of the blocks that depend on it is hot, and *cold* otherwise
   (also when no block depends on it).
2. A hot adapter is kept: it is never evicted to make room.
3. When a registration needs room over `capacity` (`reclaim(need)`), cold adapters are
   taken least recently used first: an adapter's last use is the latest of its
   registration, a namespace naming it, its weights handed to a client and the last access
   of any block that depends on it; ties go by fingerprint. For each adapter taken, every
   block that depends on it, in whichever tier, is deleted first (least recently accessed
   first; on record before its space is freed), then the adapter goes (every
   registration of it, whichever tenant made it). Adapters are taken until `need` bytes are
   free; if all the cold adapters together cannot free it, nothing is evicted and the
   registration is refused (ResourceExhausted). An adapter whose KV turned hot while its
   cold KV was deleted (a put or read meanwhile) is kept after all.
4. A lookup (and every other call on a namespace) whose adapter its tenant does not see
   any more — dropped by that tenant, unshared or dropped by the tenant that shared it, or
   evicted — is refused (FailedPrecondition: register the adapter again and reopen), so no
   call ever answers with a hit that would need an adapter the client was not told is
   gone. The blocks of such namespaces are deleted right after the drop, the eviction
   or the registration that unshared the adapter (`sweep`, which also catches a put that
   raced with the eviction), and at start for adapters whose registrations were lost.
   Registering the same content again gives the same fingerprint, hence the same
   namespace id, and the namespace is usable again (with whatever of its KV survived,
   which is KV of this very adapter).

Blocks of namespaces without an adapter are never looked at here. Victim order inside a
tier (`Directory.victims`) is unchanged: an adapter is never in a KV tier, so within a
tier every block is a leaf.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.errors import ResourceExhausted

if TYPE_CHECKING:
    from tierd.core.directory import Directory
    from tierd.weights.registry import AdapterUse, ModelRegistry

log = logging.getLogger("tierd.core")


def is_hot(entry: BlockEntry, top: str) -> bool:
    return top in entry.copies or entry.pinned or not entry.idle


def dependents(directory: Directory, fingerprint: str | None = None, tenant: str | None = None,
               ) -> dict[str, list[BlockEntry]]:  # fmt: skip
    """Blocks that depend on each adapter (or on `fingerprint` only; of `tenant`'s
    namespaces only, when given); the caller holds the directory's lock. The index keeps
    them apart, so this looks at adapters' blocks only, never the whole cache."""
    index = directory.index
    found = index.adapted() if fingerprint is None else {fingerprint: index.adapted_by(fingerprint)}
    out: dict[str, list[BlockEntry]] = {}
    for fp, blocks in found.items():
        kept = [e for e in blocks if not e.deleted and tenant in (None, e.ns.tenant)]
        if kept:
            out[fp] = kept
    return out


def reclaim_order(
    adapters: Sequence[AdapterUse], dependents: Mapping[str, Sequence[BlockEntry]],
    need: int, top: str,
) -> list[tuple[str, tuple[BlockEntry, ...]]]:  # fmt: skip
    """The adapters to evict to free `need` bytes, in order, each with the blocks to delete
    before it (rule 3); ResourceExhausted when the cold ones cannot free that much."""
    cold = []
    for use in adapters:
        blocks = dependents.get(use.fingerprint, ())
        if any(is_hot(e, top) for e in blocks):
            continue
        last = max([use.last_used, *(e.last_access for e in blocks)])
        cold.append((last, use.fingerprint, use.size, blocks))
    cold.sort(key=lambda c: (c[0], c[1]))
    picked, freed = [], 0
    for _, fp, size, blocks in cold:
        if freed >= need:
            break
        ordered = tuple(sorted(blocks, key=lambda e: (e.last_access, e.ns.id, e.key)))
        picked.append((fp, ordered))
        freed += size
    if freed < need:
        held = sum(c[2] for c in cold)
        raise ResourceExhausted(
            f"weights.capacity is short of {need} bytes and the cold adapters hold {held}: "
            "adapters whose KV is in memory, pinned or in use are kept; drop a model or an "
            "adapter, or raise the capacity",
            field="path",
        )
    return picked


class AdapterBook:
    """The dependency between adapters (in `weights`) and KV (in `directory`)."""

    def __init__(self, directory: Directory, weights: ModelRegistry) -> None:
        self.directory = directory
        self.weights = weights
        weights.reclaim = self.reclaim
        weights.dropped = self.sweep
        self.sweep()  # KV recovered whose adapter was lost (its registrations unreadable)

    def open(self, tenant: str, adapter: str, model: str) -> str:
        """The fingerprint a new namespace of `model` names for `adapter` ("": none)."""
        return self.weights.adapter_for(tenant, adapter, model) if adapter else ""

    def count(self, tenant: str) -> dict[str, int]:
        """Blocks of `tenant`'s namespaces that depend on each adapter now: a shared
        adapter's users never learn how much KV the others hold. Takes the directory's
        lock."""
        with self.directory.cond:
            return {fp: len(v) for fp, v in dependents(self.directory, tenant=tenant).items()}

    def reclaim(self, need: int) -> None:
        """Free `need` bytes of `[weights] capacity` by rule 3 (the registry calls it, without
        its lock)."""
        uses = self.weights.adapters()
        with self.directory.cond:
            order = reclaim_order(uses, dependents(self.directory), need, self.directory.top)
        for fp, blocks in order:
            self._delete(blocks)
            with self.directory.cond:  # KV put or read since the order was made: hot now
                hot = any(is_hot(e, self.directory.top)
                          for e in dependents(self.directory, fp).get(fp, ()))  # fmt: skip
            if hot:
                log.info("adapter %s: kept, its KV turned hot while room was made", fp[:16])
                continue
            self.weights.evict(fp)
            log.info("adapter %s: %d blocks of KV depending on it deleted, then it was "
                     "evicted", fp[:16], len(blocks))  # fmt: skip
        if order:
            self.sweep()

    def sweep(self) -> None:
        """Delete the blocks of namespaces whose tenant no longer sees their adapter."""
        with self.directory.cond:
            orphans = [e for fp, blocks in dependents(self.directory).items() for e in blocks
                       if not self.weights.sees(e.ns.tenant, fp)]  # fmt: skip
        self._delete(orphans)

    def _delete(self, blocks: Sequence[BlockEntry]) -> None:
        by_ns: dict[bytes, tuple[NamespaceInfo, list[bytes]]] = {}
        for e in blocks:
            by_ns.setdefault(e.ns.id, (e.ns, []))[1].append(e.key)
        for ns, keys in by_ns.values():
            self.directory.delete(ns, keys)
