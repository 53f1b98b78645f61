"""The integrity checks of every byte move, in one place.

Primitives: `block_intact(entry, view)`, `source_intact(entry, view)` (also gives the entry
its per-layer checksums), `layer_intact(entry, layer, view)`.

A copy about to be written to another tier is checked first: a stale copy (say one
adopted after a crash) must never spread, nor lend its per-layer sums to damage. Bytes
read from a tier are checked before anyone uses them: whole blocks against the block
checksum, single layers (attend) against that layer's sum.
"""

from __future__ import annotations

from tierd.core.index import BlockEntry
from tierd.tiers.checksum import checksum, layer_checksums


def block_intact(entry: BlockEntry, view: memoryview) -> bool:
    return len(view) == entry.nbytes and checksum(view) == entry.checksum


def source_intact(entry: BlockEntry, view: memoryview) -> bool:
    """Check a copy about to be written elsewhere, and give the entry its per-layer
    checksums from it if it has none yet (one pass over memory, next to a write)."""
    if not block_intact(entry, view):
        return False
    if entry.layer_sums is None:
        entry.layer_sums = layer_checksums(view, entry.ns.layout.num_layers)
    return True


def layer_intact(entry: BlockEntry, layer: int, view: memoryview) -> bool:
    sums = entry.layer_sums
    return sums is not None and checksum(view) == sums[layer]
