"""Each oversized request against a real daemon: the status code, the field, the limit named
in the message, nothing kept, and the daemon still serving."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from tests.integration.conftest import DaemonProcess
from tierd_client import AttendItem, KVLayout, TierdClient
from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc
from tierd_client.status import FIELD_METADATA_KEY

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
LIMITS = """[limits]
max_open_tenants = 4
max_sequences_per_tenant = 2
max_leases_per_tenant = 2
max_query_tokens = 64
max_tail_tokens = 64
max_lookup_tokens = 4096
"""
LAYOUT = pb.KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype=pb.DTYPE_FLOAT32,
                     block_tokens=16)  # fmt: skip
SMALL = KVLayout(2, 1, 8, "float32", 16)
TENANTS = ("lookup", "attend", "leases")  # opened first: max_open_tenants leaves them room


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    base = Path(tempfile.mkdtemp(prefix="lim-"))  # short: unix socket paths are limited
    (base / "limits.toml").write_text(LIMITS)
    daemon = DaemonProcess(base)
    daemon.cmd += ["--config", str(base / "limits.toml")]
    try:
        daemon.start()
        for tenant in TENANTS:
            with TierdClient(daemon.address, tenant=tenant) as c:
                c.open_namespace("m", SMALL)
        yield daemon.address
    finally:
        daemon.discard()


@pytest.fixture
def stub(address: str) -> Iterator[pb_grpc.TierdStub]:
    with grpc.insecure_channel(address) as channel:
        yield pb_grpc.TierdStub(channel)


def refused(call) -> tuple[grpc.StatusCode, str | None, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    err = info.value
    return err.code(), dict(err.trailing_metadata() or ()).get(FIELD_METADATA_KEY), err.details()


def open_ns(stub: pb_grpc.TierdStub, tenant: str, model: str = "m", layout=LAYOUT,
            extra=()) -> bytes:  # fmt: skip
    req = pb.OpenNamespaceRequest(
        namespace=pb.Namespace(tenant=tenant, model=model, layout=layout, extra_keys=extra)
    )
    return stub.OpenNamespace(req).namespace_id


def test_oversized_namespaces_are_refused_and_never_kept(stub: pb_grpc.TierdStub) -> None:
    before = stub.Stats(pb.StatsRequest()).namespaces
    huge = "n" * (1 << 20)
    layouts = {
        "namespace.layout.num_layers": pb.KVLayout(num_layers=3_000_000, num_kv_heads=1,
                                                   head_dim=1, dtype=pb.DTYPE_UINT8,
                                                   block_tokens=1),
        "namespace.layout.head_dim": pb.KVLayout(num_layers=1, num_kv_heads=1, head_dim=4096,
                                                 dtype=pb.DTYPE_UINT8, block_tokens=1),
        # Every dimension within its limit, the block past limits.max_block_bytes (1 GiB).
        "namespace.layout": pb.KVLayout(num_layers=1024, num_kv_heads=16, head_dim=128,
                                        dtype=pb.DTYPE_FLOAT16, block_tokens=64),
    }  # fmt: skip
    cases = [
        *((field, lambda lay=lay: open_ns(stub, "names", layout=lay)) for field, lay in
          layouts.items()),
        ("namespace.tenant", lambda: open_ns(stub, huge)),
        ("namespace.model", lambda: open_ns(stub, "names", huge)),
        ("namespace.extra_keys", lambda: open_ns(stub, "names", extra=["k"] * 17)),
        ("namespace.extra_keys[0]", lambda: open_ns(stub, "names", extra=[huge])),
    ]  # fmt: skip
    for field, call in cases:
        code, got, details = refused(call)
        assert (code, got) == (INVALID, field), details
        assert "limits.max_" in details
    assert stub.Stats(pb.StatsRequest()).namespaces == before


def test_lookup_of_too_many_tokens_is_refused(stub: pb_grpc.TierdStub) -> None:
    ns = open_ns(stub, "lookup")
    req = pb.LookupRequest(namespace_id=ns, tokens=np.arange(4097).tolist())
    code, field, details = refused(lambda: stub.Lookup(req))
    assert (code, field) == (INVALID, "tokens") and "limits.max_lookup_tokens" in details
    ok = stub.Lookup(pb.LookupRequest(namespace_id=ns, tokens=np.arange(4096).tolist()))
    assert ok.cached_tokens == 0


def test_tenant_names_in_open_mode_are_bounded(stub: pb_grpc.TierdStub) -> None:
    known = {u.tenant for u in stub.Stats(pb.StatsRequest()).tenants}
    for i in range(8):
        try:
            open_ns(stub, f"tenant-{i}")
            known.add(f"tenant-{i}")
        except grpc.RpcError as e:
            assert e.code() == EXHAUSTED
            assert dict(e.trailing_metadata())[FIELD_METADATA_KEY] == "limits.max_open_tenants"
            break
    else:
        pytest.fail("eight new tenant names were all accepted with max_open_tenants = 4")
    open_ns(stub, "lookup", "another-model")  # a known tenant still opens namespaces


def test_attend_limits_over_the_wire(address: str) -> None:
    with TierdClient(address, tenant="attend") as c:
        ns = c.open_namespace("m", SMALL)
        seqs = [c.open_sequence(ns, []) for _ in range(2)]
        with pytest.raises(Exception) as info:
            c.open_sequence(ns, [])
        assert info.value.field == "limits.max_sequences_per_tenant"  # type: ignore[attr-defined]
        rng = np.random.default_rng(0)

        def item(n: int, layer: int = 0, q_tokens: int = 1) -> AttendItem:
            kv = rng.standard_normal((2, 1, n, 8)).astype(np.float32)
            return AttendItem(seqs[0], layer, rng.standard_normal((q_tokens, 2, 8), np.float32),
                              kv[0], kv[1], list(range(n)) if layer == 0 else [])  # fmt: skip

        cases = [(item(65, q_tokens=65), "InvalidArgument", "items[0].q"),
                 (item(65), "InvalidArgument", "items[0].k_new")]  # fmt: skip
        for bad, cls, field in cases:
            with pytest.raises(Exception) as info:
                c.attend([bad])
            assert (type(info.value).__name__, info.value.field) == (cls, field)  # type: ignore[attr-defined]
        # One layer appended alone never seals: its tail stops at limits.max_tail_tokens.
        for _ in range(4):
            c.attend([item(16)])
        with pytest.raises(Exception) as info:
            c.attend([item(1)])
        assert type(info.value).__name__ == "ResourceExhausted"
        assert info.value.field == "limits.max_tail_tokens"  # type: ignore[attr-defined]
        c.close_sequence(seqs[1])
        c.open_sequence(ns, [])  # closing one makes room


def test_open_leases_per_tenant_over_the_wire(stub: pb_grpc.TierdStub) -> None:
    ns = open_ns(stub, "leases")
    shape = pb.BlockShape(dims=[2, 2, 1, 16, 8], dtype=pb.DTYPE_FLOAT32)
    leases = [
        stub.PreparePut(
            pb.PreparePutRequest(namespace_id=ns, keys=[bytes([i]) * 16], shape=shape)
        ).lease_id
        for i in range(2)
    ]
    req = pb.PreparePutRequest(namespace_id=ns, keys=[b"z" * 16], shape=shape)
    code, field, _ = refused(lambda: stub.PreparePut(req))
    assert (code, field) == (EXHAUSTED, "limits.max_leases_per_tenant")
    for lease in leases:
        stub.Release(pb.ReleaseRequest(lease_id=lease))
    assert stub.PreparePut(req).lease_id
