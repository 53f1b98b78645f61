"""KV block put/get throughput: tierd against its physical limits and a real peer, in one run.

    python tools/bench_kv.py [--sizes 64KiB,2MiB,16MiB] [--total 512MiB] [--json FILE]

For each block size it measures, on the same machine and the same bytes:
  memcpy            numpy copy between two preallocated buffers (the host tier's ceiling)
  tierd shm         put/get through the shared-memory path (prepare -> memcpy -> commit)
  tierd in-band     put/get with the bytes inside gRPC messages (what a remote client gets)
  redis             SET/GET through redis-py against a redis-server this script starts
  disk O_DIRECT     raw aligned reads/writes of a file in the data dir (the NVMe ceiling)
  tierd nvme get    get of blocks that demotion has moved to the NVMe tier
and prints GB/s with the ratios the targets are stated in. `--json` writes the figures;
the top-level keys are those of the 2 MiB size. `--tree`/`--trees` compare checkouts of
this repository in one run (see bench_trees.py).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling bench_trees module
import bench_trees

from tierd.config import format_size, parse_size
from tierd.tiers.host import segments_of
from tierd_client import KVLayout, TierdClient

# 8 KV heads x 128 dim x fp16, 16 tokens per block: layers scale the block size, so 2 MiB
# is a Llama-3-8B block (32 layers) and 64 KiB a one-layer one.
HEADS, DIM, ITEM = 8, 128, 2


def layout_for(block_bytes: int) -> KVLayout:
    per_token_layer = 2 * HEADS * DIM * ITEM
    tokens = 16 if block_bytes >= 16 * per_token_layer else 1
    layers, rest = divmod(block_bytes, per_token_layer * tokens)
    if rest or layers == 0:
        raise SystemExit(f"block size {block_bytes} is not a multiple of {per_token_layer * 16}")
    if layers > 64:  # keep layer counts realistic: grow tokens instead
        tokens, layers = tokens * layers // 32, 32
    return KVLayout(layers, HEADS, DIM, "float16", tokens)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best of `repeat` wall times: the least disturbed run, as for a bandwidth ceiling."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- peers and ceilings -------------------------------------------------------------------


def bench_memcpy(block: int, total: int) -> float:
    n = total // block
    src = np.random.default_rng(0).integers(0, 255, (n, block), dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(1)
    return gbps(n * block, timed(lambda: [np.copyto(dst[i], src[i]) for i in range(n)]))


def bench_disk(directory: Path, block: int, total: int, threads: int) -> tuple[float, float]:
    """Raw O_DIRECT write then read of `total` bytes in `block` requests, `threads` deep."""
    path = directory / "bench-odirect.dat"
    n = total // block
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    try:
        os.posix_fallocate(fd, 0, n * block)
        bufs = [mmap.mmap(-1, block) for _ in range(threads)]  # page-aligned
        for b in bufs:
            b.write(os.urandom(min(block, 1 << 16)) * (block // min(block, 1 << 16)))

        def run(op: Callable[[int, memoryview, int], int]) -> None:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda i: op(fd, memoryview(bufs[i % threads]), i * block),
                              range(n)))

        write = timed(lambda: run(lambda f, b, o: os.pwritev(f, [b], o)), repeat=2)
        read = timed(lambda: run(lambda f, b, o: os.preadv(f, [b], o)), repeat=2)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return gbps(n * block, write), gbps(n * block, read)


def bench_redis(block: int, total: int, workdir: Path) -> tuple[float, float] | None:
    server = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return None
    if server is None:
        return None
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--proto-max-bulk-len", "1gb"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                r.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the server is starting; nothing to wait on but its port
        n = total // block
        values = [np.random.default_rng(i).bytes(block) for i in range(min(n, 64))]

        def set_all() -> None:
            for i in range(n):
                r.set(f"k{i}", values[i % len(values)])

        def get_all() -> None:
            for i in range(n):
                r.get(f"k{i}")

        return gbps(n * block, timed(set_all)), gbps(n * block, timed(get_all))
    finally:
        proc.terminate()
        proc.wait(10)


# -- tierd --------------------------------------------------------------------------------


class Daemon:
    """A tierd on a private socket and data dir, for the length of one measurement."""

    def __init__(self, workdir: Path, host: int, nvme: int, name: str,
                 nvme_codec: str = "raw") -> None:  # fmt: skip
        self.dir = workdir / name
        self.address = f"unix:{self.dir}/tierd.sock"
        cmd = [sys.executable, "-m", "tierd", "serve", "--listen", self.address,
               "--data-dir", str(self.dir / "data"), "--log-level", "WARNING"]  # fmt: skip
        if nvme_codec == "raw":
            cmd += ["--host-capacity", str(host), "--nvme-capacity", str(nvme)]
        else:  # the same two tiers, as a chain whose NVMe tier encodes
            self.dir.mkdir(parents=True, exist_ok=True)
            config = self.dir / "tierd.toml"
            codec, *opts = nvme_codec.split(";")  # an encoding's options: "kivi4;v_group=32"
            params = f"codec_params = {{{', '.join(opts).replace('=', ' = ')}}}\n" if opts else ""
            config.write_text(
                f'[[tiers]]\nname = "host"\nkind = "host"\ncapacity = {host}\n\n'
                f'[[tiers]]\nname = "nvme"\nkind = "nvme"\ncapacity = {nvme}\n'
                f'codec = "{codec}"\n{params}'
            )
            cmd += ["--config", str(config)]
        self.proc = subprocess.Popen(cmd)

    def client(self, transport: str) -> TierdClient:
        return TierdClient(self.address, transport=transport, timeout=120)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        for seg in segments_of(self.dir / "data"):  # segments outlive the daemon: ours go
            seg.unlink(missing_ok=True)


def _blocks(layout: KVLayout, n: int) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 2**16, (n, *layout.block_shape), dtype=np.uint16).view(np.float16)


def _batches(n: int, per_call: int) -> list[range]:
    return [range(i, min(n, i + per_call)) for i in range(0, n, per_call)]


def bench_tierd(d: Daemon, transport: str, block: int, total: int) -> dict[str, float]:
    """Put then get `total` bytes; puts are timed cold (fresh memory) and warm (reused)."""
    layout = layout_for(block)
    n = total // block
    per_call = max(1, (32 << 20) // block)
    blocks = _blocks(layout, n)
    out = np.empty((per_call, *layout.block_shape), dtype=np.float16)
    with d.client(transport) as c:
        ns = c.open_namespace(f"bench-{transport}-{block}", layout)

        def put_round(r: int) -> tuple[list[bytes], float]:
            # Fresh keys each round: a put of present keys copies nothing.
            keys = [r.to_bytes(4, "little") + i.to_bytes(12, "little") for i in range(n)]
            t0 = time.perf_counter()
            for b in _batches(n, per_call):
                c.put(ns, keys[b.start : b.stop], blocks[b.start : b.stop])
            return keys, time.perf_counter() - t0

        keys, cold = put_round(0)
        warm = float("inf")
        for r in range(1, 4):
            # Steady state of a cache: evicted blocks' slots are reused (their pages are
            # already faulted in); delete the last round so this one reuses its slots.
            c.delete(ns, keys)
            keys, t = put_round(r)
            warm = min(warm, t)

        def get_all() -> None:
            for b in _batches(n, per_call):
                got = c.get(ns, keys[b.start : b.stop], out=out[: len(b)])
                assert all(got.found)

        get = timed(get_all)
        # Spot-check the bytes: a benchmark that returned garbage fast would be worthless.
        c.get(ns, keys[:1], out=out[:1])
        assert np.array_equal(out[0].view(np.uint16), blocks[0].view(np.uint16))
    return {
        f"{transport}_put_gbps": gbps(n * block, warm),
        f"{transport}_put_cold_gbps": gbps(n * block, cold),
        f"{transport}_get_gbps": gbps(n * block, get),
    }


def bench_nvme_get(d: Daemon, block: int, total: int, host_capacity: int) -> float:
    """Put `total`, let demotion move most of it to NVMe, then get the demoted blocks."""
    layout = layout_for(block)
    n = total // block
    per_call = max(1, min(32 << 20, host_capacity // 4) // block)
    blocks = _blocks(layout, min(n, 16))
    out = np.empty((per_call, *layout.block_shape), dtype=np.float16)
    with d.client("shm") as c:
        ns = c.open_namespace(f"bench-nvme-{block}", layout)
        tokens = np.arange(n * layout.block_tokens)
        keys = c.block_keys(ns, tokens)
        for b in _batches(n, per_call):
            c.put(ns, keys[b.start : b.stop], blocks[[i % len(blocks) for i in b]])
        # Demotion runs in the daemon; wait until its counter stops moving so the reads
        # below do not share the disk with its writes.
        deadline, last = time.monotonic() + 120, -1
        while time.monotonic() < deadline:
            now = c.stats()["demotions"]
            if now == last and now >= n // 2:
                break
            last = now
            time.sleep(0.5)
        on_nvme = [b.key for b in c.lookup(ns, tokens).blocks if b.tier == "nvme"]
        if not on_nvme:
            return float("nan")
        t0 = time.perf_counter()
        for b in _batches(len(on_nvme), per_call):
            got = c.get(ns, on_nvme[b.start : b.stop], out=out[: len(b)])
            assert all(got.found)
        return gbps(len(on_nvme) * block, time.perf_counter() - t0)


# -- report -------------------------------------------------------------------------------


def run(sizes: list[int], total: int, workdir: Path, io_threads: int) -> dict[str, dict]:
    results: dict[str, dict] = {}
    host_cap = max(2 * total + (256 << 20), 1 << 30)
    for block in sizes:
        r: dict[str, float] = {}
        r["memcpy_gbps"] = bench_memcpy(block, total)
        r["disk_write_gbps"], r["disk_read_gbps"] = bench_disk(workdir, block, total, io_threads)
        redis_r = bench_redis(block, total, workdir)
        if redis_r:
            r["redis_set_gbps"], r["redis_get_gbps"] = redis_r
        d = Daemon(workdir, host_cap, 4 * total, f"d{block}")
        try:
            r.update(bench_tierd(d, "shm", block, total))
            r.update(bench_tierd(d, "inband", block, total))
        finally:
            d.stop()
        small = max(8 * block, total // 4)
        d = Daemon(workdir, small, 4 * total, f"n{block}")
        try:
            r["nvme_get_gbps"] = bench_nvme_get(d, block, total, small)
        finally:
            d.stop()
        results[format_size(block).replace(" ", "").replace(".0", "")] = r
    return results


def ratios(r: dict[str, float]) -> dict[str, float]:
    out = {
        "shm_get_over_memcpy": r["shm_get_gbps"] / r["memcpy_gbps"],
        "nvme_get_over_disk_read": r["nvme_get_gbps"] / r["disk_read_gbps"],
    }
    if "redis_get_gbps" in r:
        out["shm_get_over_redis_get"] = r["shm_get_gbps"] / r["redis_get_gbps"]
        out["shm_put_over_redis_set"] = r["shm_put_gbps"] / r["redis_set_gbps"]
    return out


def print_table(results: dict[str, dict]) -> None:
    cols = ["memcpy_gbps", "shm_put_cold_gbps", "shm_put_gbps", "shm_get_gbps",
            "inband_put_gbps", "inband_get_gbps",
            "redis_set_gbps", "redis_get_gbps", "disk_write_gbps", "disk_read_gbps",
            "nvme_get_gbps"]  # fmt: skip
    names = [c.removesuffix("_gbps") for c in cols]
    print("GB/s".ljust(8) + "".join(n.rjust(14) for n in names))
    for size, r in results.items():
        print(size.ljust(8) + "".join(f"{r.get(c, float('nan')):14.2f}" for c in cols))
    print()
    for size, r in results.items():
        q = ratios(r)
        print(f"{size}: " + ", ".join(f"{k} {v:.2f}x" for k, v in q.items()))
    print("targets (2 MiB): shm_get >= 4x redis_get and >= 0.5x memcpy; nvme_get >= 0.7x disk")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64KiB,2MiB,16MiB")
    p.add_argument("--total", default="512MiB", help="bytes moved per measurement")
    p.add_argument("--dir", type=Path, help="work dir on the disk to measure (default: cwd)")
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--json", type=Path, help="write the figures here")
    bench_trees.add_arguments(p)
    args = p.parse_args()
    if bench_trees.trees_of(args):
        return bench_trees.compare(Path(__file__), args, lambda d: bench_trees.flatten(d["sizes"]))
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    total = parse_size(args.total)
    base = args.dir or Path.cwd()
    with tempfile.TemporaryDirectory(prefix="tierd-bench-", dir=base) as tmp:
        results = run(sizes, total, Path(tmp), args.io_threads)
    print_table(results)
    if args.json:
        headline = results.get("2MiB") or next(iter(results.values()))
        doc = {**headline, **ratios(headline), "total_bytes": total, "sizes": results}
        bench_trees.stamp(doc)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
