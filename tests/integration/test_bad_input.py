"""Malformed requests over the wire: the status code, the field named, and a daemon that
keeps serving with nothing left behind."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc
from tierd_client.status import FIELD_METADATA_KEY

LAYOUT = pb.KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype=pb.DTYPE_FLOAT16,
                     block_tokens=16)  # fmt: skip
BB = 2 * 2 * 2 * 16 * 64 * 2
SHAPE = pb.BlockShape(dims=[2, 2, 2, 16, 64], dtype=pb.DTYPE_FLOAT16)


@pytest.fixture
def stub(daemon_address: str) -> Iterator[pb_grpc.TierdStub]:
    with grpc.insecure_channel(daemon_address) as channel:
        yield pb_grpc.TierdStub(channel)


@pytest.fixture
def ns_id(stub: pb_grpc.TierdStub) -> bytes:
    req = pb.OpenNamespaceRequest(namespace=pb.Namespace(tenant="bad-input", model="m",
                                                         layout=LAYOUT))  # fmt: skip
    return stub.OpenNamespace(req).namespace_id


def field_of(err: grpc.RpcError) -> str | None:
    return dict(err.trailing_metadata() or ()).get(FIELD_METADATA_KEY)


def expect(code: grpc.StatusCode, field: str, call) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert field_of(info.value) == field, info.value.details()


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def chunks(header: pb.PutHeader, *payloads: bytes) -> Iterator[pb.PutChunk]:
    yield pb.PutChunk(header=header)
    for p in payloads:
        yield pb.PutChunk(data=p)


INVALID = grpc.StatusCode.INVALID_ARGUMENT


def test_unary_bad_input_names_the_field(stub: pb_grpc.TierdStub, ns_id: bytes) -> None:
    cases = [
        ("keys[1]", lambda: stub.PrepareGet(pb.PrepareGetRequest(namespace_id=ns_id,
                                                                 keys=[key(1), b"x" * 8]))),
        ("namespace_id", lambda: stub.Lookup(pb.LookupRequest(namespace_id=b"\0" * 16,
                                                              tokens=[1]))),
        ("tokens", lambda: stub.Lookup(pb.LookupRequest(namespace_id=ns_id, tokens=[3, -1]))),
        ("keys", lambda: stub.Delete(pb.KeysRequest(namespace_id=ns_id,
                                                    keys=[key(i) for i in range(70_000)]))),
        ("shape.dims", lambda: stub.PreparePut(pb.PreparePutRequest(
            namespace_id=ns_id, keys=[key(1)],
            shape=pb.BlockShape(dims=[2, 2, 2, 16, 32], dtype=pb.DTYPE_FLOAT16)))),
        ("shape.dtype", lambda: stub.PreparePut(pb.PreparePutRequest(
            namespace_id=ns_id, keys=[key(1)],
            shape=pb.BlockShape(dims=[2, 2, 2, 16, 64], dtype=pb.DTYPE_BFLOAT16)))),
        ("shape", lambda: stub.PreparePut(pb.PreparePutRequest(namespace_id=ns_id,
                                                               keys=[key(1)]))),
        ("keys[1]", lambda: stub.PreparePut(pb.PreparePutRequest(
            namespace_id=ns_id, keys=[key(1), key(1)], shape=SHAPE))),
        ("lease_ttl_ms", lambda: stub.PrepareGet(pb.PrepareGetRequest(
            namespace_id=ns_id, keys=[key(1)], lease_ttl_ms=4_000_000_000))),
        ("namespace.layout", lambda: stub.OpenNamespace(pb.OpenNamespaceRequest(
            namespace=pb.Namespace(tenant="t", model="m", layout=pb.KVLayout(num_layers=0))))),
        ("namespace.tenant", lambda: stub.OpenNamespace(pb.OpenNamespaceRequest(
            namespace=pb.Namespace(model="m", layout=LAYOUT)))),
    ]  # fmt: skip
    for field, call in cases:
        expect(INVALID, field, call)
    expect(grpc.StatusCode.FAILED_PRECONDITION, "lease_id",
           lambda: stub.CommitPut(pb.CommitPutRequest(lease_id=987654321)))


def test_inband_put_of_wrong_size_leaves_no_trace(stub: pb_grpc.TierdStub, ns_id: bytes) -> None:
    header = pb.PutHeader(namespace_id=ns_id, keys=[key(10), key(11)], shape=SHAPE)
    before = stub.Stats(pb.StatsRequest())
    expect(INVALID, "data", lambda: stub.Put(chunks(header, b"\1" * BB, b"\1" * (BB - 1))))
    expect(INVALID, "data", lambda: stub.Put(chunks(header, b"\1" * (2 * BB + 1))))
    expect(INVALID, "header", lambda: stub.Put(iter([pb.PutChunk(data=b"\1" * 10)])))
    two_headers = [pb.PutChunk(header=header), pb.PutChunk(header=header)]
    expect(INVALID, "header", lambda: stub.Put(iter(two_headers)))
    after = stub.Stats(pb.StatsRequest())
    host_before = next(t for t in before.tiers if t.tier == pb.TIER_HOST)
    host_after = next(t for t in after.tiers if t.tier == pb.TIER_HOST)
    assert host_after.used_bytes == host_before.used_bytes
    assert after.active_leases == before.active_leases
    got = list(stub.Get(pb.GetRequest(namespace_id=ns_id, keys=[key(10), key(11)])))
    assert list(got[0].found) == [False, False]
    # ...and the daemon still serves a correct put.
    ok = stub.Put(chunks(header, b"\2" * BB, b"\3" * BB))
    assert list(ok.results) == [pb.PUT_RESULT_STORED] * 2
    stub.Delete(pb.KeysRequest(namespace_id=ns_id, keys=[key(10), key(11)]))


def test_over_capacity_is_resource_exhausted(stub: pb_grpc.TierdStub, ns_id: bytes) -> None:
    stats = stub.Stats(pb.StatsRequest())
    host = next(t for t in stats.tiers if t.tier == pb.TIER_HOST)
    expect(grpc.StatusCode.INVALID_ARGUMENT, "keys", lambda: stub.PreparePut(
        pb.PreparePutRequest(namespace_id=ns_id, keys=[key(i) for i in range(70_000)],
                             shape=SHAPE)))  # fmt: skip
    # Lease a host tier's worth of blocks: a put beyond what a tenant's leases may hold
    # is refused at prepare, naming the limit.
    big = pb.OpenNamespaceRequest(namespace=pb.Namespace(
        tenant="bad-input", model="big",
        layout=pb.KVLayout(num_layers=64, num_kv_heads=8, head_dim=128, dtype=pb.DTYPE_FLOAT16,
                           block_tokens=16)))  # fmt: skip
    big_id = stub.OpenNamespace(big).namespace_id
    big_bb = 64 * 2 * 8 * 16 * 128 * 2
    big_shape = pb.BlockShape(dims=[64, 2, 8, 16, 128], dtype=pb.DTYPE_FLOAT16)
    n = host.capacity_bytes // big_bb
    keys = [key(1000 + i) for i in range(n)]
    prep = stub.PreparePut(pb.PreparePutRequest(namespace_id=big_id, keys=keys, shape=big_shape))
    expect(grpc.StatusCode.RESOURCE_EXHAUSTED, "limits.max_lease_bytes_per_tenant",
           lambda: stub.PreparePut(pb.PreparePutRequest(namespace_id=big_id, keys=[key(5000)],
                                                        shape=big_shape)))  # fmt: skip
    stub.Release(pb.ReleaseRequest(lease_id=prep.lease_id))
    assert stub.Stats(pb.StatsRequest()).active_leases == stats.active_leases


def test_impossible_tensor_shapes_name_their_field(stub: pb_grpc.TierdStub) -> None:
    # Dimensions whose product wraps past 2**64 once claimed to match an empty payload.
    wrapping = pb.Tensor(shape=[1 << 32, 1 << 32, 64], dtype=pb.DTYPE_FLOAT32)
    fine = pb.Tensor(shape=[1, 2, 64], dtype=pb.DTYPE_FLOAT32, data=bytes(4 * 2 * 64))
    items = [
        ("items[0].q.data", pb.AttendItem(sequence_id=1, q=wrapping)),
        ("items[0].k_new.data", pb.AttendItem(sequence_id=1, q=fine, k_new=wrapping, v_new=fine)),
        ("items[0].q.shape", pb.AttendItem(sequence_id=1, q=pb.Tensor(
            shape=[0, 1 << 62], dtype=pb.DTYPE_FLOAT32))),
    ]  # fmt: skip
    for field, item in items:
        expect(INVALID, field, lambda item=item: stub.Attend(pb.AttendRequest(items=[item])))


def test_a_query_without_heads_is_refused_like_the_csd_workers_do(
    stub: pb_grpc.TierdStub, ns_id: bytes
) -> None:
    seq = stub.OpenSequence(pb.OpenSequenceRequest(namespace_id=ns_id)).sequence_id
    headless = pb.AttendItem(sequence_id=seq, q=pb.Tensor(shape=[1, 0, 64],
                                                          dtype=pb.DTYPE_FLOAT32))  # fmt: skip
    expect(INVALID, "items[0].q", lambda: stub.Attend(pb.AttendRequest(items=[headless])))
    stub.CloseSequence(pb.CloseSequenceRequest(sequence_id=seq))
