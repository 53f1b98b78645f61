"""A Mooncake Store tier's options and its client: checked once at config load, turned into
a `MooncakeDistributedStore` (package `mooncake-transfer-engine-non-cuda`, or a CUDA
build) when the tier opens.

Primitives: `OPTIONS`, `MooncakeOptions.of(spec, where)` (raises ConfigError naming the
key), `connect(opts)`, `probe(client)`, `is_outage(exc)`, `check(rc, what)`,
`StoreDown`, `StoreRefused`.

Mooncake answers with status codes, not exceptions: 0 is success, and a negative code
says what failed. `check` turns them into the two errors the tier's link tells apart:
`StoreRefused` (about the request: no space left in the pool, an object leased to a
reader) and `StoreDown` (everything else: the master or a peer's segment is gone). Two
behaviours shape the probe: a client whose master has gone still says healthy, and
setting a client up while the master is down blocks for a minute and a half, so both
`connect` and `probe` first reach the master's port with the tier's deadline.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tierd.config_checks import host_port, show
from tierd.errors import ConfigError
from tierd.tiers.store_options import COMMON, check_common

if TYPE_CHECKING:
    from tierd.config import TierSpec

OPTIONS: dict[str, Any] = {
    "master": "",  # host:port of mooncake_master
    "metadata_server": "",  # its transfer metadata ("": http://<master host>:8080/metadata)
    "local_hostname": "127.0.0.1",  # where peers reach this daemon's segment
    "protocol": "tcp",  # tcp | rdma
    "device": "",  # RDMA device names (protocol = rdma)
    "lend": True,  # whether this daemon lends memory to the pool (false: it only reads
    # and writes what others lend)
    "segment_bytes": 0,  # how much it lends (0: the tier's capacity)
    "buffer_bytes": 64 << 20,  # this daemon's transfer buffer
    **COMMON,
}
MIN_SEGMENT = 16 << 20  # Mooncake refuses to mount smaller segments (status -600)

# Codes about the request, not the store's health (Mooncake's error codes).
NO_SPACE = -600  # no segment has room for the object
NOT_FOUND = -704
LEASED = -706  # a reader holds a lease on the object: it cannot be removed yet
REFUSALS = frozenset({NO_SPACE, NOT_FOUND, LEASED})


class StoreDown(ConnectionError):
    """The store cannot serve now (its link marks the tier unavailable)."""


class StoreRefused(RuntimeError):
    """The store refused this request (the tier stays up)."""

    def __init__(self, what: str, rc: int) -> None:
        super().__init__(f"{what}: Mooncake status {rc}")
        self.rc = rc


@dataclass(frozen=True)
class MooncakeOptions:
    master: tuple[str, int]
    metadata_server: str
    local_hostname: str
    protocol: str
    device: str
    segment_bytes: int
    buffer_bytes: int
    key_prefix: str
    timeout_ms: int
    max_queued_bytes: int
    write: str
    io_threads: int

    @classmethod
    def of(cls, spec: TierSpec, where: str) -> MooncakeOptions:
        o = {k: spec.option(k, d) for k, d in OPTIONS.items()}
        check_common(o, spec, where)
        master = host_port(o["master"], f"{where}.master",
                           "the master's host:port (e.g. 10.0.0.5:50051)")  # fmt: skip
        host = f"[{master[0]}]" if ":" in master[0] else master[0]
        meta = o["metadata_server"] or f"http://{host}:8080/metadata"
        if not (meta == "P2PHANDSHAKE" or meta.startswith(("http://", "etcd://"))):
            raise ConfigError(f"{where}.metadata_server", "an http:// or etcd:// address, or "
                              f"P2PHANDSHAKE, got {show(meta)}")  # fmt: skip
        if o["protocol"] not in ("tcp", "rdma"):
            raise ConfigError(f"{where}.protocol", f"must be tcp or rdma, got "
                              f"{show(o['protocol'])}")  # fmt: skip
        if o["protocol"] == "rdma" and not o["device"]:
            raise ConfigError(f"{where}.device", "protocol = rdma needs the RDMA device names")
        if not isinstance(o["local_hostname"], str) or not o["local_hostname"]:
            raise ConfigError(f"{where}.local_hostname", "the address peers reach this "
                              "daemon at")  # fmt: skip
        segment = (o["segment_bytes"] or spec.capacity_bytes) if o["lend"] else 0
        if o["lend"] and not MIN_SEGMENT <= segment <= 1 << 44:
            raise ConfigError(f"{where}.segment_bytes", "between 16 MiB (Mooncake's smallest "
                              "segment) and 16 TiB; or lend = false")  # fmt: skip
        del o["lend"]
        if not 1 << 20 <= o["buffer_bytes"] <= 1 << 36:
            raise ConfigError(f"{where}.buffer_bytes", "must be between 1 MiB and 64 GiB")
        return cls(**{**o, "master": master, "metadata_server": meta,
                      "segment_bytes": segment})  # fmt: skip

    @property
    def master_addr(self) -> str:
        host, port = self.master
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reach_master(opts: MooncakeOptions) -> None:
    try:
        socket.create_connection(opts.master, timeout=opts.timeout_ms / 1000).close()
    except OSError as e:
        raise StoreDown(f"master {opts.master_addr}: {e}") from None


def connect(opts: MooncakeOptions) -> Any:
    """A client set up against the master, with this daemon's segment mounted."""
    from mooncake.store import MooncakeDistributedStore

    _reach_master(opts)
    store = MooncakeDistributedStore()
    rc = store.setup(opts.local_hostname, opts.metadata_server, opts.segment_bytes,
                     opts.buffer_bytes, opts.protocol, opts.device, opts.master_addr)  # fmt: skip
    if rc != 0:
        store.close()
        raise StoreDown(f"setting up against master {opts.master_addr} failed "
                        f"(Mooncake status {rc})")  # fmt: skip
    return store


def probe_with(opts: MooncakeOptions) -> Any:
    def probe(client: Any) -> None:
        _reach_master(opts)
        rc = client.health_check()
        if rc != 0:  # e.g. a restarted master that no longer knows this client
            raise StoreDown(f"the client's health check says {rc}")

    return probe


def check(rc: int, what: str) -> None:
    if rc == 0:
        return
    if rc in REFUSALS:
        raise StoreRefused(what, rc)
    raise StoreDown(f"{what}: Mooncake status {rc}")


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, (StoreDown, OSError))
