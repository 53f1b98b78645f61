"""tierd_client against the real daemon: both transports, prefixes, pins, concurrency.

Block contents are derived from the key (a seed per key), so any block that comes back
can be checked wherever it came from: a mixed-up slot shows up as wrong bytes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from tierd_client import (
    InvalidArgument,
    KVLayout,
    Namespace,
    TierdClient,
)

TRANSPORTS = ["shm", "inband"]
LAY = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", block_tokens=16)
TIERS = {"host", "nvme", "hbm", "csd", "remote"}


def block_for(key: bytes, layout: KVLayout) -> np.ndarray:
    """The block stored under `key`: random bits (NaNs and all) seeded by the key."""
    rng = np.random.default_rng(int.from_bytes(key[:8], "little"))
    raw = np.dtype(f"u{layout.itemsize}")
    bits = rng.integers(0, np.iinfo(raw).max, layout.block_shape, dtype=raw, endpoint=True)
    return bits.view(layout.numpy_dtype)


def blocks_for(keys: list[bytes], layout: KVLayout) -> np.ndarray:
    return (
        np.stack([block_for(k, layout) for k in keys])
        if keys
        else np.zeros((0, *layout.block_shape), layout.numpy_dtype)
    )


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def tokens(n: int, seed: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 100_000, n)]


@pytest.fixture(params=TRANSPORTS)
def client(request: pytest.FixtureRequest, daemon_address: str) -> Iterator[TierdClient]:
    with TierdClient(daemon_address, transport=request.param, tenant="it") as c:
        yield c


@pytest.fixture
def ns(client: TierdClient, request: pytest.FixtureRequest) -> Namespace:
    # One namespace per test (and transport): tests never see each other's blocks.
    opened = client.open_namespace(f"model/{request.node.name}", LAY)
    assert opened.transport == client.transport
    assert opened.block_bytes == LAY.block_bytes and len(opened.id) == 16
    return opened


def test_auto_transport_uses_shared_memory_on_this_host(daemon_address: str) -> None:
    with TierdClient(daemon_address) as c:
        ns = c.open_namespace("model/auto", LAY)
        assert ns.segment is not None and ns.transport == "shm"


def test_open_namespace_asks_again_when_the_shared_memory_changed_before_the_handoff(
    daemon_address: str,
) -> None:
    """The daemon's answer names its staging area's generation; when the area was replaced
    before the client's handoff (the handoff hands over another one), the client asks
    OpenNamespace again and maps the new area, instead of failing the call."""
    with TierdClient(daemon_address, transport="shm", tenant="it") as c:
        real, answers = c._unary, []

        def first_answer_stale(name: str, request: Any) -> Any:
            resp = real(name, request)
            if name == "OpenNamespace":
                answers.append(bytes(resp.segment.instance))
                if len(answers) == 1:  # as if the area were replaced right after answering
                    resp.segment.instance = bytes(len(resp.segment.instance))
            return resp

        c._unary = first_answer_stale  # type: ignore[method-assign]
        ns = c.open_namespace("model/replaced-area", LAY)
        assert ns.transport == "shm" and len(answers) == 2
        keys = c.block_keys(ns, tokens(2 * LAY.block_tokens, seed=5))
        blocks = blocks_for(keys, LAY)
        assert c.put(ns, keys, blocks) == ["stored"] * 2
        assert same_bits(c.get(ns, keys).blocks, blocks)


def test_round_trip_byte_exact(client: TierdClient, ns: Namespace) -> None:
    keys = client.block_keys(ns, tokens(8 * LAY.block_tokens, seed=1))
    blocks = blocks_for(keys, LAY)
    assert client.put(ns, keys, blocks) == ["stored"] * 8
    assert client.put(ns, keys, blocks) == ["already_present"] * 8
    got = client.get(ns, keys)
    assert got.found == [True] * 8
    assert got.blocks.dtype == LAY.numpy_dtype and same_bits(got.blocks, blocks)


def test_round_trip_sequence_of_blocks(client: TierdClient, ns: Namespace) -> None:
    keys = client.block_keys(ns, tokens(3 * LAY.block_tokens, seed=2))
    assert client.put(ns, keys, [block_for(k, LAY) for k in keys]) == ["stored"] * 3
    assert same_bits(client.get(ns, keys).blocks, blocks_for(keys, LAY))


def test_large_payload_spans_several_chunks(client: TierdClient) -> None:
    big = KVLayout(4, 8, 128, "float16", 32)  # 512 KiB blocks; 10 of them = 5 MiB
    ns = client.open_namespace(f"model/large-{client.transport}", big)
    keys = client.block_keys(ns, tokens(10 * big.block_tokens, seed=3))
    blocks = blocks_for(keys, big)
    assert client.put(ns, keys, blocks) == ["stored"] * 10
    got = client.get(ns, keys)
    assert got.found == [True] * 10 and same_bits(got.blocks, blocks)


def test_get_into_out_leaves_missing_rows_alone(client: TierdClient, ns: Namespace) -> None:
    keys = client.block_keys(ns, tokens(4 * LAY.block_tokens, seed=4))
    client.put(ns, keys[::2], blocks_for(keys[::2], LAY))
    out = np.full((4, *LAY.block_shape), 3.0, dtype=np.float16)
    got = client.get(ns, keys, out=out)
    assert got.blocks is out
    assert got.found == [True, False, True, False]
    assert same_bits(out[0], block_for(keys[0], LAY)) and same_bits(out[2], block_for(keys[2], LAY))
    assert (out[[1, 3]] == 3.0).all()


def test_get_missing_reports_not_found(client: TierdClient, ns: Namespace) -> None:
    keys = client.block_keys(ns, tokens(3 * LAY.block_tokens, seed=5))
    got = client.get(ns, keys)
    assert got.found == [False, False, False]
    assert not got.blocks.view(np.uint16).any()


def test_lookup_returns_longest_cached_prefix(client: TierdClient, ns: Namespace) -> None:
    bt = LAY.block_tokens
    toks = tokens(5 * bt + 7, seed=6)  # five full blocks and a partial tail
    keys = client.block_keys(ns, toks)
    assert len(keys) == 5

    empty = client.lookup(ns, toks)
    assert empty.cached_tokens == 0 and empty.blocks == []

    held = [0, 1, 2, 4]  # block 3 missing: the prefix stops at 3 blocks
    client.put(ns, [keys[i] for i in held], blocks_for([keys[i] for i in held], LAY))
    res = client.lookup(ns, toks)
    assert res.cached_tokens == 3 * bt
    assert [b.key for b in res.blocks] == keys[:3]
    assert all(b.tier in TIERS for b in res.blocks)

    client.put(ns, [keys[3]], blocks_for([keys[3]], LAY))
    full = client.lookup(ns, toks)
    assert full.cached_tokens == 5 * bt  # the partial tail is never cached
    assert [b.key for b in full.blocks] == keys

    assert client.lookup(ns, toks[: 2 * bt + 3]).cached_tokens == 2 * bt
    other = tokens(3 * bt, seed=600)
    assert client.lookup(ns, other).cached_tokens == 0


def test_namespaces_are_separate(client: TierdClient, ns: Namespace) -> None:
    other = client.open_namespace("model/other-" + client.transport, LAY)
    assert other.id != ns.id
    toks = tokens(2 * LAY.block_tokens, seed=7)
    keys = client.block_keys(ns, toks)
    client.put(ns, keys, blocks_for(keys, LAY))
    assert client.lookup(other, toks).cached_tokens == 0
    assert client.get(other, keys).found == [False, False]


def test_delete(client: TierdClient, ns: Namespace) -> None:
    toks = tokens(3 * LAY.block_tokens, seed=8)
    keys = client.block_keys(ns, toks)
    client.put(ns, keys, blocks_for(keys, LAY))
    never = client.block_keys(ns, tokens(LAY.block_tokens, seed=800))
    assert client.delete(ns, [keys[0], keys[1], *never]) == 2
    assert client.delete(ns, [keys[0], keys[1]]) == 0
    got = client.get(ns, keys)
    assert got.found == [False, False, True]
    assert same_bits(got.blocks[2], block_for(keys[2], LAY))
    assert client.lookup(ns, toks).cached_tokens == 0  # the prefix now breaks at block 0


def test_pin_unpin_counts(client: TierdClient, ns: Namespace) -> None:
    keys = client.block_keys(ns, tokens(3 * LAY.block_tokens, seed=9))
    client.put(ns, keys, blocks_for(keys, LAY))
    missing = client.block_keys(ns, tokens(LAY.block_tokens, seed=900))
    assert client.pin(ns, [*keys, *missing]) == 3  # missing keys change nothing
    # PinResponse.changed counts state changes, so pinning twice changes nothing.
    assert client.pin(ns, keys) == 0
    assert client.get(ns, keys).found == [True] * 3  # pinned blocks are still readable
    assert client.unpin(ns, keys[:2]) == 2
    assert client.unpin(ns, keys) == 1
    assert client.unpin(ns, keys) == 0


def test_bf16_torch_round_trip(client: TierdClient) -> None:
    torch = pytest.importorskip("torch")
    lay = dataclasses.replace(LAY, dtype="bfloat16")
    ns = client.open_namespace(f"model/bf16-{client.transport}", lay)
    keys = client.block_keys(ns, tokens(4 * lay.block_tokens, seed=10))
    t = torch.randn(4, *lay.block_shape).to(torch.bfloat16)
    t[0, 0, 0, 0, 0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    assert client.put(ns, keys, t) == ["stored"] * 4

    got = client.get(ns, keys, as_torch=True)
    assert got.blocks.dtype == torch.bfloat16
    assert torch.equal(got.blocks.view(torch.int16), t.view(torch.int16))

    out = torch.zeros_like(t)
    assert client.get(ns, keys, out=out).blocks is out
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))

    raw = client.get(ns, keys).blocks  # numpy: raw bf16 bits as uint16
    assert raw.dtype == np.uint16 and raw.tobytes() == t.view(torch.int16).numpy().tobytes()


def test_daemon_checks_the_claimed_shape(client: TierdClient, ns: Namespace) -> None:
    # A Namespace whose layout disagrees with the daemon's passes the client's own check;
    # the BlockShape it sends must then be refused by the daemon.
    wrong = dataclasses.replace(ns, layout=dataclasses.replace(LAY, head_dim=32))
    keys = client.block_keys(ns, tokens(2 * LAY.block_tokens, seed=11))
    with pytest.raises(InvalidArgument) as e:
        client.put(wrong, keys, blocks_for(keys, wrong.layout))
    assert e.value.field
    assert client.get(ns, keys).found == [False, False]  # nothing half-written is visible


def test_stats(client: TierdClient, ns: Namespace) -> None:
    keys = client.block_keys(ns, tokens(2 * LAY.block_tokens, seed=12))
    client.put(ns, keys, blocks_for(keys, LAY))
    st = client.stats()
    assert {"host", "nvme"} <= set(st["tiers"])
    host = st["tiers"]["host"]
    assert 0 < host["capacity_bytes"] <= 256 << 20
    assert host["blocks"] >= 2 and host["used_bytes"] >= 2 * LAY.block_bytes
    assert st["namespaces"] >= 1 and isinstance(st["lookups"], int)


def test_concurrent_clients(daemon_address: str) -> None:
    n_clients, rounds, own_blocks, shared_blocks = 8, 4, 12, 12
    bt = LAY.block_tokens
    shared_tokens = tokens(shared_blocks * bt, seed=1000)
    start = threading.Barrier(n_clients)
    failures: list[BaseException] = []
    put_results: dict[bytes, Counter[str]] = {}
    all_keys: dict[int, list[bytes]] = {}
    lock = threading.Lock()

    def worker(i: int) -> None:
        transport = TRANSPORTS[i % 2]
        try:
            with TierdClient(daemon_address, transport=transport, tenant="it") as c:
                ns = c.open_namespace("model/concurrent", LAY)
                own = c.block_keys(ns, tokens(own_blocks * bt, seed=2000 + i))
                shared = c.block_keys(ns, shared_tokens)
                with lock:
                    all_keys[i] = own
                start.wait(timeout=60)
                for r in range(rounds):
                    # Interleave own and shared keys so slots of both land side by side.
                    batch = [k for pair in zip(own, shared, strict=True) for k in pair]
                    batch = batch[r % 3 :] + batch[: r % 3]
                    outcomes = c.put(ns, batch, blocks_for(batch, LAY))
                    with lock:
                        for k, o in zip(batch, outcomes, strict=True):
                            put_results.setdefault(k, Counter())[o] += 1
                    with lock:
                        others = [k for j, ks in all_keys.items() if j != i for k in ks[:3]]
                    want = [*own, *shared, *others]
                    got = c.get(ns, want)
                    assert all(got.found[: len(own) + len(shared)]), f"client {i} lost a block"
                    for k, f, row in zip(want, got.found, got.blocks, strict=True):
                        if f:
                            assert same_bits(row, block_for(k, LAY)), f"client {i}: mixed block"
        except BaseException as e:  # noqa: BLE001 - a thread's failure must fail the test
            with lock:
                failures.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    if failures:
        raise failures[0]
    for outcomes in put_results.values():
        assert set(outcomes) <= {"stored", "already_present"}
        assert outcomes["stored"] >= 1, "a key was never reported stored"


def test_client_started_before_the_daemon(spawn_daemon: Callable[..., Any]) -> None:
    daemon = spawn_daemon(start=False)  # nothing listens at its address yet
    with TierdClient(daemon.address, timeout=30.0) as c:
        late = threading.Timer(1.0, daemon.start, kwargs={"wait": False})
        late.start()
        try:
            t0 = time.monotonic()
            stats = c.stats()  # the first call waits for the daemon instead of failing
            assert "tiers" in stats and time.monotonic() - t0 >= 0.5
        finally:
            late.join()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_calls_survive_a_daemon_restart(spawn_daemon: Callable[..., Any], transport: str) -> None:
    daemon = spawn_daemon()
    with TierdClient(daemon.address, transport=transport, max_retries=8) as c:
        ns = c.open_namespace("model/restart", LAY)
        keys = c.block_keys(ns, tokens(3 * LAY.block_tokens, seed=13))
        c.put(ns, keys, blocks_for(keys, LAY))
        daemon.restart()
        got = c.get(ns, keys)  # UNAVAILABLE while the channel redials is retried
        for k, f, row in zip(keys, got.found, got.blocks, strict=True):
            assert not f or same_bits(row, block_for(k, LAY))
        more = c.block_keys(ns, tokens(2 * LAY.block_tokens, seed=14))
        assert c.put(ns, more, blocks_for(more, LAY)) == ["stored", "stored"]
        assert same_bits(c.get(ns, more).blocks, blocks_for(more, LAY))
