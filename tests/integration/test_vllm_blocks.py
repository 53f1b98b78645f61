"""The vLLM connector's daemon side against a real daemon: blocks copied straight between
leased shared-memory slots and (vLLM-shaped) tensors, and a link that fails soft."""

from __future__ import annotations

import time

import pytest
import torch

from tierd_client import KVLayout, TierdClient
from tierd_client.vllm_store import ConnectorSettings, TierdLink, read_blocks, write_blocks

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float32", block_tokens=4)


@pytest.mark.parametrize("transport", ["shm", "inband"])
def test_blocks_round_trip_through_leased_slots(daemon_address: str, transport: str) -> None:
    with TierdClient(daemon_address, transport=transport) as client:
        ns = client.open_namespace(f"vllm-blocks-{transport}", LAYOUT)
        assert ns.transport == transport
        tokens = list(range(100, 112))
        keys = client.block_keys(ns, tokens)
        blocks = torch.randn(len(keys), *LAYOUT.block_shape)

        def fill(i: int, slot: torch.Tensor) -> None:
            slot.copy_(blocks[i])

        put = write_blocks(client, ns, keys[:2], fill)
        assert client.lookup(ns, tokens).cached_tokens == 0  # nothing visible before commit
        assert put.commit() == 2
        # Shared memory leases only the block the daemon lacks; in-band sends all three.
        filled: list[int] = []
        put = write_blocks(client, ns, keys, lambda i, slot: (filled.append(i), fill(i, slot)))
        assert put.commit() == 1
        assert filled == ([2] if transport == "shm" else [0, 1, 2])

        seen: dict[int, torch.Tensor] = {}
        missing = b"\x01" * 16
        found = read_blocks(client, ns, [keys[1], missing, keys[0], keys[2]],
                            lambda i, b: seen.__setitem__(i, b.clone()))  # fmt: skip
        assert found == [True, False, True, True]
        assert sorted(seen) == [0, 2, 3]
        assert torch.equal(seen[0], blocks[1]) and torch.equal(seen[2], blocks[0])
        assert torch.equal(seen[3], blocks[2])


def test_aborted_put_leaves_nothing(daemon_address: str) -> None:
    with TierdClient(daemon_address) as client:
        ns = client.open_namespace("vllm-blocks-abort", LAYOUT)
        keys = client.block_keys(ns, list(range(8)))
        put = write_blocks(client, ns, keys, lambda i, slot: slot.fill_(1.0))
        put.abort()
        assert client.lookup(ns, list(range(8))).cached_tokens == 0


def test_link_to_a_missing_daemon_fails_soft() -> None:
    settings = ConnectorSettings.from_extra(
        {"address": "unix:/nonexistent/tierd.sock", "timeout_s": 0.5, "retry_after_s": 60}
    )
    link = TierdLink(settings, LAYOUT, "m")
    try:
        t = time.monotonic()
        assert link.lookup_tiers(None, list(range(16))) == []
        assert not link.up and link.failures == 1
        # While marked down nothing is tried: answers are immediate and nothing is saved.
        assert link.lookup_tiers(None, list(range(16))) == []
        assert link.save(None, [b"\0" * 16], lambda i, s: None) is None
        assert link.failures == 1
        assert time.monotonic() - t < 5.0
        with pytest.raises(Exception, match="down"):
            link.load(None, [b"\0" * 16], lambda i, b: None)
    finally:
        link.close()


def test_link_lookup_reports_tiers(daemon_address: str) -> None:
    settings = ConnectorSettings.from_extra({"address": daemon_address})
    link = TierdLink(settings, LAYOUT, "link-model")
    try:
        tokens = list(range(40, 53))  # three full blocks and one token
        keys = link.keys("salt-a", tokens)
        assert len(keys) == 3
        put = link.save("salt-a", keys[:2], lambda i, slot: slot.fill_(float(i)))
        assert put is not None and link.commit(put) == 2
        assert link.lookup_tiers("salt-a", tokens) == ["host", "host"]
        assert link.lookup_tiers("salt-b", tokens) == []  # another salt, another namespace
        assert link.lookup_tiers(None, tokens) == []
    finally:
        link.close()


def test_link_tenants_never_share_blocks(daemon_address: str) -> None:
    # Open mode: a tenant is a name; the connector's `tenant` setting picks it.
    mine = TierdLink(ConnectorSettings.from_extra({"address": daemon_address}), LAYOUT, "tm")
    other = TierdLink(ConnectorSettings.from_extra({"address": daemon_address, "tenant": "it"}),
                      LAYOUT, "tm")  # fmt: skip
    try:
        tokens = list(range(60, 68))
        put = mine.save(None, mine.keys(None, tokens), lambda i, slot: slot.fill_(1.0))
        assert put is not None and mine.commit(put) == 2
        assert mine.lookup_tiers(None, tokens) == ["host", "host"]
        assert other.lookup_tiers(None, tokens) == []  # same model, salt and tokens
    finally:
        mine.close()
        other.close()


def test_link_one_failed_call_leaves_the_daemon_in_use(daemon_address: str) -> None:
    link = TierdLink(ConnectorSettings.from_extra({"address": daemon_address}), LAYOUT, "one")
    try:
        assert link.save(None, [b"short key"], lambda i, slot: None) is None  # InvalidArgument
        assert link.failures == 1 and link.up  # one call failed; the daemon is still used
        tokens = list(range(8))
        put = link.save(None, link.keys(None, tokens), lambda i, slot: slot.fill_(2.0))
        assert put is not None and link.commit(put) == 2
        assert link.lookup_tiers(None, tokens) == ["host", "host"]
    finally:
        link.close()
