"""TierdClient: the thin client an inference worker uses to store and load KV blocks.

Primitives: `open_namespace`, `block_keys`, `lookup`, `put`, `get`, `delete`, `pin`,
`unpin`, `stats`, `close` (also a context manager).

Bulk bytes go through the tenant's shared-memory segment when the daemon is on this host
and the segment can be mapped (put: PreparePut -> copy into leased slots -> CommitPut;
get: PrepareGet -> copy out -> Release), otherwise in-band as gRPC streams. Either way
each byte is copied once between the caller's buffer and the daemon's memory. A client
on another host moves blocks through a transfer engine instead of gRPC payloads when
both ends have one (`bulk`, `tierd_client.bulk`).

`attend` and `attend_stream` go over a shared-memory ring when the daemon is on this host
(`tierd_client.fastpath`), else over gRPC.

Calls that can be repeated safely are retried on UNAVAILABLE with jittered exponential
backoff; a put or get via shared memory is retried as a whole sequence, because a daemon
that restarted has forgotten the lease. The first call of a client waits for the channel
to become ready (up to `timeout`), so a worker started just before its daemon works.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self, TypeVar

import grpc
import numpy as np

from . import keys as _keys
from ._proto import tierd_pb2 as pb
from ._proto import tierd_pb2_grpc as pb_grpc
from .address import parse_address
from .arrays import BlockRows, block_rows, byte_rows, out_buffer
from .attend import AttendItem, AttendOutput, AttendStream, outputs_of, request_of
from .bulk import BulkPath
from .chunks import GetAssembler, put_chunks
from .errors import FailedPrecondition, Internal, InvalidArgument, TierdError
from .fastpath import FastAttend
from .hostinfo import host_id
from .layout import KVLayout
from .models import ModelsMixin
from .results import (
    CachedBlock,
    GetResult,
    LookupResult,
    Namespace,
    PutOutcome,
    SegmentInfo,
    Transport,
    tier_kind,
    tier_name,
)
from .rpc import call_with_retries, error_from_rpc
from .shm import SegmentMaps, slot_view

T = TypeVar("T")

MAX_MESSAGE_BYTES = 64 << 20
_RECONNECT_MIN_MS = 100
_RECONNECT_MAX_MS = 2000
_TRANSPORTS = ("auto", "shm", "inband")
_PUT_RESULT = {pb.PUT_RESULT_STORED: "stored", pb.PUT_RESULT_ALREADY_PRESENT: "already_present"}


def _check_keys(keys: Iterable[bytes]) -> list[bytes]:
    out = []
    for i, k in enumerate(keys):
        if not isinstance(k, (bytes, bytearray, memoryview)) or len(k) != _keys.KEY_BYTES:
            raise InvalidArgument(f"a block key is {_keys.KEY_BYTES} bytes", field=f"keys[{i}]")
        out.append(bytes(k))
    return out


def _tier_stats(t: pb.TierStats) -> dict[str, Any]:
    out = {f.name: getattr(t, f.name) for f in t.DESCRIPTOR.fields
           if f.name not in ("tier", "tier_name")}  # fmt: skip
    out["kind"] = t.kind or tier_kind(t.tier)  # older daemons: the enum is the kind
    out["available"] = t.available if t.HasField("available") else True
    return out


def _kind_value(name: str) -> str:
    """The enum of a tier named after its kind, which is all an older daemon reads."""
    value = f"TIER_{name.upper()}"
    return value if value in pb.Tier.DESCRIPTOR.values_by_name else "TIER_UNSPECIFIED"


class TierdClient(ModelsMixin):
    """One connection to a tierd daemon; safe to share between threads.

        with TierdClient("unix:/run/tierd/tierd.sock", tenant="team-a") as c:
            ns = c.open_namespace("llama-3-8b@abc123", KVLayout(32, 8, 128, "bfloat16", 16))
            keys = c.block_keys(ns, tokens)
            hit = c.lookup(ns, tokens)              # longest cached prefix
            c.put(ns, keys[hit.cached_tokens // 16 :], new_blocks)
            got = c.get(ns, keys, as_torch=True)    # got.found, got.blocks

    `transport`: "auto" (shared memory when the daemon is on this host and its segment can
    be mapped, else in-band), "shm" (fail if impossible) or "inband". `timeout` is the
    deadline of each RPC; `max_retries` bounds the retries after UNAVAILABLE;
    `lease_ttl_ms` is how long a shared-memory lease may stay open (0: the daemon's
    default). `credentials` secures a TCP channel; `token` is the tenant's bearer token.
    `fast_attend`: attend over a shared-memory ring when the daemon is on this host (the
    first attend opens it; gRPC whenever it cannot be used); False: always gRPC.
    `bulk`: how blocks travel without shared memory: "auto" (through a Mooncake transfer
    engine when the daemon announces one and the `mooncake` extra is installed, else
    in-band gRPC), "engine" (fail if impossible) or "inband"; `bulk_hostname`: where the
    daemon reaches this client's engine (default: this host's address toward the daemon).
    """

    def __init__(
        self,
        address: str,
        *,
        tenant: str = "default",
        transport: str = "auto",
        timeout: float = 30.0,
        max_retries: int = 5,
        lease_ttl_ms: int = 0,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        fast_attend: bool = True,
        bulk: str = "auto",
        bulk_hostname: str | None = None,
    ) -> None:
        if transport not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {_TRANSPORTS}, got {transport!r}")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not 0 <= lease_ttl_ms <= 2**32 - 1:
            raise ValueError("lease_ttl_ms must fit in uint32 (0: the daemon's default)")
        self.address = parse_address(address)
        self.tenant = tenant
        self.transport = transport
        self._timeout = timeout
        self._max_retries = max_retries
        self._lease_ttl_ms = lease_ttl_ms
        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            # grpc's own reconnect backoff (1 s growing to 120 s) would outlast our retries
            # after a daemon restart: calls fail fast while the channel waits to redial.
            ("grpc.initial_reconnect_backoff_ms", _RECONNECT_MIN_MS),
            ("grpc.min_reconnect_backoff_ms", _RECONNECT_MIN_MS),
            ("grpc.max_reconnect_backoff_ms", _RECONNECT_MAX_MS),
        ]
        target = self.address.target
        self._channel = (
            grpc.secure_channel(target, credentials, options)
            if credentials is not None
            else grpc.insecure_channel(target, options)
        )
        self._stub = pb_grpc.TierdStub(self._channel)
        self._segments = SegmentMaps(tenant, token)
        self._ready = False  # until a call succeeds, calls wait for the channel
        self._rng = random.Random()
        # A tenant's bearer token travels with every call (daemons with tenants configured).
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        # Where the daemon hands out shared memory: what a namespace on this host named,
        # else beside a unix socket (the handoff authenticates whoever connects).
        self._handoff: str | None = None
        self._fast = FastAttend(self._ring_handoff, tenant, token) if fast_attend else None
        self._bulk = BulkPath(self, bulk, bulk_hostname)

    # ---- plumbing -------------------------------------------------------------------

    def _invoke(self, call: Callable[..., T], request: Any) -> T:
        try:
            resp = call(request, timeout=self._timeout, wait_for_ready=not self._ready,
                        metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e
        self._ready = True
        return resp

    def _segment_map(self, resp: Any, ns: Namespace) -> Any:
        # Every Prepare response should name the segment; fall back to the one from open.
        segment = resp.segment if resp.segment.handoff else ns.segment
        if segment is None:
            raise Internal("daemon leased a slot but named no segment", field="segment")
        return self._segments.map(segment)

    def _unary(self, method: str, request: Any) -> Any:
        return self._invoke(getattr(self._stub, method), request)

    def _retrying(self, fn: Callable[[], T]) -> T:
        return call_with_retries(fn, max_retries=self._max_retries, rng=self._rng)

    def _release_quietly(self, lease_id: int) -> None:
        # Only on a path that is already failing: the original error matters more, and a
        # lease nobody releases still expires.
        try:
            self._unary("Release", pb.ReleaseRequest(lease_id=lease_id))
        except TierdError:
            pass

    # ---- namespaces and keys ----------------------------------------------------------

    def open_namespace(
        self, model: str, layout: KVLayout, *, extra_keys: Iterable[str] = (),
        lossless: bool = False, adapter: str = "",
    ) -> Namespace:  # fmt: skip
        """`lossless`: the namespace's blocks are kept exact (tiers with a lossy codec
        store them raw); a namespace of its own, apart from the one without it.
        `adapter`: the LoRA adapter (held by the daemon, see `register_adapter`) the KV is
        computed through; a namespace of its own per adapter. Once the adapter is dropped
        or evicted, calls on the namespace fail with FailedPrecondition (its KV is gone)."""
        if isinstance(extra_keys, str):
            raise TypeError("extra_keys is a sequence of strings, not one string")
        req = pb.OpenNamespaceRequest(
            namespace=pb.Namespace(
                tenant=self.tenant,
                model=model,
                layout=layout.to_proto(),
                extra_keys=list(extra_keys),
                lossless=lossless,
                adapter=adapter,
            )
        )
        # The handoff is retried with the call: a daemon that replaced its staging area (or
        # restarted) between its answer and the handoff answers again with the new one.
        return self._retrying(lambda: self._opened(model, layout,
                                                   self._unary("OpenNamespace", req)))  # fmt: skip

    def _opened(self, model: str, layout: KVLayout, resp: Any) -> Namespace:
        if len(resp.namespace_id) != _keys.KEY_BYTES:
            raise Internal("daemon sent a malformed namespace id", field="namespace_id")
        if resp.block_bytes != layout.block_bytes:
            raise Internal(
                f"daemon says blocks are {resp.block_bytes} bytes, the layout {layout.block_bytes}",
                field="block_bytes",
            )
        seg = resp.segment
        segment = (SegmentInfo(seg.handoff, seg.size, seg.host_id, seg.staging_size, seg.instance)
                   if seg.handoff else None)  # fmt: skip
        if segment is not None and segment.host_id == host_id():
            self._handoff = segment.handoff
        return Namespace(
            id=resp.namespace_id,
            tenant=self.tenant,
            model=model,
            layout=layout,
            block_bytes=resp.block_bytes,
            segment=segment,
            transport=self._choose_transport(segment, resp.bulk_engine
                                             if resp.HasField("bulk_engine") else None),
        )  # fmt: skip

    def _choose_transport(self, segment: SegmentInfo | None, engine: Any = None) -> Transport:
        reason: str | None = "transport='inband'"
        if self.transport != "inband":
            reason = self._segments.unusable(segment)  # maps the segment when it can
            if reason is None:
                return "shm"
            if self.transport == "shm":
                raise FailedPrecondition(f"shared memory is impossible: {reason}",
                                         field="transport")  # fmt: skip
        why_not = self._bulk.usable(engine)  # opens this client's engine when it can
        if why_not is None:
            return "engine"
        if self._bulk.mode == "engine":
            raise FailedPrecondition(f"no transfer engine path: {why_not}", field="bulk")
        return "inband"

    def block_keys(self, ns: Namespace, tokens: Sequence[int] | np.ndarray) -> list[bytes]:
        """Keys of the full blocks of `tokens`, exactly as the daemon computes them."""
        return _keys.block_keys(ns.id, tokens, ns.layout.block_tokens)

    def lookup(self, ns: Namespace, tokens: Sequence[int] | np.ndarray) -> LookupResult:
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.ndim != 1:
            raise InvalidArgument("tokens must be one-dimensional", field="tokens")
        req = pb.LookupRequest(namespace_id=ns.id, tokens=arr.tolist())
        resp = self._retrying(lambda: self._unary("Lookup", req))
        return LookupResult(
            cached_tokens=resp.cached_tokens,
            blocks=[CachedBlock(b.key, tier_name(b.tier_name, b.tier)) for b in resp.blocks],
            held_by=resp.held_by, held_blocks=resp.held_blocks,
        )

    # ---- put ---------------------------------------------------------------------------

    def put(self, ns: Namespace, keys: Iterable[bytes], blocks: Any) -> list[PutOutcome]:
        """Store blocks under keys; per key "stored" or "already_present".

        `blocks`: [n, *block_shape] array/tensor, or n arrays/tensors of block_shape, in
        the layout's dtype (numpy: uint16 / uint8 raw bits for bfloat16 / float8_e4m3).
        """
        key_list = _check_keys(keys)
        rows = block_rows(blocks, ns.layout, len(key_list))
        if not key_list:
            return []
        if ns.transport == "shm":
            return self._retrying(lambda: self._put_shm(ns, key_list, rows))
        if ns.transport == "engine":
            return self._retrying(lambda: self._bulk.put(ns, key_list, rows))
        return self._retrying(lambda: self._put_inband(ns, key_list, rows))

    def _put_shm(self, ns: Namespace, keys: list[bytes], rows: BlockRows) -> list[PutOutcome]:
        req = pb.PreparePutRequest(
            namespace_id=ns.id,
            keys=keys,
            shape=rows.wire_shape(),
            lease_ttl_ms=self._lease_ttl_ms,
        )
        resp = self._unary("PreparePut", req)
        outcomes: list[PutOutcome] = []
        try:
            if len(resp.slots) != len(keys):
                raise Internal(f"{len(resp.slots)} slots for {len(keys)} keys", field="slots")
            mm = None
            for i, slot in enumerate(resp.slots):
                if slot.state == pb.SLOT_STATE_ALREADY_PRESENT:
                    outcomes.append("already_present")
                    continue
                if slot.state != pb.SLOT_STATE_LEASED or not resp.lease_id:
                    raise Internal(
                        f"slot {i}: state {slot.state} lease {resp.lease_id}", field="slots"
                    )
                if mm is None:
                    mm = self._segment_map(resp, ns).staging
                np.copyto(slot_view(mm, slot.offset, ns.layout), rows.row(i))
                outcomes.append("stored")
        except BaseException:
            if resp.lease_id:
                self._release_quietly(resp.lease_id)  # aborts the uncommitted put
            raise
        if resp.lease_id:
            self._unary("CommitPut", pb.CommitPutRequest(lease_id=resp.lease_id))
        return outcomes

    def _put_inband(self, ns: Namespace, keys: list[bytes], rows: BlockRows) -> list[PutOutcome]:
        header = pb.PutHeader(namespace_id=ns.id, keys=keys, shape=rows.wire_shape())
        resp = self._invoke(self._stub.Put, put_chunks(header, rows.byte_pieces()))
        if len(resp.results) != len(keys):
            raise Internal(f"{len(resp.results)} results for {len(keys)} keys", field="results")
        try:
            return [_PUT_RESULT[r] for r in resp.results]  # type: ignore[misc]
        except KeyError:
            raise Internal("daemon sent an unspecified put result", field="results") from None

    # ---- get ---------------------------------------------------------------------------

    def get(
        self, ns: Namespace, keys: Iterable[bytes], *, out: Any = None, as_torch: bool = False
    ) -> GetResult:
        """Load blocks; `found[i]` says whether key i was there.

        `blocks` is `out` when given (C-contiguous, [n, *block_shape], the layout's dtype),
        else a fresh zeroed numpy array (a torch tensor with `as_torch`). Rows of missing
        keys are left untouched. If a transient failure forces a retry, rows found by the
        failed attempt may already have been written.
        """
        key_list = _check_keys(keys)
        buf = out_buffer(ns.layout, len(key_list), out=out, as_torch=as_torch)
        if not key_list:
            return GetResult([], buf.result)
        fetch = {"shm": self._get_shm, "engine": self._bulk.get}.get(ns.transport,
                                                                     self._get_inband)  # fmt: skip
        found = self._retrying(lambda: fetch(ns, key_list, buf.view))
        buf.finish(found)
        return GetResult(found, buf.result)

    def _get_shm(self, ns: Namespace, keys: list[bytes], view: np.ndarray) -> list[bool]:
        req = pb.PrepareGetRequest(namespace_id=ns.id, keys=keys, lease_ttl_ms=self._lease_ttl_ms)
        resp = self._unary("PrepareGet", req)
        try:
            if len(resp.slots) != len(keys):
                raise Internal(f"{len(resp.slots)} slots for {len(keys)} keys", field="slots")
            mm = None
            for i, slot in enumerate(resp.slots):
                if slot.found:
                    if mm is None:
                        mm = self._segment_map(resp, ns).store
                    np.copyto(view[i], slot_view(mm, slot.offset, ns.layout))
        except BaseException:
            if resp.lease_id:
                self._release_quietly(resp.lease_id)
            raise
        if resp.lease_id:
            # Not quiet: a lease that ended before this release (expired, or a restarted
            # daemon) no longer protected the slots, so the bytes copied may be torn.
            self._unary("Release", pb.ReleaseRequest(lease_id=resp.lease_id))
        return [s.found for s in resp.slots]

    def _get_inband(self, ns: Namespace, keys: list[bytes], view: np.ndarray) -> list[bool]:
        asm = GetAssembler(byte_rows(view, ns.layout), ns.block_bytes)
        req = pb.GetRequest(namespace_id=ns.id, keys=keys)
        # A server stream reports failures while it is read, so no _invoke here.
        stream = self._stub.Get(req, timeout=self._timeout, wait_for_ready=not self._ready,
                                metadata=self._metadata)
        try:
            for chunk in stream:
                asm.feed(chunk)
        except grpc.RpcError as e:
            raise error_from_rpc(e) from e
        except BaseException:
            stream.cancel()
            raise
        self._ready = True
        return asm.finish()

    # ---- management ----------------------------------------------------------------------

    def _keys_call(self, method: str, ns: Namespace, keys: Iterable[bytes]) -> Any:
        req = pb.KeysRequest(namespace_id=ns.id, keys=_check_keys(keys))
        return self._retrying(lambda: self._unary(method, req))

    def locate(self, ns: Namespace, keys: Iterable[bytes]) -> list[str | None]:
        """The name of the tier holding each key ("host", "nvme", ...), None where not cached."""
        resp = self._keys_call("Locate", ns, keys)
        names = list(resp.tier_names) or [""] * len(resp.tiers)  # older daemons send no names
        return [tier_name(n, t) if n or t else None for n, t in zip(names, resp.tiers)]

    def delete(self, ns: Namespace, keys: Iterable[bytes]) -> int:
        """Delete blocks; returns how many existed."""
        return int(self._keys_call("Delete", ns, keys).deleted)

    def pin(self, ns: Namespace, keys: Iterable[bytes]) -> int:
        """Keep blocks from eviction; returns how many changed state."""
        return int(self._keys_call("Pin", ns, keys).changed)

    def unpin(self, ns: Namespace, keys: Iterable[bytes]) -> int:
        return int(self._keys_call("Unpin", ns, keys).changed)

    def stats(self) -> dict[str, Any]:
        """Daemon counters as a plain dict; `"tiers"` maps each configured tier's name, in
        chain order, to its counters, kind and availability."""
        resp = self._retrying(lambda: self._unary("Stats", pb.StatsRequest()))
        out: dict[str, Any] = {}
        for f in resp.DESCRIPTOR.fields:
            if f.name not in ("tiers", "tenants", "peers", "directory"):
                out[f.name] = getattr(resp, f.name)
        out["tenants"] = [
            {"tenant": u.tenant, "tier": tier_name(u.tier_name, u.tier), "used_bytes": u.used_bytes}
            for u in resp.tenants
        ]
        out["tiers"] = {tier_name(t.tier_name, t.tier): _tier_stats(t) for t in resp.tiers}
        out["peers"] = {p.address: {f.name: getattr(p, f.name) for f in p.DESCRIPTOR.fields
                                    if f.name != "address"} for p in resp.peers}  # fmt: skip
        # The prefix directory's counters (None: the daemon keeps none).
        out["directory"] = ({f.name: getattr(resp.directory, f.name)
                             for f in resp.directory.DESCRIPTOR.fields}
                            if resp.HasField("directory") else None)  # fmt: skip
        return out

    # ---- attend ----------------------------------------------------------------------

    def open_sequence(self, ns: Namespace, keys: Iterable[bytes], *, ttl_ms: int = 0) -> int:
        """Start a sequence over cached blocks (in prefix order); returns its id."""
        req = pb.OpenSequenceRequest(namespace_id=ns.id, keys=_check_keys(keys), ttl_ms=ttl_ms)
        return int(self._unary("OpenSequence", req).sequence_id)

    def close_sequence(self, sequence_id: int) -> None:
        self._unary("CloseSequence", pb.CloseSequenceRequest(sequence_id=sequence_id))

    def attend(self, items: Sequence[AttendItem], *, as_torch: bool = True) -> list[AttendOutput]:
        """Decode attention inside tierd: one output per item, computed next to the KV."""
        if self._fast is not None:
            outs = self._fast.attend(items, as_torch, self._timeout)
            if outs is not None:
                return outs
        return outputs_of(self._unary("Attend", request_of(items)), as_torch)

    def attend_stream(self, *, as_torch: bool = True) -> AttendStream:
        """A bidirectional Attend call for a decode loop (one request/response per send)."""
        return AttendStream(self._stub, None, as_torch, self._metadata, self._fast)

    @property
    def fast_attend_calls(self) -> int:
        """Attend calls this client sent over a shared-memory ring (the rest went by gRPC)."""
        return self._fast.served if self._fast is not None else 0

    def _ring_handoff(self) -> str | None:
        if self._handoff is not None:
            return self._handoff
        return self.address.unix_path + ".shm" if self.address.unix_path else None

    def move(self, ns: Namespace, keys: Iterable[bytes], tier: str) -> int:
        """Place blocks in the tier of this configured name; returns how many are there now.
        A name the daemon lacks is InvalidArgument naming its tiers."""
        if not tier:
            raise InvalidArgument("name a tier", field="tier")
        req = pb.MoveRequest(namespace_id=ns.id, keys=_check_keys(keys), tier_name=tier,
                             tier=_kind_value(tier))  # fmt: skip
        return int(self._unary("Move", req).moved)

    # ---- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()
        self._segments.close()
        if self._fast is not None:
            self._fast.close()
        self._bulk.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"TierdClient({self.address.target!r}, tenant={self.tenant!r}, "
            f"transport={self.transport!r})"
        )
