"""Property-based abuse of every RPC: malformed and random messages never kill the daemon,
never surface as INTERNAL/UNKNOWN, and leave it serving correct answers."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc

ACCEPTABLE = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))  # fmt: skip

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
keys = st.lists(st.binary(min_size=0, max_size=20), max_size=6)
dtype = st.sampled_from(list(pb.DType.values()))
layout = st.builds(pb.KVLayout, num_layers=st.integers(0, 2000), num_kv_heads=st.integers(0, 64),
                   head_dim=st.integers(0, 512), dtype=dtype, block_tokens=st.integers(0, 1024))
tensor = st.builds(pb.Tensor, shape=st.lists(st.integers(0, 64), max_size=4), dtype=dtype,
                   data=st.binary(max_size=4096))
shape = st.builds(pb.BlockShape, dims=st.lists(st.integers(0, 2**20), max_size=6), dtype=dtype)


@pytest.fixture(scope="module")
def stub(daemon_address: str) -> Iterator[pb_grpc.TierdStub]:
    with grpc.insecure_channel(daemon_address) as channel:
        yield pb_grpc.TierdStub(channel)


@pytest.fixture(scope="module")
def ns_id(stub: pb_grpc.TierdStub) -> bytes:
    req = pb.OpenNamespaceRequest(namespace=pb.Namespace(
        tenant="fuzz", model="m", layout=pb.KVLayout(num_layers=1, num_kv_heads=1, head_dim=64,
                                                     dtype=pb.DTYPE_FLOAT16, block_tokens=16)))
    return stub.OpenNamespace(req).namespace_id


def survive(call) -> None:
    try:
        result = call()
        if hasattr(result, "__next__"):
            for _ in result:
                pass
    except grpc.RpcError as e:
        assert e.code() in ACCEPTABLE, f"{e.code()}: {e.details()}"


def ns_or_random(ns_id: bytes):
    return st.one_of(st.just(ns_id), st.binary(max_size=24))


def cases(ns):
    return {
        "OpenNamespace": st.builds(pb.OpenNamespaceRequest, namespace=st.builds(
            pb.Namespace, tenant=st.text(max_size=20), model=st.text(max_size=20), layout=layout,
            extra_keys=st.lists(st.text(max_size=8), max_size=3))),
        "Lookup": st.builds(pb.LookupRequest, namespace_id=ns,
                            tokens=st.lists(st.integers(-2**63, 2**63 - 1), max_size=80)),
        "PreparePut": st.builds(pb.PreparePutRequest, namespace_id=ns, keys=keys, shape=shape,
                                lease_ttl_ms=u32),
        "CommitPut": st.builds(pb.CommitPutRequest, lease_id=u64),
        "PrepareGet": st.builds(pb.PrepareGetRequest, namespace_id=ns, keys=keys,
                                lease_ttl_ms=u32),
        "Release": st.builds(pb.ReleaseRequest, lease_id=u64),
        "Get": st.builds(pb.GetRequest, namespace_id=ns, keys=keys),
        "Locate": st.builds(pb.KeysRequest, namespace_id=ns, keys=keys),
        "Delete": st.builds(pb.KeysRequest, namespace_id=ns, keys=keys),
        "Pin": st.builds(pb.KeysRequest, namespace_id=ns, keys=keys),
        "Unpin": st.builds(pb.KeysRequest, namespace_id=ns, keys=keys),
        "Stats": st.just(pb.StatsRequest()),
        "OpenSequence": st.builds(pb.OpenSequenceRequest, namespace_id=ns, keys=keys,
                                  ttl_ms=u32),
        "CloseSequence": st.builds(pb.CloseSequenceRequest, sequence_id=u64),
        "Attend": st.builds(pb.AttendRequest, items=st.lists(st.builds(
            pb.AttendItem, sequence_id=u64, layer=u32, q=tensor, k_new=tensor, v_new=tensor,
            new_tokens=st.lists(st.integers(-5, 5), max_size=3),
            scale=st.floats(allow_nan=True, width=32)), max_size=3)),
        "Move": st.builds(pb.MoveRequest, namespace_id=ns, keys=keys,
                          tier=st.sampled_from(list(pb.Tier.values()))),
    }  # fmt: skip


@pytest.mark.parametrize("method", list(cases(st.none())))
@SETTINGS
@given(data=st.data())
def test_every_rpc_survives_random_messages(stub, ns_id: bytes, method: str, data) -> None:
    request = data.draw(cases(ns_or_random(ns_id))[method])
    survive(lambda: getattr(stub, method)(request, timeout=30))
    assert stub.Stats(pb.StatsRequest()).namespaces >= 1


@SETTINGS
@given(st.binary(max_size=512))
def test_undecodable_bytes_are_invalid_argument(stub: pb_grpc.TierdStub, raw: bytes) -> None:
    for method in ("Lookup", "PreparePut", "Attend"):
        call = stub_raw(stub, method)
        try:
            call(raw, timeout=30)
        except grpc.RpcError as e:
            assert e.code() in ACCEPTABLE, f"{method}: {e.code()}: {e.details()}"


@SETTINGS
@given(st.lists(st.binary(max_size=256), min_size=1, max_size=4))
def test_streams_survive_random_chunks(stub: pb_grpc.TierdStub, ns_id: bytes, datas) -> None:
    header = pb.PutHeader(namespace_id=ns_id, keys=[b"k" * 16],
                          shape=pb.BlockShape(dims=[1, 2, 1, 16, 64], dtype=pb.DTYPE_FLOAT16))
    chunks = [pb.PutChunk(header=header)] + [pb.PutChunk(data=d) for d in datas]
    survive(lambda: stub.Put(iter(chunks), timeout=30))
    survive(lambda: stub.Put(iter([pb.PutChunk(data=d) for d in datas]), timeout=30))
    survive(lambda: stub.AttendStream(iter([pb.AttendRequest()] * 2), timeout=30))


def stub_raw(stub: pb_grpc.TierdStub, method: str):
    """The same RPC without the request serializer: raw bytes go on the wire."""
    channel = stub._raw_channel  # set by the fixture below
    return channel.unary_unary(f"/tierd.v1.Tierd/{method}", request_serializer=None,
                               response_deserializer=None)


@pytest.fixture(scope="module", autouse=True)
def _raw_channel(stub: pb_grpc.TierdStub, daemon_address: str) -> Iterator[None]:
    with grpc.insecure_channel(daemon_address) as channel:
        stub._raw_channel = channel  # type: ignore[attr-defined]
        yield
