"""Space allocator for fixed regions (a shared-memory segment, a preallocated file).

Primitives: `allocate(nbytes) -> offset | None`, `free(offset, nbytes)`,
`reserve(offset, nbytes)` (rebuild after restart), `used_bytes`, `capacity`. An extent
that does not fit the books (a double free, an overlapping reserve) is an `ExtentError`.

KV blocks of one namespace all have one size, so freed extents are kept on exact-size
free lists and handed back LIFO (the most recently touched memory is reused first, which
keeps pages warm). Space not on a size list lives in coalesced holes, first-fit. When a
request fits neither, the size lists are folded back into the holes and it is tried again,
so blocks of a new size can reuse the space of an old one.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

from tierd.errors import ExtentError


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


class ExtentAllocator:
    def __init__(self, capacity: int, alignment: int = 4096) -> None:
        if capacity < 0 or alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("capacity must be >= 0 and alignment a power of two")
        self.alignment = alignment
        self.capacity = capacity // alignment * alignment
        # Holes: sorted disjoint (offset, length) pairs, kept as two parallel lists.
        self._hole_off: list[int] = [0] if self.capacity else []
        self._hole_len: list[int] = [self.capacity] if self.capacity else []
        self._sized: dict[int, list[int]] = defaultdict(list)
        # Offsets on the size lists, so a double free is caught before it hands one
        # extent to two owners.
        self._sized_offsets: set[int] = set()
        self._sized_bytes = 0
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def free_bytes(self) -> int:
        return self.capacity - self._used

    def extent_bytes(self, nbytes: int) -> int:
        """The space an allocation of `nbytes` really takes."""
        if nbytes < 0:
            raise ExtentError(f"negative size: {nbytes}")
        return align_up(max(nbytes, 1), self.alignment)

    def can_allocate(self, nbytes: int) -> bool:
        """Exactly whether `allocate(nbytes)` would succeed now.

        Free bytes alone are not enough: with mixed sizes the free space can be split
        into holes that are each too small.
        """
        size = self.extent_bytes(nbytes)
        if size > self.capacity - self._used:
            return False
        if self._sized.get(size) or self._hole_fits(size):
            return True
        if self._sized_bytes:
            # allocate() would fold at this point too, so folding here loses nothing.
            self._fold_sized_lists()
            return self._hole_fits(size)
        return False

    def allocate(self, nbytes: int) -> int | None:
        size = self.extent_bytes(nbytes)
        stack = self._sized.get(size)
        if stack:
            self._sized_bytes -= size
            self._used += size
            reused = stack.pop()
            self._sized_offsets.discard(reused)
            return reused
        offset = self._take_from_holes(size)
        if offset is None and self._sized_bytes:
            self._fold_sized_lists()
            offset = self._take_from_holes(size)
        if offset is not None:
            self._used += size
        return offset

    def free(self, offset: int, nbytes: int) -> None:
        size = self.extent_bytes(nbytes)
        if (
            offset < 0
            or offset % self.alignment
            or offset + size > self.capacity
            or size > self._used
            or offset in self._sized_offsets
            or self._in_hole(offset)
        ):
            raise ExtentError(f"free of an extent never allocated: offset={offset} size={size}")
        self._used -= size
        self._sized[size].append(offset)
        self._sized_offsets.add(offset)
        self._sized_bytes += size

    def reserve(self, offset: int, nbytes: int) -> None:
        """Mark a known extent as allocated (used when rebuilding from a persisted index)."""
        size = self.extent_bytes(nbytes)
        if offset < 0 or offset % self.alignment or offset + size > self.capacity:
            raise ExtentError(f"extent offset={offset} size={size} is misaligned or out of range")
        i = self._containing_hole(offset, size)
        if i < 0 and self._sized_bytes:
            # The extent may sit on a size list (freed, not yet folded): it is free too.
            self._fold_sized_lists()
            i = self._containing_hole(offset, size)
        if i < 0:
            raise ExtentError(f"extent offset={offset} size={size} overlaps an allocated one")
        h_off, h_len = self._hole_off[i], self._hole_len[i]
        del self._hole_off[i], self._hole_len[i]
        self._insert_hole(h_off, offset - h_off)
        self._insert_hole(offset + size, h_off + h_len - offset - size)
        self._used += size

    @property
    def cached_free_bytes(self) -> int:
        """Freed bytes kept on size lists for warm reuse (still resident in memory)."""
        return self._sized_bytes

    def has_cached(self, nbytes: int) -> bool:
        """Whether an allocation of `nbytes` would reuse a warm extent (no new memory)."""
        return bool(self._sized.get(self.extent_bytes(nbytes)))

    def release_cached(self, want: int) -> list[tuple[int, int]]:
        """Fold warm extents into holes until `want` bytes are released; returns them.

        The oldest-freed extents of each size go first, so the warmest stay."""
        released: list[tuple[int, int]] = []
        total = 0
        for size, offsets in self._sized.items():
            while offsets and total < want:
                offset = offsets.pop(0)
                self._sized_offsets.discard(offset)
                self._sized_bytes -= size
                self._merge_hole(offset, size)
                released.append((offset, size))
                total += size
        return released

    def drain_cached(self) -> list[tuple[int, int]]:
        """Fold the size lists into holes; returns the extents folded, to release to the OS."""
        drained = [(off, size) for size, offsets in self._sized.items() for off in offsets]
        self._fold_sized_lists()
        return drained

    def holes(self) -> list[tuple[int, int]]:
        """Free space that is not kept warm: never allocated, or released to the OS."""
        return list(zip(self._hole_off, self._hole_len))

    def free_extents(self) -> list[tuple[int, int]]:
        """Every free (offset, length), coalesced: what may be released back to the OS."""
        self._fold_sized_lists()
        return list(zip(self._hole_off, self._hole_len))

    # -- internals ------------------------------------------------------------------------

    def _containing_hole(self, offset: int, size: int) -> int:
        """Index of the hole holding all of [offset, offset+size), else -1."""
        i = bisect.bisect_right(self._hole_off, offset) - 1
        if i < 0 or offset + size > self._hole_off[i] + self._hole_len[i]:
            return -1
        return i

    def _in_hole(self, offset: int) -> bool:
        i = bisect.bisect_right(self._hole_off, offset) - 1
        return i >= 0 and offset < self._hole_off[i] + self._hole_len[i]

    def _hole_fits(self, size: int) -> bool:
        return any(length >= size for length in self._hole_len)

    def _take_from_holes(self, size: int) -> int | None:
        for i, length in enumerate(self._hole_len):
            if length >= size:
                offset = self._hole_off[i]
                if length == size:
                    del self._hole_off[i], self._hole_len[i]
                else:
                    self._hole_off[i] += size
                    self._hole_len[i] -= size
                return offset
        return None

    def _fold_sized_lists(self) -> None:
        for size, offsets in self._sized.items():
            for offset in offsets:
                self._merge_hole(offset, size)
        self._sized.clear()
        self._sized_offsets.clear()
        self._sized_bytes = 0

    def _insert_hole(self, offset: int, length: int) -> None:
        if length > 0:
            i = bisect.bisect_left(self._hole_off, offset)
            self._hole_off.insert(i, offset)
            self._hole_len.insert(i, length)

    def _merge_hole(self, offset: int, length: int) -> None:
        i = bisect.bisect_left(self._hole_off, offset)
        if i > 0 and self._hole_off[i - 1] + self._hole_len[i - 1] == offset:
            i -= 1
            self._hole_len[i] += length
        else:
            self._hole_off.insert(i, offset)
            self._hole_len.insert(i, length)
        nxt = i + 1
        if (
            nxt < len(self._hole_off)
            and self._hole_off[i] + self._hole_len[i] == self._hole_off[nxt]
        ):
            self._hole_len[i] += self._hole_len[nxt]
            del self._hole_off[nxt], self._hole_len[nxt]
