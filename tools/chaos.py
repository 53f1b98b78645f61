"""Chaos run: clients put, get, attend and move against a real daemon while faults hit it,
and a checker compares every answer with what was committed.

    python tools/chaos.py --seconds 60 --seed 1 --json out.json [--clients 3] [--host-durable]
                          [--base DIR] [--keep]

Needs root: the daemon's data dir (catalog, NVMe file, two local CSD workers' shards) lives
on a small tmpfs mounted for the run, so they can meet a full disk. The host tier is small,
so most blocks are demoted to NVMe; clients also move blocks to "nvme", "csd" and "host".

Faults, at seeded random times, each kind once per round in a shuffled order (`--faults`
picks kinds); they go on for --seconds, and longer (3x at most) until every kind has hit:
  daemon_kill  kill -9 of the daemon (half the time with its CSD workers, as systemd kills a
               crashed unit's control group), restarted on the same data dir
  worker_kill  kill -9 of one CSD worker process (the daemon restarts it)
  nvme_flip    bytes flipped inside a block's extent of the NVMe data file
  csd_flip     bytes flipped inside a block's extent of a CSD shard's data file
  disk_full    a ballast file fills the mount for a while, then is deleted

The checker's rules. Block contents derive from (seed, key), so any answer can be checked.
An answer returned as success must be byte-exact (get) or within 1e-4 relative of the
float64 oracle over the committed bytes (attend); anything else is a wrong answer. Misses
and the errors in ACCEPTED are acceptable answers; other errors (INTERNAL, a call past its
deadline) are counted apart. A block is committed when its put returned success, and
required at the end when, besides, a move to "nvme" or "csd" acknowledged it (every
committed block with --host-durable) and no flip hit its extent: flips are mapped to blocks
through the catalogs (read only) as they are just before, just after and for a few seconds
after each flip. After the faults stop the daemon is restarted cleanly (SIGTERM); a
required block missing then is lost; the figures give what each lost key went through
(puts, moves and flips, with times), and --keep leaves the data dir beside the log.

Exit status: 0 with no wrong answer and nothing lost, 1 otherwise, 2 when the rig failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from chaos_clients import (
    CALL_TIMEOUT_S,
    EXAMPLES,
    KINDS,
    LAYOUT,
    MODEL,
    OPS,
    Client,
    Ledger,
)
from chaos_faults import (
    Daemon,
    Extent,
    Mount,
    RigError,
    catalog_rows,
    csd_extents,
    flip,
    keys_over,
    nvme_extents,
    recoveries,
)

from tierd.config import parse_size
from tierd.tiers.host import segments_of
from tierd_client import Namespace, TierdClient, TierdError

# Errors the rules accept as answers; others (INTERNAL, a call past its deadline) are
# counted apart: not wrong answers, but not what a fault should cause either.
ACCEPTED = {"miss", "miss_uncommitted", "FailedPrecondition", "DataLoss", "Unavailable",
            "ResourceExhausted", "NotFound"}  # fmt: skip
FINAL_DEADLINE_S = 60.0
FLIP_REMAP_S = 10.0  # a flip is mapped to blocks again at every fault this long after it


class Chaos:
    """The fault schedule and the final check, around one daemon and its mount."""

    def __init__(self, args: argparse.Namespace, base: Path) -> None:
        self.args = args
        self.rng = random.Random(f"chaos/{args.seed}/faults")
        self.mount = Mount(base / "mnt", parse_size(args.mount_size, key="--mount-size"))
        self.data_dir = self.mount.path / "data"
        self.daemon = Daemon(
            base,
            self.data_dir,
            host=args.host_capacity,
            nvme=args.nvme_capacity,
            csd=args.csd_capacity,
            workers=2,
        )
        self.ledger = Ledger(args.seed)
        self.stop = threading.Event()
        self.kinds = [k for k in args.faults.split(",") if k]
        self.faults: Counter[str] = Counter()
        self.fault_log: list[str] = []
        self.flips: list[tuple[float, Path, list[int]]] = []
        self.t0 = time.monotonic()

    # -- faults --------------------------------------------------------------------------------

    def inject(self, kind: str) -> str | None:
        """Inject one fault; what was done, or None when there was nothing to hit yet."""
        if kind == "daemon_kill":
            # Half the time its workers die with it, as systemd kills a crashed unit's
            # control group; otherwise they notice the orphaning and drain on their own.
            group = self.rng.random() < 0.5
            self.daemon.kill9(workers=group)
            self.daemon.start()
            how = "with its workers" if group else "its workers left running"
            return f"killed the daemon ({how}), restart {self.daemon.starts - 1}"
        if kind == "worker_kill":
            pids = self.daemon.worker_pids()
            if not pids:
                return None
            pid = self.rng.choice(pids)
            os.kill(pid, signal.SIGKILL)
            return f"killed csd worker pid {pid}"
        if kind in ("nvme_flip", "csd_flip"):
            snapshot = nvme_extents if kind == "nvme_flip" else csd_extents
            extents = snapshot(self.data_dir, only_copy=True) or snapshot(self.data_dir)
            if not extents:
                return None
            target = self.rng.choice(extents)
            offsets = flip(target, self.rng)
            self.flips.append((time.monotonic(), target.file, offsets))
            self.ledger.mark_flipped({target.key})
            self.ledger.note([target.key], f"{kind} at {offsets} in {target.file}")
            self.remap()
            return f"flipped {len(offsets)} bytes of {target.key.hex()[:12]} in {target.file.name}"
        if kind == "disk_full":
            written = self.mount.fill()
            hold = self.rng.uniform(1.0, 2.5)
            self.stop.wait(hold)
            self.mount.clear()
            return f"filled the disk ({written >> 20} MiB ballast) for {hold:.1f} s"
        raise ValueError(kind)

    def remap(self, max_age: float = FLIP_REMAP_S) -> None:
        """Blocks whose extent holds a recent flip, by the catalogs as they are now."""
        now = time.monotonic()
        recent = [(f, offs) for t, f, offs in self.flips if now - t <= max_age]
        if not recent:
            return
        extents: list[Extent] = nvme_extents(self.data_dir) + csd_extents(self.data_dir)
        for file, offsets in recent:
            keys = keys_over(extents, file, offsets) - self.ledger.flipped
            self.ledger.mark_flipped(keys)
            self.ledger.note(list(keys), f"mapped to an earlier flip at {offsets} in {file}")

    def warm(self) -> bool:
        with self.ledger.lock:
            return {"nvme", "csd"} <= set(self.ledger.durable.values())

    def run_faults(self) -> None:
        """Faults until --seconds have passed and every kind was injected at least once
        (but no longer than 3 x --seconds: a daemon that keeps failing must not hang CI)."""
        deadline = self.t0 + self.args.seconds
        cap = self.t0 + 3 * self.args.seconds
        scale = max(1.0, self.args.seconds / 20.0)
        # Blocks to hit first: wait (a while at most) until moves put some on NVMe and CSD.
        warm = self.t0 + min(5.0, self.args.seconds / 4)
        while time.monotonic() < warm and not self.warm():
            self.stop.wait(0.1)
        next_at = time.monotonic()
        pending: list[str] = []
        while True:
            if not pending:
                pending = self.rng.sample(self.kinds, len(self.kinds))
                if not pending:  # a run without faults: clients only
                    self.stop.wait(max(0.0, deadline - time.monotonic()))
                    return
            self.stop.wait(max(0.0, next_at - time.monotonic()))
            now = time.monotonic()
            if now >= cap or (now >= deadline and all(self.faults[k] for k in self.kinds)):
                return
            kind = pending[0]
            done = self.inject(kind)
            self.remap()
            if done is None:  # nothing there yet: the next kind first, this one later
                pending.append(pending.pop(0))
                next_at = time.monotonic() + 0.5
                continue
            pending.pop(0)
            self.faults[kind] += 1
            self.fault_log.append(f"{time.monotonic() - self.t0:6.1f}s {kind}: {done}")
            next_at = time.monotonic() + self.rng.uniform(1.0, 2.5) * scale

    # -- the run ---------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        figures: dict[str, Any] = {}
        clients: list[Client] = []
        try:
            self.mount.mount()
            self.daemon.start()
            self.t0 = self.ledger.t0 = time.monotonic()
            clients = [
                Client(i, self.daemon.address, self.ledger, self.stop,
                       transport="inband" if i == 0 else "auto", max_blocks=self.args.max_blocks)
                for i in range(self.args.clients)
            ]  # fmt: skip
            for cl in clients:
                cl.start()
            try:
                self.run_faults()
            except RigError as e:
                figures["aborted"] = str(e)
            self.stop.set()
            for cl in clients:
                cl.join(timeout=3 * CALL_TIMEOUT_S)
            figures["elapsed_s"] = round(time.monotonic() - self.t0, 1)
            self.mount.clear()
            self.remap()
            if "aborted" not in figures:
                # Faults over: a clean restart, then every committed block is asked for.
                self.daemon.terminate()
                self.keep("data-at-stop")
                self.daemon.start()
                if not self.daemon.wait_workers(30.0):
                    figures["final_workers_unhealthy"] = True
                figures.update(self.final_check())
        except RigError as e:
            figures["aborted"] = str(e)
        finally:
            self.stop.set()
            self.mount.clear()
            self.daemon.cleanup()
            self.keep("data-at-end")
            self.mount.unmount()
        return self.figures(figures)

    def keep(self, name: str) -> None:
        """With --keep, a copy of the data dir (catalogs and tier files) beside the log, for
        tracing a verdict afterwards; the mount it lives on goes with the run."""
        if not self.args.keep or not self.data_dir.is_dir():
            return

        def special(d: str, names: list[str]) -> list[str]:  # sockets cannot be copied
            return [n for n in names if not (Path(d, n).is_file() or Path(d, n).is_dir())]

        shutil.copytree(self.data_dir, self.daemon.base / name, ignore=special,
                        dirs_exist_ok=True)  # fmt: skip
        for seg in segments_of(self.data_dir):  # the host tier's memory, outside the mount
            shutil.copy(seg, self.daemon.base / name / seg.name)

    def final_check(self) -> dict[str, Any]:
        led = self.ledger
        with led.lock:
            keys = list(led.committed)
            flipped, durable = set(led.flipped), dict(led.durable)
        required = {
            k for k in keys if k not in flipped and (self.args.host_durable or k in durable)
        }
        found: dict[bytes, bool] = {}
        wrong_before = led.wrong
        deadline = time.monotonic() + FINAL_DEADLINE_S
        where: Counter[str] = Counter()
        with TierdClient(self.daemon.address, timeout=CALL_TIMEOUT_S, max_retries=3) as c:
            pending = list(keys)
            ns: Namespace | None = None
            while pending and time.monotonic() < deadline:
                batch = pending[:64]
                try:
                    ns = ns or c.open_namespace(MODEL, LAYOUT)
                    where.update(str(t) for t in c.locate(ns, batch))
                    got = c.get(ns, batch)
                except TierdError as e:
                    led.error("final get", e, prefix="final:")
                    time.sleep(0.2)  # a worker may still be coming up: ask again
                    continue
                for key, ok, row in zip(batch, got.found, got.blocks, strict=True):
                    found[key] = ok
                    if ok and np.asarray(row).tobytes() != led.content(key).tobytes():
                        led.wrong_answer(f"final get {key.hex()}: bytes differ")
                pending = pending[64:]
            # A read that meets a corrupt copy answers a miss and drops that copy (a stale
            # catalog row left by a write the full disk refused can name reused memory), so
            # a block missed is asked for once more: lost only if no intact copy serves it.
            missed = [k for k in keys if k in found and not found[k]]
            for i in range(0, len(missed), 64):
                batch = missed[i : i + 64]
                try:
                    got = c.get(ns or c.open_namespace(MODEL, LAYOUT), batch)
                except TierdError as e:
                    led.error("final get", e, prefix="final:")
                    continue
                for key, ok, row in zip(batch, got.found, got.blocks, strict=True):
                    found[key] = ok
                    if ok and np.asarray(row).tobytes() != led.content(key).tobytes():
                        led.wrong_answer(f"final get {key.hex()}: bytes differ")
        lost = [k for k in keys if k in required and not found.get(k, False)]
        rows = catalog_rows(self.data_dir, lost[:EXAMPLES])
        return {
            "checked_at_end": len(found),
            "unanswered_at_end": len(keys) - len(found),
            "found_at_end": sum(found.values()),
            "found_when_asked_again": sum(1 for k in missed if found[k]),
            "required": len(required),
            "lost": len(lost),
            "lost_examples": [
                f"{k.hex()} ({'moved to ' + durable[k] if k in durable else 'never moved'}; "
                f"catalog: {rows[k]})"
                for k in lost[:EXAMPLES]
            ],
            "lost_history": {k.hex(): led.history.get(k, []) for k in lost[:EXAMPLES]},
            # Blocks the rules let go (never moved, no flip), missing all the same.
            "missing_not_required": sum(
                1 for k in keys if k not in required and k not in flipped and not found.get(k)
            ),
            "flipped_missing_at_end": sum(1 for k in keys if k in flipped and not found.get(k)),
            "wrong_at_end": led.wrong - wrong_before,
            "tiers_at_end": dict(where),
        }

    def figures(self, extra: dict[str, Any]) -> dict[str, Any]:
        led = self.ledger
        out: dict[str, Any] = {
            "seed": self.args.seed,
            "seconds": self.args.seconds,
            "clients": self.args.clients,
            "host_durable": self.args.host_durable,
            "calls": {op: led.calls[op] for op in OPS},
            "faults": {kind: self.faults[kind] for kind in KINDS},
            "errors": dict(sorted(led.errors.items())),
            "error_examples": led.error_examples,
            "unexpected_errors": sum(
                n for code, n in led.errors.items() if code.split(":")[-1] not in ACCEPTED
            ),
            "stop_timeouts": self.daemon.stop_timeouts,
            "recoveries": recoveries(self.daemon.log_tail(1 << 24)),
            "answers_checked": dict(led.checked),
            "wrong": led.wrong,
            "wrong_examples": led.wrong_examples,
            "committed": len(led.committed),
            "durable": len(led.durable),
            "flipped": len(led.flipped),
            "daemon_starts": self.daemon.starts,
            "fault_log": self.fault_log,
        }
        out.update(extra)
        out.setdefault("lost", None)
        return out


def table(fig: dict[str, Any]) -> str:
    def kv(d: dict[str, Any]) -> str:
        return "  ".join(f"{k} {v}" for k, v in d.items()) or "-"

    def end(name: str) -> Any:
        return fig.get(name, "-")

    committed = (
        f"{fig['committed']} ({fig['durable']} acknowledged durable by move, "
        f"{fig['flipped']} hit by a flip)"
    )
    at_end = (
        f"{end('checked_at_end')} (found {end('found_at_end')}, "
        f"{end('found_when_asked_again')} of them when asked again, required {end('required')}, "
        f"hit by a flip and missing {end('flipped_missing_at_end')}, "
        f"never moved and missing {end('missing_not_required')})"
    )
    refused = (
        f"{fig['unexpected_errors']} errors outside the accepted ones; the daemon outlived "
        f"SIGTERM {fig['stop_timeouts']}x"
    )
    rows = [
        ("calls", kv(fig["calls"])),
        ("faults injected", kv(fig["faults"])),
        ("errors", kv(fig["errors"])),
        ("not accepted", refused),
        ("answers checked", kv(fig["answers_checked"])),
        ("wrong answers", str(fig["wrong"])),
        ("committed", committed),
        ("checked at end", at_end),
        ("lost", str(fig["lost"])),
        ("daemon starts", "  ".join(f"{b} blocks ({d} dropped)" for b, d in fig["recoveries"])),
    ]
    head = (
        f"chaos run: seed {fig['seed']}, {fig['seconds']} s, {fig['clients']} clients, "
        f"host-only blocks required: {'yes' if fig['host_durable'] else 'no'}"
    )
    lines = [head] + [f"  {name:<16} {value}" for name, value in rows]
    if fig.get("aborted"):
        lines.append(f"  ABORTED: {fig['aborted'][:2000]}")
    lines += [f"  first {code}: {msg}" for code, msg in fig.get("error_examples", {}).items()]
    for what in ("wrong_examples", "lost_examples"):
        lines += [f"  {what[:-9]}: {x}" for x in fig.get(what, [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="how long faults are injected")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--clients", type=int, default=3, help="client threads")
    p.add_argument(
        "--host-durable",
        action="store_true",
        help="require every committed block at the end, host-only ones included",
    )
    p.add_argument(
        "--max-blocks",
        type=int,
        default=512,
        help="committed blocks at most (the tiers never have to evict)",
    )
    p.add_argument(
        "--faults",
        default=",".join(KINDS),
        help=f"kinds to inject, comma-separated (default all: {','.join(KINDS)})",
    )
    p.add_argument("--host-capacity", default="4MiB")
    p.add_argument("--nvme-capacity", default="32MiB")
    p.add_argument("--csd-capacity", default="8MiB", help="per CSD worker")
    p.add_argument("--mount-size", default="64MiB")
    p.add_argument("--base", type=Path, help="work directory (default: a fresh one, removed)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the work directory, with copies of the data dir as the daemon stopped "
        "cleanly (data-at-stop) and at the end (data-at-end)",
    )
    args = p.parse_args(argv)
    unknown = set(args.faults.split(",")) - set(KINDS) - {""}
    if unknown:
        p.error(f"unknown fault kinds: {', '.join(sorted(unknown))}")
    # SIGTERM ends the run through its finally blocks: processes, mount and segments.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    own_base = args.base is None
    base = Path(tempfile.mkdtemp(prefix="chaos-")) if own_base else args.base
    base.mkdir(parents=True, exist_ok=True)
    try:
        fig = Chaos(args, base).run()
    finally:
        if own_base and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        elif own_base:
            print(f"chaos: kept {base}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(fig, indent=2) + "\n")
    print(table(fig), flush=True)
    if fig.get("aborted") and not fig.get("elapsed_s"):
        return 2  # the rig never got the clients going
    return 0 if fig["wrong"] == 0 and fig["lost"] == 0 and not fig.get("aborted") else 1


if __name__ == "__main__":
    sys.exit(main())
