"""The catalog's write log: changes committed in the order the directory decided them, but
outside the core lock, several at a time.

Primitives: `CatalogLog(catalog)`, `add(plan) -> ticket` (caller holds the core lock),
`commit(ticket)` (caller does not: raises what the catalog raised for that change),
`commit_all()`, `last()`.

The directory decides under its lock and appends each catalog change here in the same
critical section, so the log's order is the order of the decisions. Whoever needs a change
durable (a put before it answers, a demotion before it frees memory) commits after
releasing the lock: one transaction takes every change queued so far (group commit), so
a slow or stuck SQLite commit holds only callers that wait for durability, never lookups,
reads or attends. Changes nobody waits for (where a copy went) are committed by the next
commit of anyone, and at least once per placement pass.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque

from tierd.core.catalog import Catalog, Plan

log = logging.getLogger("tierd.core")

# Failed batches remembered for their waiters (a waiter asks once, soon after).
_FAILURES_KEPT = 256


class CatalogLog:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._queue: deque[tuple[int, Plan]] = deque()
        self._queue_lock = threading.Lock()  # appends and takes only: never held for I/O
        self._commit_lock = threading.Lock()  # one committer at a time, in ticket order
        self._last = 0  # ticket of the newest change queued
        self._done = 0  # every change up to this ticket has been tried
        self._failures: deque[tuple[int, int, BaseException]] = deque(maxlen=_FAILURES_KEPT)

    def add(self, plan: Plan) -> int:
        """Queue a change; its ticket orders it after every change queued before."""
        with self._queue_lock:
            self._last += 1
            self._queue.append((self._last, plan))
            return self._last

    def last(self) -> int:
        """The ticket of the newest change queued (0: none yet)."""
        with self._queue_lock:
            return self._last

    def commit(self, ticket: int) -> None:
        """Make every change up to `ticket` durable (and those queued after it, in the same
        transaction). Raises the catalog's error if `ticket`'s transaction failed."""
        # Another committer may have taken this change already: then there is nothing to
        # wait for (`_done` only grows, and is read whole).
        if self._done < ticket:
            self._commit(ticket)
        for first, last, error in list(self._failures):
            if first <= ticket <= last:
                raise error

    def _commit(self, ticket: int) -> None:
        with self._commit_lock:
            if self._done < ticket:
                with self._queue_lock:
                    batch = list(self._queue)
                    self._queue.clear()
                if batch:
                    first, last = batch[0][0], batch[-1][0]
                    try:
                        self.catalog.run(*(plan for _, plan in batch))
                    except BaseException as e:  # kept for this batch's waiters
                        log.error("catalog changes %d..%d were not recorded: %s", first, last, e)
                        # Back-to-back failures are one range (a full disk fails every
                        # batch), so what is kept spans far more than the last few batches.
                        if self._failures and self._failures[-1][1] == first - 1:
                            first = self._failures.pop()[0]
                        self._failures.append((first, last, e))
                        if not isinstance(e, Exception):  # an interrupt: recorded, then on
                            self._done = last
                            raise
                    self._done = last

    def commit_all(self) -> None:
        """Commit whatever is queued; a failure is for its waiters (if any) to report."""
        with self._queue_lock:
            last = self._last
        # A failure was logged, and is raised to the waiter of each change it failed.
        with contextlib.suppress(Exception):
            self.commit(last)
