"""Compressed KV on a mooncake tier (a real Mooncake Store master on loopback): one daemon
writes its blocks through as kivi4 codes, the tier counts encoded bytes, and a second
daemon finds them by their headers (kept under a key of their own), decodes exactly the
codec's round trip and attends over the codes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from tests.integration.conftest import DaemonProcess
from tests.integration.test_remote_mooncake import chain, master  # noqa: F401 - fixture
from tests.integration.test_remote_redis import LAY, T, block_for, poll
from tests.integration.test_tier_codecs import GROUP, reference
from tests.integration.test_tier_stats import configured
from tests.mooncake_master import Master, needs_mooncake
from tierd_client import AttendItem, TierdClient
from tierd_kernels.codecs import make_codec

pytestmark = needs_mooncake
KIVI4 = make_codec("kivi4")


def test_a_second_daemon_finds_decodes_and_attends_over_kivi4_codes(
    master: Master,  # noqa: F811 - the fixture
    spawn_daemon: Callable[..., DaemonProcess],
) -> None:
    def start(**remote: str) -> DaemonProcess:
        d = configured(spawn_daemon(start=False), chain(master, **remote) + 'codec = "kivi4"\n')
        d.start()
        return d

    a, b = start(write="through"), start()
    tokens = np.arange(3 * T)
    encoded = KIVI4.block_bytes(LAY.block_shape, torch.float32)
    with TierdClient(a.address, tenant="it") as ca, TierdClient(b.address, tenant="it") as cb:
        ns = ca.open_namespace("mc-codes", LAY)
        keys = ca.block_keys(ns, tokens)
        blocks = [block_for(k) for k in keys]
        ca.put(ns, keys, np.stack(blocks))
        poll(lambda: ca.stats()["tiers"]["remote"]["blocks"] == 3, "write-through copies")
        assert ca.stats()["tiers"]["remote"]["used_bytes"] == 3 * encoded

        seen = [KIVI4.decode(KIVI4.encode(torch.from_numpy(x)), LAY.block_shape,
                             torch.float32).numpy() for x in blocks]  # fmt: skip
        nsb = cb.open_namespace("mc-codes", LAY)
        assert cb.lookup(nsb, tokens).cached_tokens == 3 * T
        assert cb.stats()["tiers"]["remote"]["used_bytes"] == 3 * encoded
        seq = cb.open_sequence(nsb, keys)
        q = np.random.default_rng(4).standard_normal((1, GROUP * 2, 64), dtype=np.float32)
        (got,) = cb.attend([AttendItem(seq, 0, q)], as_torch=False)
        want = reference(q, seen, 0)
        assert np.abs(got.out - want).max() <= 1e-4 * np.abs(want).max() + 1e-5
        cb.close_sequence(seq)
        res = cb.get(nsb, keys)
        assert all(res.found)
        assert [r.tobytes() for r in res.blocks] == [s.tobytes() for s in seen]
