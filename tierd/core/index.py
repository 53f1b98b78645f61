"""In-memory index: namespaces and block entries, the core's view of what is where.

Primitives: `NamespaceInfo`, `BlockEntry`, `Index.get/add/remove/namespace`.

The catalog (SQLite) is the durable copy; this is the one every call reads, guarded by the
core's lock. An entry holds one `Copy` per tier that has its bytes, by tier name (a block
promoted from a slower tier keeps its copy there, so demoting it again costs no write).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from tierd.tiers.base import Copy
from tierd_client.layout import KVLayout


def layout_to_list(layout: KVLayout) -> list[int | str]:
    """The layout as the catalog stores it and as namespace ids hash it."""
    return [layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.dtype,
            layout.block_tokens]


def layout_from_list(values: list[int | str]) -> KVLayout:
    layers, heads, dim, dtype, tokens = values
    return KVLayout(int(layers), int(heads), int(dim), str(dtype), int(tokens))


@dataclass(frozen=True)
class NamespaceInfo:
    id: bytes
    tenant: str
    model: str
    layout: KVLayout
    extra_keys: tuple[str, ...]
    # Blocks kept exact: tiers with a lossy codec store them raw (part of the id).
    lossless: bool = False
    # The fingerprint of the LoRA adapter its KV depends on ("": none; part of the id);
    # tierd.core.adapters.
    adapter: str = ""

    @property
    def block_bytes(self) -> int:
        return self.layout.block_bytes


@dataclass(eq=False)
class BlockEntry:
    ns: NamespaceInfo
    key: bytes
    nbytes: int
    checksum: int
    copies: dict[str, Copy] = field(default_factory=dict)  # by tier name
    pinned: bool = False
    last_access: float = 0.0
    hits: int = 0
    readers: int = 0  # get leases holding the host copy
    moving: bool = False  # a demotion or move is writing a copy out
    deleted: bool = False  # removed from the index; space freed when readers reach 0
    # One checksum per layer's K|V range, so attend verifies exactly the range it reads
    # from NVMe; set when the block is first written out, None for older catalog rows.
    layer_sums: tuple[int, ...] | None = field(default=None, repr=False)
    loading: Future[bool] | None = field(default=None, repr=False)  # promotion in flight
    # Placement policies' state, by tier name (tierd.core.policies), and the block's
    # position in its prefix as the last lookup saw it (-1: never looked up).
    policy_state: dict[str, Any] = field(default_factory=dict, repr=False)
    depth: int = -1
    # When the prefix directory was last told this daemon holds it (0: not told, or told
    # it is gone); tierd.core.holders.
    advertised: float = 0.0

    @property
    def idle(self) -> bool:
        """Nobody reads, writes or loads its bytes: its space may be freed."""
        return self.readers == 0 and not self.moving and self.loading is None

    @property
    def movable(self) -> bool:
        return self.idle and not self.deleted


class Index:
    def __init__(self) -> None:
        self.namespaces: dict[bytes, NamespaceInfo] = {}
        self._blocks: dict[tuple[bytes, bytes], BlockEntry] = {}
        # The blocks of namespaces that name an adapter, by its fingerprint: what depends
        # on an adapter is found without walking every block (tierd.core.adapters).
        self._adapted: dict[str, dict[tuple[bytes, bytes], BlockEntry]] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, ns_id: bytes, key: bytes) -> BlockEntry | None:
        return self._blocks.get((ns_id, key))

    def add(self, entry: BlockEntry) -> None:
        k = (entry.ns.id, entry.key)
        self._blocks[k] = entry
        if entry.ns.adapter:
            self._adapted.setdefault(entry.ns.adapter, {})[k] = entry

    def remove(self, entry: BlockEntry) -> None:
        """Unindex `entry` (not another block that took its key since)."""
        if self._blocks.get(k := (entry.ns.id, entry.key)) is entry:
            del self._blocks[k]
            if entry.ns.adapter:
                deps = self._adapted[entry.ns.adapter]
                del deps[k]
                if not deps:
                    del self._adapted[entry.ns.adapter]

    def adapted(self) -> dict[str, list[BlockEntry]]:
        """The indexed blocks of namespaces naming an adapter, by its fingerprint."""
        return {fp: list(deps.values()) for fp, deps in self._adapted.items()}

    def adapted_by(self, fingerprint: str) -> list[BlockEntry]:
        return list(self._adapted.get(fingerprint, {}).values())

    def holds(self, entry: BlockEntry) -> bool:
        """Whether `entry` is the block its key names (False once a delete took it out)."""
        return self._blocks.get((entry.ns.id, entry.key)) is entry

    def entries(self) -> list[BlockEntry]:
        return list(self._blocks.values())
