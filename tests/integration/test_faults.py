"""Faults and a soak against a real daemon: dead clients give memory back, and many clients
of several tenants mixing every call for a while lose nothing, see nothing of each other and
leave the daemon's memory flat.

Each test starts its own daemon from a config file (tenants, a short lease lifetime, a small
host tier), on unix sockets only, and removes it and its /dev/shm segments however it ends.

This file is also the program of the client processes the tests start
(`python test_faults.py MODE JSON`): the dying client of the first test, the soak workers
and the soak's victim that is killed with SIGKILL at intervals. Block contents are derived
from (tenant, key), so any process can check any block it reads without keeping bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tierd.tiers.block_header import HEADER_BYTES
from tierd.tiers.host import segments_of
from tierd_client import (
    FailedPrecondition,
    KVLayout,
    ResourceExhausted,
    TierdClient,
    TierdError,
)
from tierd_client._proto import tierd_pb2 as pb
from tierd_client.attend import AttendItem
from tierd_client.keys import block_keys as ns_block_keys
from tierd_client.keys import namespace_id
from tierd_client.layout import dtype_to_proto
from tierd_client.shm import slot_view

# 2 layers x K|V x 2 kv heads x 16 tokens x 64 dim x float32 = 32 KiB per block.
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_tokens=16)
BB = LAYOUT.block_bytes
# Space one block takes per tier: on NVMe its header page comes in front of it.
EXTENT = {"host": BB, "nvme": BB + HEADER_BYTES}
T = LAYOUT.block_tokens
GROUP = 2  # query heads per KV head (GQA)
HEADS = GROUP * LAYOUT.num_kv_heads
SHAPE = pb.BlockShape(dims=list(LAYOUT.block_shape), dtype=dtype_to_proto(LAYOUT.dtype))
MODEL = "fault-model@1"

TOKENS = {"alpha": "alpha-fault-token", "beta": "beta-fault-token", "gamma": "gamma-fault-token"}
TENANTS = tuple(TOKENS)

START_DEADLINE_S = 60.0
STOP_DEADLINE_S = 30.0
RECLAIM_DEADLINE_S = 10.0

SOAK_SECONDS = float(os.environ.get("TIERD_SOAK_SECONDS", "30"))
SOAK_PROCESSES = 4  # x SOAK_THREADS clients each: 16 clients
SOAK_THREADS = 4
RSS_GROWTH_LIMIT = 64 << 20
ABANDON_TTL_MS = 600  # leases and sequences the soak abandons on purpose


# -- contents and token spaces (shared by the test and its client processes) ------------------


def block_content(tenant: str, key: bytes) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(tenant.encode() + key, digest_size=8).digest(), "little")
    return np.random.default_rng(seed).standard_normal(LAYOUT.block_shape, dtype=np.float32)


def contents(tenant: str, keys: list[bytes]) -> np.ndarray:
    return np.stack([block_content(tenant, k) for k in keys])


def tenant_base(tenant: str) -> int:
    # Every tenant's prompts live in their own token range, so a tenant never stores a
    # prompt of another one: a hit on another tenant's prompt can only be a leak.
    return (TENANTS.index(tenant) + 1) * 100_000_000


def shared_prompt(tenant: str, p: int) -> np.ndarray:
    """Prompt p of the tenant's shared set (every client of the tenant uses these)."""
    return tenant_base(tenant) + p * 1000 + np.arange((1 + p % 4) * T)


def private_prompt(tenant: str, client: int, p: int) -> np.ndarray:
    """Prompt p of one client: 1-4 blocks it puts, plus one more block that only an attend
    seals into the cache (the "extension")."""
    return (
        tenant_base(tenant) + 10_000_000 + client * 100_000 + p * 100 + np.arange((2 + p % 4) * T)
    )


def ghost_prompt(tenant: str, client: int, n: int) -> np.ndarray:
    """Keys that are only ever prepared, never committed: they must never be visible."""
    return tenant_base(tenant) + 50_000_000 + client * 100_000 + n * 100 + np.arange(2 * T)


def victim_prompt(tenant: str, n: int) -> np.ndarray:
    return tenant_base(tenant) + 60_000_000 + n * 100 + np.arange(2 * T)


def victim_ghost(tenant: str, n: int) -> np.ndarray:
    return tenant_base(tenant) + 70_000_000 + n * 100 + np.arange(2 * T)


def reference_attention(
    k: np.ndarray, v: np.ndarray, q: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """q [1, heads, dim] over k, v [kv_heads, seq, dim] (GQA), in float64: (out, lse)."""
    kk = np.repeat(k.astype(np.float64), GROUP, axis=0)  # [heads, seq, dim]
    vv = np.repeat(v.astype(np.float64), GROUP, axis=0)
    s = np.einsum("hd,hsd->hs", q[0].astype(np.float64), kk) / math.sqrt(LAYOUT.head_dim)
    m = s.max(axis=1, keepdims=True)
    w = np.exp(s - m)
    den = w.sum(axis=1, keepdims=True)
    out = np.einsum("hs,hsd->hd", w / den, vv)
    return out[None], (m + np.log(den))[:, 0][None]


# -- the daemon under test ---------------------------------------------------------------------


def tenants_toml() -> str:
    return "".join(
        f'[[tenants]]\nname = "{name}"\n'
        f'token_sha256 = "{hashlib.sha256(tok.encode()).hexdigest()}"\n'
        for name, tok in TOKENS.items()
    )


class ConfigDaemon:
    """`python -m tierd serve --config FILE` in a fresh short directory (unix socket paths
    are limited to 107 bytes, so not pytest's tmp_path)."""

    def __init__(self, body: str) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="tflt-"))
        self.data_dir = self.base / "data"
        self.address = f"unix:{self.base}/tierd.sock"
        self.config = self.base / "tierd.toml"
        self.config.write_text(
            f'data_dir = "{self.data_dir}"\n[server]\nlisten = ["{self.address}"]\n{body}'
        )
        self.log = self.base / "tierd.stderr"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, limit: int = 8000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return "<no daemon log>"

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tierd", "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip

    def wait_serving(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_DEADLINE_S
        with TierdClient(self.address, token=TOKENS["alpha"], timeout=1.0, max_retries=0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"tierd exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    c.stats()
                    return
                except TierdError:  # not listening yet
                    time.sleep(0.1)
        raise AssertionError(f"tierd did not answer within {START_DEADLINE_S}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_anon(self) -> int:
        """Anonymous resident memory: the heap. Shared-memory pages are the host tier."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no RssAnon in /proc/PID/status")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_DEADLINE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        # Segments outlive the daemon on purpose (a restart adopts them): remove ours. They
        # are named after the data dir, as CacheService names them.
        for seg in segments_of(self.data_dir):
            seg.unlink(missing_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)


@contextmanager
def running_daemon(body: str, *, wait: bool = True) -> Iterator[ConfigDaemon]:
    daemon = ConfigDaemon(body)
    try:
        daemon.start()
        if wait:
            daemon.wait_serving()
        yield daemon
    except BaseException:
        print(f"--- tierd stderr ---\n{daemon.log_tail()}", file=sys.stderr)
        raise
    finally:
        daemon.stop()


class Child:
    """A client process of this file, its stdout read line by line on a thread."""

    def __init__(self, mode: str, args: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, mode, json.dumps(args)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[bytes] = []
        threading.Thread(target=self._read_out, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for chunk in self.proc.stderr:
            self.stderr.append(chunk)

    def err_tail(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")[-4000:]

    def expect(self, prefix: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {prefix!r} line within {timeout}s:\n{self.err_tail()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                self.proc.wait(5)
                raise AssertionError(
                    f"client exited ({self.proc.returncode}) before {prefix!r}:\n{self.err_tail()}"
                )
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)


def poll_stats(address: str, pred: Any, deadline_s: float) -> tuple[bool, dict[str, Any], float]:
    """Poll Stats until pred(stats) holds; (held, last stats, seconds waited)."""
    t0 = time.monotonic()
    with TierdClient(address, token=TOKENS["alpha"], timeout=5.0) as c:
        while True:
            s = c.stats()
            if pred(s):
                return True, s, time.monotonic() - t0
            if time.monotonic() - t0 > deadline_s:
                return False, s, time.monotonic() - t0
            time.sleep(0.05)


def host_used(s: dict[str, Any]) -> int:
    return int(s["tiers"]["host"]["used_bytes"])


# -- 1. a client that dies holding leases gives its memory back --------------------------------

# The dying client's leases ask for longer than the daemon's 500 ms default, so that the
# test's Stats read lands inside them however loaded the machine; expiry is what is tested.
HOLD_TTL_MS = 2500


def test_dead_client_leases_are_reclaimed() -> None:
    body = (f'[host]\ncapacity = "64MiB"\n[nvme]\ncapacity = "64MiB"\n'
            f"[leases]\ndefault_ttl_ms = 500\n{tenants_toml()}")  # fmt: skip
    with running_daemon(body) as daemon:
        child = Child("dying-client", {"address": daemon.address, "tenant": "alpha"})
        try:
            child.expect("COMMITTED", START_DEADLINE_S)
            with TierdClient(daemon.address, tenant="alpha", token=TOKENS["alpha"]) as c:
                base = c.stats()
            assert base["active_leases"] == 0
            child.send("go")
            held_info = json.loads(child.expect("HOLDING", 30))
            with TierdClient(daemon.address, tenant="alpha", token=TOKENS["alpha"]) as c:
                held = c.stats()
            # The put lease holds staging, not host-tier space; both leases are open.
            assert held_info["put_slots"] > 0 and held["active_leases"] >= 2, held
            child.kill()
            t_kill = time.monotonic()
        finally:
            child.kill()

        ok, after, waited = poll_stats(
            daemon.address,
            lambda s: (
                s["active_leases"] == base["active_leases"] and host_used(s) == host_used(base)
                and s["active_sequences"] == base["active_sequences"]
            ),
            RECLAIM_DEADLINE_S,
        )
        assert ok, (
            f"after {waited:.1f}s: active_leases {after['active_leases']} (baseline "
            f"{base['active_leases']}), host used {host_used(after)} (baseline {host_used(base)})"
        )
        print(f"\ndead client: host used {host_used(base)} -> {host_used(held)} -> "
              f"{host_used(after)} B, leases 0 -> {held['active_leases']} -> 0, reclaimed "
              f"{time.monotonic() - t_kill:.2f}s after SIGKILL (lease ttl {HOLD_TTL_MS} ms)")  # fmt: skip

        with TierdClient(daemon.address, tenant="alpha", token=TOKENS["alpha"]) as c:
            ns = c.open_namespace(MODEL, LAYOUT)
            keys = c.block_keys(ns, DYING_COMMITTED)
            got = c.get(ns, keys)
            assert got.found == [True] * len(keys)
            assert np.array_equal(got.blocks.view(np.uint8), contents("alpha", keys).view(np.uint8))
            # What was prepared and half-copied, never committed, is nowhere.
            ghost = c.block_keys(ns, DYING_UNCOMMITTED)
            assert c.lookup(ns, DYING_UNCOMMITTED).cached_tokens == 0
            assert c.get(ns, ghost).found == [False] * len(ghost)
            # The reader references of the expired get lease and sequence are gone too: a
            # move to NVMe drops a host copy only when nobody else reads the block.
            assert c.move(ns, keys, "nvme") == len(keys)
            assert host_used(c.stats()) == host_used(base) - len(keys) * BB
            assert [b.tier for b in c.lookup(ns, DYING_COMMITTED).blocks] == ["nvme"] * len(keys)
            got = c.get(ns, keys)  # promoted back, still byte-exact
            assert np.array_equal(got.blocks.view(np.uint8), contents("alpha", keys).view(np.uint8))


DYING_COMMITTED = np.arange(4 * T) + 1000
DYING_UNCOMMITTED = np.arange(4 * T) + 5000


def dying_client(args: dict[str, Any]) -> None:
    tenant = args["tenant"]
    c = TierdClient(args["address"], tenant=tenant, token=TOKENS[tenant], transport="shm")
    ns = c.open_namespace(MODEL, LAYOUT)
    keys = c.block_keys(ns, DYING_COMMITTED)
    c.put(ns, keys, contents(tenant, keys))
    print("COMMITTED", flush=True)
    sys.stdin.readline()
    # The sequence first: the daemon's first one builds its attention engine (seconds on a
    # loaded machine), which must not eat into the leases' lifetime before the test looks.
    seq = c.open_sequence(ns, keys, ttl_ms=HOLD_TTL_MS)
    new = c.block_keys(ns, DYING_UNCOMMITTED)
    prep = c._unary("PreparePut", pb.PreparePutRequest(
        namespace_id=ns.id, keys=new, shape=SHAPE, lease_ttl_ms=HOLD_TTL_MS))  # fmt: skip
    mm = c._segment_map(prep, ns).staging
    for slot in prep.slots[:2]:  # dies half way through copying
        slot_view(mm, slot.offset, LAYOUT)[...] = 7.0
    get = c._unary("PrepareGet", pb.PrepareGetRequest(
        namespace_id=ns.id, keys=keys, lease_ttl_ms=HOLD_TTL_MS))  # fmt: skip
    info = {"put_lease": prep.lease_id, "put_slots": len(prep.slots), "get_lease": get.lease_id,
            "sequence": seq}  # fmt: skip
    print("HOLDING", json.dumps(info), flush=True)
    sys.stdin.read()  # until SIGKILL


# -- 2. the soak -------------------------------------------------------------------------------

_PROBES = ("Lookup", "PrepareGet", "Get", "Delete", "Pin", "Move", "OpenSequence", "PreparePut")


class SoakClient:
    """One client of one tenant, mixing every call until its deadline (one thread)."""

    def __init__(self, address: str, tenant: str, index: int, ns_ids: dict[str, bytes],
                 seed: int) -> None:  # fmt: skip
        self.tenant, self.index = tenant, index
        self.rng = random.Random(seed)
        self.nrng = np.random.default_rng(seed)
        token = TOKENS[tenant]
        self.cs = TierdClient(address, tenant=tenant, token=token, transport="shm", timeout=60)
        self.ci = TierdClient(address, tenant=tenant, token=token, transport="inband", timeout=60)
        self.ns_s = self.cs.open_namespace(MODEL, LAYOUT)
        self.ns_i = self.ci.open_namespace(MODEL, LAYOUT)
        assert self.ns_s.transport == "shm" and self.ns_i.transport == "inband"
        assert self.ns_s.id == self.ns_i.id == ns_ids[tenant]
        self.others = {t: i for t, i in ns_ids.items() if t != tenant}
        self.n_private = 48
        self.stored: set[bytes] = set()  # private keys put and not deleted since
        self.deleted: set[bytes] = set()  # private keys deleted and not stored since
        self.pinned: set[bytes] = set()
        self.ghosts = 0
        self.calls: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.expected: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.counts: Counter[str] = Counter()  # bytes, misses, data-loss and leak tallies
        self._unknown_answers: dict[str, tuple[str, str | None, str]] = {}

    # -- helpers ------------------------------------------------------------------------

    def bad(self, what: str) -> None:
        self.unexpected.append(f"{self.tenant}#{self.index}: {what}")

    def keys(self, tokens: np.ndarray) -> list[bytes]:
        return ns_block_keys(self.ns_s.id, tokens, T)

    def pick_prompt(self, private: float = 0.75) -> tuple[np.ndarray, bool]:
        if self.rng.random() < private:
            return private_prompt(self.tenant, self.index, self.rng.randrange(self.n_private)), True
        return shared_prompt(self.tenant, self.rng.randrange(16)), False

    def check_blocks(self, keys: list[bytes], found: list[bool], blocks: np.ndarray,
                     private: bool) -> None:  # fmt: skip
        for i, (key, hit) in enumerate(zip(keys, found)):
            if hit:
                self.counts["bytes_got"] += BB
                want = block_content(self.tenant, key)
                if not np.array_equal(blocks[i].view(np.uint8), want.view(np.uint8)):
                    self.counts["wrong_bytes"] += 1
                    self.bad(f"wrong bytes for key {key.hex()} (private={private})")
                if private and key in self.deleted:
                    self.counts["resurrected"] += 1
                    self.bad(f"deleted key {key.hex()} is back")
            elif private and key in self.pinned:
                self.counts["lost_pinned"] += 1
                self.bad(f"pinned key {key.hex()} missing")
            elif private and key in self.stored:
                self.counts["evicted_misses"] += 1

    # -- operations -----------------------------------------------------------------------

    def op_put(self) -> None:
        shm = self.rng.random() < 0.6
        client, ns = (self.cs, self.ns_s) if shm else (self.ci, self.ns_i)
        tokens, private = self.pick_prompt()
        keys = self.keys(tokens)
        if private:
            keys = keys[:-1]  # the extension block is only ever sealed by attend
        start = self.rng.randrange(len(keys)) if self.rng.random() < 0.3 else 0
        keys = keys[start:]
        self.calls["put_shm" if shm else "put_inband"] += 1
        outcomes = client.put(ns, keys, contents(self.tenant, keys))
        self.counts["bytes_put"] += outcomes.count("stored") * BB
        if private:
            self.stored.update(keys)
            self.deleted.difference_update(keys)

    def op_get(self) -> None:
        shm = self.rng.random() < 0.6
        client, ns = (self.cs, self.ns_s) if shm else (self.ci, self.ns_i)
        tokens, private = self.pick_prompt()
        keys = self.keys(tokens)
        self.calls["get_shm" if shm else "get_inband"] += 1
        got = client.get(ns, keys)
        self.check_blocks(keys, got.found, got.blocks, private)

    def op_lookup(self) -> None:
        tokens, _ = self.pick_prompt()
        keys = self.keys(tokens)
        self.calls["lookup"] += 1
        hit = self.cs.lookup(self.ns_s, tokens)
        n = hit.cached_tokens // T
        if (hit.cached_tokens % T or len(hit.blocks) != n
                or [b.key for b in hit.blocks] != keys[:n]
                or any(b.tier not in ("host", "nvme") for b in hit.blocks)):  # fmt: skip
            self.bad(f"inconsistent lookup: {hit.cached_tokens} tokens, {len(hit.blocks)} blocks")

    def op_delete(self) -> None:
        tokens, private = self.pick_prompt(private=0.9)
        keys = self.keys(tokens)
        keys = keys[self.rng.randrange(len(keys)) :]
        self.calls["delete"] += 1
        n = self.cs.delete(self.ns_s, keys)
        if n > len(keys):
            self.bad(f"deleted {n} of {len(keys)} keys")
        if private:
            self.stored.difference_update(keys)
            self.pinned.difference_update(keys)
            self.deleted.update(keys)

    def op_pin(self) -> None:
        if len(self.pinned) >= 8 or (self.pinned and self.rng.random() < 0.4):
            keys = self.rng.sample(sorted(self.pinned), max(1, len(self.pinned) // 2))
            self.calls["unpin"] += 1
            n = self.cs.unpin(self.ns_s, keys)
            if n != len(keys):  # pinned blocks are never evicted, and only we touch them
                self.counts["lost_pinned"] += len(keys) - n
                self.bad(f"unpin changed {n} of {len(keys)} pinned keys")
            self.pinned.difference_update(keys)
            return
        tokens = private_prompt(self.tenant, self.index, self.rng.randrange(self.n_private))
        keys = [k for k in self.keys(tokens) if k in self.stored and k not in self.pinned][:4]
        if not keys:
            return
        self.calls["pin"] += 1
        if self.cs.pin(self.ns_s, keys) == len(keys):
            self.pinned.update(keys)
        else:  # some were evicted meanwhile: back to a known state
            self.counts["pin_partial"] += 1
            self.calls["unpin"] += 1
            self.cs.unpin(self.ns_s, keys)

    def op_move(self) -> None:
        # Mostly shared prompts: clients of a tenant then move the same blocks at once.
        tokens, _ = self.pick_prompt(private=0.3)
        keys = self.keys(tokens)
        tier = "nvme" if self.rng.random() < 0.8 else "host"
        self.calls[f"move_{tier}"] += 1
        n = self.cs.move(self.ns_s, keys, tier)
        if n > len(keys):
            self.bad(f"moved {n} of {len(keys)} keys")

    def op_attend(self) -> None:
        tokens, private = self.pick_prompt(private=0.6)
        keys = self.keys(tokens)
        self.calls["lookup"] += 1
        hit = self.cs.lookup(self.ns_s, tokens)
        m = hit.cached_tokens // T
        if m == 0:
            return
        prefix = keys[:m]
        self.calls["open_sequence"] += 1
        try:
            seq = self.cs.open_sequence(self.ns_s, prefix, ttl_ms=60_000)
        except FailedPrecondition:  # evicted or deleted between lookup and open
            self.expected["open_sequence: block gone since lookup"] += 1
            return
        try:
            known = contents(self.tenant, prefix)  # [m, layers, 2, kv, T, dim]
            ks = [np.concatenate(list(known[:, layer, 0]), axis=1) for layer in range(2)]
            vs = [np.concatenate(list(known[:, layer, 1]), axis=1) for layer in range(2)]
            stream = self.cs.attend_stream(as_torch=False) if self.rng.random() < 0.5 else None
            if m < len(keys) and self.rng.random() < 0.5:
                # Append the next block of the prompt in one step: it is sealed into the
                # cache under keys[m], with the bytes it would have had if put.
                blk = block_content(self.tenant, keys[m])
                steps = [(blk[:, 0], blk[:, 1], tokens[m * T : (m + 1) * T])]
                if private:
                    self.deleted.discard(keys[m])
            else:  # a few decode steps, tokens outside every prompt (never sealed)
                steps = []
                for _ in range(3):
                    kv = self.nrng.standard_normal((2, 2, LAYOUT.num_kv_heads, 1, 64),
                                                   dtype=np.float32)  # fmt: skip
                    steps.append((kv[0], kv[1], [tenant_base(self.tenant) + 90_000_000]))
            for k_new, v_new, new_tokens in steps:  # k_new: [layers, kv, n, dim]
                q = self.nrng.standard_normal((2, 1, HEADS, 64), dtype=np.float32)
                items = [AttendItem(seq, layer, q[layer], k_new[layer], v_new[layer],
                                    list(map(int, new_tokens)) if layer == 0 else ())
                         for layer in range(2)]  # fmt: skip
                self.calls["attend_step"] += 1
                outs = (
                    stream.send(items)
                    if stream is not None
                    else self.cs.attend(items, as_torch=False)
                )
                for layer in range(2):
                    ks[layer] = np.concatenate([ks[layer], k_new[layer]], axis=1)
                    vs[layer] = np.concatenate([vs[layer], v_new[layer]], axis=1)
                    ref_out, ref_lse = reference_attention(ks[layer], vs[layer], q[layer])
                    out, lse = np.asarray(outs[layer].out), np.asarray(outs[layer].lse)
                    if not (np.allclose(out, ref_out, rtol=1e-3, atol=2e-4)
                            and np.allclose(lse, ref_lse, rtol=1e-4, atol=1e-3)):  # fmt: skip
                        self.counts["wrong_attend"] += 1
                        self.bad(f"attend output off by {np.abs(out - ref_out).max():.3g}")
            if stream is not None:
                stream.close()
        finally:
            self.calls["close_sequence"] += 1
            self.cs.close_sequence(seq)

    # -- cross-tenant probes (every iteration) ---------------------------------------------

    def _raw(self, method: str, ns_id: bytes, keys: list[bytes]) -> tuple[str, str | None, str]:
        """Call `method` with a namespace id through raw requests; the answer's kind."""
        c = self.cs
        try:
            if method == "Get":
                stream = self.ci._stub.Get(pb.GetRequest(namespace_id=ns_id, keys=keys),
                                           timeout=30, metadata=self.ci._metadata)  # fmt: skip
                try:
                    chunks = list(stream)
                except grpc.RpcError as e:
                    from tierd_client.rpc import error_from_rpc

                    raise error_from_rpc(e) from e
                return ("ok", None, str(sum(chunks[0].found) if chunks else 0))
            if method == "Lookup":
                r = c._unary("Lookup", pb.LookupRequest(namespace_id=ns_id, tokens=[1] * T))
                return ("ok", None, str(r.cached_tokens))
            if method == "PrepareGet":
                r = c._unary("PrepareGet", pb.PrepareGetRequest(namespace_id=ns_id, keys=keys))
                if r.lease_id:
                    c._unary("Release", pb.ReleaseRequest(lease_id=r.lease_id))
                return ("ok", None, str(sum(s.found for s in r.slots)))
            if method == "PreparePut":
                r = c._unary("PreparePut", pb.PreparePutRequest(
                    namespace_id=ns_id, keys=[os.urandom(16)], shape=SHAPE))  # fmt: skip
                if r.lease_id:
                    c._unary("Release", pb.ReleaseRequest(lease_id=r.lease_id))
                return ("ok", None, "")
            if method == "OpenSequence":
                r = c._unary("OpenSequence", pb.OpenSequenceRequest(namespace_id=ns_id, keys=keys))
                c._unary("CloseSequence", pb.CloseSequenceRequest(sequence_id=r.sequence_id))
                return ("ok", None, "")
            if method == "Move":
                r = c._unary("Move", pb.MoveRequest(namespace_id=ns_id, keys=keys,
                                                    tier=pb.TIER_HOST))  # fmt: skip
                return ("ok", None, str(r.moved))
            r = c._unary(method, pb.KeysRequest(namespace_id=ns_id, keys=keys))  # Delete, Pin
            if method == "Pin":
                c._unary("Unpin", pb.KeysRequest(namespace_id=ns_id, keys=keys))
            return ("ok", None, str(getattr(r, "deleted", getattr(r, "changed", 0))))
        except TierdError as e:
            return (type(e).__name__, e.field, e.message)

    def probe(self) -> None:
        other = self.rng.choice(sorted(self.others))
        p = self.rng.randrange(16)
        theirs = shared_prompt(other, p)
        # Their prompt, in our namespace: as absent as any prompt never stored.
        self.calls["probe_lookup"] += 1
        if self.cs.lookup(self.ns_s, theirs).cached_tokens != 0:
            self.counts["cross_tenant_reads"] += 1
            self.bad(f"lookup of {other}'s prompt hit in {self.tenant}'s namespace")
        # Their namespace id, by a raw request: answered exactly like an unknown id.
        method = _PROBES[self.calls["probe_raw"] % len(_PROBES)]
        self.calls["probe_raw"] += 1
        their_keys = ns_block_keys(self.others[other], theirs, T)
        if method not in self._unknown_answers:
            self._unknown_answers[method] = self._raw(method, os.urandom(16), their_keys)
            if self._unknown_answers[method][0] != "InvalidArgument":
                self.bad(f"{method} with an unknown namespace: {self._unknown_answers[method]}")
        answer = self._raw(method, self.others[other], their_keys)
        if answer[0] == "ok":
            self.counts["cross_tenant_reads"] += 1
            self.bad(f"{method} on {other}'s namespace succeeded: {answer}")
        elif answer != self._unknown_answers[method]:
            self.counts["cross_tenant_distinguishable"] += 1
            self.bad(f"{method} on {other}'s namespace: {answer}, unknown id: "
                     f"{self._unknown_answers[method]}")  # fmt: skip

    # -- injected faults: abandoned leases and sequences, broken streams -------------------

    def ghost_keys(self) -> tuple[np.ndarray, list[bytes]]:
        tokens = ghost_prompt(self.tenant, self.index, self.ghosts % 1000)
        self.ghosts += 1
        return tokens, self.keys(tokens)

    def check_ghost(self, tokens: np.ndarray, keys: list[bytes]) -> None:
        self.calls["lookup"] += 1
        if self.cs.lookup(self.ns_s, tokens).cached_tokens != 0:
            self.counts["half_written_visible"] += 1
            self.bad("an uncommitted put is visible to lookup")

    def op_fault(self) -> None:
        kind = self.rng.choice(("abandon_put", "abandon_get", "truncated_put", "cancelled_put",
                                "cancelled_get", "abandon_sequence"))  # fmt: skip
        self.faults[kind] += 1
        ns = self.ns_s
        if kind == "abandon_put":
            tokens, keys = self.ghost_keys()
            prep = self.cs._unary(
                "PreparePut",
                pb.PreparePutRequest(
                    namespace_id=ns.id, keys=keys, shape=SHAPE, lease_ttl_ms=ABANDON_TTL_MS
                ),
            )
            mm = self.cs._segment_map(prep, ns).staging
            for slot in prep.slots[:1]:
                slot_view(mm, slot.offset, LAYOUT)[...] = -1.0
            self.check_ghost(tokens, keys)
        elif kind in ("truncated_put", "cancelled_put"):
            tokens, keys = self.ghost_keys()
            data = contents(self.tenant, keys).tobytes()
            header = pb.PutHeader(namespace_id=ns.id, keys=keys, shape=SHAPE)

            def chunks() -> Iterator[pb.PutChunk]:
                yield pb.PutChunk(header=header, data=data[: BB + BB // 2])
                if kind == "cancelled_put":
                    raise ConnectionAbortedError("client gives up mid-stream")

            try:
                self.ci._stub.Put(chunks(), timeout=30, metadata=self.ci._metadata)
                self.bad(f"{kind} succeeded")
            except grpc.RpcError as e:
                want = (grpc.StatusCode.INVALID_ARGUMENT if kind == "truncated_put"
                        else grpc.StatusCode.UNKNOWN)  # fmt: skip
                if e.code() not in (want, grpc.StatusCode.CANCELLED):
                    self.bad(f"{kind}: {e.code()} {e.details()}")
            self.check_ghost(tokens, keys)
        elif kind == "cancelled_get":
            tokens, _ = self.pick_prompt()
            stream = self.ci._stub.Get(pb.GetRequest(namespace_id=ns.id, keys=self.keys(tokens)),
                                       timeout=30, metadata=self.ci._metadata)  # fmt: skip
            try:
                next(stream, None)
            except grpc.RpcError as e:
                self.bad(f"cancelled_get: {e.code()} {e.details()}")
            stream.cancel()
        else:
            tokens = private_prompt(self.tenant, self.index, self.rng.randrange(self.n_private))
            keys = [k for k in self.keys(tokens) if k in self.stored][:3]
            if not keys:
                return
            try:
                if kind == "abandon_get":
                    self.cs._unary(
                        "PrepareGet",
                        pb.PrepareGetRequest(
                            namespace_id=ns.id, keys=keys, lease_ttl_ms=ABANDON_TTL_MS
                        ),
                    )
                else:
                    hit = self.cs.lookup(self.ns_s, tokens)
                    if hit.cached_tokens:
                        self.cs.open_sequence(ns, [b.key for b in hit.blocks],
                                              ttl_ms=ABANDON_TTL_MS)  # fmt: skip
            except FailedPrecondition:
                self.expected["open_sequence: block gone since lookup"] += 1

    # -- the loop -------------------------------------------------------------------------

    OPS = (("op_put", 20), ("op_get", 25), ("op_lookup", 8), ("op_delete", 5), ("op_pin", 8),
           ("op_move", 7), ("op_attend", 10), ("op_fault", 3))  # fmt: skip

    def run(self, seconds: float) -> dict[str, Any]:
        names = [n for n, _ in self.OPS]
        weights = [w for _, w in self.OPS]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for name in (self.rng.choices(names, weights)[0], "probe"):
                try:
                    getattr(self, name)()
                except ResourceExhausted:  # counted apart; the sizes are chosen to avoid it
                    self.expected[f"{name}: RESOURCE_EXHAUSTED"] += 1
                except TierdError as e:
                    self.bad(f"{name}: {type(e).__name__}: {e}")
                except Exception:  # noqa: BLE001 - every failure is counted, none hidden
                    self.bad(f"{name}: {traceback.format_exc(limit=4)}")
            self.counts["iterations"] += 1
        self.final_sweep()
        self.cs.close()
        self.ci.close()
        return {"tenant": self.tenant, "index": self.index, "calls": dict(self.calls),
                "faults": dict(self.faults), "expected": dict(self.expected),
                "unexpected": self.unexpected, "counts": dict(self.counts)}  # fmt: skip

    def final_sweep(self) -> None:
        """Read back every private key: right bytes, pinned ones all there, deleted ones
        gone; and no ghost (prepared, never committed) anywhere."""
        try:
            keys = [k for p in range(self.n_private)
                    for k in self.keys(private_prompt(self.tenant, self.index, p))]  # fmt: skip
            for i in range(0, len(keys), 8):  # 16 sweeps at once must fit the host tier
                self.calls["get_shm"] += 1
                got = self.cs.get(self.ns_s, keys[i : i + 8])
                self.check_blocks(keys[i : i + 8], got.found, got.blocks, True)
            ghosts = [k for n in range(min(self.ghosts, 1000))
                      for k in self.keys(ghost_prompt(self.tenant, self.index, n))]  # fmt: skip
            if ghosts:  # none is stored, so nothing is staged: one call
                self.calls["get_shm"] += 1
                seen = sum(self.cs.get(self.ns_s, ghosts).found)
                if seen:
                    self.counts["half_written_visible"] += seen
                    self.bad(f"{seen} keys of uncommitted puts are visible")
            if self.pinned:
                self.calls["unpin"] += 1
                self.cs.unpin(self.ns_s, sorted(self.pinned))
        except TierdError as e:
            self.bad(f"final sweep: {type(e).__name__}: {e}")


def soak_worker(args: dict[str, Any]) -> None:
    logging.getLogger("grpc").setLevel(logging.CRITICAL)  # injected stream aborts log loudly
    ns_ids = {t: bytes.fromhex(h) for t, h in args["ns_ids"].items()}
    clients = [SoakClient(args["address"], c["tenant"], c["index"], ns_ids, c["seed"])
               for c in args["clients"]]  # fmt: skip
    print("READY", flush=True)
    sys.stdin.readline()  # GO
    results: list[dict[str, Any]] = [{} for _ in clients]

    def run(i: int) -> None:
        results[i] = clients[i].run(args["seconds"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("RESULT", json.dumps(results), flush=True)


def victim(args: dict[str, Any]) -> None:
    """Holds leases and sequences all the time, until SIGKILL; appends every ghost prompt it
    prepares (and never commits) to a file first, so the test can check they stay unseen."""
    tenant = args["tenant"]
    c = TierdClient(args["address"], tenant=tenant, token=TOKENS[tenant], transport="shm",
                    lease_ttl_ms=ABANDON_TTL_MS)  # fmt: skip
    ns = c.open_namespace(MODEL, LAYOUT)
    rng = random.Random(args["seed"])
    ghosts = open(args["ghost_file"], "a")  # noqa: SIM115 - lives until the kill
    print("READY", flush=True)
    while True:
        tokens = victim_prompt(tenant, rng.randrange(64))
        keys = c.block_keys(ns, tokens)
        try:
            c.put(ns, keys, contents(tenant, keys))
        except ResourceExhausted:  # a full host tier is no failure of the victim's
            continue
        n = rng.randrange(100_000)
        ghosts.write(f"{n}\n")
        ghosts.flush()
        gkeys = c.block_keys(ns, victim_ghost(tenant, n))
        try:
            prep = c._unary(
                "PreparePut",
                pb.PreparePutRequest(
                    namespace_id=ns.id, keys=gkeys, shape=SHAPE, lease_ttl_ms=ABANDON_TTL_MS
                ),
            )
            mm = c._segment_map(prep, ns).staging
            slot_view(mm, prep.slots[0].offset, LAYOUT)[...] = 3.0
            c._unary(
                "PrepareGet",
                pb.PrepareGetRequest(namespace_id=ns.id, keys=keys, lease_ttl_ms=ABANDON_TTL_MS),
            )
            try:
                c.open_sequence(ns, keys, ttl_ms=ABANDON_TTL_MS)
            except FailedPrecondition:
                pass
        except ResourceExhausted:
            # It abandons leases faster than they expire on a fast machine: the tenant's
            # lease bound refusing it is that bound working. Back off for one lease life
            # (a rate, not a wait on anything) so it does not spin against the daemon.
            time.sleep(ABANDON_TTL_MS / 1000)


def _merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {k: Counter() for k in ("calls", "faults", "expected", "counts")}
    unexpected: list[str] = []
    for r in results:
        for k, counter in total.items():
            counter.update(r[k])
        unexpected += r["unexpected"]
    total["unexpected"] = unexpected
    return total


def test_soak_many_tenants_every_call() -> None:
    """16 clients of 3 tenants mix every call against a 16 MiB host tier (so blocks are
    demoted and promoted all the time), with faults injected, for TIERD_SOAK_SECONDS.

    Clients are 4 processes of 4 threads. In one process the GIL would serialise every
    client's Python work (content generation and checks, protobuf, the shared-memory
    copies), so at most one client would be between RPCs at any moment and the daemon
    would rarely see requests race; four processes on this 2-core machine keep the CPUs
    (and the daemon's 16 RPC threads) contended, and threads inside each keep start-up
    cheap. A fifth process, the victim, holds leases and sequences all the time and is
    killed with SIGKILL (and restarted) a few times during the run.
    """
    body = (f'[host]\ncapacity = "16MiB"\n[nvme]\ncapacity = "32MiB"\n'
            f"[leases]\ndefault_ttl_ms = 5000\n{tenants_toml()}")  # fmt: skip
    seconds = SOAK_SECONDS
    children: list[Child] = []
    victims: list[Child] = []
    t_start = time.monotonic()
    # The clients start while the daemon does (their first call waits for it): both take
    # seconds of imports on a small machine. Namespace ids are computed as the daemon does.
    layout = [LAYOUT.num_layers, LAYOUT.num_kv_heads, LAYOUT.head_dim, LAYOUT.dtype, T]
    ns_ids = {t: namespace_id(t, MODEL, layout).hex() for t in TENANTS}
    with running_daemon(body, wait=False) as daemon:
        try:
            ghost_file = daemon.base / "victim-ghosts.txt"
            ghost_file.touch()
            for p in range(SOAK_PROCESSES):
                clients = [
                    {"tenant": TENANTS[g % 3], "index": g, "seed": 1000 + g}
                    for g in range(p, SOAK_PROCESSES * SOAK_THREADS, SOAK_PROCESSES)
                ]
                children.append(Child("soak-worker", {
                    "address": daemon.address, "ns_ids": ns_ids, "clients": clients,
                    "seconds": seconds}))  # fmt: skip

            def new_victim(n: int) -> Child:
                v = Child("victim", {"address": daemon.address, "tenant": "gamma", "seed": n,
                                     "ghost_file": str(ghost_file)})  # fmt: skip
                victims.append(v)
                return v

            current = new_victim(0)
            daemon.wait_serving()
            for child in children:
                child.expect("READY", START_DEADLINE_S)
            current.expect("READY", START_DEADLINE_S)
            for child in children:
                child.send("go")
            t_go = time.monotonic()

            # Watch while they run: RSS after the warm-up, the peak, the victim's deaths.
            warm_at = t_go + min(max(5.0, seconds / 4), seconds / 2)
            kill_every = seconds / 4
            next_kill = t_go + kill_every
            rss_warm = rss_peak = 0
            kills = 0
            while any(ch.proc.poll() is None for ch in children):
                assert daemon.alive(), f"tierd died during the soak:\n{daemon.log_tail()}"
                assert time.monotonic() < t_go + seconds + 120, "soak clients did not finish"
                rss = daemon.rss_anon()
                rss_peak = max(rss_peak, rss)
                if not rss_warm and time.monotonic() >= warm_at:
                    rss_warm = rss
                if current.proc.poll() is not None:  # it must only ever die by our hand
                    raise AssertionError(f"the victim exited by itself:\n{current.err_tail()}")
                if time.monotonic() >= next_kill and time.monotonic() < t_go + seconds - 2:
                    current.kill()
                    kills += 1
                    next_kill += kill_every
                    current = new_victim(kills)
                running = next((ch for ch in children if ch.proc.poll() is None), None)
                if running is not None:
                    try:
                        running.proc.wait(0.5)  # the tick of this watch loop
                    except subprocess.TimeoutExpired:
                        pass
            current.kill()
            kills += 1
            t_end = time.monotonic()
            results: list[dict[str, Any]] = []
            for child in children:
                results += json.loads(child.expect("RESULT", 30))
                assert child.proc.wait(30) == 0, child.err_tail()
            total = _merge(results)

            # Everything abandoned (leases, sequences, the victim's) expires; then the tiers'
            # used space is exactly their blocks: no extent leaked by any race.
            def exact(s: dict[str, Any]) -> bool:
                return all(t["used_bytes"] == t["blocks"] * EXTENT.get(name, BB)
                           for name, t in s["tiers"].items())  # fmt: skip

            drained, stats, waited = poll_stats(
                daemon.address, lambda s: s["active_leases"] == 0, 15.0
            )
            # (a demotion may still be writing for a moment: its NVMe extent is taken first)
            ok, stats, more = (
                poll_stats(daemon.address, exact, 3.0) if drained else (False, stats, 0)
            )
            waited += more
            rss_end = daemon.rss_anon()

            # The victim's prepared, never committed ghosts are nowhere.
            with TierdClient(daemon.address, tenant="gamma", token=TOKENS["gamma"]) as c:
                ns = c.open_namespace(MODEL, LAYOUT)
                victim_ghosts = set(ghost_file.read_text().split())
                ghost_hits = sum(
                    c.lookup(ns, victim_ghost("gamma", int(n))).cached_tokens > 0
                    for n in victim_ghosts
                )
        finally:
            for v in victims + children:
                v.kill()

        calls, counts, faults = total["calls"], total["counts"], total["faults"]
        tiers = stats["tiers"]
        data_lost = (
            counts["wrong_bytes"]
            + counts["lost_pinned"]
            + counts["resurrected"]
            + counts["wrong_attend"]
            + counts["half_written_visible"]
            + ghost_hits
        )
        print(
            f"\nsoak: {seconds:.0f}s, 16 clients / 3 tenants, {counts['iterations']} iterations, "
            f"{sum(calls.values())} calls: {dict(sorted(calls.items()))}\n"
            f"  bytes moved: put {counts['bytes_put'] / 2**20:.1f} MiB, got "
            f"{counts['bytes_got'] / 2**20:.1f} MiB; daemon: demotions {stats['demotions']}, "
            f"promotions {stats['promotions']}, evictions host {tiers['host']['evictions']} "
            f"nvme {tiers['nvme']['evictions']}, corrupt reads {stats['corrupt_reads']}\n"
            f"  faults injected: {sum(faults.values()) + kills} ({dict(sorted(faults.items()))}, "
            f"victim SIGKILLs {kills}, victim ghosts {len(victim_ghosts)})\n"
            f"  expected outcomes: {dict(total['expected'])}; misses of evicted blocks "
            f"{counts['evicted_misses']}\n"
            f"  errors: {len(total['unexpected'])} unexpected; cross-tenant reads "
            f"{counts['cross_tenant_reads']} (distinguishable answers "
            f"{counts['cross_tenant_distinguishable']}); data lost {data_lost} (wrong bytes "
            f"{counts['wrong_bytes']}, lost pinned {counts['lost_pinned']}, resurrected "
            f"{counts['resurrected']}, wrong attend {counts['wrong_attend']}, half-written "
            f"visible {counts['half_written_visible'] + ghost_hits})\n"
            f"  daemon RssAnon: warm {rss_warm / 2**20:.1f} MiB, peak {rss_peak / 2**20:.1f} MiB, "
            f"end {rss_end / 2**20:.1f} MiB (growth {(rss_end - rss_warm) / 2**20:+.1f} MiB); "
            f"start-up {t_go - t_start:.1f}s, soak {t_end - t_go:.1f}s, settled in {waited:.1f}s"
        )  # fmt: skip
        assert not total["unexpected"], "\n".join(total["unexpected"][:30])
        assert counts["cross_tenant_reads"] == 0
        assert counts["cross_tenant_distinguishable"] == 0
        assert data_lost == 0
        assert stats["corrupt_reads"] == 0
        assert drained, f"leases still active {waited:.1f}s after the soak: {stats}"
        leaked = {name: (t["used_bytes"] - t["blocks"] * EXTENT.get(name, BB)) / BB
                  for name, t in tiers.items()}  # fmt: skip
        assert ok, f"used space is not the blocks' space: extents leaked per tier {leaked}"
        assert stats["demotions"] > 0 and stats["promotions"] > 0, stats
        assert rss_warm and rss_end - rss_warm < RSS_GROWTH_LIMIT


# -- client processes --------------------------------------------------------------------------

MODES = {"dying-client": dying_client, "soak-worker": soak_worker, "victim": victim}

if __name__ == "__main__":
    MODES[sys.argv[1]](json.loads(sys.argv[2]))
