"""Leases: what a client holds between prepare and commit/release.

Primitives: `PutLease`, `GetLease`, `LeaseTable.add/pop/expired`.

A put lease owns staging slots that no index entry names; a get
lease holds a reader reference on each block it returned. A client that dies never
releases, so every lease carries a deadline and the core reaps the expired ones.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tierd.core.index import BlockEntry, NamespaceInfo
from tierd.tiers.staging import StagingArea


@dataclass
class PutSlotLease:
    key: bytes
    offset: int


@dataclass
class PutLease:
    id: int
    ns: NamespaceInfo
    slots: list[PutSlotLease]
    deadline: float
    area: StagingArea  # the staging area its slots are in
    committing: bool = False
    writers: int = 0  # in-band chunks being copied into its slots right now
    # Held by the daemon for an in-band stream: the client never sees its id, and the
    # CommitPut / Release calls do not touch it.
    inband: bool = False


@dataclass
class GetLease:
    id: int
    ns: NamespaceInfo
    entries: list[BlockEntry] = field(default_factory=list)
    deadline: float = 0.0
    inband: bool = False  # held by the daemon for an in-band Get stream
    # The daemon is copying its blocks out (into the exchange area): it does not expire
    # until that is done.
    copying: bool = False
    on_end: Callable[[], None] | None = None  # what else it holds, freed when it ends
    # Bytes of what else it holds (exchange slots): the tenant's, as its entries are.
    other_bytes: int = 0


Lease = PutLease | GetLease


class LeaseTable:
    def __init__(self) -> None:
        self._leases: dict[int, Lease] = {}
        # Random-looking start so ids of a restarted daemon do not match old clients' ids.
        self._ids = itertools.count(int.from_bytes(os.urandom(4), "little") << 16)

    def __len__(self) -> int:
        return len(self._leases)

    def next_id(self) -> int:
        return next(self._ids)

    def add(self, lease: Lease) -> None:
        self._leases[lease.id] = lease

    def get(self, lease_id: int) -> Lease | None:
        return self._leases.get(lease_id)

    def pop(self, lease_id: int) -> Lease | None:
        return self._leases.pop(lease_id, None)

    def expired(self, now: float | None = None) -> list[Lease]:
        now = time.monotonic() if now is None else now
        gone = [
            lease
            for lease in self._leases.values()
            if lease.deadline <= now
            and not (isinstance(lease, PutLease) and (lease.committing or lease.writers))
            and not (isinstance(lease, GetLease) and lease.copying)
        ]
        for lease in gone:
            del self._leases[lease.id]
        return gone

    def all(self) -> list[Lease]:
        return list(self._leases.values())
