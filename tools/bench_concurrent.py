"""Many clients at once against one real daemon: calls per second and latency per call type.

    python tools/bench_concurrent.py [--clients 16] [--seconds 20] [--json FILE]
    python tools/bench_concurrent.py --trees /tmp/before,. --seconds 10

Starts `python -m tierd serve` on a private socket and data dir, then N client processes,
each with its own TierdClient over shared memory. Processes, not threads: threads of one
Python process would measure the load generator's GIL. After a warm-up (one call of each
type: the daemon builds its attention engine on first use) and a setup that stores each
client's chains, every client mixes, for a fixed time, calls drawn at random:
  lookup          the cached prefix of one of its chains (4 blocks); all 64 tokens must hit
  get             one chain's 4 blocks, compared byte for byte with what was put
  put             a fresh chain of 4 blocks into a slot (the slot's old chain goes first,
                  by `delete`)
  stats           the daemon's counters
  attend          `open_sequence` over one chain, one `attend` per layer, `close_sequence`
The chains of all clients together are 3x the host tier, so demotion to the NVMe tier, and
promotion back on get, run in the background all along; the report counts both in the
measured window. Reports calls/s in total and per type, p50/p99 latency per type, errors
(exceptions) and wrong answers (a miss, or bytes not what was put): both must be 0, else
the exit status is 1. `--tree`/`--trees` compare checkouts (see bench_trees.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_trees module
import bench_trees

from tierd_client import AttendItem, KVLayout, TierdClient, TierdError

# A small model's block: 2 layers x 8 KV heads x 16 tokens x 128 dim, bfloat16 = 128 KiB;
# attend queries have 32 heads (GQA group 4).
LAYOUT = KVLayout(2, 8, 128, "bfloat16", 16)
Q_HEADS = 32
CHAIN = 4  # blocks per chain: one put, get, lookup or sequence
POOL = 16  # distinct block contents a client draws its chains from
MIX = {"lookup": 3, "get": 3, "put": 2, "stats": 1, "attend": 1}
START_DEADLINE_S = 60.0


def mib(n: int) -> int:
    return n << 20


# -- one client process -------------------------------------------------------------------


class Recorder:
    """Latencies, errors and wrong answers of one client, per call type."""

    def __init__(self) -> None:
        self.lat: dict[str, list[float]] = {}
        self.errors: dict[str, dict[str, int]] = {}
        self.wrong: dict[str, int] = {}
        self.samples: list[str] = []

    def call(self, op: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            out = fn()
        except (TierdError, OSError, ValueError) as e:
            kind = self.errors.setdefault(op, {})
            kind[type(e).__name__] = kind.get(type(e).__name__, 0) + 1
            if len(self.samples) < 5:
                self.samples.append(f"{op}: {type(e).__name__}: {e}")
            return None
        self.lat.setdefault(op, []).append(time.perf_counter() - t0)
        return out

    def bad(self, op: str, why: str) -> None:
        self.wrong[op] = self.wrong.get(op, 0) + 1
        if len(self.samples) < 5:
            self.samples.append(f"{op}: wrong answer: {why}")


class Chains:
    """A client's slots, each holding one stored chain: tokens, keys and the bytes put."""

    def __init__(self, idx: int, client: TierdClient, ns: Any, slots: int) -> None:
        self.rng = np.random.default_rng(idx)
        self.client, self.ns = client, ns
        # Valid bfloat16 values (the top half of float32s): attend over them stays finite.
        f32 = self.rng.standard_normal((POOL, *LAYOUT.block_shape), dtype=np.float32)
        self.pool = (f32.view(np.uint32) >> 16).astype(np.uint16)
        self.slots: list[tuple[np.ndarray, list[bytes], np.ndarray] | None] = [None] * slots

    def fresh(self) -> tuple[np.ndarray, list[bytes], np.ndarray]:
        tokens = self.rng.integers(0, 1 << 30, CHAIN * LAYOUT.block_tokens)
        keys = self.client.block_keys(self.ns, tokens)
        data = self.pool[self.rng.integers(0, POOL, CHAIN)]
        for j, key in enumerate(keys):  # each block carries its key: a mix-up shows
            data[j].reshape(-1)[:16] = (
                np.frombuffer(key, np.uint8).astype(np.float32).view(np.uint32) >> 16
            )
        return tokens, keys, data


def client_main(
    idx: int, address: str, slots: int, seconds: float, seed: int, barrier: Any, results: Any
) -> None:
    rec = Recorder()
    try:
        with TierdClient(address, transport="shm", timeout=60) as c:
            ns = c.open_namespace("bench-concurrent", LAYOUT)
            chains = Chains(idx, c, ns, slots)
            for s in range(slots):
                chains.slots[s] = chain = chains.fresh()
                c.put(ns, chain[1], chain[2])
            barrier.wait(timeout=300)
            run_mix(c, ns, chains, rec, seconds, random.Random(seed * 1000 + idx))
    except Exception as e:  # noqa: BLE001  (any failure: the others must not wait at the barrier)
        barrier.abort()
        rec.samples.append(f"client {idx} stopped: {type(e).__name__}: {e}")
        rec.errors.setdefault("setup", {})[type(e).__name__] = 1
    results.put(
        {
            "idx": idx,
            "lat": rec.lat,
            "errors": rec.errors,
            "wrong": rec.wrong,
            "samples": rec.samples,
        }
    )


def run_mix(
    c: TierdClient, ns: Any, chains: Chains, rec: Recorder, seconds: float, rng: random.Random
) -> None:
    ops, weights = list(MIX), list(MIX.values())
    q = np.random.default_rng(0).standard_normal((1, Q_HEADS, LAYOUT.head_dim), np.float32)
    out = np.empty((CHAIN, *LAYOUT.block_shape), dtype=np.uint16)
    next_slot = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        op = rng.choices(ops, weights)[0]
        if op == "stats":
            rec.call("stats", c.stats)
            continue
        if op == "put":
            s, next_slot = next_slot, (next_slot + 1) % len(chains.slots)
            old, chains.slots[s] = chains.slots[s], None
            if old is not None and rec.call("delete", partial(c.delete, ns, old[1])) is None:
                continue
            new = chains.fresh()
            if rec.call("put", partial(c.put, ns, new[1], new[2])) is not None:
                chains.slots[s] = new
            continue
        chain = rng.choice([ch for ch in chains.slots if ch is not None])
        tokens, keys, data = chain
        if op == "lookup":
            hit = rec.call("lookup", partial(c.lookup, ns, tokens))
            if hit is not None and hit.cached_tokens != len(tokens):
                rec.bad("lookup", f"{hit.cached_tokens} of {len(tokens)} tokens cached")
        elif op == "get":
            got = rec.call("get", partial(c.get, ns, keys, out=out))
            if got is not None and not (all(got.found) and np.array_equal(out, data)):
                rec.bad("get", f"found {got.found}, bytes equal {np.array_equal(out, data)}")
        else:
            attend(c, ns, keys, q, rec)


def attend(c: TierdClient, ns: Any, keys: list[bytes], q: np.ndarray, rec: Recorder) -> None:
    sid = rec.call("open_sequence", partial(c.open_sequence, ns, keys))
    if sid is None:
        return
    for layer in range(LAYOUT.num_layers):
        item = AttendItem(sid, layer, q)
        res = rec.call("attend", partial(c.attend, [item], as_torch=False))
        if res is not None:
            o = res[0].out
            if o.shape != (1, Q_HEADS, LAYOUT.head_dim) or not np.isfinite(o).all():
                rec.bad("attend", f"output of shape {o.shape}, finite {np.isfinite(o).all()}")
    rec.call("close_sequence", partial(c.close_sequence, sid))


# -- the daemon and the run ---------------------------------------------------------------


class Daemon:
    """`python -m tierd serve` in `base`; its stderr goes to a file, read if it fails."""

    def __init__(self, base: Path, host: int, nvme: int) -> None:
        self.base = base
        self.address = f"unix:{base}/tierd.sock"
        self.log = base / "tierd.stderr"
        cmd = [
            sys.executable,
            "-m",
            "tierd",
            "serve",
            "--listen",
            self.address,
            "--data-dir",
            str(base / "data"),
            "--host-capacity",
            str(host),
            "--nvme-capacity",
            str(nvme),
            "--log-level",
            "WARNING",
        ]
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        with TierdClient(self.address, timeout=1.0, max_retries=0) as probe:
            deadline = time.monotonic() + START_DEADLINE_S
            while True:
                if self.proc.poll() is not None:
                    raise SystemExit(f"tierd exited with {self.proc.returncode}:\n{self.tail()}")
                try:
                    probe.stats()
                    return
                except TierdError:  # not listening yet
                    if time.monotonic() > deadline:
                        self.stop()
                        raise SystemExit(f"tierd did not answer in time:\n{self.tail()}")
                    time.sleep(0.1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        from tierd.tiers.host import segments_of  # the daemon keeps its segments on purpose

        for seg in segments_of(self.base / "data"):
            seg.unlink(missing_ok=True)


def daemon_cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) the daemon has used so far."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def warm_up(address: str) -> None:
    """One of each call before measuring: the daemon builds its attention engine (and
    imports torch, seconds on a loaded machine) on the first sequence, which would
    otherwise stand in the p99 of `open_sequence` as if the steady state were that slow."""
    rec = Recorder()
    with TierdClient(address, transport="shm", timeout=120) as c:
        ns = c.open_namespace("bench-concurrent-warm-up", LAYOUT)
        tokens, keys, data = Chains(2**32 - 1, c, ns, 1).fresh()
        c.put(ns, keys, data)
        c.lookup(ns, tokens)
        c.get(ns, keys, out=np.empty_like(data))
        q = np.zeros((1, Q_HEADS, LAYOUT.head_dim), np.float32)
        attend(c, ns, keys, q, rec)
        c.delete(ns, keys)
    if rec.errors or rec.wrong:
        raise SystemExit(f"the warm-up failed: {rec.samples}")


def run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    host = mib(args.host_mib)
    slots = max(2, 3 * host // (args.clients * CHAIN * LAYOUT.block_bytes))
    working_set = args.clients * slots * CHAIN * LAYOUT.block_bytes
    d = Daemon(base, host, 4 * working_set + mib(64))
    try:
        warm_up(d.address)
        ctx = mp.get_context("spawn")  # no fork of a process that holds gRPC threads
        barrier, results = ctx.Barrier(args.clients + 1), ctx.Queue()
        procs = [
            ctx.Process(
                target=client_main,
                daemon=True,
                args=(i, d.address, slots, args.seconds, args.seed, barrier, results),
            )
            for i in range(args.clients)
        ]
        for p in procs:
            p.start()
        with TierdClient(d.address, timeout=60) as c:
            try:
                barrier.wait(timeout=300)
            except threading.BrokenBarrierError:
                pass  # a client failed its setup; its report says why
            before = c.stats()
            cpu0 = daemon_cpu_s(d.proc.pid)
            t0 = time.perf_counter()
            reports = [results.get(timeout=args.seconds + 300) for _ in procs]
            window = time.perf_counter() - t0
            after = c.stats()
            cpu = daemon_cpu_s(d.proc.pid) - cpu0
        for p in procs:
            p.join(30)
    finally:
        d.stop()
    return summarize(reports, args, window, (before, after), cpu, working_set, host)


def summarize(
    reports: list[dict[str, Any]],
    args: argparse.Namespace,
    window: float,
    stats: tuple[dict[str, Any], dict[str, Any]],
    daemon_cpu: float,
    working_set: int,
    host: int,
) -> dict[str, Any]:
    before, after = stats
    lat: dict[str, list[float]] = {}
    errors: dict[str, dict[str, int]] = {}
    wrong: dict[str, int] = {}
    samples: list[str] = []
    for r in reports:
        for op, v in r["lat"].items():
            lat.setdefault(op, []).extend(v)
        for op, kinds in r["errors"].items():
            for k, n in kinds.items():
                errors.setdefault(op, {})[k] = errors.setdefault(op, {}).get(k, 0) + n
        for op, n in r["wrong"].items():
            wrong[op] = wrong.get(op, 0) + n
        samples += r["samples"]
    calls = {}
    for op in sorted(set(lat) | set(errors) | set(wrong)):
        v = np.asarray(lat.get(op, []))
        calls[op] = {
            "calls": len(v),
            "per_s": len(v) / args.seconds,
            "p50_ms": float(np.percentile(v, 50) * 1e3) if len(v) else float("nan"),
            "p99_ms": float(np.percentile(v, 99) * 1e3) if len(v) else float("nan"),
            "errors": sum(errors.get(op, {}).values()),
            "wrong": wrong.get(op, 0),
        }
    total_calls = sum(c["calls"] for c in calls.values())
    return {
        "clients": args.clients,
        "seconds": args.seconds,
        "window_s": window,
        "host_bytes": host,
        "working_set_bytes": working_set,
        "block_bytes": LAYOUT.block_bytes,
        "total_per_s": total_calls / args.seconds,
        # What a call costs the daemon, whatever else loads the machine: the CPU it used in
        # the window (the clients' calls end within it) over the calls made.
        "daemon_cpu_ms_per_call": daemon_cpu * 1e3 / max(1, total_calls),
        "errors": sum(c["errors"] for c in calls.values()),
        "wrong": sum(c["wrong"] for c in calls.values()),
        "demotions": after["demotions"] - before["demotions"],
        "promotions": after["promotions"] - before["promotions"],
        "calls": calls,
        "error_kinds": errors,
        "error_samples": samples[:10],
    }


def print_table(doc: dict[str, Any]) -> None:
    print(
        f"{doc['clients']} clients x {doc['seconds']:g} s, working set "
        f"{doc['working_set_bytes'] >> 20} MiB over a {doc['host_bytes'] >> 20} MiB host "
        f"tier; in the window: {doc['demotions']} demotions, {doc['promotions']} promotions"
    )
    print(
        f"{'call':<16}{'calls':>9}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'errors':>8}{'wrong':>7}"
    )
    for op, c in doc["calls"].items():
        print(
            f"{op:<16}{c['calls']:>9}{c['per_s']:>10.1f}{c['p50_ms']:>10.2f}"
            f"{c['p99_ms']:>10.2f}{c['errors']:>8}{c['wrong']:>7}"
        )
    print(
        f"{'total':<16}{sum(c['calls'] for c in doc['calls'].values()):>9}"
        f"{doc['total_per_s']:>10.1f}{'':>20}{doc['errors']:>8}{doc['wrong']:>7}"
    )
    print(f"daemon CPU per call: {doc['daemon_cpu_ms_per_call']:.2f} ms")
    for s in doc["error_samples"]:
        print(f"  {s}")


def metrics(doc: dict[str, Any]) -> dict[str, float]:
    """The figures a revision comparison sets side by side."""
    keys = ("total_per_s", "daemon_cpu_ms_per_call", "errors", "wrong", "demotions", "promotions")
    out = {k: doc[k] for k in keys}
    for op, c in doc["calls"].items():
        for k in ("per_s", "p50_ms", "p99_ms"):
            out[f"{op}.{k}"] = c[k]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0, help="length of the measured mix")
    p.add_argument(
        "--host-mib", type=int, default=32, help="host tier size; the working set is 3x this"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dir", type=Path, help="work dir on the disk to measure (default: /tmp)")
    p.add_argument("--json", type=Path, help="write the figures here")
    bench_trees.add_arguments(p)
    args = p.parse_args()
    if bench_trees.trees_of(args):
        return bench_trees.compare(Path(__file__), args, metrics)
    # Short: unix socket paths are limited to 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="tierd-conc-", dir=args.dir))
    try:
        doc = run(args, base)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print_table(doc)
    if args.json:
        bench_trees.stamp(doc)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 1 if doc["errors"] or doc["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
