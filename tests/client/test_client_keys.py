"""Block keys: the hash chain the client and the daemon must agree on."""

from __future__ import annotations

import numpy as np
import pytest

from tierd_client import KEY_BYTES, KVLayout, Namespace, TierdClient, block_keys
from tierd_client.keys import namespace_id

NS_A = namespace_id("tenant-a", "llama-3-8b@rev1", (32, 8, 128, "bfloat16", 16))
NS_B = namespace_id("tenant-b", "llama-3-8b@rev1", (32, 8, 128, "bfloat16", 16))
BT = 16


def _tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 128_000, n)]


def test_deterministic_and_sized() -> None:
    toks = _tokens(5 * BT)
    a, b = block_keys(NS_A, toks, BT), block_keys(NS_A, list(toks), BT)
    assert a == b and len(a) == 5
    assert all(isinstance(k, bytes) and len(k) == KEY_BYTES for k in a)
    assert len(set(a)) == 5


def test_numpy_and_list_tokens_agree() -> None:
    toks = _tokens(3 * BT)
    assert block_keys(NS_A, np.array(toks, dtype=np.int32), BT) == block_keys(NS_A, toks, BT)


@pytest.mark.parametrize("n_blocks", [0, 1, 2, 4])
def test_prefix_property(n_blocks: int) -> None:
    toks = _tokens(5 * BT)
    full = block_keys(NS_A, toks, BT)
    assert block_keys(NS_A, toks[: n_blocks * BT], BT) == full[:n_blocks]


def test_partial_tail_is_ignored() -> None:
    toks = _tokens(3 * BT)
    keys3 = block_keys(NS_A, toks, BT)
    assert block_keys(NS_A, toks[: 2 * BT + 7], BT) == keys3[:2]
    assert block_keys(NS_A, toks[: BT - 1], BT) == []
    # Changing only tail tokens changes nothing.
    other_tail = toks[: 2 * BT] + [1, 2, 3]
    assert block_keys(NS_A, other_tail, BT) == keys3[:2]


def test_key_names_its_whole_prefix() -> None:
    toks = _tokens(4 * BT)
    changed = list(toks)
    changed[BT + 3] += 1  # a token in block 1
    a, b = block_keys(NS_A, toks, BT), block_keys(NS_A, changed, BT)
    assert a[0] == b[0]
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True))


def test_namespaces_never_share_keys() -> None:
    toks = _tokens(4 * BT)
    assert NS_A != NS_B
    assert not set(block_keys(NS_A, toks, BT)) & set(block_keys(NS_B, toks, BT))


def test_block_size_matters() -> None:
    toks = _tokens(4 * BT)
    assert block_keys(NS_A, toks, BT)[0] != block_keys(NS_A, toks, BT // 2)[0]


def test_client_block_keys_uses_namespace_id_and_block_tokens() -> None:
    lay = KVLayout(32, 8, 128, "bfloat16", BT)
    ns = Namespace(NS_A, "tenant-a", "m", lay, lay.block_bytes, None, "inband")
    toks = _tokens(3 * BT + 5)
    with TierdClient("unix:/nonexistent/tierd.sock") as c:
        assert c.block_keys(ns, toks) == block_keys(NS_A, toks, BT)
