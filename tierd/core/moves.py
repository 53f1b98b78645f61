"""Explicit moves between tiers (the Move call): operators and tests place blocks by hand.

Primitives: `move(service, ns_id, keys, tier) -> moved`.

  the memory tier  promote (slower copies stay, as with any promotion);
  any other tier   write each block that has no copy there (from its fastest copy, through
                   the transfer engine), then drop its other copies, so reads and attend
                   use that tier (while others hold the block, the copy they may be
                   reading, its fastest besides the target, stays; the move still counts,
                   since the block now lives in the target).
A tier that places blocks itself (CSD workers, round robin over healthy ones) picks where
each goes when it reserves room.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from tierd.core import validate
from tierd.core.catalog import copy_rows, plan_set_copies, plan_set_layer_sums
from tierd.core.index import BlockEntry
from tierd.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)
from tierd.tiers.base import Copy, Location, Tier
from tierd.transfer.engine import Move, Outcome

# How long a move waits for another call that is writing the same block out.
MOVE_WAIT_SECONDS = 30.0

if TYPE_CHECKING:
    from tierd.core.service import CacheService


def move(svc: CacheService, ns_id: bytes, keys: Sequence[bytes], tier: str) -> int:
    ns = svc.namespace(ns_id)
    validate.check_keys(keys, svc.config.leases.max_keys_per_call)
    target = svc.tiers.get(tier)
    if target is None:
        names = ", ".join(t.name for t in svc.tiers)
        raise InvalidArgument(f"no tier named {tier!r} (tiers: {names})", field="tier")
    with svc.cond:
        # Once each, however often named: one reader reference, one claim.
        held = [e for e in dict.fromkeys(svc.index.get(ns.id, k) for k in keys) if e is not None]
        for entry in held:
            entry.readers += 1
    try:
        if target is svc.top:
            svc.placer.make_resident(held)
            return sum(1 for e in held if target.name in e.copies)
        return _to_tier(svc, target, held)
    finally:
        with svc.cond:
            for entry in held:
                svc.drop_reader(entry)
            svc.cond.notify_all()


def _claim(svc: CacheService, entry: BlockEntry) -> None:
    """Wait until nobody else writes this block out, then mark it as ours to write.

    Caller holds the lock. Demotions and other moves skip or wait for a `moving` block, so
    one block never gets two copies in one tier (the second would leak its space)."""
    if not svc.cond.wait_for(lambda: not entry.moving, MOVE_WAIT_SECONDS):
        raise Unavailable("the block is being moved by another call; retry", field="keys")
    svc.directory.claim(entry)


def _release_claims(svc: CacheService, entries: list[BlockEntry]) -> None:
    for entry in entries:
        svc.directory.unclaim(entry)
    svc.cond.notify_all()


def _to_tier(svc: CacheService, target: Tier, held: list[BlockEntry]) -> int:
    # Claimed in key order, so two moves over overlapping keys never wait on each other.
    todo = sorted(held, key=lambda e: e.key)
    with svc.cond:
        claimed: list[BlockEntry] = []
        try:
            for entry in todo:
                _claim(svc, entry)
                claimed.append(entry)
        except Unavailable:
            _release_claims(svc, claimed)
            raise
        writes: list[tuple[BlockEntry, Copy, Location]] = []
        try:
            for entry in (e for e in todo if target.name not in e.copies and e.copies):
                src = svc.directory.best(entry)
                assert src is not None
                size = svc.transfer.stored_bytes(target, entry)
                loc = svc.placer.allocate_in(target, entry.ns.tenant, size)
                if loc is None:
                    raise ResourceExhausted(f"{target.name} tier full", field="keys")
                writes.append((entry, src, loc))
        except BaseException:
            for entry, _, loc in writes:
                target.release(entry.ns.tenant, loc, svc.transfer.stored_bytes(target, entry))
            _release_claims(svc, claimed)
            raise
    stamped = [e.layer_sums is None for e, _, _ in writes]
    moves = [Move(e, src, target, loc) for e, src, loc in writes]
    outcomes = [f.result() for f in svc.transfer.copy_many(moves)]
    corrupt: list[tuple[BlockEntry, Copy]] = []
    failed = False
    made: dict[int, Copy] = {}  # id(entry) -> the copy this move wrote for it
    with svc.cond:
        sums = []
        for (entry, src, loc), outcome, fresh, done in zip(writes, outcomes, stamped, moves):
            if outcome is not Outcome.OK or entry.deleted:
                target.release(entry.ns.tenant, loc, svc.transfer.stored_bytes(target, entry))
                if outcome is Outcome.CORRUPT:
                    corrupt.append((entry, src))
                failed |= outcome is Outcome.UNREACHABLE
                continue
            assert done.result is not None  # the copy made: in the target's encoding
            made[id(entry)] = done.result
            if fresh and entry.layer_sums is not None:
                sums.append((entry.ns.id, entry.key, entry.checksum, entry.layer_sums))
        planned = {id(e): _kept(svc, e, target, made.get(id(e))) for e in todo}
        rows = [(e.ns.id, e.key, copy_rows(planned[id(e)])) for e in todo if planned[id(e)]]
        ticket = svc.directory.log.add(plan_set_copies(rows) + plan_set_layer_sums(sums))
    # On record before memory changes (an answered move is durable), committed without the
    # lock: a catalog that cannot take the rows (its disk is full) leaves every block where
    # it was, on record as in memory, and the move fails.
    try:
        svc.directory.log.commit(ticket)
    except BaseException:
        with svc.cond:
            for entry, _, loc in writes:
                if id(entry) in made:
                    target.release(entry.ns.tenant, loc, svc.transfer.stored_bytes(target, entry))
            _release_claims(svc, claimed)
        raise
    with svc.cond:
        moved = 0
        for entry in todo:
            copy = made.get(id(entry))
            if entry.deleted:
                if copy is not None:
                    target.release(entry.ns.tenant, copy.location, copy.length)
                continue
            if copy is not None:
                svc.directory.add_copy(entry, copy)
            if target.name not in entry.copies:
                continue
            moved += 1
            keep = {id(c) for c in _kept(svc, entry, target, None)}
            for other in [c for c in entry.copies.values() if id(c) not in keep]:
                svc.directory.drop_copy(entry, other)
            # Readers came or went, or other changes to the block were queued meanwhile:
            # the record follows memory again (behind, as any change nobody waits for).
            if keep != {id(c) for c in planned[id(entry)]} or svc.directory.log.last() != ticket:
                svc.directory.record_copies(entry)
        _release_claims(svc, claimed)
    for entry, src in corrupt:
        svc.drop_corrupt_copy(entry, src.tier, src.location, own_readers=1)
    if corrupt:
        entry = corrupt[0][0]
        raise DataLoss(f"block {entry.key.hex()} failed its checksum in the {corrupt[0][1].tier} "
                       "tier and was dropped; recompute it", field="keys")  # fmt: skip
    if failed:
        raise Unavailable(f"writing to the {target.name} tier failed; retry", field="tier")
    if any(not e.copies for e in todo):
        raise FailedPrecondition("block has no copy left to move", field="keys")
    return moved


def _kept(svc: CacheService, entry: BlockEntry, target: Tier, made: Copy | None) -> list[Copy]:
    """The copies a block keeps once moved: the target's, and while others hold the block
    (ours is the one reference the caller took), the copy they may be reading: the fastest
    besides the target, which a get maps, a sequence attends over or a promotion copies
    from. None when the block has no copy in the target."""
    new = made or entry.copies.get(target.name)
    if new is None:
        return []
    others = [c for c in entry.copies.values() if c.tier != target.name]
    if entry.readers > 1 and others:
        return [new, min(others, key=lambda c: svc.directory.rank(c.tier))]
    return [new]
