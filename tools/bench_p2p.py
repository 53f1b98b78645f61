"""Blocks pulled from a peer daemon through tierd against Mooncake's transfer engine reading
the same bytes between two processes, in one run (`tools/bench_remote.py --stores p2p`).

  p2p get       daemon B, configured with daemon A as its peer, answers a lookup of a
                prefix only A holds: it pins the blocks on A, reads them with one-sided
                transfer-engine reads into its own host memory, checks and commits them;
                then B's client reads them from B's shared memory. Deleted on B between
                rounds (untimed), so each round pulls every block again.
  raw read      a holder process registers the same bytes with a transfer engine; this
                process reads them into registered memory with batched one-sided reads
                (the physical peer: no daemon, no checksum, no commit).
Figures: `p2p_get`, `raw_te_read` (GB/s per round) and `p2p_get_over_raw_te_read`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import bench_kv
import numpy as np

from tests.ports import free_port
from tierd.tiers.host import segments_of
from tierd_client import KVLayout, TierdClient, TierdError

TOKEN = "bench-p2p-secret-0123456789"
RAW_BATCH = 64  # blocks per batched read, as a pull of one lookup's batch would

HOLDER = """
import sys
import numpy as np
from mooncake.engine import TransferEngine
n, block = int(sys.argv[1]), int(sys.argv[2])
data = np.random.default_rng(1).integers(0, 2**16, n * block // 2, dtype=np.uint16)
e = TransferEngine()
assert e.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
assert e.register_memory(data.ctypes.data, data.nbytes) == 0
print(e.get_rpc_port(), data.ctypes.data, flush=True)
sys.stdin.read()
"""


class PeerDaemon:
    def __init__(self, base: Path, name: str, peers: str, capacity: int) -> None:
        self.dir = base / name
        self.dir.mkdir()
        self.address = f"unix:{self.dir}/tierd.sock"
        (self.dir / "peer.token").write_text(TOKEN)
        config = self.dir / "tierd.toml"
        config.write_text(f'[host]\ncapacity = {capacity}\n\n[peers]\n{peers}\n'
                          f'token_file = "{self.dir / "peer.token"}"\ntimeout_ms = 30000\n')  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tierd", "serve", "--config", str(config), "--listen",
             self.address, "--data-dir", str(self.dir / "data"), "--log-level", "WARNING"],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def wait(self) -> None:
        deadline = time.monotonic() + 60
        with TierdClient(self.address, timeout=1.0, max_retries=0) as probe:
            while True:
                try:
                    probe.stats()
                    return
                except TierdError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise
                    time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        for seg in segments_of(self.dir / "data"):
            seg.unlink(missing_ok=True)


def run_p2p(layout: KVLayout, total: int, rounds: int, workdir: Path) -> dict[str, list[float]]:
    from mooncake.engine import TransferEngine

    block = layout.block_bytes
    n = total // block
    per_call = max(1, (32 << 20) // block)
    batches = bench_kv._batches(n, per_call)
    blocks = bench_kv._blocks(layout, n)
    out = np.empty((per_call, *layout.block_shape), dtype=np.float16)
    where = f"127.0.0.1:{free_port()}"
    capacity = 2 * total + (256 << 20)
    a = PeerDaemon(workdir, "a", f'listen = "{where}"', capacity)
    b = PeerDaemon(workdir, "b", f'peers = ["{where}"]', capacity)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(n), str(block)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    figures: dict[str, list[float]] = {}
    try:
        a.wait()
        b.wait()
        assert holder.stdout is not None
        port, remote = map(int, holder.stdout.readline().split())
        engine = TransferEngine()
        assert engine.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
        dst = np.empty(n * block, dtype=np.uint8)
        assert engine.register_memory(dst.ctypes.data, dst.nbytes) == 0
        with TierdClient(a.address, transport="shm", timeout=120) as ca, \
                TierdClient(b.address, transport="shm", timeout=120) as cb:  # fmt: skip
            tokens = np.arange(n * layout.block_tokens)
            ns_a, ns_b = ca.open_namespace("bench-p2p", layout), cb.open_namespace("bench-p2p",
                                                                                  layout)  # fmt: skip
            keys = ca.block_keys(ns_a, tokens)
            for r in batches:
                ca.put(ns_a, keys[r.start : r.stop], blocks[r.start : r.stop])

            def p2p_get() -> None:
                assert cb.lookup(ns_b, tokens).cached_tokens == len(tokens)
                for r in batches:
                    assert all(cb.get(ns_b, keys[r.start : r.stop], out=out[: len(r)]).found)
                assert np.array_equal(out[len(batches[-1]) - 1].view(np.uint16),
                                      blocks[-1].view(np.uint16))  # fmt: skip

            def raw_read() -> None:
                for i in range(0, n, RAW_BATCH):
                    m = min(RAW_BATCH, n - i)
                    locs = [dst.ctypes.data + (i + j) * block for j in range(m)]
                    rems = [remote + (i + j) * block for j in range(m)]
                    assert engine.batch_transfer_sync_read(f"127.0.0.1:{port}", locs, rems,
                                                           [block] * m) == 0  # fmt: skip

            def fresh() -> None:
                for r in batches:
                    cb.delete(ns_b, keys[r.start : r.stop])

            paths = [("p2p_get", p2p_get, fresh), ("raw_te_read", raw_read, lambda: None)]
            for i in range(rounds):
                for name, fn, before in paths[i % 2 :] + paths[: i % 2]:
                    before()
                    t0 = time.perf_counter()
                    fn()
                    figures.setdefault(name, []).append(bench_kv.gbps(n * block,
                                                                      time.perf_counter() - t0))  # fmt: skip
            peer = cb.stats()["peers"][where]
            assert peer["blocks"] == rounds * n and peer["corrupt"] == 0, peer
    finally:
        b.stop()
        a.stop()
        holder.communicate("", timeout=30)
    figures["p2p_get_over_raw_te_read"] = [
        x / y for x, y in zip(figures["p2p_get"], figures["raw_te_read"])]  # fmt: skip
    return figures
