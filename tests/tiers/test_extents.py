from __future__ import annotations

import random

import pytest

from tierd.errors import ExtentError
from tierd.tiers.extents import ExtentAllocator, align_up

A = 4096


def test_capacity_rounds_down_and_sizes_align() -> None:
    alloc = ExtentAllocator(10 * A + 123)
    assert alloc.capacity == 10 * A
    assert alloc.extent_bytes(0) == A
    assert alloc.extent_bytes(1) == A
    assert alloc.extent_bytes(A) == A
    assert alloc.extent_bytes(A + 1) == 2 * A
    with pytest.raises(ExtentError):
        alloc.extent_bytes(-1)


def test_bad_construction() -> None:
    with pytest.raises(ValueError):
        ExtentAllocator(-1)
    with pytest.raises(ValueError):
        ExtentAllocator(A, alignment=3000)
    empty = ExtentAllocator(0)
    assert empty.allocate(1) is None
    assert not empty.can_allocate(1)


def test_fill_then_full_then_free_makes_room() -> None:
    alloc = ExtentAllocator(4 * A)
    offs = [alloc.allocate(A) for _ in range(4)]
    assert sorted(offs) == [0, A, 2 * A, 3 * A]  # type: ignore[type-var]
    assert alloc.used_bytes == 4 * A and alloc.free_bytes == 0
    assert alloc.allocate(1) is None
    assert not alloc.can_allocate(1)
    alloc.free(offs[1], A)  # type: ignore[arg-type]
    assert alloc.can_allocate(A)
    assert alloc.allocate(A) == offs[1]


def test_same_size_reuse_is_lifo() -> None:
    alloc = ExtentAllocator(8 * A)
    a, _b, c = (alloc.allocate(2 * A) for _ in range(3))
    alloc.free(a, 2 * A)  # type: ignore[arg-type]
    alloc.free(c, 2 * A)  # type: ignore[arg-type]
    assert alloc.cached_free_bytes == 4 * A
    assert alloc.allocate(2 * A) == c
    assert alloc.allocate(2 * A) == a
    assert alloc.cached_free_bytes == 0


def test_fold_lets_a_new_size_reuse_old_space() -> None:
    alloc = ExtentAllocator(4 * A)
    small = [alloc.allocate(A) for _ in range(4)]
    for off in small:
        alloc.free(off, A)  # type: ignore[arg-type]
    assert alloc.used_bytes == 0
    # Nothing on the 4-page list and no hole: only folding the 1-page list finds room.
    assert alloc.can_allocate(4 * A)
    assert alloc.allocate(4 * A) == 0
    assert alloc.used_bytes == 4 * A


def test_can_allocate_is_exact_under_fragmentation() -> None:
    alloc = ExtentAllocator(3 * A)
    a, b, c = (alloc.allocate(A) for _ in range(3))
    alloc.free(a, A)  # type: ignore[arg-type]
    alloc.free(c, A)  # type: ignore[arg-type]
    # 2 pages are free, but not adjacent.
    assert alloc.free_bytes == 2 * A
    assert not alloc.can_allocate(2 * A)
    assert alloc.allocate(2 * A) is None
    alloc.free(b, A)  # type: ignore[arg-type]
    assert alloc.can_allocate(3 * A)
    assert alloc.allocate(3 * A) == 0


def test_free_rejects_bad_and_double_frees() -> None:
    alloc = ExtentAllocator(4 * A)
    off = alloc.allocate(A)
    other = alloc.allocate(A)
    assert off is not None and other is not None
    with pytest.raises(ExtentError):
        alloc.free(off + 1, A)
    with pytest.raises(ExtentError):
        alloc.free(-A, A)
    with pytest.raises(ExtentError):
        alloc.free(4 * A, A)
    with pytest.raises(ExtentError):
        alloc.free(3 * A, A)  # in a hole: never allocated
    alloc.free(off, A)
    with pytest.raises(ExtentError):
        alloc.free(off, A)  # still on the size list
    alloc.drain_cached()
    with pytest.raises(ExtentError):
        alloc.free(off, A)  # now in a hole
    assert alloc.used_bytes == A


def test_reserve_after_restart() -> None:
    first = ExtentAllocator(16 * A)
    live = {}
    for size in (A, 3 * A, 100, 2 * A + 1, A):
        off = first.allocate(size)
        assert off is not None
        live[off] = size
    gone = next(iter(live))
    first.free(gone, live.pop(gone))

    second = ExtentAllocator(16 * A)
    for off, size in live.items():
        second.reserve(off, size)
    assert second.used_bytes == first.used_bytes
    with pytest.raises(ExtentError):
        second.reserve(next(iter(live)), A)  # already reserved
    # What is left is handed out without touching a reserved extent.
    taken = []
    while (off := second.allocate(A)) is not None:
        taken.append(off)
    assert len(taken) * A == second.capacity - sum(second.extent_bytes(s) for s in live.values())
    for off in taken:
        for r_off, r_size in live.items():
            assert off + A <= r_off or off >= r_off + second.extent_bytes(r_size)


def test_reserve_rejects_bad_extents_and_sees_cached_frees() -> None:
    alloc = ExtentAllocator(8 * A)
    with pytest.raises(ExtentError):
        alloc.reserve(100, A)
    with pytest.raises(ExtentError):
        alloc.reserve(7 * A, 2 * A)
    with pytest.raises(ExtentError):
        alloc.reserve(-A, A)
    off = alloc.allocate(2 * A)
    assert off is not None
    alloc.free(off, 2 * A)  # sits on a size list, but is free
    alloc.reserve(off + A, A)
    assert alloc.used_bytes == A


def test_drain_and_free_extents_coalesce() -> None:
    alloc = ExtentAllocator(8 * A)
    offs = [alloc.allocate(A) for _ in range(8)]
    for off in offs[2:5]:
        alloc.free(off, A)  # type: ignore[arg-type]
    drained = alloc.drain_cached()
    assert sorted(drained) == [(2 * A, A), (3 * A, A), (4 * A, A)]
    assert alloc.cached_free_bytes == 0
    assert alloc.free_extents() == [(2 * A, 3 * A)]
    alloc.free(offs[7], A)  # type: ignore[arg-type]
    assert alloc.free_extents() == [(2 * A, 3 * A), (7 * A, A)]


class _Model:
    """Byte-level truth: every live extent, checked for overlap and bounds."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.live: dict[int, int] = {}  # offset -> extent bytes

    def check_new(self, off: int, size: int) -> None:
        assert off % A == 0 and 0 <= off and off + size <= self.capacity
        for o, s in self.live.items():
            assert off + size <= o or off >= o + s, f"[{off},+{size}) overlaps [{o},+{s})"

    @property
    def used(self) -> int:
        return sum(self.live.values())


@pytest.mark.parametrize("seed", range(6))
def test_randomized_against_model(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.choice([64, 200, 513]) * A
    alloc = ExtentAllocator(capacity)
    model = _Model(alloc.capacity)
    # Phases of sizes, so folds of old size lists must make room for new sizes.
    phases = [
        [A],
        [2 * A, 3 * A + 17],
        [1, 5 * A],
        [rng.randrange(1, 9 * A) for _ in range(4)],
    ]
    for step in range(3000):
        sizes = phases[(step // 500) % len(phases)]
        op = rng.random()
        if op < 0.55 or not model.live:
            nbytes = rng.choice(sizes)
            size = align_up(max(nbytes, 1), A)
            predicted = alloc.can_allocate(nbytes)
            off = alloc.allocate(nbytes)
            assert (off is not None) == predicted
            if off is not None:
                model.check_new(off, size)
                model.live[off] = size
            else:
                # Full is only allowed when no hole of that size can exist.
                assert max((ln for _, ln in alloc.free_extents()), default=0) < size
        elif op < 0.95:
            off = rng.choice(list(model.live))
            alloc.free(off, model.live.pop(off))
        elif op < 0.97:
            alloc.drain_cached()
        else:
            # Restart: rebuild a fresh allocator from the live extents alone.
            alloc = ExtentAllocator(capacity)
            for off, size in model.live.items():
                alloc.reserve(off, size)
        assert alloc.used_bytes == model.used
        assert alloc.free_bytes == alloc.capacity - model.used
    # Free space and live extents tile the file exactly.
    holes = alloc.free_extents()
    spans = sorted(list(model.live.items()) + holes)
    pos = 0
    for off, size in spans:
        assert off == pos
        pos += size
    assert pos == alloc.capacity
