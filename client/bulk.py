"""Gets and puts of a client on another host through a Mooncake transfer engine, instead
of gRPC payloads (`TierdClient(..., bulk="auto"|"engine"|"inband")`).

Primitives: `BulkPath(client, mode, hostname)`: `usable(engine) -> reason | None` (opens
this client's engine, once, with the daemon's protocol), `get(ns, keys, view) -> found`,
`put(ns, keys, rows) -> outcomes`, `close()`; `BULK_MODES`.

Get: the caller's destination buffer is registered with this client's engine; BulkGet
copies the blocks into the daemon's exchange area under a lease and names where they are;
this client reads them one-sided, checks each block's xxh3-64 checksum, and ends the lease
with Release. Put: the blocks (the caller's array when it is one contiguous buffer, else a
contiguous copy) are registered and named with their checksums; the daemon reads them
from that range only, checks them and commits. The registration lasts one call.

The engine needs the `mooncake` extra (and the system's libibverbs1). With "auto", a
client that cannot open one, a daemon that announces none, or a transfer that fails
(the engine's port unreachable, the daemon restarted without its engine) goes on over
gRPC in-band, for good, after one logged warning; "engine" raises instead. A call whose
blocks do not fit the daemon's exchange area right now goes in-band alone ("engine":
Unavailable). Checksums that do not match are `DataLoss` either way: bytes arrived damaged.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ._proto import tierd_pb2 as pb
from .arrays import BlockRows
from .errors import DataLoss, FailedPrecondition, Internal, ResourceExhausted, Unavailable
from .results import Namespace, PutOutcome

if TYPE_CHECKING:
    from .client import TierdClient

log = logging.getLogger("tierd_client.bulk")

BULK_MODES = ("auto", "engine", "inband")
_PUT_RESULT = {pb.PUT_RESULT_STORED: "stored", pb.PUT_RESULT_ALREADY_PRESENT: "already_present"}


class _EngineFailed(Exception):
    """The transfer engine path cannot serve this call (in-band still can)."""


class _ExchangeFull(Exception):
    """The daemon's exchange area has no room for this call now (in-band can serve it)."""


def _checksum(buf: Any) -> int:
    import xxhash  # the daemon's own block checksum (xxh3-64)

    return int(xxhash.xxh3_64_intdigest(buf))


def local_hostname(host: str, port: int) -> str:
    """The address this host's packets to `host` leave from: where the daemon reaches
    this client's engine (a UDP connect sends nothing, it only picks the route)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((host, port or 9))
        return str(s.getsockname()[0])


def start_engine(hostname: str, protocol: str) -> tuple[Any, str]:
    """A Mooncake transfer engine on `hostname` (the mooncake extra; no metadata server:
    engines name each other as HOST:PORT) and that address. ImportError without the
    extra, OSError if it does not start. The daemon's engine starts here too."""
    from mooncake.engine import TransferEngine

    engine = TransferEngine()
    rc = engine.initialize(hostname, "P2PHANDSHAKE", protocol, "")
    if rc != 0:
        raise OSError(f"the transfer engine did not start on {hostname} ({protocol}): {rc}")
    return engine, f"{hostname}:{engine.get_rpc_port()}"


def engine_read(engine: Any, target: str, reads: list[tuple[int, int, int]]) -> bool:
    """Copy each (local address, remote address, length) from `target`'s registered
    memory into this engine's; True if every read completed."""
    if not reads:
        return True
    local, remote, lengths = (list(x) for x in zip(*reads))
    return bool(engine.batch_transfer_sync_read(target, local, remote, lengths) == 0)


class _Engine:
    """This client's transfer engine; every use is serialised (registrations are per call)."""

    def __init__(self, hostname: str, protocol: str) -> None:
        self._engine, self.address = start_engine(hostname, protocol)
        self.protocol = protocol
        self.lock = threading.Lock()

    def register(self, view: np.ndarray) -> int:
        addr = int(view.ctypes.data)
        if self._engine.register_memory(addr, view.nbytes) != 0:
            raise _EngineFailed(f"the engine refused to register {view.nbytes} bytes")
        return addr

    def unregister(self, addr: int) -> None:
        self._engine.unregister_memory(addr)

    def read(self, target: str, reads: list[tuple[int, int, int]]) -> bool:
        return engine_read(self._engine, target, reads)


class BulkPath:
    def __init__(self, client: TierdClient, mode: str, hostname: str | None) -> None:
        if mode not in BULK_MODES:
            raise ValueError(f"bulk must be one of {BULK_MODES}, got {mode!r}")
        self.client = client
        self.mode = mode
        self._hostname = hostname
        self._engine: _Engine | None = None
        self._broken: str | None = None  # why the engine path is off ("auto" only)
        self._open_lock = threading.Lock()

    def usable(self, engine: pb.BulkEngine | None) -> str | None:
        """None when blocks of a namespace whose daemon announced `engine` can go through
        this client's engine (opened here, once); else why not."""
        if self.mode == "inband":
            return "bulk='inband'"
        if engine is None or not engine.address:
            return "the daemon has no transfer engine for clients ([peers] bulk)"
        if self._broken:
            return self._broken
        with self._open_lock:
            if self._engine is not None:
                if self._engine.protocol != engine.protocol:
                    return (f"this client's engine speaks {self._engine.protocol}, the "
                            f"daemon's {engine.protocol}")  # fmt: skip
                return None
            try:
                host = self._hostname or local_hostname(*_host_port(engine.address))
                self._engine = _Engine(host, engine.protocol)
            except (ImportError, OSError, ValueError) as e:
                return f"no transfer engine here: {e}"
        return None

    def _fall_back(self, why: str) -> None:
        if self.mode == "engine":
            raise Unavailable(f"transfer engine path: {why}", field="bulk")
        if self._broken is None:
            log.warning("transfer engine path off, blocks go in-band from now on: %s", why)
        self._broken = why

    def get(self, ns: Namespace, keys: list[bytes], view: np.ndarray) -> list[bool]:
        if self._broken is None:
            try:
                return self._get(ns, keys, view)
            except _EngineFailed as e:
                self._fall_back(str(e))
            except _ExchangeFull as e:
                self._one_call_inband(e)
        return self.client._get_inband(ns, keys, view)

    def put(self, ns: Namespace, keys: list[bytes], rows: BlockRows) -> list[PutOutcome]:
        if self._broken is None:
            try:
                return self._put(ns, keys, rows)
            except _EngineFailed as e:
                self._fall_back(str(e))
            except _ExchangeFull as e:
                self._one_call_inband(e)
        return self.client._put_inband(ns, keys, rows)

    def _one_call_inband(self, why: _ExchangeFull) -> None:
        """The daemon's exchange area had no room for this call's blocks now: this one
        call goes in-band, the next tries the engine again."""
        if self.mode == "engine":
            raise Unavailable(f"transfer engine path: {why}", field="bulk")
        log.debug("one call in-band: %s", why)

    def _call(self, method: str, request: Any) -> Any:
        try:
            return self.client._unary(method, request)
        except FailedPrecondition as e:
            if e.field == "engine":  # a daemon that restarted without its engine
                raise _EngineFailed(e.message) from None
            raise
        except ResourceExhausted as e:
            if e.field == "exchange":  # too many blocks in transit at the daemon right now
                raise _ExchangeFull(e.message) from None
            raise

    def _get(self, ns: Namespace, keys: list[bytes], view: np.ndarray) -> list[bool]:
        engine, bb = self._engine, ns.block_bytes
        assert engine is not None, "usable() opened it"
        flat = view.reshape(-1).view(np.uint8)
        req = pb.BulkGetRequest(namespace_id=ns.id, keys=keys,
                                lease_ttl_ms=self.client._lease_ttl_ms)  # fmt: skip
        with engine.lock:
            base = engine.register(flat)
            try:
                resp = self._call("BulkGet", req)
                try:
                    found = self._read(engine, resp, keys, base, bb)
                    for i, b in enumerate(resp.blocks):
                        if b.found and _checksum(flat[i * bb : (i + 1) * bb]) != b.checksum:
                            raise DataLoss(f"block {i} read through the transfer engine "
                                           "does not match its checksum",
                                           field=f"blocks[{i}]")  # fmt: skip
                except BaseException:
                    if resp.lease_id:
                        self.client._release_quietly(resp.lease_id)
                    raise
            finally:
                engine.unregister(base)
        if resp.lease_id:
            # Not quiet: a lease that ended before it (expired, a restarted daemon) no
            # longer pinned the blocks, so what was read may be torn.
            self.client._unary("Release", pb.ReleaseRequest(lease_id=resp.lease_id))
        return found

    @staticmethod
    def _read(engine: _Engine, resp: Any, keys: list[bytes], base: int, bb: int) -> list[bool]:
        if len(resp.blocks) != len(keys):
            raise Internal(f"{len(resp.blocks)} blocks for {len(keys)} keys", field="blocks")
        reads = []
        for i, b in enumerate(resp.blocks):
            if b.found:
                if b.length != bb:
                    raise Internal(f"block {i} is {b.length} bytes, not {bb}", field="blocks")
                reads.append((base + i * bb, b.remote_address, bb))
        if reads and resp.engine.protocol != engine.protocol:
            raise _EngineFailed(f"the daemon's engine speaks {resp.engine.protocol}")
        if not engine.read(resp.engine.address, reads):
            raise _EngineFailed(f"reading {len(reads)} blocks from {resp.engine.address} failed")
        return [b.found for b in resp.blocks]

    def _put(self, ns: Namespace, keys: list[bytes], rows: BlockRows) -> list[PutOutcome]:
        engine, bb = self._engine, ns.block_bytes
        assert engine is not None, "usable() opened it"
        whole = rows.whole
        if whole is not None and whole.flags.c_contiguous:
            flat = whole.reshape(-1).view(np.uint8)
        else:  # separate or strided rows: one contiguous copy the daemon can read
            flat = np.empty(len(keys) * bb, dtype=np.uint8)
            for i, piece in enumerate(rows.byte_pieces()):
                part = np.frombuffer(piece, dtype=np.uint8)
                flat[i * bb : i * bb + len(part)] = part
        sums = [_checksum(flat[i * bb : (i + 1) * bb]) for i in range(len(keys))]
        with engine.lock:
            base = engine.register(flat)
            try:
                req = pb.BulkPutRequest(
                    namespace_id=ns.id, keys=keys, shape=rows.wire_shape(),
                    engine=pb.BulkEngine(address=engine.address, protocol=engine.protocol),
                    buffer_address=base, buffer_length=flat.nbytes, checksums=sums,
                )  # fmt: skip
                try:
                    resp = self._call("BulkPut", req)
                except Unavailable as e:
                    if e.field == "engine.address":  # the daemon could not reach our engine
                        raise _EngineFailed(e.message) from None
                    raise
            finally:
                engine.unregister(base)
        if len(resp.results) != len(keys):
            raise Internal(f"{len(resp.results)} results for {len(keys)} keys", field="results")
        try:
            return [_PUT_RESULT[r] for r in resp.results]  # type: ignore[misc]
        except KeyError:
            raise Internal("daemon sent an unspecified put result", field="results") from None

    def close(self) -> None:
        self._engine = None  # the engine stops with its last reference


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"the daemon's engine address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)
