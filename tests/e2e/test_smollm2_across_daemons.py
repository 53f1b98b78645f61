"""End to end across two daemons: daemon B decodes SmolLM2 from the KV that a client of
daemon A prefilled, once pulled peer to peer (B has A as its peer) and once found in a
shared Redis cluster (a redis tier on both, no peers). B's greedy tokens must equal
transformers' own, B must reuse the whole prefix (none of it recomputed), and the prefix's
blocks on B must be byte-exact with A's.

A short prompt and 16 new tokens keep it to a few seconds past the model's load. Needs
the model's requirements (tests/e2e/conftest.py), the transfer engine (mooncake extra),
and for the shared tier redis-server and redis-py; skips without them. The network
namespace case needs `ip netns` (CAP_NET_ADMIN) and skips without it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import Daemon, Loaded, chat_ids, reference
from tests.integration.test_peers_netns import namespaces  # noqa: F401  (a fixture)
from tests.mooncake_master import needs_mooncake
from tests.ports import free_port
from tests.redis_cluster import HAVE_REDIS, Cluster, started
from tierd_client import TierdClient

pytestmark = [pytest.mark.e2e, needs_mooncake]

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1@float32"
BLOCK_TOKENS = 16
NEW_TOKENS = 16
PROMPT = "Write a short poem about the sea."
TOKEN = "e2e-peer-secret-0123456789"


@pytest.fixture(scope="module")
def case(smollm2: Loaded) -> tuple[list[int], list[int]]:
    """The prompt's ids and transformers' greedy tokens for it."""
    ids = chat_ids(smollm2.tokenizer, PROMPT)
    assert len(ids) > 2 * BLOCK_TOKENS  # at least two full blocks to carry across
    return ids, reference(smollm2, ids, NEW_TOKENS)


@pytest.fixture
def config_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tierd-e2e-cfg-"))
    yield path
    for f in path.iterdir():
        f.unlink()
    path.rmdir()


def _config(config_dir: Path, name: str, body: str) -> str:
    path = config_dir / f"{name}.toml"
    path.write_text(body)
    return str(path)


def _peers(config_dir: Path, **keys: Any) -> str:
    token = config_dir / "peer.token"
    token.write_text(TOKEN + "\n")
    lines = [f'token_file = "{token}"'] + [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "[peers]\n" + "\n".join(lines) + "\n"


def _carry(loaded: Loaded, a: Daemon, b: Daemon, ids: list[int], want: list[int], tag: str,
           settle: Callable[[TierdClient, int], None] | None = None) -> TierdClient:  # fmt: skip
    """A's client prefills the prompt (then `settle(A's client, blocks)`); B decodes it
    from there. Returns B's client (open)."""
    from tierd_client.hf import TierdNamespaceParams, generate_with_tierd, kv_layout

    params = TierdNamespaceParams(MODEL_ID, block_tokens=BLOCK_TOKENS, extra_keys=(tag,))
    reused = (len(ids) - 1) // BLOCK_TOKENS * BLOCK_TOKENS  # all the prompt's full blocks
    layout = kv_layout(loaded.model.config, params)
    with a.client() as ca:
        first = generate_with_tierd(loaded.model, ids, ca, params, 1)  # prefills, caches
        assert first.reused_tokens == 0 and first.new_tokens == want[:1]
        ns_a = ca.open_namespace(params.model, layout, extra_keys=params.extra_keys)
        keys = ca.block_keys(ns_a, ids)[: reused // BLOCK_TOKENS]
        on_a = ca.get(ns_a, keys)
        assert on_a.all_found
        if settle is not None:
            settle(ca, len(keys))
    cb = b.client()
    got = generate_with_tierd(loaded.model, ids, cb, params, NEW_TOKENS)
    assert got.reused_tokens == reused, "B recomputed part of the prefix A's client prefilled"
    assert got.new_tokens == want, (
        f"B diverged from transformers\nwant {loaded.tokenizer.decode(want)!r}\n"
        f"got  {loaded.tokenizer.decode(got.new_tokens)!r}"
    )
    ns_b = cb.open_namespace(params.model, layout, extra_keys=params.extra_keys)
    on_b = cb.get(ns_b, keys)
    assert on_b.all_found
    assert on_b.blocks.tobytes() == on_a.blocks.tobytes()
    return cb


def _pulled(loaded: Loaded, case: tuple[list[int], list[int]], config_dir: Path, tag: str,
            where: str, engines: tuple[str, str] = ("", ""),
            netns: tuple[str, str] = ("", "")) -> None:  # fmt: skip
    """A listens for peers at `where`, B has A as its peer; B decodes from A's prefill,
    pulled. `engines`, `netns`: A's and B's transfer-engine hostnames and namespaces."""
    ids, want = case
    sides = []
    for keys, engine in (({"listen": where}, engines[0]), ({"peers": [where]}, engines[1])):
        sides.append(keys | ({"engine_hostname": engine} if engine else {}))
    a = Daemon("--config", _config(config_dir, "a", _peers(config_dir, **sides[0])),
               netns=netns[0])  # fmt: skip
    try:
        b = Daemon("--config", _config(config_dir, "b", _peers(config_dir, **sides[1])),
                   netns=netns[1])  # fmt: skip
        try:
            with _carry(loaded, a, b, ids, want, tag) as cb:
                peer = cb.stats()["peers"][where]
                assert peer["blocks"] >= (len(ids) - 1) // BLOCK_TOKENS and peer["errors"] == 0
        finally:
            b.stop()
    finally:
        a.stop()


def test_b_decodes_from_a_prefill_pulled_peer_to_peer(
    smollm2: Loaded, case: tuple[list[int], list[int]], config_dir: Path
) -> None:
    _pulled(smollm2, case, config_dir, "p2p", f"127.0.0.1:{free_port()}")


def test_b_in_another_network_namespace_decodes_from_a_prefill_pulled_over_the_link(
    smollm2: Loaded, case: tuple[list[int], list[int]], config_dir: Path,
    namespaces: dict[str, str],  # noqa: F811  (the imported fixture)
) -> None:
    """As above, with A and B in two network namespaces joined by a veth pair: the Peer
    call and the transfer engine's reads cross the link, as between two hosts."""
    (ns_a, addr_a), (ns_b, addr_b) = namespaces.items()
    _pulled(smollm2, case, config_dir, "p2p-netns", f"{addr_a}:{free_port()}",
            engines=(addr_a, addr_b), netns=(ns_a, ns_b))  # fmt: skip


def _written_through(client: TierdClient, blocks: int, deadline_s: float = 30.0) -> None:
    """Wait until A's write-through copies of the prefix are in the cluster."""
    deadline = time.monotonic() + deadline_s
    while client.stats()["tiers"]["remote"]["blocks"] < blocks:
        assert time.monotonic() < deadline, f"write-through of {blocks} blocks in {deadline_s}s"
        time.sleep(0.05)


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started(Cluster, tmp_path_factory.mktemp("cluster"))


@pytest.mark.redis
@pytest.mark.skipif(not HAVE_REDIS, reason="needs redis-server, redis-cli and redis-py")
def test_b_decodes_from_a_prefill_through_the_shared_redis_tier(
    smollm2: Loaded, case: tuple[list[int], list[int]], config_dir: Path, cluster: Cluster
) -> None:
    ids, want = case
    nodes = ", ".join(f'"{n}"' for n in cluster.nodes)
    body = ('[[tiers]]\nname = "host"\nkind = "host"\ncapacity = "512MiB"\n\n'
            f'[[tiers]]\nname = "remote"\nkind = "redis"\ncapacity = "256MiB"\n'
            f'nodes = [{nodes}]\nwrite = "through"\n')  # fmt: skip
    a = Daemon("--config", _config(config_dir, "a", body), sizes=False)
    try:
        b = Daemon("--config", _config(config_dir, "b", body), sizes=False)
        try:
            # B has no peers and started empty: the prefix it reuses came from the cluster.
            with _carry(smollm2, a, b, ids, want, "redis", settle=_written_through) as cb:
                assert cb.stats()["peers"] == {}
        finally:
            b.stop()
    finally:
        a.stop()
