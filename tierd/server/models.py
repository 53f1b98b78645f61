"""The model calls of the servicer (RegisterModel, ListModels, DropModel) and the weights
handoff: translation only; `tierd.weights.registry` decides.

Primitives: `ModelsServicer` (a mixin of `TierdServicer`: it uses `self.svc`, `self.auth`
and `self.handoff`), `model_info(view, tensors, dependents=0) -> pb.ModelInfo`.

LoRA adapters are models with `base_model` set (`tierd.weights.adapters`); their info
carries the base's fingerprint, rank, alpha, target modules and the KV blocks that depend
on them now (`tierd.core.adapters`).

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


def model_info(view: ModelView, tensors: bool, dependents: int = 0) -> pb.ModelInfo:
    reg, m = view.registration, view.manifest
    info = pb.ModelInfo(
        name=reg.name, fingerprint=reg.fingerprint, size=m.size, layers=m.layers,
        tenant=reg.tenant, shared=reg.shared, dtype=m.dtype, source=reg.source,
        tensor_count=len(m.tensors),
    )  # fmt: skip
    a = m.adapter
    if a is not None:
        info.adapter.CopyFrom(pb.AdapterInfo(
            base_model=a.base, rank=a.rank, alpha=a.alpha, target_modules=a.target_modules,
            dependent_blocks=dependents,
        ))  # fmt: skip
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
            tenant, request.path, request.dtype, request.name, request.shared, request.base_model
        )
        return pb.RegisterModelResponse(model=model_info(view, False), created=created)

    @translate_errors
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext):
        tenant = self._model_tenant(request.tenant, context)
        views = self.svc.weights.list(tenant, request.model)
        segment = pb.ShmSegment(host_id=host_id())
        if self.handoff is not None:
            segment.handoff = str(self.handoff.path)
        counts = self.svc.adapters.count(tenant) if any(v.manifest.adapter for v in views) else {}
        infos = [model_info(v, request.tensors, counts.get(v.registration.fingerprint, 0))
                 for v in views]  # fmt: skip
        return pb.ListModelsResponse(models=infos, segment=segment)

    @translate_errors
    def DropModel(self, request: pb.DropModelRequest, context: grpc.ServicerContext):
        self.svc.weights.drop(self._model_tenant(request.tenant, context), request.model)
        return pb.DropModelResponse()
