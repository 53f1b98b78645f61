"""Remote-tier get through tierd against the cluster it reads from, in one run.

    python tools/bench_remote.py [--block 2MiB] [--total 256MiB] [--threads 8] [--rounds 7]
                                 [--stores redis,mooncake,p2p] [--json FILE]

Starts a Redis cluster (three masters, one replica each, on loopback: redis-server and
redis-cli from PATH) and a tierd whose chain is host -> redis, then measures on the same
blocks:
  remote get     tierd shared-memory get of blocks whose only copy is in the redis tier
                 (each get promotes them: read, checked, copied into host; the client
                 reads its shared memory); moved back to the redis tier between rounds
  raw GET        redis-py's RedisCluster GET of those very values, with as many threads
                 as the tier's io_threads (the physical peer: what a client reading the
                 cluster itself gets), and with one thread
  in-band get    tierd gRPC in-band get of the same blocks held in host memory
and then, on a Mooncake Store master and a holder process that lends the pool its memory
(every block lives there, so each read crosses processes over the transfer engine, TCP):
  mooncake tier get   tierd get of blocks whose only copy is in its mooncake tier
  mooncake get        Mooncake's own client reading those values (`io_threads` threads,
                      and one): the peer, in another process than the holder too
  remote client get   a client that maps no shared memory (as on another host) getting
                      the same blocks, held in the daemon's memory, through the transfer
                      engine (`[peers] bulk`: BulkGet, one-sided reads, checksums)
  remote client put   the same client putting them (the daemon reads them one-sided)
Each round times all four, in rotating order, after moving the blocks where the next
one reads them (untimed); figures are medians over rounds, ratios are per round (a busy
machine moves both sides of a round together). With `p2p`, a daemon pulling a prefix from a
peer daemon against the transfer engine's own reads (`tools/bench_p2p.py`: `p2p_get_gbps`,
`raw_te_read_gbps`). `--json` writes `remote_get_gbps`,
`raw_cluster_get_gbps`, `inband_get_gbps`, `mooncake_get_gbps`, `mooncake_tier_get_gbps`,
`remote_client_get_gbps`, `remote_client_put_gbps` and the ratios the targets are stated
in (remote get >= 0.9x raw GET, remote client get >= 1.0x Mooncake get), with each
figure's range.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))  # sibling benchmarks
sys.path.insert(0, str(ROOT))  # tests.redis_cluster: the servers the tests run on
import bench_kv
import bench_trees
from bench_p2p import run_p2p

from tests.mooncake_master import HAVE_MOONCAKE
from tests.redis_cluster import HAVE_REDIS, Cluster
from tierd.config import format_size, parse_size
from tierd.tiers.host import segments_of
from tierd_client import KVLayout, TierdClient


def timed(fn: Callable[[], object], before: Callable[[], object]) -> float:
    """Wall time of `fn`, `before` run untimed first."""
    before()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Daemon:
    def __init__(self, workdir: Path, remote_tier: str, host: int, remote: int,
                 threads: int, extra: str = "") -> None:  # fmt: skip
        """`remote_tier`: the remote tier's kind and options, TOML lines; `extra`: more
        sections."""
        self.dir = workdir / "tierd"
        self.dir.mkdir()
        self.address = f"unix:{self.dir}/tierd.sock"
        config = self.dir / "tierd.toml"
        config.write_text(
            f'[[tiers]]\nname = "mem"\nkind = "host"\ncapacity = {host}\n\n'
            f'[[tiers]]\nname = "remote"\ncapacity = {remote}\n{remote_tier}'
            f"io_threads = {threads}\ntimeout_ms = 5000\n{extra}"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tierd", "serve", "--config", str(config), "--listen",
             self.address, "--data-dir", str(self.dir / "data"), "--log-level", "WARNING"]
        )  # fmt: skip

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        for seg in segments_of(self.dir / "data"):
            seg.unlink(missing_ok=True)


def run(layout: KVLayout, total: int, threads: int, rounds: int,
        workdir: Path) -> dict[str, list[float]]:  # fmt: skip
    """GB/s of each path, one figure per round."""
    block = layout.block_bytes
    n = total // block
    per_call = max(1, (32 << 20) // block)
    batches = bench_kv._batches(n, per_call)
    blocks = bench_kv._blocks(layout, n)
    out = np.empty((per_call, *layout.block_shape), dtype=np.float16)
    cluster = Cluster(workdir / "cluster")
    cluster.start()
    daemon = Daemon(workdir, f'kind = "redis"\nnodes = {json.dumps(cluster.nodes)}\n',
                    2 * total + (256 << 20), 4 * total, threads)  # fmt: skip
    figures: dict[str, list[float]] = {}
    try:
        with TierdClient(daemon.address, transport="shm", timeout=120) as c, \
                TierdClient(daemon.address, transport="inband", timeout=120) as ib, \
                cluster.client() as rc, ThreadPoolExecutor(threads) as pool:  # fmt: skip
            ns = c.open_namespace("bench-remote", layout)
            nsi = ib.open_namespace("bench-remote", layout)  # its gets stream in-band
            keys = [i.to_bytes(16, "little") for i in range(n)]
            rkeys = [f"tierd:{{default:{ns.id.hex()}}}:{k.hex()}" for k in keys]
            for b in batches:
                c.put(ns, keys[b.start : b.stop], blocks[b.start : b.stop])

            def only_remote() -> None:  # a move to the redis tier drops the host copies
                for b in batches:
                    assert c.move(ns, keys[b.start : b.stop], "remote") == len(b)

            def in_memory() -> None:
                for b in batches:
                    assert c.move(ns, keys[b.start : b.stop], "mem") == len(b)

            def remote_get() -> None:
                for b in batches:
                    got = c.get(ns, keys[b.start : b.stop], out=out[: len(b)])
                    assert all(got.found)
                assert np.array_equal(out[len(batches[-1]) - 1].view(np.uint16),
                                      blocks[-1].view(np.uint16))  # fmt: skip

            def raw(width: int) -> Callable[[], None]:
                def get_all() -> None:
                    got = (list(pool.map(rc.get, rkeys)) if width > 1 else
                           [rc.get(k) for k in rkeys])  # fmt: skip
                    assert got[-1] is not None and got[-1][-block:] == blocks[-1].tobytes()

                return get_all

            def inband_get() -> None:
                for b in batches:
                    got = ib.get(nsi, keys[b.start : b.stop], out=out[: len(b)])
                    assert all(got.found)

            paths = [
                ("remote_get", remote_get, only_remote),
                ("raw_cluster_get", raw(threads), only_remote),
                ("raw_cluster_get_1thread", raw(1), only_remote),
                ("inband_get", inband_get, in_memory),
            ]
            for i in range(rounds):
                for name, fn, before in paths[i % 4 :] + paths[: i % 4]:
                    figures.setdefault(name, []).append(bench_kv.gbps(n * block,
                                                                      timed(fn, before)))  # fmt: skip
    finally:
        daemon.stop()
        cluster.stop()
    figures["remote_get_over_raw_cluster_get"] = [
        a / b for a, b in zip(figures["remote_get"], figures["raw_cluster_get"])]  # fmt: skip
    return figures


# A Mooncake client that only lends memory to the pool: the blocks live in its segment,
# so every read below (tierd's and the raw client's) crosses to another process.
HOLDER = """
import sys
from mooncake.store import MooncakeDistributedStore
s = MooncakeDistributedStore()
rc = s.setup("127.0.0.1", sys.argv[1], int(sys.argv[2]), 16 << 20, "tcp", "", sys.argv[3])
print("READY" if rc == 0 else f"FAILED {rc}", flush=True)
sys.stdin.read()
s.close()
"""
READER_SEGMENT = 0  # readers lend nothing: no block lands in their memory


def run_mooncake(layout: KVLayout, total: int, threads: int, rounds: int,
                 workdir: Path) -> dict[str, list[float]]:  # fmt: skip
    """GB/s of the mooncake tier's get through tierd and of Mooncake's own client."""
    from mooncake.store import MooncakeDistributedStore

    from tests.mooncake_master import Master

    block = layout.block_bytes
    n = total // block
    per_call = max(1, (32 << 20) // block)
    batches = bench_kv._batches(n, per_call)
    blocks = bench_kv._blocks(layout, n)
    out = np.empty((per_call, *layout.block_shape), dtype=np.float16)
    (workdir / "master").mkdir()
    master = Master(workdir / "master")
    master.start()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, master.metadata,
                               str(2 * total + (64 << 20)), master.address],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline().strip() == "READY"
    tier = (
        f'kind = "mooncake"\nmaster = "{master.address}"\n'
        f'metadata_server = "{master.metadata}"\nlend = false\n'
    )
    daemon = Daemon(workdir, tier, 2 * total + (256 << 20), 2 * total, threads,
                    '\n[peers]\nbulk = true\nengine_hostname = "127.0.0.1"\n')  # fmt: skip
    store = MooncakeDistributedStore()
    assert store.setup("127.0.0.1", master.metadata, READER_SEGMENT, 64 << 20, "tcp", "",
                       master.address) == 0  # fmt: skip
    figures: dict[str, list[float]] = {}
    try:
        with TierdClient(daemon.address, transport="shm", timeout=120) as c, \
                TierdClient(daemon.address, transport="inband", bulk="engine",
                            timeout=120) as rc, \
                ThreadPoolExecutor(threads) as pool:  # fmt: skip
            ns = c.open_namespace("bench-remote", layout)
            nsr = rc.open_namespace("bench-remote", layout)  # through the transfer engine
            assert nsr.transport == "engine"
            keys = [i.to_bytes(16, "little") for i in range(n)]
            rkeys = [f"tierd/default/{ns.id.hex()}/{k.hex()}" for k in keys]
            for b in batches:
                c.put(ns, keys[b.start : b.stop], blocks[b.start : b.stop])

            def only_remote() -> None:
                for b in batches:
                    assert c.move(ns, keys[b.start : b.stop], "remote") == len(b)

            def tier_get() -> None:
                for b in batches:
                    got = c.get(ns, keys[b.start : b.stop], out=out[: len(b)])
                    assert all(got.found)

            def in_memory() -> None:
                for b in batches:
                    assert c.move(ns, keys[b.start : b.stop], "mem") == len(b)

            def client_get() -> None:
                for b in batches:
                    got = rc.get(nsr, keys[b.start : b.stop], out=out[: len(b)])
                    assert all(got.found)
                assert np.array_equal(out[len(batches[-1]) - 1].view(np.uint16),
                                      blocks[-1].view(np.uint16))  # fmt: skip

            def deleted() -> None:
                assert c.delete(ns, keys) == n

            def client_put() -> None:
                for b in batches:
                    assert rc.put(nsr, keys[b.start : b.stop], blocks[b.start : b.stop]) == [
                        "stored"] * len(b)  # fmt: skip

            def raw(width: int) -> Callable[[], None]:
                def get_all() -> None:
                    got = (list(pool.map(store.get, rkeys)) if width > 1 else
                           [store.get(k) for k in rkeys])  # fmt: skip
                    assert got[-1][-block:] == blocks[-1].tobytes()

                return get_all

            paths = [
                ("mooncake_tier_get", tier_get, only_remote),
                ("mooncake_get", raw(threads), only_remote),
                ("mooncake_get_1thread", raw(1), only_remote),
                ("remote_client_get", client_get, in_memory),
                ("remote_client_put", client_put, deleted),
            ]
            for i in range(rounds):
                at = i % len(paths)
                for name, fn, before in paths[at:] + paths[:at]:
                    figures.setdefault(name, []).append(bench_kv.gbps(n * block,
                                                                      timed(fn, before)))  # fmt: skip
    finally:
        daemon.stop()
        store.close()
        holder.communicate("", timeout=30)
        master.kill()
    figures["mooncake_tier_get_over_mooncake_get"] = [
        a / b for a, b in zip(figures["mooncake_tier_get"], figures["mooncake_get"])]  # fmt: skip
    figures["remote_client_get_over_mooncake_get"] = [
        a / b for a, b in zip(figures["remote_client_get"], figures["mooncake_get"])]  # fmt: skip
    figures["remote_client_get_over_mooncake_get_1thread"] = [
        a / b for a, b in zip(figures["remote_client_get"],
                              figures["mooncake_get_1thread"])]  # fmt: skip
    return figures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--block", default="2MiB")
    p.add_argument("--total", default="256MiB", help="bytes read per measurement")
    p.add_argument("--threads", type=int, default=8, help="the tier's io_threads, and raw GET's")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--stores", default="redis,mooncake,p2p", help="which stores to measure")
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args()
    stores = set(args.stores.split(","))
    if "redis" in stores and not HAVE_REDIS:
        print("needs redis-server, redis-cli and redis-py", file=sys.stderr)
        return 1
    if stores & {"mooncake", "p2p"} and not HAVE_MOONCAKE:
        print("needs mooncake-transfer-engine-non-cuda and libibverbs1", file=sys.stderr)
        return 1
    layout = bench_kv.layout_for(parse_size(args.block))
    total = parse_size(args.total)
    figures: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tierd-bench-remote-") as tmp:
        if "redis" in stores:
            (Path(tmp) / "redis").mkdir()
            figures |= run(layout, total, args.threads, args.rounds, Path(tmp) / "redis")
        if "mooncake" in stores:
            (Path(tmp) / "mooncake").mkdir()
            figures |= run_mooncake(layout, total, args.threads, args.rounds,
                                    Path(tmp) / "mooncake")  # fmt: skip
        if "p2p" in stores:
            (Path(tmp) / "p2p").mkdir()
            figures |= run_p2p(layout, total, args.rounds, Path(tmp) / "p2p")
    print(f"{format_size(layout.block_bytes)} blocks, {format_size(total)} per round, "
          f"{args.threads} threads, {args.rounds} rounds: median (range)")  # fmt: skip
    doc: dict[str, object] = {}
    for name, values in figures.items():
        med = statistics.median(values)
        unit = "x" if "_over_" in name else " GB/s"
        print(f"  {name:<34}{med:6.2f}{unit} ({min(values):.2f}-{max(values):.2f})")
        key = name if "_over_" in name else f"{name}_gbps"
        doc[key], doc[f"{key}_range"] = med, [min(values), max(values)]
    print(
        "target: remote get >= 0.9x raw cluster GET (and the mooncake tier's against "
        "Mooncake's own client); remote client get >= 1.0x Mooncake get"
    )
    if args.json:
        doc.update(block_bytes=layout.block_bytes, total_bytes=total, threads=args.threads,
                   rounds=args.rounds)  # fmt: skip
        bench_trees.stamp(doc)
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
