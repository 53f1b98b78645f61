"""`tierctl replay TRACE`: a request trace through the daemon's own tier chain and placement
policies (`tierd.core.chain.TierChain`, `tierd.core.policies`), no daemon, no I/O.

Primitives: `read_trace(path, block_tokens) -> list[Request]`, `Spec` (a policy per
level), `replay(requests, capacities, spec, block_bytes) -> RunResult`, `ideal_hit_rate`.

Trace: the Mooncake format (one JSON object a line, `.jsonl` or gzipped): `timestamp`
(ms), `input_length` (tokens), `hash_ids` (the request's prefix blocks, `block_tokens`
tokens each; equal ids mean the same prefix block).

Each request, in order:

1. lookup: its blocks are looked up in prefix order, stopping at the first one no level
   holds (prefix semantics). Each hit is read from the fastest level holding it: its
   bytes count for that level, its tokens as saved (hit tokens are min(hits x
   block_tokens, input_length), since the last block may be partial);
2. the hits are recorded (`TierChain.hit`, every level holding the block is told; the
   entry's `last_access` is the request's time and its `depth` its position);
3. the blocks the top level lacks enter it: hits served from a lower level are promoted
   (their lower copy stays, as in the daemon) and the missing blocks are put. Room is
   made first (`TierChain.settle`): victims move down the chain through the admission
   filters or are dropped. The request's hits are busy (being read) and never victims.
   Blocks after the first miss that some level still holds are recomputed by the engine
   and not written again (the daemon keeps the copy it has).

Output blocks are not inserted: the trace's ids are per request, so a later turn that
reuses this request's output names those blocks with ids of its own, which are put when
that turn misses them; blocks for the output here could never be hit.

Levels are named host, nvme, csd (fastest first), each with capacity from `--capacity`
and watermarks at 100% (a level holds at most its capacity and frees just what an insert
needs), so results depend on the policies alone. `--policy lru` runs LRU on every level;
`--policy lru/tinylfu` runs LRU on host and TinyLFU on the levels below.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import IO

from tierctl.cli import Command
from tierctl.errors import ExitCode, UsageError

LEVEL_NAMES = ("host", "nvme", "csd")
BLOCK_TOKENS = 512
# Llama-3-8B in bfloat16: 32 layers x (K, V) x 8 KV heads x 128 dims x 2 bytes per token.
KV_BYTES_PER_TOKEN = 32 * 2 * 8 * 128 * 2
OCCUPANCY_SAMPLES = 200


@dataclass(frozen=True)
class Request:
    timestamp_ms: float
    input_length: int
    hash_ids: tuple[int, ...]


@dataclass(frozen=True)
class Spec:
    """The policy of the top level and of the levels below it."""

    top: str
    lower: str

    @classmethod
    def parse(cls, text: str) -> Spec:
        from tierd.core.policies import POLICIES

        parts = text.split("/")
        if len(parts) > 2 or not all(parts):
            raise UsageError(f"--policy {text!r}: expected NAME or TOP/LOWER, e.g. lru/tinylfu")
        for name in parts:
            if name not in POLICIES:
                raise UsageError(f"--policy: unknown policy {name!r}; known: {', '.join(POLICIES)}")
        return cls(parts[0], parts[-1])

    def __str__(self) -> str:
        return self.top if self.top == self.lower else f"{self.top}/{self.lower}"


@dataclass
class RunResult:
    policy: str
    capacity_bytes: dict[str, int]
    block_bytes: int
    requests: int
    input_tokens: int
    hit_rate: float  # hit tokens / input tokens
    tokens_saved: int  # prefill tokens not recomputed
    bytes_read: dict[str, int]
    bytes_written: dict[str, int]  # by demotions into the levels below the top
    dropped_blocks: int  # blocks that left the chain altogether
    occupancy: dict[str, list[float]] = field(default_factory=dict)  # "t_s" and per level
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # CPU time spent on this run (a process runs one at a time)


# -- the trace ------------------------------------------------------------------------------


def _open_text(path: Path) -> IO[str]:
    with path.open("rb") as probe:
        gz = probe.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rt", encoding="utf-8") if gz else path.open(encoding="utf-8")


def read_trace(path: Path, block_tokens: int = BLOCK_TOKENS) -> list[Request]:
    """Every request of a Mooncake-format trace, or a UsageError naming the bad line."""
    out: list[Request] = []
    try:
        with _open_text(path) as lines:
            for lineno, line in enumerate(lines, 1):
                if line.strip():
                    out.append(_request(line, f"{path}:{lineno}"))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}") from e
    if not out:
        raise UsageError(f"{path}: no requests")
    return out


def _request(line: str, where: str) -> Request:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}: not JSON ({e.msg})") from e
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected an object")
    ids, length, ts = obj.get("hash_ids"), obj.get("input_length"), obj.get("timestamp", 0)
    if not isinstance(ids, list) or not all(type(i) is int for i in ids):
        raise UsageError(f"{where}: hash_ids must be a list of integers")
    if type(length) is not int or length < 0:
        raise UsageError(f"{where}: input_length must be a non-negative integer")
    if type(ts) not in (int, float):
        raise UsageError(f"{where}: timestamp must be a number of milliseconds")
    return Request(float(ts), length, tuple(ids))


def ideal_hit_rate(requests: Sequence[Request], block_tokens: int = BLOCK_TOKENS) -> float:
    """The hit rate of a cache that never evicts (the ceiling of any policy)."""
    seen: set[int] = set()
    hit = total = 0
    for r in requests:
        k = 0
        while k < len(r.hash_ids) and r.hash_ids[k] in seen:
            k += 1
        hit += min(k * block_tokens, r.input_length)
        total += r.input_length
        seen.update(r.hash_ids)
    return hit / total if total else 0.0


# -- one run ----------------------------------------------------------------------------------


def replay(requests: Sequence[Request], capacities: Sequence[int], spec: Spec,
           block_bytes: int, block_tokens: int = BLOCK_TOKENS) -> RunResult:  # fmt: skip
    from tierd.core.chain import Level, TierChain
    from tierd.core.index import BlockEntry, NamespaceInfo
    from tierd.core.policies import make_policy
    from tierd_client.layout import KVLayout

    names = LEVEL_NAMES[: len(capacities)]
    chain = TierChain([
        Level(n, cap, 1.0, 1.0, make_policy(spec.top if i == 0 else spec.lower, n))
        for i, (n, cap) in enumerate(zip(names, capacities))
    ])  # fmt: skip
    top = names[0]
    ns = NamespaceInfo(b"trace".ljust(16, b"\0"), "trace", "trace",
                       KVLayout(32, 8, 128, "bfloat16", block_tokens), ())  # fmt: skip
    held: dict[int, BlockEntry] = {}  # hash id -> entry, for blocks some level holds
    read = dict.fromkeys(names, 0)
    written = dict.fromkeys(names[1:], 0)
    occupancy: dict[str, list[float]] = {"t_s": [], **{n: [] for n in names}}
    every = max(1, len(requests) // OCCUPANCY_SAMPLES)
    hit_tokens = input_tokens = dropped = 0
    started, cpu_started = time.perf_counter(), time.process_time()

    def apply(busy: set[BlockEntry], incoming: int) -> None:
        nonlocal dropped
        for m in chain.settle(top, incoming, busy=busy.__contains__):
            if m.write and m.dst is not None:
                written[m.dst] += m.entry.nbytes
            elif m.dst is None and chain.top_of(m.entry) is None:
                dropped += 1
                del held[int.from_bytes(m.entry.key, "little", signed=True)]

    for n, req in enumerate(requests):
        ids, now = req.hash_ids, req.timestamp_ms / 1000.0
        k = 0
        while k < len(ids) and ids[k] in held:
            k += 1
        hits = [held[h] for h in ids[:k]]
        promote = []
        for depth, entry in enumerate(hits):
            tier = chain.top_of(entry)
            read[tier] += entry.nbytes  # type: ignore[index]
            entry.last_access, entry.depth = now, depth
            entry.hits += 1
            chain.hit(entry)
            if tier != top:
                promote.append(entry)
        new: list[BlockEntry] = []
        for depth in range(k, len(ids)):
            cached = held.get(ids[depth])
            if cached is not None:
                chain.access(cached)  # recomputed, and the copy it has is kept
                continue
            entry = BlockEntry(ns, ids[depth].to_bytes(8, "little", signed=True),
                               block_bytes, 0, last_access=now, depth=depth)  # fmt: skip
            held[ids[depth]] = entry
            new.append(entry)
        busy = set(hits)
        apply(busy, block_bytes * (len(promote) + len(new)))
        for entry in promote:
            chain.insert(entry, top)
        for entry in new:
            chain.access(entry)
            chain.insert(entry, top)
        if chain.need(top):  # a request larger than the top level: its own tail leaves
            apply(busy, 0)
        hit_tokens += min(k * block_tokens, req.input_length)
        input_tokens += req.input_length
        if n % every == 0 or n == len(requests) - 1:
            occupancy["t_s"].append(now)
            for name in names:
                occupancy[name].append(chain.used(name) / max(chain.level(name).capacity_bytes, 1))
    return RunResult(
        policy=str(spec), capacity_bytes=dict(zip(names, capacities)), block_bytes=block_bytes,
        requests=len(requests), input_tokens=input_tokens,
        hit_rate=hit_tokens / input_tokens if input_tokens else 0.0, tokens_saved=hit_tokens,
        bytes_read=read, bytes_written=written, dropped_blocks=dropped, occupancy=occupancy,
        seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started,
    )  # fmt: skip


# -- the command --------------------------------------------------------------------------------

_worker_trace: list[Request] = []


def _load_in_worker(path: Path, block_tokens: int) -> None:
    global _worker_trace
    _worker_trace = read_trace(path, block_tokens)


def _run_in_worker(caps: tuple[int, ...], spec: Spec, block_bytes: int, block_tokens: int
                   ) -> RunResult:  # fmt: skip
    return replay(_worker_trace, caps, spec, block_bytes, block_tokens)


def _capacities(values: list[str]) -> list[tuple[int, ...]]:
    from tierd.config import parse_size
    from tierd.errors import ConfigError

    out = []
    for text in values:
        try:
            caps = tuple(parse_size(part, key="--capacity") for part in text.split(","))
        except ConfigError as e:
            raise UsageError(str(e)) from e
        if not 1 <= len(caps) <= len(LEVEL_NAMES) or caps[0] <= 0:
            raise UsageError(f"--capacity {text!r}: 1 to {len(LEVEL_NAMES)} sizes "
                             f"({', '.join(LEVEL_NAMES)}), the first above 0")  # fmt: skip
        out.append(caps)
    return out


def _size(text: str, key: str) -> int:
    from tierd.config import parse_size
    from tierd.errors import ConfigError

    try:
        n = parse_size(text, key=key)
    except ConfigError as e:
        raise UsageError(str(e)) from e
    if n <= 0:
        raise UsageError(f"{key} must be above 0")
    return n


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", type=Path, help="request trace, Mooncake format (.jsonl[.gz])")
    p.add_argument("--capacity", action="extend", nargs="+", metavar="SIZE,...",
                   help="one size per level (host,nvme,csd), e.g. 8GiB,64GiB; repeat or list "
                        "several to sweep (default 8GiB,64GiB)")  # fmt: skip
    p.add_argument("--policy", action="append", metavar="NAME,...",
                   help="policies to compare, comma separated; TOP/LOWER sets the top "
                        "level's apart (e.g. lru/tinylfu); default: every policy")  # fmt: skip
    p.add_argument("--block-tokens", type=int, default=BLOCK_TOKENS,
                   help=f"tokens per hash id of the trace (default {BLOCK_TOKENS})")  # fmt: skip
    p.add_argument("--block-bytes", metavar="SIZE",
                   help="bytes per block (default: Llama-3-8B bf16 KV, 128 KiB/token x "
                        "block tokens: 64 MiB at 512)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=0,
                   help="runs in parallel (default: one per CPU)")  # fmt: skip
    p.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    p.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="hit rate against capacity per policy, and occupancy over time")  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from tierd.core.policies import POLICIES

    if args.block_tokens <= 0:
        raise UsageError("--block-tokens must be above 0")
    block_bytes = (_size(args.block_bytes, "--block-bytes") if args.block_bytes
                   else KV_BYTES_PER_TOKEN * args.block_tokens)  # fmt: skip
    caps = _capacities(args.capacity or ["8GiB,64GiB"])
    names = [n for text in args.policy or [",".join(POLICIES)] for n in text.split(",")]
    specs = list(dict.fromkeys(Spec.parse(n.strip()) for n in names))
    if not args.trace.is_file():
        raise UsageError(f"{args.trace}: no such file")
    requests = read_trace(args.trace, args.block_tokens)
    ideal = ideal_hit_rate(requests, args.block_tokens)
    runs = [(c, s) for c in caps for s in specs]
    jobs = min(args.jobs or os.cpu_count() or 1, len(runs))
    started = time.perf_counter()
    if jobs <= 1:
        results = [replay(requests, c, s, block_bytes, args.block_tokens) for c, s in runs]
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("fork"),
                                 initializer=_load_in_worker,
                                 initargs=(args.trace, args.block_tokens)) as pool:  # fmt: skip
            futures = [pool.submit(_run_in_worker, c, s, block_bytes, args.block_tokens)
                       for c, s in runs]  # fmt: skip
            results = [f.result() for f in futures]
    elapsed = time.perf_counter() - started
    print(_table(results, requests, ideal, block_bytes, args.block_tokens))
    print(f"{len(runs)} runs in {elapsed:.1f} s ({jobs} at a time)", file=sys.stderr)
    if args.json:
        doc = {"trace": str(args.trace), "requests": len(requests), "ideal_hit_rate": ideal,
               "block_tokens": args.block_tokens, "block_bytes": block_bytes,
               "results": [asdict(r) for r in results]}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    if args.plot:
        from tierctl.replay_plot import plot_replay

        plot_replay(results, ideal, args.plot)
    return ExitCode.OK


def _table(results: list[RunResult], requests: Sequence[Request], ideal: float,
           block_bytes: int, block_tokens: int) -> str:  # fmt: skip
    from tierctl.tables import count, render
    from tierd.config import format_size

    levels = max((list(r.capacity_bytes) for r in results), key=len)
    headers = ["policy", "capacity", "hit rate", "tokens saved",
               *(f"read {n}" for n in levels), *(f"written {n}" for n in levels[1:]),
               "dropped", "s"]  # fmt: skip
    rows = [
        [r.policy, " + ".join(format_size(c) for c in r.capacity_bytes.values()),
         f"{r.hit_rate:.2%}", count(r.tokens_saved),
         *(format_size(r.bytes_read.get(n, 0)) for n in levels),
         *(format_size(r.bytes_written.get(n, 0)) for n in levels[1:]),
         count(r.dropped_blocks), f"{r.seconds:.1f}"]
        for r in results
    ]  # fmt: skip
    head = (f"{len(requests):,} requests, {format_size(block_bytes)} per {block_tokens}-token "
            f"block; a cache that never evicts would hit {ideal:.2%}")  # fmt: skip
    return head + "\n\n" + render(headers, rows, right=set(range(2, len(headers))))


COMMAND = Command("replay", "replay a request trace through the tier chain and policies",
                  _add_arguments, _run,
                  description="Replay a Mooncake-format request trace through tierd's tier "
                              "chain and placement policies (no daemon): prefix hit rate, "
                              "tokens saved and bytes read per tier, per policy and "
                              "capacity.")  # fmt: skip
