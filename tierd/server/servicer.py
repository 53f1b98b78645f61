"""The gRPC servicer: translates messages to core calls and results back. Nothing else.

Every method is wrapped by `translate_errors`, so a domain error becomes its status code.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import grpc

from tierd.core.service import CacheService, SegmentInfo
from tierd.core.stats import TierSnapshot
from tierd.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from tierd.server.auth import Authenticator
from tierd.server.bulk import BulkServicer, bulk_engine
from tierd.server.handoff import HandoffServer
from tierd.server.models import ModelsServicer
from tierd.server.status import translate_errors
from tierd_client._proto import tierd_pb2 as pb
from tierd_client._proto import tierd_pb2_grpc as pb_grpc
from tierd_client.layout import KVLayout, dtype_from_proto
from tierd_client.tensors import to_message, to_torch

# In-band gets stream blocks in chunks of at most this size (well under the message cap).
STREAM_CHUNK_BYTES = 4 << 20


@functools.cache
def _kind_enum(kind: str) -> int:
    """The wire enum of a tier kind, which older clients read (TIER_<KIND>); a kind the
    enum lacks is TIER_UNSPECIFIED, and the message's tier name still says which tier."""
    try:
        return int(pb.Tier.Value(f"TIER_{kind.upper()}"))
    except ValueError:
        return pb.TIER_UNSPECIFIED


def _shape(msg: pb.BlockShape, field: str) -> tuple[list[int], str]:
    if not msg.dims:
        raise InvalidArgument("the blocks' shape and dtype are required", field=field)
    try:
        dtype = dtype_from_proto(msg.dtype)
    except ValueError as e:
        raise InvalidArgument(str(e), field=f"{field}.dtype") from None
    return list(msg.dims), dtype


def _layout(msg: pb.KVLayout) -> KVLayout:
    try:
        return KVLayout.from_proto(msg)
    except ValueError as e:
        raise InvalidArgument(str(e), field="namespace.layout") from None


def _attend_calls(request: pb.AttendRequest) -> list:
    from tierd.attention.attend import AttendCall

    calls = []
    for i, item in enumerate(request.items):
        field = f"items[{i}]"
        has_kv = item.HasField("k_new") or item.HasField("v_new")
        calls.append(AttendCall(
            sequence_id=item.sequence_id,
            layer=item.layer,
            q=to_torch(item.q, f"{field}.q"),
            k_new=to_torch(item.k_new, f"{field}.k_new") if has_kv else None,
            v_new=to_torch(item.v_new, f"{field}.v_new") if has_kv else None,
            new_tokens=tuple(item.new_tokens),
            scale=item.scale or None,
        ))  # fmt: skip
    return calls


def _attend_response(results: list) -> pb.AttendResponse:
    return pb.AttendResponse(
        results=[pb.AttendResult(out=to_message(o), lse=to_message(lse)) for o, lse in results]
    )


def _tier_stats(t: TierSnapshot) -> pb.TierStats:
    c = t.counters
    return pb.TierStats(
        tier=_kind_enum(t.kind), tier_name=t.name, kind=t.kind,
        capacity_bytes=t.capacity_bytes, used_bytes=t.used_bytes, blocks=t.blocks,
        hits=c.hits, misses=c.misses, bytes_read=c.bytes_read, bytes_written=c.bytes_written,
        evictions=c.evictions, backend=t.backend, available=t.available,
    )  # fmt: skip


class TierdServicer(ModelsServicer, BulkServicer, pb_grpc.TierdServicer):
    shape_of = staticmethod(_shape)

    def __init__(self, service: CacheService) -> None:
        self.svc = service
        self.auth = Authenticator(service.config.tenants)
        self.handoff: HandoffServer | None = None  # set by the daemon when it has one

    def reload(self) -> None:
        self.auth = Authenticator(self.svc.config.tenants)

    def _tier(self, name: str) -> int:
        """The enum of a tier named by the core ("": not cached), from the tier's kind."""
        tier = self.svc.tiers.get(name) if name else None
        return _kind_enum(tier.kind) if tier is not None else pb.TIER_UNSPECIFIED

    def _move_target(self, request: pb.MoveRequest) -> str:
        """The tier a Move names: by name, or (older clients) the first of the enum's kind."""
        names = ", ".join(t.name for t in self.svc.tiers)
        if request.tier_name:
            if self.svc.tiers.get(request.tier_name) is None:
                raise InvalidArgument(f"no tier named {request.tier_name!r} (tiers: {names})",
                                      field="tier_name")  # fmt: skip
            return request.tier_name
        if request.tier != pb.TIER_UNSPECIFIED:
            for tier in self.svc.tiers:
                if _kind_enum(tier.kind) == request.tier:
                    return tier.name
        raise InvalidArgument(f"name one of the daemon's tiers: {names}", field="tier_name")

    def _segment(self, seg: SegmentInfo) -> pb.ShmSegment:
        if self.handoff is None:  # no unix listener: no shared memory to offer
            return pb.ShmSegment(host_id=seg.host_id)
        return pb.ShmSegment(
            size=seg.size, host_id=seg.host_id, handoff=str(self.handoff.path),
            staging_size=seg.staging_size,
            instance=self.handoff.instance_of(seg.staging_generation),
        )  # fmt: skip

    def authorize_shared_memory(self, tenant: str, token: str | None) -> str:
        """Which tenant's shared memory a handoff client may map (the RPCs' rules)."""
        if self.auth.open:
            if not tenant:
                raise InvalidArgument("name the tenant", field="tenant")
            if not self.svc.knows_tenant(tenant):  # no segment is made for a stranger
                raise NotFound("no namespace of this tenant; call OpenNamespace first",
                               field="tenant")  # fmt: skip
            return tenant
        owner = self.auth.tenant_of_token(token) if token else None
        if owner is None:
            raise Unauthenticated("a bearer token of a tenant is required for shared memory")
        if tenant and tenant != owner:
            raise PermissionDenied("credentials are for another tenant", field="tenant")
        return owner

    # Every call is checked against the caller's tenant before the core sees it; what
    # belongs to another tenant looks exactly like what does not exist.

    def _ns(self, ns_id: bytes, context: grpc.ServicerContext) -> None:
        self.svc.namespace(ns_id, self.auth.identify(context))

    def _lease(self, lease_id: int, context: grpc.ServicerContext) -> bool:
        principal = self.auth.identify(context)
        return principal is None or self.svc.lease_tenant(lease_id) in (principal, None)

    def _sequence(self, seq_id: int, context: grpc.ServicerContext, field: str) -> None:
        self.check_sequence_owner(self.auth.identify(context), seq_id, field)

    def check_sequence_owner(self, principal: str | None, seq_id: int, field: str) -> None:
        """The one tenant check of a sequence, shared with the attend rings (whose client
        proved `principal` at the handoff; None: an open daemon)."""
        owner = self.svc.attend.sequence_tenant(seq_id)
        if principal is not None and owner is not None and owner != principal:
            raise NotFound("no such sequence (closed or expired)", field=field)

    @translate_errors
    def OpenNamespace(self, request: pb.OpenNamespaceRequest, context: grpc.ServicerContext):
        n = request.namespace
        tenant, principal = n.tenant, self.auth.identify(context)
        if principal is not None:
            if tenant and tenant != principal:
                raise PermissionDenied("credentials are for another tenant",
                                       field="namespace.tenant")
            tenant = principal
        ns, seg = self.svc.open_namespace(tenant, n.model, _layout(n.layout), list(n.extra_keys),
                                          lossless=n.lossless, adapter=n.adapter)  # fmt: skip
        return pb.OpenNamespaceResponse(
            namespace_id=ns.id, block_bytes=ns.block_bytes, segment=self._segment(seg),
            bulk_engine=bulk_engine(self.svc),
        )  # fmt: skip

    @translate_errors
    def Lookup(self, request: pb.LookupRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        result = self.svc.lookup(request.namespace_id, request.tokens)
        return pb.LookupResponse(
            cached_tokens=result.cached_tokens,
            blocks=[
                pb.BlockLocation(key=k, tier=self._tier(t), tier_name=t) for k, t in result.blocks
            ],
            held_by=result.held_by, held_blocks=result.held_blocks,
        )

    @translate_errors
    def PreparePut(self, request: pb.PreparePutRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        dims, dtype = _shape(request.shape, "shape")
        prepared = self.svc.prepare_put(
            request.namespace_id, list(request.keys), dims, dtype, request.lease_ttl_ms
        )
        states = {"leased": pb.SLOT_STATE_LEASED, "already_present": pb.SLOT_STATE_ALREADY_PRESENT}
        return pb.PreparePutResponse(
            lease_id=prepared.lease_id,
            slots=[pb.PutSlot(state=states[s.state], offset=s.offset) for s in prepared.slots],
            segment=self._segment(prepared.segment),
        )

    @translate_errors
    def CommitPut(self, request: pb.CommitPutRequest, context: grpc.ServicerContext):
        if not self._lease(request.lease_id, context):
            raise FailedPrecondition(
                "no put lease with this id (expired, released or committed)", field="lease_id"
            )
        return pb.CommitPutResponse(stored=self.svc.commit_put(request.lease_id))

    @translate_errors
    def PrepareGet(self, request: pb.PrepareGetRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        prepared = self.svc.prepare_get(
            request.namespace_id, list(request.keys), request.lease_ttl_ms
        )
        return pb.PrepareGetResponse(
            lease_id=prepared.lease_id,
            slots=[pb.GetSlot(found=s.found, offset=s.offset, tier=self._tier(s.tier),
                              tier_name=s.tier) for s in prepared.slots],
            segment=self._segment(prepared.segment),
        )  # fmt: skip

    @translate_errors
    def Release(self, request: pb.ReleaseRequest, context: grpc.ServicerContext):
        if not (self._lease(request.lease_id, context) and self.svc.release(request.lease_id)):
            raise FailedPrecondition(
                "no open lease with this id: it expired or ended; bytes read under it may "
                "have been reused", field="lease_id",
            )
        return pb.ReleaseResponse()

    @translate_errors
    def Put(self, request_iterator: Iterator[pb.PutChunk], context: grpc.ServicerContext):
        self.auth.identify(context)  # from metadata, before a byte of the stream is read
        first = next(request_iterator, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("the first chunk must carry the header", field="header")
        header = first.header
        self._ns(header.namespace_id, context)
        dims, dtype = _shape(header.shape, "header.shape")
        writer = self.svc.begin_inband_put(header.namespace_id, list(header.keys), dims, dtype)
        try:
            writer.write(first.data)
            for chunk in request_iterator:
                if chunk.HasField("header"):
                    raise InvalidArgument("only the first chunk may carry a header",
                                          field="header")
                writer.write(chunk.data)
            results = writer.finish()
        except BaseException:
            writer.abort()
            raise
        codes = {"stored": pb.PUT_RESULT_STORED, "already_present": pb.PUT_RESULT_ALREADY_PRESENT}
        return pb.PutResponse(results=[codes[r] for r in results])

    @translate_errors
    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        # Held for the life of the stream (a slow reader must not see reused space).
        prepared = self.svc.prepare_get(request.namespace_id, list(request.keys), hold=True)
        try:
            ns = self.svc.namespace(request.namespace_id)
            yield pb.GetChunk(found=[s.found for s in prepared.slots], block_bytes=ns.block_bytes)
            for slot in prepared.slots:
                if not slot.found:
                    continue
                view = self.svc.view(ns, slot.offset)
                for start in range(0, len(view), STREAM_CHUNK_BYTES):
                    yield pb.GetChunk(data=bytes(view[start : start + STREAM_CHUNK_BYTES]))
        finally:
            self.svc.release(prepared.lease_id, inband=True)

    @translate_errors
    def Locate(self, request: pb.KeysRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        tiers = self.svc.locate(request.namespace_id, list(request.keys))
        return pb.LocateResponse(tiers=[self._tier(t) for t in tiers], tier_names=tiers)

    @translate_errors
    def Delete(self, request: pb.KeysRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        return pb.DeleteResponse(deleted=self.svc.delete(request.namespace_id, list(request.keys)))

    @translate_errors
    def Pin(self, request: pb.KeysRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        changed = self.svc.set_pinned(request.namespace_id, list(request.keys), True)
        return pb.PinResponse(changed=changed)

    @translate_errors
    def Unpin(self, request: pb.KeysRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        changed = self.svc.set_pinned(request.namespace_id, list(request.keys), False)
        return pb.PinResponse(changed=changed)

    @translate_errors
    def Stats(self, request: pb.StatsRequest, context: grpc.ServicerContext):
        principal = self.auth.identify(context)  # totals are daemon-wide; usage is per tenant
        s = self.svc.stats()
        peers = self.svc.peers.snapshot() if self.svc.peers is not None else []
        book = self.svc.peers.directory() if self.svc.peers is not None else None
        usage = [
            pb.TenantUsage(tenant=tenant, tier=self._tier(tier), tier_name=tier, used_bytes=n)
            for (tenant, tier), n in sorted(self.svc.usage_by_tenant().items())
            if principal is None or tenant == principal
        ]
        return pb.StatsResponse(
            tiers=[_tier_stats(t) for t in s.tiers], lookups=s.lookups, misses=s.misses,
            demotions=s.demotions, promotions=s.promotions, corrupt_reads=s.corrupt_reads,
            active_leases=s.active_leases, namespaces=s.namespaces, tenants=usage,
            active_sequences=s.active_sequences,
            peers=[pb.PeerStats(**dataclasses.asdict(p)) for p in peers],
            directory=pb.PrefixDirectoryStats(**dataclasses.asdict(book)) if book else None,
        )  # fmt: skip

    @translate_errors
    def OpenSequence(self, request: pb.OpenSequenceRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        seq_id, cached = self.svc.attend.open_sequence(
            request.namespace_id, list(request.keys), request.ttl_ms
        )
        return pb.OpenSequenceResponse(sequence_id=seq_id, cached_tokens=cached)

    @translate_errors
    def CloseSequence(self, request: pb.CloseSequenceRequest, context: grpc.ServicerContext):
        self._sequence(request.sequence_id, context, "sequence_id")
        self.svc.attend.close_sequence(request.sequence_id)
        return pb.CloseSequenceResponse()

    @translate_errors
    def Attend(self, request: pb.AttendRequest, context: grpc.ServicerContext):
        return _attend_response(self._attend(request, context))

    @translate_errors
    def AttendStream(self, request_iterator: Iterator[pb.AttendRequest], context):
        self.auth.identify(context)  # from metadata, before a byte of the stream is read
        for request in request_iterator:
            yield _attend_response(self._attend(request, context))

    def _attend(self, request: pb.AttendRequest, context: grpc.ServicerContext) -> list:
        for i, item in enumerate(request.items):
            self._sequence(item.sequence_id, context, f"items[{i}].sequence_id")
        return self.svc.attend.attend(_attend_calls(request))

    @translate_errors
    def Move(self, request: pb.MoveRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        target = self._move_target(request)
        moved = self.svc.move(request.namespace_id, list(request.keys), target)
        return pb.MoveResponse(moved=moved)
