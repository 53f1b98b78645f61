"""The link to a remote store: every call on a deadline, and whether the store is up.

Primitives: `Link(name, connect, probe, is_outage, timeout_s, threads)`, `call(io,
deliver) -> Future`, `up`, `reason`, `down(reason)`, `start()`, `close()`; `background`
(work the link's thread runs while the store is up: queued writes, drops).

A request thread never waits on the network longer than the deadline: every call runs on
the link's own threads, and a timer settles its future at the deadline if the store has
not answered by then. `io` does the network part and touches nothing of the caller's;
`deliver` (copying into the caller's buffer) runs only if the call beat its deadline, so
no late answer ever writes into memory its caller has moved on from.

A connection refused, a timeout, a cluster that says it is down or a failed probe (the
link probes an idle store every couple of seconds) marks the store down:
calls then fail at once (the tier's copies are misses, its writes queue or are dropped),
and the link's thread reconnects with a backoff until a probe passes, then marks it up.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from tierd.errors import Unavailable

log = logging.getLogger("tierd.tiers")

C = TypeVar("C")  # the store's client
T = TypeVar("T")
R = TypeVar("R")

BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 2.0


class _Call(Generic[R]):
    """One call's future, settled once: by its worker or by its deadline."""

    __slots__ = ("future", "lock", "settled")

    def __init__(self) -> None:
        self.future: Future[R] = Future()
        self.lock = threading.Lock()
        self.settled = False

    def claim(self) -> bool:
        with self.lock:
            if self.settled:
                return False
            self.settled = True
            return True


class _Deadlines:
    """One thread that fails calls whose deadline passed."""

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, _Call[Any], Callable[[], BaseException]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-deadlines", daemon=True)
        self._thread.start()

    def add(self, when: float, call: _Call[Any], error: Callable[[], BaseException]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (when, next(self._seq), call, error))
            if self._heap[0][2] is call:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                if self._closed:
                    return
                _, _, call, error = heapq.heappop(self._heap)
            if not call.future.done() and call.claim():
                call.future.set_exception(error())

    def close(self) -> None:
        """Stop; calls still waiting fail now (their workers were cancelled)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
            left, self._heap = self._heap, []
        self._thread.join()
        for _, _, call, error in left:
            if call.claim():
                call.future.set_exception(error())


class Link(Generic[C]):
    def __init__(
        self,
        name: str,
        connect: Callable[[], C],
        probe: Callable[[C], None],
        is_outage: Callable[[BaseException], bool],
        timeout_s: float,
        threads: int,
    ) -> None:
        self.name = name
        self._connect, self._probe, self._is_outage = connect, probe, is_outage
        self.timeout_s = timeout_s
        self.client: C | None = None
        self.up = False
        self.reason = "not connected yet"
        # Work for the link's thread while the store is up: returns whether it did any.
        self.background: Callable[[C], bool] = lambda client: False
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"tierd-{name}")
        self._deadlines = _Deadlines(f"tierd-{name}")
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"tierd-{name}-link", daemon=True)

    # -- state -------------------------------------------------------------------------

    def connect_now(self) -> None:
        """One connection attempt in the caller's thread (at open: a refused password is
        a configuration error there). Raises what `connect` or `probe` raised."""
        client = self._connect()
        self._probe(client)
        self._set_up(client)

    def start(self) -> None:
        if not self._thread.is_alive() and not self._closed:
            self._thread.start()

    def _set_up(self, client: C) -> None:
        with self._cond:
            old, self.client = self.client, client
            was, self.up, self.reason = self.up, True, ""
            self._cond.notify_all()
        if old is not None and old is not client:
            _close_quietly(old)
        if not was:
            log.info("tier %s: the store answers again", self.name)

    def down(self, reason: str) -> None:
        with self._cond:
            if not self.up:
                return
            self.up, self.reason = False, reason
            self._cond.notify_all()
        log.warning("tier %s unavailable (its copies are misses until it answers): %s",
                    self.name, reason)  # fmt: skip

    def wake(self) -> None:
        """There is background work (queued writes or drops)."""
        with self._cond:
            self._cond.notify_all()

    # -- calls -------------------------------------------------------------------------

    def call(self, io: Callable[[C], T], deliver: Callable[[T], R]) -> Future[R]:
        """`io(client)` on a link thread, then `deliver(its result)` if within the deadline.
        The future fails with Unavailable when the store is down or too slow, or with what
        `io` or `deliver` raised otherwise.

        The deadline runs from when the store is asked, not from when the call was queued:
        a large batch waits its turn behind calls the store is answering (the daemon's own
        queue), while a store that stops answering costs each call at most the deadline,
        since the first call past it marks the store down and every queued call then fails
        at once."""
        call: _Call[R] = _Call()
        if not self.up or self.client is None:
            call.future.set_exception(self.unavailable())
            return call.future

        def run() -> None:
            client = self.client  # the newest: a reconnect replaces it
            if not self.up or client is None:
                if call.claim():
                    call.future.set_exception(self.unavailable())
                return
            self._deadlines.add(time.monotonic() + self.timeout_s, call, self._late)
            try:
                result = io(client)
            except BaseException as e:  # noqa: BLE001 - handed to the waiter
                if self._is_outage(e):
                    self.down(f"{type(e).__name__}: {e}")
                    e = self.unavailable()
                if call.claim():
                    call.future.set_exception(e)
                return
            if call.claim():
                try:
                    call.future.set_result(deliver(result))
                except BaseException as e:  # noqa: BLE001 - handed to the waiter
                    call.future.set_exception(e)

        try:
            self._pool.submit(run)
        except RuntimeError:  # closed
            if call.claim():
                call.future.set_exception(self.unavailable())
        return call.future

    def _late(self) -> BaseException:
        self.down(f"no answer within {self.timeout_s * 1000:.0f} ms")
        return self.unavailable()

    def unavailable(self) -> Unavailable:
        return Unavailable(f"the {self.name} tier is unavailable: {self.reason or 'down'}")

    # -- the link's thread -------------------------------------------------------------

    def _run(self) -> None:
        backoff = BACKOFF_FIRST_S
        while True:
            with self._cond:
                if self._closed:
                    return
                if not self.up:
                    self._cond.wait(backoff)
                    if self._closed:
                        return
            if not self.up:
                try:
                    self.connect_now()
                    backoff = BACKOFF_FIRST_S
                except Exception as e:  # noqa: BLE001 - still down; try again later
                    self.reason = f"{type(e).__name__}: {e}"
                    backoff = min(2 * backoff, BACKOFF_MAX_S)
                continue
            client = self.client
            busy = False
            if client is not None:
                try:
                    busy = self.background(client)
                except Exception as e:  # noqa: BLE001 - judged like any failed call
                    if self._is_outage(e):
                        self.down(f"{type(e).__name__}: {e}")
                    else:
                        log.warning("tier %s: background work failed: %s", self.name, e)
            if not busy:
                with self._cond:
                    if self.up and not self._closed:
                        self._cond.wait(BACKOFF_MAX_S)
                # Idle: ask the store whether it still serves. Some stores answer a read
                # of a key on a server that has gone as a missing key, so reads alone
                # would never mark them down.
                if self.up and client is not None and client is self.client:
                    try:
                        self._probe(client)
                    except Exception as e:  # noqa: BLE001 - judged like any failed call
                        if self._is_outage(e):
                            self.down(f"{type(e).__name__}: {e}")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self.up, self.reason = False, "closed"
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._deadlines.close()
        if self.client is not None:
            _close_quietly(self.client)
            self.client = None


def _close_quietly(client: Any) -> None:
    try:
        client.close()
    except Exception:  # noqa: BLE001, S110 - a client of a store that is gone
        pass
