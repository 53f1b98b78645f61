"""TinyLFU admission (Einziger et al., "TinyLFU: A Highly Efficient Cache Admission
Policy", 2017) for slower tiers, with LRU inside the tier.

Every access to a block (a put or a read, whichever tier serves it: `on_access`) goes
into an approximate frequency histogram:

- a doorkeeper, the set of key hashes seen once in the current window (the paper's Bloom
  filter, held exactly here): a first access only enters it;
- a count-min sketch, 4 rows of 4-bit-sized counters (capped at 15): later accesses
  increment the block's counter in each row; the estimate is the smallest of the 4, plus
  one if the doorkeeper holds the block;
- aging: after `sample` accesses every counter is halved and the doorkeeper cleared, so
  the estimate reflects the recent past. `sample` is ten times the most blocks the tier
  has held (at least `MIN_SAMPLE`), and each sketch row is at least that many counters
  wide (a power of two; when the tier outgrows it, the sketch restarts wider).

Admission rule for a block demoted into this tier: when the tier has room for it, it is
admitted (no block is displaced); when the tier is full, it is admitted only if its
estimated frequency is strictly above that of the victim it would displace (the tier's
next victim, passed in by the caller since `wants_victim` is set). The tier above plays
the part of W-TinyLFU's admission window: new blocks always enter there. Inside the tier
blocks leave in LRU order.
"""

from __future__ import annotations

import hashlib

from tierd.core.index import BlockEntry
from tierd.core.policies.lru import LRU

ROWS = 4
MAX_COUNT = 15
MIN_SAMPLE = 4096
_HALVE = bytes(i >> 1 for i in range(256))


def key_hash(entry: BlockEntry) -> int:
    """A 64-bit hash of the block's identity, the same in every process (Python's own
    string hash is salted per process, which would make replays unrepeatable)."""
    digest = hashlib.blake2b(entry.ns.id + entry.key, digest_size=8).digest()
    return int.from_bytes(digest, "little")


class TinyLFU(LRU):
    name = "tinylfu"
    wants_victim = True

    def __init__(self, tier: str = "tier", min_sample: int = MIN_SAMPLE) -> None:
        super().__init__(tier)
        self.min_sample = min_sample
        self.peak = 0  # most blocks this tier has held
        self._width = 0
        self._rows: list[bytearray] = []
        self._door: set[int] = set()
        self._added = 0  # accesses since the last aging
        self._resize()

    @property
    def sample(self) -> int:
        return max(10 * self.peak, self.min_sample)

    def _resize(self) -> None:
        self._width = 1 << (max(self.peak, self.min_sample) - 1).bit_length()
        self._rows = [bytearray(self._width) for _ in range(ROWS)]
        self._door.clear()
        self._added = 0

    def _slots(self, h: int) -> list[int]:
        # Double hashing: row i uses h1 + i * h2 (h2 odd, so the rows differ).
        h1, h2, mask = h & 0xFFFFFFFF, (h >> 32) | 1, self._width - 1
        return [(h1 + i * h2) & mask for i in range(ROWS)]

    def on_insert(self, entry: BlockEntry) -> None:
        super().on_insert(entry)
        held = len(self._valid)
        if held > self.peak:
            self.peak = held
            if self.peak > self._width:
                self._resize()

    def on_access(self, entry: BlockEntry) -> None:
        h = key_hash(entry)
        if h not in self._door:
            self._door.add(h)
        else:
            for row, slot in zip(self._rows, self._slots(h)):
                if row[slot] < MAX_COUNT:
                    row[slot] += 1
        self._added += 1
        if self._added >= self.sample:
            self._age()

    def _age(self) -> None:
        self._rows = [row.translate(_HALVE) for row in self._rows]
        self._door.clear()
        self._added = 0

    def estimate(self, entry: BlockEntry) -> int:
        h = key_hash(entry)
        count = min(row[slot] for row, slot in zip(self._rows, self._slots(h)))
        return count + (1 if h in self._door else 0)

    def admit(self, entry: BlockEntry, victim: BlockEntry | None = None) -> bool:
        return victim is None or self.estimate(entry) > self.estimate(victim)
