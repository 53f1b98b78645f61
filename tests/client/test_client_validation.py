"""Client-side checks that fail before any RPC (the address points at no daemon)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tierd_client import FailedPrecondition, InvalidArgument, KVLayout, Namespace, TierdClient

LAY = KVLayout(2, 2, 8, "float16", 4)
NS = Namespace(b"\x01" * 16, "default", "m", LAY, LAY.block_bytes, None, "inband")
KEYS = [bytes([i]) * 16 for i in range(2)]


@pytest.fixture
def client():  # type: ignore[no-untyped-def]
    # Nothing listens here; every test must finish without touching the network.
    with TierdClient("unix:/nonexistent/tierd.sock", timeout=5.0, max_retries=0) as c:
        yield c


def test_put_wrong_dtype_fails_fast(client: TierdClient) -> None:
    t0 = time.monotonic()
    with pytest.raises(InvalidArgument) as e:
        client.put(NS, KEYS, np.zeros((2, *LAY.block_shape), np.float32))
    assert e.value.field == "blocks.dtype"
    assert time.monotonic() - t0 < 1.0


def test_bad_keys(client: TierdClient) -> None:
    blocks = np.zeros((2, *LAY.block_shape), np.float16)
    with pytest.raises(InvalidArgument) as e:
        client.put(NS, [KEYS[0], b"short"], blocks)
    assert e.value.field == "keys[1]"
    with pytest.raises(InvalidArgument):
        client.get(NS, ["not bytes" * 2])  # type: ignore[list-item]
    with pytest.raises(InvalidArgument):
        client.delete(NS, [b"x" * 17])


def test_bad_out(client: TierdClient) -> None:
    with pytest.raises(InvalidArgument) as e:
        client.get(NS, KEYS, out=np.zeros((1, *LAY.block_shape), np.float16))
    assert e.value.field == "out.shape"


def test_bad_tokens(client: TierdClient) -> None:
    with pytest.raises(InvalidArgument) as e:
        client.lookup(NS, np.zeros((2, 4), np.int64))
    assert e.value.field == "tokens"


def test_empty_batches_need_no_daemon(client: TierdClient) -> None:
    assert client.put(NS, [], np.zeros((0, *LAY.block_shape), np.float16)) == []
    got = client.get(NS, [])
    assert got.found == [] and got.blocks.shape == (0, *LAY.block_shape)


def test_forced_shm_without_a_segment(client: TierdClient) -> None:
    forced = TierdClient("unix:/nonexistent/tierd.sock", transport="shm")
    with pytest.raises(FailedPrecondition) as e:
        forced._choose_transport(None)
    assert e.value.field == "transport"
    assert client._choose_transport(None) == "inband"
    forced.close()


def test_extra_keys_must_not_be_a_string(client: TierdClient) -> None:
    with pytest.raises(TypeError):
        client.open_namespace("m", LAY, extra_keys="lora-a")
