"""The tier chain as a pure planner: which blocks leave a level, where they go, which are
dropped. No I/O, no locks, no threads; the caller serialises calls (the placer under its
own lock) and moves the bytes.

Primitives: `Level(name, capacity_bytes, high_watermark, low_watermark, policy,
admission)`, `Share(weight, quota_bytes)`, `Move(entry, src, dst, write)`,
`TierChain(levels)` with

- bookkeeping: `insert(entry, level)`, `remove(entry, level)`, `forget(entry)`,
  `hit(entry)`, `access(entry)`, `holds(entry, level)`, `levels_of(entry)`,
  `top_of(entry)`, `used(level)`, `usage(level)`;
- questions: `need(level, incoming)` (bytes to free, from the watermarks),
  `plan_room(level, nbytes, usage, share, busy)` (victims, in order, fair between
  tenants), `destination(entry, level)` (the level a victim goes to, None: dropped);
- `settle(level, incoming, busy, share)`: applies the answers to the bookkeeping alone
  (for simulations and tests; the daemon applies them as its I/O completes). One pass's
  victims are placed together: each level below makes room once for all it admitted.

Levels are ordered fastest first. Each level's `policy` orders its victims (through
`victims_of`, so planning costs the victims taken, not a scan of the level) and is told
of inserts, hits and evictions; `admission` (default: the level's policy) decides
whether a block demoted from above may enter (a separate admission policy gets no insert,
hit or evict hook, so it may share the level's name). Every access is also reported to every
level's policy and admission filter (`on_access`), since frequency filters count the
accesses of blocks they do not hold yet.

Fair share, as `tierd.core.fairness`: victims are taken one at a time from the tenant
with the most bytes in the level per unit of weight, a tenant over its quota first;
within a tenant the policy's order decides.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass

from tierd.core.fairness import merge_by_pressure
from tierd.core.index import BlockEntry
from tierd.core.policies.base import Policy, Pred
from tierd.errors import Internal


@dataclass(frozen=True)
class Level:
    name: str
    capacity_bytes: int
    high_watermark: float  # room is made when occupancy would pass this share...
    low_watermark: float  # ...down to this share
    policy: Policy
    admission: Policy | None = None  # None: the policy's own `admit`

    @property
    def gate(self) -> Policy:
        return self.admission if self.admission is not None else self.policy


@dataclass(frozen=True)
class Share:
    """A tenant's claim on a level: its weight, and a quota in bytes (0: none)."""

    weight: float = 1.0
    quota_bytes: int = 0


@dataclass(frozen=True)
class Move:
    """One step of a plan applied by `settle`: `entry`'s copy left `src` for `dst`
    (None: dropped); `write` is False when `dst` already held a copy."""

    entry: BlockEntry
    src: str
    dst: str | None
    write: bool


def _equal_shares(tenant: str) -> Share:
    return Share()


class TierChain:
    def __init__(self, levels: list[Level]) -> None:
        if not levels:
            raise ValueError("a tier chain needs at least one level")
        names = [lv.name for lv in levels]
        if len(set(names)) != len(names):
            raise ValueError(f"level names repeat: {names}")
        self.levels = list(levels)
        self._rank = {lv.name: i for i, lv in enumerate(levels)}
        self._members: list[dict[BlockEntry, None]] = [{} for _ in levels]
        self._used = [0 for _ in levels]
        self._usage: list[dict[str, int]] = [{} for _ in levels]
        # Only filters that count accesses are told of them (the rest would do nothing).
        gates = [p for lv in levels for p in (lv.policy, lv.admission) if p is not None]
        self._counters = [p.on_access for p in gates
                          if type(p).on_access is not Policy.on_access]  # fmt: skip

    # -- bookkeeping --------------------------------------------------------------------

    def level(self, name: str) -> Level:
        return self.levels[self._rank[name]]

    def holds(self, entry: BlockEntry, level: str) -> bool:
        return entry in self._members[self._rank[level]]

    def levels_of(self, entry: BlockEntry) -> list[str]:
        return [lv.name for lv, m in zip(self.levels, self._members) if entry in m]

    def top_of(self, entry: BlockEntry) -> str | None:
        """The fastest level holding the block (where a read is served from)."""
        for lv, members in zip(self.levels, self._members):
            if entry in members:
                return lv.name
        return None

    def used(self, level: str) -> int:
        return self._used[self._rank[level]]

    def usage(self, level: str) -> dict[str, int]:
        """Bytes held in the level, by tenant."""
        return dict(self._usage[self._rank[level]])

    def insert(self, entry: BlockEntry, level: str) -> None:
        """The block got a copy in `level` (a put, a promotion or a demotion into it)."""
        i = self._rank[level]
        if entry in self._members[i]:
            raise Internal(f"{level} already holds this block")
        self._members[i][entry] = None
        self._add_bytes(i, entry, entry.nbytes)
        self.levels[i].policy.on_insert(entry)

    def remove(self, entry: BlockEntry, level: str) -> None:
        """The block's copy in `level` is gone (demoted, evicted, deleted)."""
        i = self._rank[level]
        if self._members[i].pop(entry, 0) is None:
            self._add_bytes(i, entry, -entry.nbytes)
            self.levels[i].policy.on_evict(entry)

    def forget(self, entry: BlockEntry) -> None:
        """The block left the cache: every copy is gone."""
        for lv in self.levels:
            self.remove(entry, lv.name)

    def access(self, entry: BlockEntry) -> None:
        """One put or read of the block, reported to every frequency filter."""
        for count in self._counters:
            count(entry)

    def hit(self, entry: BlockEntry) -> None:
        """A read of the block was served: every level holding a copy is told, and the
        access is counted. (The entry's own `hits`/`last_access` are the caller's.)"""
        self.access(entry)
        for lv, members in zip(self.levels, self._members):
            if entry in members:
                lv.policy.on_hit(entry)

    def _add_bytes(self, i: int, entry: BlockEntry, n: int) -> None:
        self._used[i] += n
        tenant = entry.ns.tenant
        left = self._usage[i].get(tenant, 0) + n
        if left:
            self._usage[i][tenant] = left
        else:
            self._usage[i].pop(tenant, None)

    # -- questions ----------------------------------------------------------------------

    def need(self, level: str, incoming: int = 0) -> int:
        """Bytes to free in `level` before `incoming` more bytes enter it: none while
        occupancy stays at or under the high watermark, else down to the low one."""
        i = self._rank[level]
        lv, after = self.levels[i], self._used[i] + incoming
        if after <= lv.capacity_bytes * lv.high_watermark:
            return 0
        return max(0, int(after - lv.capacity_bytes * lv.low_watermark + 0.5))

    def plan_room(
        self,
        level: str,
        nbytes: int,
        usage: Mapping[str, int] | None = None,
        share: Callable[[str], Share] | None = None,
        busy: Pred | None = None,
    ) -> list[BlockEntry]:
        """Victims freeing at least `nbytes` in `level`, in the order they should leave
        (fewer if not enough may leave). `usage`: bytes per tenant that pressure counts
        (default: what the chain holds); `share`: each tenant's weight and quota;
        `busy`: blocks that may not leave now. In the last level pinned blocks never
        leave (above it they are moved down, never dropped). Nothing changes but the
        order state a policy keeps (S3-FIFO moves the blocks it passed over)."""
        if nbytes <= 0:
            return []
        i = self._rank[level]
        members = self._members[i]
        if i == len(self.levels) - 1:
            stays: Pred | None = (lambda e: e.pinned or busy(e)) if busy else (
                lambda e: e.pinned)  # fmt: skip
        else:
            stays = busy
        order = self.levels[i].policy.victims_of
        queues = {t: order(t, members.__contains__, stays) for t in self._usage[i]}
        picked: list[BlockEntry] = []
        try:
            if len(queues) == 1:  # one tenant: nobody to be fair to
                victims: Iterator[BlockEntry] = next(iter(queues.values()))
            else:
                victims = _fair(queues, dict(usage if usage is not None else self._usage[i]),
                                share or _equal_shares)  # fmt: skip
            for entry in victims:
                picked.append(entry)
                nbytes -= entry.nbytes
                if nbytes <= 0:
                    break
        finally:
            for q in queues.values():
                q.close()  # puts back what was taken but not evicted
        return picked

    def destination(self, entry: BlockEntry, level: str) -> str | None:
        """Where a victim of `level` goes: the first level below that already holds a
        copy (no write, no question asked), or admits it. Pinned blocks go to the next
        level without asking. None: the block is dropped from the chain."""
        for j in range(self._rank[level] + 1, len(self.levels)):
            lv = self.levels[j]
            if entry in self._members[j] or (entry.pinned and lv.capacity_bytes > 0):
                return lv.name
            if lv.capacity_bytes < entry.nbytes:
                continue
            gate, victim = lv.gate, None
            if gate.wants_victim and self.need(lv.name, entry.nbytes) > 0:
                first = self.plan_room(lv.name, entry.nbytes)
                victim = first[0] if first else None
            if gate.admit(entry, victim):
                return lv.name
        return None

    # -- applying a plan (bookkeeping only) ---------------------------------------------

    def settle(
        self,
        level: str,
        incoming: int = 0,
        busy: Pred | None = None,
        share: Callable[[str], Share] | None = None,
    ) -> list[Move]:
        """Make room for `incoming` bytes in `level`, applying the plan to the bookkeeping:
        the victims' destinations are chosen in turn, then each level below makes room
        once for all the blocks coming to it (the same way: its victims move further
        down; `busy` blocks stay in every level), then the victims move. A level whose
        blocks are all busy takes what comes anyway, over its capacity (as a daemon
        whose readers hold their copies). Returns the moves in the order they happened."""
        victims = self.plan_room(level, self.need(level, incoming), busy=busy, share=share)
        if not victims:
            return []
        placed = [(entry, self.destination(entry, level)) for entry in victims]
        moves: list[Move] = []
        for j in range(self._rank[level] + 1, len(self.levels)):
            name = self.levels[j].name
            coming = [e for e, dst in placed if dst == name]
            inbound = sum(e.nbytes for e in coming if not self.holds(e, name))
            if inbound:  # blocks on their way (already there or not) and busy ones stay
                moves.extend(self.settle(name, inbound, busy=_either(set(coming), busy),
                                         share=share))  # fmt: skip
        for entry, dst in placed:
            self.remove(entry, level)
            write = dst is not None and not self.holds(entry, dst)
            if write:
                self.insert(entry, dst)  # type: ignore[arg-type]
            moves.append(Move(entry, level, dst, write))
        return moves


def _either(blocks: set[BlockEntry], busy: Pred | None) -> Pred:
    if busy is None:
        return blocks.__contains__
    return lambda e: e in blocks or busy(e)


def _fair(queues: Mapping[str, Generator[BlockEntry, None, None]], usage: dict[str, int],
          share: Callable[[str], Share]) -> Iterator[BlockEntry]:  # fmt: skip
    """Victims one at a time from the tenant under most pressure (over quota first, then
    bytes per weight), each tenant's blocks in its queue's order."""

    def key(tenant: str, used: int) -> tuple[float, ...]:
        s = share(tenant)
        over = 1 if s.quota_bytes > 0 and used > s.quota_bytes else 0
        return (-over, -used / (s.weight if s.weight > 0 else 1e-9))

    return merge_by_pressure(queues, usage, key)
