"""The integrity checks of every byte move, in one place.

Primitives: `copy_intact(copy, view)`, `source_intact(entry, copy, view)` (also gives the
entry its per-layer checksums), `layer_intact(entry, copy, layer, view)`, `layer_sums_of`.

A copy about to be written to another tier is checked first: a stale copy (say one
adopted after a crash) must never spread, nor lend its per-layer sums to damage. Bytes
read from a tier are checked before anyone uses them: whole copies against the copy's
checksum (of its stored bytes: encoded ones for an encoded copy), single layers (attend)
against that layer's sum. A copy whose bytes are the block's as put uses the block's
per-layer sums; one whose bytes differ (encoded, or decoded from a lossy copy) carries
its own.
"""

from __future__ import annotations

from tierd.core.index import BlockEntry
from tierd.tiers.base import Copy
from tierd.tiers.checksum import checksum, layer_checksums


def copy_intact(copy: Copy, view: memoryview) -> bool:
    return len(view) == copy.length and checksum(view) == copy.checksum


def as_put(entry: BlockEntry, copy: Copy) -> bool:
    """Whether the copy holds the block's bytes as put (raw, never through a lossy codec)."""
    return copy.encoding == "raw" and copy.checksum == entry.checksum


def source_intact(entry: BlockEntry, copy: Copy, view: memoryview) -> bool:
    """Check a copy about to be written elsewhere, and give the entry its per-layer
    checksums from it if it has none yet (one pass over memory, next to a write)."""
    if not copy_intact(copy, view):
        return False
    if entry.layer_sums is None and as_put(entry, copy):
        entry.layer_sums = layer_checksums(view, entry.ns.layout.num_layers)
    return True


def layer_sums_of(entry: BlockEntry, copy: Copy) -> tuple[int, ...] | None:
    """The per-layer checksums that vouch for `copy`'s stored bytes."""
    return entry.layer_sums if as_put(entry, copy) else copy.layer_sums


def layer_intact(entry: BlockEntry, copy: Copy, layer: int, view: memoryview) -> bool:
    sums = layer_sums_of(entry, copy)
    return sums is not None and checksum(view) == sums[layer]
