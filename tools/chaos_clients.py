"""The clients and the checker of the chaos run (tools/chaos.py).

Primitives:
  `block_content(seed, key)`   the bytes of a block, derived from (seed, key)
  `Ledger(seed)`               what clients were told (committed, acknowledged durable, hit by
                               a flip) and the verdicts (calls, errors, checked, wrong)
  `Client(idx, address, ...)`  a thread: seeded put / get / attend / move, every answer checked
  `attend_error(out, q, blocks, layer)`  why an attend answer is wrong, by the float64 oracle
  `error_code(exc)`            the name an error is counted under

A put's keys are committed only once it returned success; a failed put's keys may still
be served later, and are checked like the others, since their bytes are known too.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

from tierd_client import AttendItem, KVLayout, Namespace, TierdClient, TierdError, Unavailable
from tierd_kernels.reference import attention_reference, gather_layer_kv

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float32", block_tokens=16)
HEADS = 2 * LAYOUT.num_kv_heads  # GQA, 2 query heads per KV head
MODEL = "chaos@1"
KINDS = ("daemon_kill", "worker_kill", "nvme_flip", "csd_flip", "disk_full")
OPS = ("put", "get", "attend", "move")
RTOL = 1e-4
CALL_TIMEOUT_S = 15.0
EXAMPLES = 20


def block_content(seed: int, key: bytes) -> np.ndarray:
    h = hashlib.blake2b(seed.to_bytes(8, "little", signed=True) + key, digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(h, "little"))
    return rng.standard_normal(LAYOUT.block_shape, dtype=np.float32)


def error_code(exc: BaseException) -> str:
    if type(exc) is TierdError:  # a status the client has no class for: its code name
        return str(exc).split(":", 1)[0]
    if isinstance(exc, TierdError):
        return type(exc).__name__
    return f"client:{type(exc).__name__}"


class Ledger:
    """What clients were told, and the checker's verdicts; shared by all client threads."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.t0 = time.monotonic()  # the run's start, for the times of wrong answers
        self.lock = threading.Lock()
        self.committed: list[bytes] = []
        self.committed_set: set[bytes] = set()
        self.attempted: list[bytes] = []  # failed puts: maybe visible, never required
        self.durable: dict[bytes, str] = {}  # key -> tier whose move acknowledged it
        self.flipped: set[bytes] = set()
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}  # code -> the first message seen
        self.checked: Counter[str] = Counter()
        self.wrong = 0
        self.wrong_examples: list[str] = []
        # What each key went through, with times from the start: traces a lost block.
        self.history: dict[bytes, list[str]] = {}

    def note(self, keys: list[bytes], what: str) -> None:
        at = f"{time.monotonic() - self.t0:.2f}s {what}"
        with self.lock:
            for k in keys:
                self.history.setdefault(k, []).append(at)

    def content(self, key: bytes) -> np.ndarray:
        return block_content(self.seed, key)

    def commit(self, keys: list[bytes]) -> None:
        with self.lock:
            for k in keys:
                if k not in self.committed_set:
                    self.committed_set.add(k)
                    self.committed.append(k)

    def attempt(self, keys: list[bytes]) -> None:
        with self.lock:
            self.attempted += [k for k in keys if k not in self.committed_set]

    def make_durable(self, keys: list[bytes], tier: str) -> None:
        with self.lock:
            for k in keys:
                self.durable[k] = tier

    def mark_flipped(self, keys: set[bytes]) -> None:
        with self.lock:
            self.flipped |= keys

    def sample(self, rng: random.Random, n: int, *, known: bool = False,
               not_durable: bool = False) -> list[bytes]:  # fmt: skip
        with self.lock:
            pool = self.committed + self.attempted if known else self.committed
            if not_durable:
                pool = [k for k in pool if k not in self.durable] or pool
            return rng.sample(pool, min(n, len(pool)))

    def count(self, what: Counter[str], name: str, n: int = 1) -> None:
        with self.lock:
            what[name] += n

    def error(self, op: str, exc: BaseException, prefix: str = "") -> None:
        code = prefix + error_code(exc)
        with self.lock:
            self.errors[code] += 1
            self.error_examples.setdefault(code, f"{op}: {exc}"[:300])

    def wrong_answer(self, what: str) -> None:
        with self.lock:
            self.wrong += 1
            if len(self.wrong_examples) < EXAMPLES:
                self.wrong_examples.append(f"{time.monotonic() - self.t0:.1f}s {what}")


def attend_error(out: Any, q: torch.Tensor, blocks: list[np.ndarray], layer: int) -> str | None:
    """Why an attend answer is wrong against the float64 oracle; None when it is right."""
    kv = gather_layer_kv([torch.from_numpy(b) for b in blocks], layer)
    ref = attention_reference(q, kv.k, kv.v)
    got_out, got_lse = torch.as_tensor(out.out), torch.as_tensor(out.lse)
    if got_out.shape != ref.out.shape or got_lse.shape != ref.lse.shape:
        return f"shape out {list(got_out.shape)} lse {list(got_lse.shape)}"
    d_out = (got_out.double() - ref.out.double()).abs().max().item()
    d_lse = (got_lse.double() - ref.lse.double()).abs().max().item()
    rel_out = d_out / max(ref.out.abs().max().item(), 1e-6)
    rel_lse = d_lse / max(ref.lse.abs().max().item(), 1.0)
    if not (rel_out <= RTOL and rel_lse <= RTOL):  # NaN fails too
        return f"relative error out {rel_out:.3g} lse {rel_lse:.3g}"
    return None


class Client(threading.Thread):
    """One client: a loop of put, get, attend and move with seeded choices."""

    def __init__(self, idx: int, address: str, ledger: Ledger, stop: threading.Event,
                 *, transport: str, max_blocks: int) -> None:  # fmt: skip
        super().__init__(name=f"chaos-client-{idx}", daemon=True)
        self.idx, self.address, self.ledger, self.stop = idx, address, ledger, stop
        self.transport, self.max_blocks = transport, max_blocks
        self.rng = random.Random(f"chaos/{ledger.seed}/client/{idx}")
        self.np_rng = np.random.default_rng(self.rng.getrandbits(64))
        self.made = 0

    def run(self) -> None:
        with TierdClient(self.address, transport=self.transport, timeout=CALL_TIMEOUT_S,
                         max_retries=2) as c:  # fmt: skip
            ns: Namespace | None = None
            # First some blocks on every tier, so the faults have something to hit.
            opening = ["put", "move:nvme", "move:csd"]
            while not self.stop.is_set():
                op = opening.pop(0) if opening else self.rng.choices(OPS, weights=(4, 3, 3, 1))[0]
                try:
                    if ns is None:
                        ns = c.open_namespace(MODEL, LAYOUT)
                    if op.startswith("move:"):
                        self.move(c, ns, op[5:])
                    else:
                        getattr(self, op)(c, ns)
                except Exception as e:  # noqa: BLE001 - every failure is a counted answer
                    self.ledger.error(op, e)
                    if isinstance(e, Unavailable):
                        self.stop.wait(0.1)  # the daemon is restarting: do not spin

    def _new_keys(self, n: int) -> list[bytes]:
        keys = []
        for _ in range(n):
            self.made += 1
            name = f"chaos/{self.ledger.seed}/{self.idx}/{self.made}".encode()
            keys.append(hashlib.blake2b(name, digest_size=16).digest())
        return keys

    def put(self, c: TierdClient, ns: Namespace) -> None:
        n = self.rng.randint(1, 4)
        full = len(self.ledger.committed) >= self.max_blocks
        keys = self.ledger.sample(self.rng, n) if full else self._new_keys(n)
        if not keys:
            return
        self.ledger.count(self.ledger.calls, "put")
        try:
            c.put(ns, keys, np.stack([self.ledger.content(k) for k in keys]))
        except BaseException as e:
            self.ledger.attempt(keys)
            self.ledger.note(keys, f"put failed ({error_code(e)}) by client {self.idx}")
            raise
        self.ledger.commit(keys)
        self.ledger.note(keys, f"put by client {self.idx}")

    def get(self, c: TierdClient, ns: Namespace) -> None:
        # Now and then a key whose put failed: if it is served, its bytes must be right too.
        known = self.rng.random() < 0.25
        keys = self.ledger.sample(self.rng, self.rng.randint(1, 6), known=known)
        if not keys:
            return
        self.ledger.count(self.ledger.calls, "get")
        got = c.get(ns, keys)
        for key, found, row in zip(keys, got.found, got.blocks, strict=True):
            if not found:
                # A miss of a block whose put failed is no news; of a committed one it is.
                committed = key in self.ledger.committed_set
                self.ledger.count(self.ledger.errors, "miss" if committed else "miss_uncommitted")
                continue
            self.ledger.count(self.ledger.checked, "get_blocks")
            if np.asarray(row).tobytes() != self.ledger.content(key).tobytes():
                self.ledger.wrong_answer(f"get {key.hex()}: bytes differ from the committed ones")

    def attend(self, c: TierdClient, ns: Namespace) -> None:
        keys = self.ledger.sample(self.rng, self.rng.randint(1, 4))
        if not keys:
            return
        layer = self.rng.randrange(LAYOUT.num_layers)
        q = torch.from_numpy(
            self.np_rng.standard_normal((1, HEADS, LAYOUT.head_dim), dtype=np.float32)
        )
        self.ledger.count(self.ledger.calls, "attend")
        seq = c.open_sequence(ns, keys, ttl_ms=30_000)
        try:
            out = c.attend([AttendItem(seq, layer, q)])[0]
        finally:
            try:
                c.close_sequence(seq)
            except TierdError:
                pass  # the daemon restarted, or the sequence expired: nothing is held
        self.ledger.count(self.ledger.checked, "attends")
        why = attend_error(out, q, [self.ledger.content(k) for k in keys], layer)
        if why is not None:
            names = ",".join(k.hex()[:12] for k in keys)
            self.ledger.wrong_answer(
                f"attend layer {layer} over [{names}]: {why}; {self._diagnose(c, ns, keys)}"
            )

    def _diagnose(self, c: TierdClient, ns: Namespace, keys: list[bytes]) -> str:
        """Where the blocks of a wrong answer are, and whether get serves their bytes right
        (tells a bad stored copy from a bad attend path). Not counted as calls."""
        try:
            tiers = c.locate(ns, keys)
            got = c.get(ns, keys)
        except Exception as e:  # noqa: BLE001 - a diagnosis must not hide the verdict
            return f"diagnosis failed: {error_code(e)}"
        verdicts = [
            "missing" if not found
            else "bytes ok" if np.asarray(row).tobytes() == self.ledger.content(k).tobytes()
            else "BYTES DIFFER"
            for k, found, row in zip(keys, got.found, got.blocks, strict=True)
        ]  # fmt: skip
        return "then " + ", ".join(f"{t}: {v}" for t, v in zip(tiers, verdicts, strict=True))

    def move(self, c: TierdClient, ns: Namespace, tier: str | None = None) -> None:
        if tier is None:
            r = self.rng.random()
            tier = "nvme" if r < 0.6 else "csd" if r < 0.9 else "host"
        keys = self.ledger.sample(self.rng, self.rng.randint(1, 4), not_durable=True)
        if not keys:
            return
        self.ledger.count(self.ledger.calls, "move")
        self.ledger.note(keys, f"move to {tier} sent by client {self.idx}")
        moved = c.move(ns, keys, tier)
        if tier == "host":
            self.ledger.note(keys, f"move to host answered {moved}/{len(keys)}")
            return
        if moved == len(keys):
            self.ledger.make_durable(keys, tier)
            self.ledger.note(keys, f"move to {tier} acknowledged")
            return
        for key in keys:  # the count does not say which: ask one by one
            self.ledger.count(self.ledger.calls, "move")
            if c.move(ns, [key], tier) == 1:
                self.ledger.make_durable([key], tier)
                self.ledger.note([key], f"move to {tier} acknowledged (alone)")
