"""BulkGet and BulkPut: remote clients' blocks through the transfer engine; translation
only (`tierd.core.bulk` decides).

Primitives: `BulkServicer` (a mixin of `TierdServicer`: it uses `self.svc`, `_ns`,
`_tier` and `shape_of`), `bulk_engine(service) -> pb.BulkEngine | None` (what
OpenNamespace announces).

Tenant checks are the in-band calls': the namespace must be the caller's, and the lease a
BulkGet opens is ended by the ordinary Release, which checks its owner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from tierd.core.bulk import Bulk, Source
from tierd.errors import FailedPrecondition
from tierd.server.status import translate_errors
from tierd_client._proto import tierd_pb2 as pb

if TYPE_CHECKING:
    from tierd.core.service import CacheService

_RESULTS = {"stored": pb.PUT_RESULT_STORED, "already_present": pb.PUT_RESULT_ALREADY_PRESENT}


def bulk_engine(service: CacheService) -> pb.BulkEngine | None:
    bulk = service.bulk
    if bulk is None:
        return None
    return pb.BulkEngine(address=bulk.engine.address, protocol=bulk.engine.protocol)


class BulkServicer:
    svc: CacheService
    if TYPE_CHECKING:  # TierdServicer's

        def _ns(self, ns_id: bytes, context: grpc.ServicerContext) -> None: ...

        def _tier(self, name: str) -> int: ...

        @staticmethod
        def shape_of(msg: pb.BlockShape, field: str) -> tuple[list[int], str]: ...

    def _bulk(self) -> Bulk:
        bulk = self.svc.bulk
        if bulk is None:
            raise FailedPrecondition("this daemon has no transfer engine for clients "
                                     "([peers] bulk); use Get and Put", field="engine")  # fmt: skip
        return bulk

    @translate_errors
    def BulkGet(self, request: pb.BulkGetRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        lent = self._bulk().lend(request.namespace_id, list(request.keys), request.lease_ttl_ms)
        return pb.BulkGetResponse(
            lease_id=lent.lease_id,
            engine=pb.BulkEngine(address=lent.engine_address, protocol=lent.protocol),
            blocks=[pb.BulkBlock(found=b.found, remote_address=b.address, length=b.length,
                                 checksum=b.checksum, tier=self._tier(b.tier), tier_name=b.tier)
                    for b in lent.blocks],
        )  # fmt: skip

    @translate_errors
    def BulkPut(self, request: pb.BulkPutRequest, context: grpc.ServicerContext):
        self._ns(request.namespace_id, context)
        dims, dtype = self.shape_of(request.shape, "shape")
        source = Source(request.engine.address, request.engine.protocol,
                        request.buffer_address, request.buffer_length)  # fmt: skip
        results = self._bulk().put(request.namespace_id, list(request.keys), dims, dtype,
                                   source, list(request.checksums))  # fmt: skip
        return pb.BulkPutResponse(results=[_RESULTS[r] for r in results])
