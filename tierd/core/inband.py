"""In-band puts: bytes that arrive in gRPC chunks, routed into the lease's staging slots.

Every chunk is fenced by the lease (`CacheService.write_staging`): once the lease expired
or was released, the stream fails instead of writing into slots handed to another put."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tierd.core.index import NamespaceInfo
from tierd.core.results import PreparedPut
from tierd.errors import InvalidArgument

if TYPE_CHECKING:
    from tierd.core.service import CacheService


class InbandPut:
    """Routes a stream of bytes (blocks in key order) into the leased host slots."""

    def __init__(self, svc: CacheService, ns: NamespaceInfo, prepared: PreparedPut) -> None:
        self._svc, self._ns, self._prepared = svc, ns, prepared
        self._expected = len(prepared.slots) * ns.block_bytes
        self._filled = 0

    def write(self, chunk: bytes) -> None:
        view, bb = memoryview(chunk), self._ns.block_bytes
        if self._filled + len(view) > self._expected:
            raise InvalidArgument(
                f"more data than {len(self._prepared.slots)} blocks of {bb} bytes", field="data"
            )
        while view:
            index, within = divmod(self._filled, bb)
            n = min(len(view), bb - within)
            slot = self._prepared.slots[index]
            if slot.state == "leased":
                self._svc.write_staging(self._prepared.lease_id, slot.offset + within, view[:n])
            view = view[n:]
            self._filled += n

    def finish(self) -> list[str]:
        if self._filled != self._expected:
            raise InvalidArgument(
                f"expected {self._expected} bytes ({len(self._prepared.slots)} blocks of "
                f"{self._ns.block_bytes}), got {self._filled}", field="data",
            )
        if self._prepared.lease_id:
            self._svc.commit_put(self._prepared.lease_id, inband=True)
        return ["already_present" if s.state == "already_present" else "stored"
                for s in self._prepared.slots]  # fmt: skip

    def abort(self) -> None:
        self._svc.release(self._prepared.lease_id, inband=True)
