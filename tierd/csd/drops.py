"""Deferred drops: blocks the core forgets while holding its lock, dropped on workers later.

Primitives: `DeferredDrops(send)`, `add(name, ns_id, keys)` (never blocks on the
network), `cancel(name, ns_id, keys)` (before storing those keys again), `pending()`,
`close(flush_s)`.

One thread sends the queued drops, batched per (worker, namespace). A worker that is down
keeps its drops queued and they are retried every `retry_s`, so a restart does not leave
orphans that fill the shard. `cancel` exists because a key can come back: if the core
evicts a block from worker A and later stores the same key on A again, a late drop would
delete the fresh copy; so a store first takes its keys out of the queue and waits for a
drop of them already on the wire to finish.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

from tierd.errors import TierdError, Unavailable

log = logging.getLogger("tierd.csd")

_Target = tuple[str, bytes]  # (worker, namespace)


class DeferredDrops:
    def __init__(
        self,
        send: Callable[[str, bytes, list[bytes]], int],
        *,
        retry_s: float = 1.0,
        max_pending: int = 1 << 20,
    ) -> None:
        self._send = send
        self._retry_s = retry_s
        self._max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: dict[_Target, dict[bytes, None]] = {}  # ordered sets
        self._inflight: dict[_Target, set[bytes]] = {}
        self._count = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="csd-drops", daemon=True)
        self._thread.start()

    def add(self, name: str, ns_id: bytes, keys: Iterable[bytes]) -> None:
        with self._cond:
            queue = self._pending.setdefault((name, ns_id), {})
            before = len(queue)
            queue.update(dict.fromkeys(keys))
            self._count += len(queue) - before
            if self._count > self._max_pending:
                # A worker gone for good: forget its oldest drops rather than grow forever
                # (they become orphans on its shard, reclaimable from ListBlocks).
                self._shed()
            self._cond.notify_all()

    def cancel(self, name: str, ns_id: bytes, keys: Iterable[bytes]) -> None:
        wanted = set(keys)
        with self._cond:
            while True:
                queue = self._pending.get((name, ns_id))
                if queue:
                    for k in wanted & queue.keys():
                        del queue[k]
                        self._count -= 1
                if not wanted & self._inflight.get((name, ns_id), set()):
                    return
                # On the wire: wait for that batch, then look again (a failed batch is
                # re-queued, and those keys must come out of the queue once more).
                self._cond.wait()

    def pending(self) -> int:
        with self._cond:
            return self._count + sum(len(v) for v in self._inflight.values())

    def close(self, flush_s: float = 2.0) -> None:
        """Give queued drops up to `flush_s` to go out, then stop the thread."""
        with self._cond:
            self._cond.wait_for(lambda: not self._count and not self._inflight, timeout=flush_s)
            self._stop = True
            self._cond.notify_all()
        self._thread.join()

    def _shed(self) -> None:
        for queue in self._pending.values():
            while queue and self._count > self._max_pending:
                del queue[next(iter(queue))]
                self._count -= 1
            if self._count <= self._max_pending:
                break
        log.warning("too many deferred csd drops queued; forgot the oldest")

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stop or self._count > 0)
                if self._stop:
                    return
                batches = {t: list(q) for t, q in self._pending.items() if q}
                self._pending.clear()
                self._count = 0
                for t, keys in batches.items():
                    self._inflight[t] = set(keys)
            failed = False
            for (name, ns_id), keys in batches.items():
                ok = self._try(name, ns_id, keys)
                with self._cond:
                    del self._inflight[(name, ns_id)]
                    if not ok:
                        failed = True
                        queue = self._pending.setdefault((name, ns_id), {})
                        fresh = {k: None for k in keys if k not in queue}
                        # Back in front of newer drops; a cancel waiting on this batch
                        # removes its keys again when it wakes.
                        self._pending[(name, ns_id)] = {**fresh, **queue}
                        self._count += len(fresh)
                    self._cond.notify_all()
            if failed:
                with self._cond:
                    self._cond.wait_for(lambda: self._stop, timeout=self._retry_s)

    def _try(self, name: str, ns_id: bytes, keys: list[bytes]) -> bool:
        try:
            self._send(name, ns_id, keys)
            return True
        except Unavailable:
            return False  # down or restarting: try again later
        except TierdError as exc:
            log.warning("dropping %d blocks on csd worker %r failed: %s", len(keys), name, exc)
            return True  # would fail the same way again
