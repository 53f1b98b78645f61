"""The model calls of the servicer (RegisterModel, ListModels, DropModel) and the weights
handoff: translation only; `tierd.weights.registry` decides.

Primitives: `ModelsServicer` (a mixin of `TierdServicer`: it uses `self.svc`, `self.auth`
and `self.handoff`), `model_info(view, tensors) -> pb.ModelInfo`.

The caller's tenant is what its credentials prove; an open daemon takes the tenant the
request names, as OpenNamespace does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from tierd.errors import InvalidArgument, PermissionDenied, Unauthenticated
from tierd.server.status import translate_errors
from tierd.weights.registry import ModelView
from tierd_client._proto import tierd_pb2 as pb
from tierd_client.hostinfo import host_id

if TYPE_CHECKING:
    from tierd.core.service import CacheService
    from tierd.server.auth import Authenticator
    from tierd.server.handoff import HandoffServer


def model_info(view: ModelView, tensors: bool) -> pb.ModelInfo:
    reg, m = view.registration, view.manifest
    info = pb.ModelInfo(
        name=reg.name, fingerprint=reg.fingerprint, size=m.size, layers=m.layers,
        tenant=reg.tenant, shared=reg.shared, dtype=m.dtype, source=reg.source,
        tensor_count=len(m.tensors),
    )  # fmt: skip
    if tensors:
        info.config_json = m.config_json
        info.tensors.extend(
            pb.ModelTensor(name=t.name, shape=t.shape, dtype=t.dtype, offset=t.offset,
                           nbytes=t.nbytes, layer=t.layer) for t in m.tensors
        )  # fmt: skip
    return info


class ModelsServicer:
    svc: CacheService
    auth: Authenticator
    handoff: HandoffServer | None

    def _model_tenant(self, named: str, context: grpc.ServicerContext) -> str:
        principal = self.auth.identify(context)
        if principal is None:
            if not named:
                raise InvalidArgument("name the tenant", field="tenant")
            return named
        if named and named != principal:
            raise PermissionDenied("credentials are for another tenant", field="tenant")
        return principal

    def weights_fd(self, tenant: str, token: str | None, model: str) -> tuple[int, int, str]:
        """The handoff's question: a read-only descriptor of `model`'s area for a client
        that proved `tenant` (the RPCs' rules), its size and fingerprint."""
        if not self.auth.open:
            owner = self.auth.tenant_of_token(token) if token else None
            if owner is None:
                raise Unauthenticated("a bearer token of a tenant is required for weights")
            if tenant and tenant != owner:
                raise PermissionDenied("credentials are for another tenant", field="tenant")
            tenant = owner
        elif not tenant:
            raise InvalidArgument("name the tenant", field="tenant")
        return self.svc.weights.fd_for(tenant, model)

    @translate_errors
    def RegisterModel(self, request: pb.RegisterModelRequest, context: grpc.ServicerContext):
        tenant = self._model_tenant(request.tenant, context)
        view, created = self.svc.weights.register(
            tenant, request.path, request.dtype, request.name, request.shared
        )
        return pb.RegisterModelResponse(model=model_info(view, False), created=created)

    @translate_errors
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext):
        tenant = self._model_tenant(request.tenant, context)
        views = self.svc.weights.list(tenant, request.model)
        segment = pb.ShmSegment(host_id=host_id())
        if self.handoff is not None:
            segment.handoff = str(self.handoff.path)
        return pb.ListModelsResponse(models=[model_info(v, request.tensors) for v in views],
                                     segment=segment)  # fmt: skip

    @translate_errors
    def DropModel(self, request: pb.DropModelRequest, context: grpc.ServicerContext):
        self.svc.weights.drop(self._model_tenant(request.tenant, context), request.model)
        return pb.DropModelResponse()
