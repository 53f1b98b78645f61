"""Tenants against a real daemon: authentication, isolation, quotas."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tierd.tiers.host import segments_of
from tierd_client import (
    FailedPrecondition,
    InvalidArgument,
    KVLayout,
    PermissionDenied,
    TierdClient,
    Unauthenticated,
)
from tierd_client._proto import tierd_pb2 as pb

TOKENS = {"alpha": "alpha-secret", "beta": "beta-secret", "gamma": "gamma-secret"}
LAYOUT = KVLayout(2, 2, 64, "float16", 16)  # 16 KiB blocks
BB = LAYOUT.block_bytes


def config_text(base: Path) -> str:
    tenants = "".join(
        f'[[tenants]]\nname = "{name}"\n'
        f'token_sha256 = "{hashlib.sha256(tok.encode()).hexdigest()}"\n'
        + ('host_quota = "256KiB"\n' if name == "gamma" else "")
        for name, tok in TOKENS.items()
    )
    return (f'data_dir = "{base}/data"\n[server]\nlisten = ["unix:{base}/s.sock"]\n'
            f'[host]\ncapacity = "16MiB"\n[nvme]\ncapacity = "64MiB"\n{tenants}')  # fmt: skip


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="tnt-") as d:
        base = Path(d)
        cfg = base / "tierd.toml"
        cfg.write_text(config_text(base))
        log = (base / "log").open("w")
        proc = subprocess.Popen([sys.executable, "-m", "tierd", "serve", "--config", str(cfg)],
                                stderr=log)  # fmt: skip
        addr = f"unix:{base}/s.sock"
        try:
            with TierdClient(addr, token=TOKENS["alpha"], timeout=30) as c:
                c.stats()  # waits for the daemon to answer
            yield addr
        finally:
            proc.terminate()
            proc.wait(30)
            for seg in segments_of(base / "data"):
                seg.unlink()


def client(address: str, tenant: str, **kw) -> TierdClient:
    return TierdClient(address, tenant=tenant, token=TOKENS.get(tenant, "wrong"), **kw)


def blocks(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *LAYOUT.block_shape)).astype(np.float16)


def test_calls_without_valid_credentials_are_refused(address: str) -> None:
    with TierdClient(address, max_retries=0) as anonymous, pytest.raises(Unauthenticated):
        anonymous.open_namespace("m", LAYOUT)
    with TierdClient(address, token="not-a-token", max_retries=0) as forged, pytest.raises(
        Unauthenticated
    ):
        forged.stats()


def test_a_tenant_cannot_claim_another(address: str) -> None:
    with TierdClient(address, tenant="beta", token=TOKENS["alpha"]) as c, pytest.raises(
        PermissionDenied
    ):
        c.open_namespace("m", LAYOUT)


def test_foreign_blocks_look_absent(address: str) -> None:
    tokens = np.arange(64)
    with client(address, "alpha") as a, client(address, "beta") as b:
        ns_a = a.open_namespace("shared-model", LAYOUT)
        keys = a.block_keys(ns_a, tokens)
        a.put(ns_a, keys, blocks(4, 1))
        ns_b = b.open_namespace("shared-model", LAYOUT)
        assert ns_b.id != ns_a.id
        # Same model, same prompt: beta's lookup answers exactly as for an absent prefix.
        assert b.lookup(ns_b, tokens).cached_tokens == 0
        assert b.get(ns_b, keys).found == [False] * 4
        # Using alpha's namespace id is answered like an id that never existed.
        errors = []
        for ns_id in (ns_a.id, os.urandom(16)):
            with pytest.raises(InvalidArgument) as info:
                b._unary("Lookup", pb.LookupRequest(namespace_id=ns_id, tokens=[1] * 16))
            errors.append((info.value.field, info.value.message))
        assert errors[0] == errors[1]
        # Nor can beta delete, pin or commit what is alpha's.
        with pytest.raises(InvalidArgument):
            b._unary("Delete", pb.KeysRequest(namespace_id=ns_a.id, keys=keys))
        assert a.get(ns_a, keys).found == [True] * 4
        prep = a._unary("PreparePut", pb.PreparePutRequest(
            namespace_id=ns_a.id, keys=[os.urandom(16)],
            shape=pb.BlockShape(dims=list(LAYOUT.block_shape), dtype=pb.DTYPE_FLOAT16)))
        with pytest.raises(FailedPrecondition):
            b._unary("CommitPut", pb.CommitPutRequest(lease_id=prep.lease_id))
        a._unary("CommitPut", pb.CommitPutRequest(lease_id=prep.lease_id))


def test_quota_moves_only_the_tenant_over_it(address: str) -> None:
    with client(address, "gamma") as g, client(address, "alpha") as a:
        ns_a = a.open_namespace("quota-neighbour", LAYOUT)
        keys_a = a.block_keys(ns_a, np.arange(4 * 16) + 10_000)
        a.put(ns_a, keys_a, blocks(4, 2))
        ns_g = g.open_namespace("quota-model", LAYOUT)
        keys_g = g.block_keys(ns_g, np.arange(40 * 16))
        for i in range(0, 40, 4):  # 40 blocks = 640 KiB against a 256 KiB host quota
            g.put(ns_g, keys_g[i : i + 4], blocks(4, 100 + i))
        tiers = [b.tier for b in g.lookup(ns_g, np.arange(40 * 16)).blocks]
        assert len(tiers) == 40
        assert tiers.count("host") * BB <= 256 * 1024
        assert tiers.count("nvme") >= 40 - 256 * 1024 // BB
        assert [b.tier for b in a.lookup(ns_a, np.arange(4 * 16) + 10_000).blocks] == ["host"] * 4
        got = g.get(ns_g, keys_g[:4])  # quota still allows staging this batch back
        assert got.found == [True] * 4
        assert np.array_equal(got.blocks, blocks(4, 100))


def _handoff(address: str) -> str:
    with client(address, "alpha") as c:
        seg = c.open_namespace("m/shm", LAYOUT).segment
    assert seg is not None and seg.handoff
    return seg.handoff


def test_shared_memory_is_handed_only_to_its_tenant(address: str) -> None:
    from tierd_client.shm import receive_fds

    handoff = _handoff(address)
    with pytest.raises(Unauthenticated):
        receive_fds(handoff, "alpha", None)
    with pytest.raises(Unauthenticated):
        receive_fds(handoff, "alpha", "not-a-token")
    with pytest.raises(PermissionDenied):
        receive_fds(handoff, "beta", TOKENS["alpha"])
    # Each tenant's descriptors are its own memory: beta never sees alpha's block.
    data = blocks(1, seed=11)
    with client(address, "alpha") as a, client(address, "beta") as b:
        ns_a = a.open_namespace("m/shm", LAYOUT)
        assert ns_a.transport == "shm"
        key = a.block_keys(ns_a, np.arange(16) + 7000)
        a.put(ns_a, key, data)
        ns_b = b.open_namespace("m/shm", LAYOUT)
        mine = a._segments.map(ns_a.segment).store
        theirs = b._segments.map(ns_b.segment).store
        needle = data[0].tobytes()
        assert mine.find(needle) >= 0 and theirs.find(needle) == -1


def test_a_client_cannot_damage_committed_blocks(address: str) -> None:
    """Everything a client can do to the memory it was handed: truncating fails, writing
    the block segment fails, and scribbling over all of staging after a commit changes
    no stored block; the daemon keeps serving."""
    import mmap

    from tierd_client.shm import receive_fds

    data = blocks(4, seed=12)
    with client(address, "alpha") as a:
        ns = a.open_namespace("m/shm", LAYOUT)
        keys = a.block_keys(ns, np.arange(64) + 9000)
        assert a.put(ns, keys, data) == ["stored"] * 4
        fds = receive_fds(ns.segment.handoff, "alpha", TOKENS["alpha"])
        try:
            for fd in (fds.segment_fd, fds.staging_fd):
                with pytest.raises(OSError):
                    os.ftruncate(fd, 0)
            with pytest.raises(PermissionError):
                mmap.mmap(fds.segment_fd, fds.size, flags=mmap.MAP_SHARED,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
            staging = mmap.mmap(fds.staging_fd, fds.staging_size, flags=mmap.MAP_SHARED,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE)  # fmt: skip
            for at in range(0, fds.staging_size, 1 << 20):
                staging[at : at + 4096] = b"\xee" * 4096  # a sample of every MiB, cheaply
            staging.close()
        finally:
            os.close(fds.segment_fd)
            os.close(fds.staging_fd)
        got = a.get(ns, keys)
        assert all(got.found) and (got.blocks == data).all()
        assert a.lookup(ns, np.arange(64) + 9000).cached_tokens == 64  # still answering
