"""Worker processes forked from a warm launcher, for models held in tierd.

A fresh Python worker spends seconds importing torch and transformers before it reads a byte
of weights (about 3.4 s of a 3.7 s time to first token for SmolLM2 on these machines), and
each one keeps about 300 MiB of its own interpreter, torch and transformers state beside the
weights it maps from tierd. `WorkerLauncher` imports all of that once, in a launcher
process; every worker is a fork of it, so it starts with the imports done and shares their
pages copy-on-write with the launcher and every other worker. Together with the weights
mapped from tierd (one copy on the host), N workers then cost little more than one.

It is the standard library's fork server (`multiprocessing`'s "forkserver" context) with
what a model worker needs around it:

- the launcher imports `preload` (by default torch, transformers' Llama code and tierd's
  client), then freezes its garbage collector, so collections in the workers neither walk
  nor write to, and so copy, the objects they inherited;
- nothing in the launcher starts a thread or opens a channel: torch's thread pool and gRPC
  channels are made in each worker, after the fork (neither survives one);
- `start` (in the constructor by default) waits for the imports and checks them: a preload
  the launcher could not import (the fork server skips it in silence, and imports with a
  fresh interpreter's sys.path, not this process's), or a fork server that other code
  started before, without the preload, is a RuntimeError, not workers that import it all;
- `spawn(target, *args)` starts one worker and returns its `multiprocessing.Process`.
  `target` and its arguments travel pickled, so `target` is a module-level function.

    launcher = WorkerLauncher()          # once per serving process; seconds (the imports)
    worker = launcher.spawn(serve, address, fingerprint)   # each worker: milliseconds
    worker.join()

The launcher process lives until the process that made it and its workers exit; one that
dies is started again at the next `spawn` (`pid` then names the new one). The fork server
is one per process (the standard library keeps it so): every `WorkerLauncher` of a process
shares it, and they must agree on `preload`.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Sequence
from multiprocessing import forkserver
from multiprocessing.context import ForkServerContext
from typing import Any

# What a transformers model worker imports: torch, the model code and the client. The last
# entry freezes the collector over everything imported before it.
DEFAULT_PRELOAD: tuple[str, ...] = (
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "tierd_client",
    "tierd_client.hf_weights",
)
_FREEZE = "tierd_client._launcher_freeze"

_lock = threading.Lock()
_preload: tuple[str, ...] | None = None  # what this process's fork server was given


class WorkerLauncher:
    """Forks workers from a launcher that has imported `preload` (see the module doc)."""

    def __init__(self, preload: Sequence[str] = DEFAULT_PRELOAD, *, start: bool = True) -> None:
        """`start`: start the launcher now (its imports take seconds) rather than at the
        first `spawn`."""
        global _preload
        self._pid = 0
        self._asked = list(preload)
        self._wanted = wanted = (*preload, _FREEZE)
        with _lock:
            if _preload is not None and _preload != wanted:
                raise ValueError(
                    f"this process's launcher already preloads {list(_preload[:-1])}; "
                    f"one process has one launcher (asked for {list(preload)})"
                )
            self._ctx: ForkServerContext = multiprocessing.get_context("forkserver")  # type: ignore[assignment]
            self._ctx.set_forkserver_preload(list(wanted))
            _preload = wanted
        if start:
            self.start()

    def start(self) -> None:
        """Start the launcher if it is not running, and wait until it has imported
        `preload`: the standard library starts it at once but imports in the background, so
        one worker that does nothing goes through it first, and says what the launcher
        lacks. The fork server skips a module that raises ImportError without a word, and
        ignores a preload set after it started: either is a RuntimeError here, rather than
        workers that import everything again."""
        ours, theirs = self._ctx.Pipe(duplex=False)
        try:
            ready = self._ctx.Process(target=_ready, args=(theirs, self._wanted),
                                      name="tierd-launcher-ready")  # fmt: skip
            try:
                ready.start()
            except (EOFError, OSError) as e:  # it died importing: its traceback is on stderr
                raise RuntimeError(f"the launcher exited while importing {self._asked}") from e
            finally:
                theirs.close()
            try:
                pid, missing = ours.recv()
            except EOFError:
                pid, missing = 0, {}
        finally:
            ours.close()
        ready.join()
        if ready.exitcode != 0 or not pid:
            raise RuntimeError(f"the launcher's first worker exited with {ready.exitcode}")
        if missing:
            raise RuntimeError(
                f"the launcher lacks {missing}: it could not import them (its sys.path is a "
                "fresh interpreter's), or this process's fork server was started by other "
                "code before this launcher, without its preload"
            )
        self._pid = int(pid)

    @property
    def pid(self) -> int:
        """The launcher process's pid (its memory is the workers' shared part). One that
        died is replaced at the next use, this one included."""
        forkserver.ensure_running()  # reaps a dead launcher, so its pid is gone below
        if not self._pid or not _alive(self._pid):
            self.start()
        return self._pid

    def spawn(self, target: Callable[..., Any], *args: Any, name: str | None = None,
              **kwargs: Any) -> multiprocessing.process.BaseProcess:  # fmt: skip
        """A worker forked from the launcher, running `target(*args, **kwargs)`; started."""
        proc = self._ctx.Process(target=target, args=args, kwargs=kwargs, name=name)
        proc.start()
        return proc

    @property
    def context(self) -> ForkServerContext:
        """The multiprocessing context, for the pipes and queues that talk to workers."""
        return self._ctx


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _ready(conn: Any, wanted: Sequence[str]) -> None:
    """The worker `start` waits for (the launcher has imported everything by then): it
    names its parent, the launcher, and what of `wanted` the launcher did not import, with
    the error of importing it here (none: only the launcher's sys.path lacks it)."""
    import importlib

    missing: dict[str, str] = {}
    for name in wanted:
        if name not in sys.modules:
            try:
                importlib.import_module(name)
                missing[name] = "imports in a worker, not in the launcher"
            except Exception as e:  # noqa: BLE001  (whatever its import raises, to report)
                missing[name] = f"{type(e).__name__}: {e}"
    conn.send((os.getppid(), missing))
    conn.close()
