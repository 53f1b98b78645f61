"""Models held in tierd: register them, list them, and map their weights into this process.

Primitives: `ModelsMixin` (the `TierdClient` methods `register_model`, `list_models`,
`model_info`, `drop_model`, `load_weights`, `register_adapter`, `load_adapter`),
`ModelInfo`, `ModelTensor`, `AdapterInfo`, `Weights`, `receive_weights_fd(handoff, tenant,
token, model, timeout)`.

A LoRA adapter is held like a model (registered from a PEFT directory against a model the
tenant sees, listed, shared, dropped); `load_adapter` maps its matrices as `load_weights`
maps a model's, and `tierd_client.hf_lora.apply_adapter` applies them to a model built on
the base's weights. A KV namespace opened with `adapter=` depends on it: see
`TierdClient.open_namespace`.

`load_weights` asks the daemon for the model's manifest, receives its weights area over
the handoff socket (one read-only descriptor, the same mechanism as the KV segment), maps
it MAP_SHARED and PROT_READ, and returns one tensor per name, each a view of the mapping
(`torch.frombuffer`): no byte is copied, and every process that maps the same model
shares its pages. The tensors are read-only in the hardware's sense: an in-place write
to one kills the process with SIGSEGV, so use them for inference only. The mapping lives
as long as any of its tensors does; the daemon may drop the model meanwhile without
harm to them.
"""

from __future__ import annotations

import mmap
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ._proto import tierd_pb2 as pb
from .errors import FailedPrecondition, Internal
from .hostinfo import host_id
from .shm import exchange

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

REGISTER_TIMEOUT_S = 600.0  # the daemon reads and converts the whole model in this call


@dataclass(frozen=True)
class ModelTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name: bfloat16, float32, int64, ...
    offset: int
    nbytes: int
    layer: int  # N of `model.layers.N.`; -1 outside the decoder layers


@dataclass(frozen=True)
class AdapterInfo:
    base_model: str  # the fingerprint of the model it adapts
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    dependent_blocks: int  # KV blocks of the caller's namespaces naming it, when listed


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str  # content hash: use it as the KV namespace's model id
    size: int
    layers: int
    tenant: str
    shared: bool
    dtype: str
    source: str
    tensor_count: int
    tensors: tuple[ModelTensor, ...] = ()  # with `model_info(..., tensors=True)`
    config_json: str = ""  # an adapter's: its adapter_config.json
    adapter: AdapterInfo | None = None  # set for a LoRA adapter

    @classmethod
    def from_proto(cls, m: Any) -> ModelInfo:
        tensors = tuple(ModelTensor(t.name, tuple(t.shape), t.dtype, t.offset, t.nbytes,
                                    t.layer) for t in m.tensors)  # fmt: skip
        a = m.adapter if m.HasField("adapter") else None
        adapter = None if a is None else AdapterInfo(
            a.base_model, a.rank, a.alpha, tuple(a.target_modules), a.dependent_blocks)  # fmt: skip
        return cls(m.name, m.fingerprint, m.size, m.layers, m.tenant, m.shared, m.dtype,
                   m.source, m.tensor_count, tensors, m.config_json, adapter)  # fmt: skip

    def layer_groups(self) -> dict[int, list[str]]:
        """Tensor names per decoder layer (-1: the rest), in the area's order."""
        out: dict[int, list[str]] = {}
        for t in self.tensors:
            out.setdefault(t.layer, []).append(t.name)
        return out


class Weights(dict):
    """name -> tensor over the mapped weights area; `info` is the model, `address` and
    `size` the mapping's."""

    info: ModelInfo
    address: int
    size: int


def receive_weights_fd(handoff: str, tenant: str, token: str | None, model: str,
                       timeout: float) -> tuple[int, int, str]:  # fmt: skip
    """Ask the daemon at `handoff` for `model`'s area: (descriptor, size, fingerprint);
    the caller owns the descriptor."""

    def parse(reply: dict[str, Any], fds: list[int]) -> tuple[int, int, str]:
        if reply.get("kind") != "weights" or len(fds) != 1:
            raise FailedPrecondition("the daemon does not hand over weights (older daemon?)",
                                     field="model")  # fmt: skip
        return fds[0], int(reply["size"]), str(reply["fingerprint"])

    request = {"tenant": tenant, "token": token, "kind": "weights", "model": model}
    handed, _ = exchange(handoff, request, max_fds=1, timeout=timeout, what="weights",
                         field="model", parse=parse)  # fmt: skip
    return handed


def _tensor(mm: mmap.mmap, t: ModelTensor, size: int) -> torch.Tensor:
    import torch

    dtype = getattr(torch, t.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise Internal(f"tensor {t.name!r} has an unknown dtype {t.dtype!r}", field="tensors")
    count = 1
    for d in t.shape:
        count *= d
    if count * dtype.itemsize != t.nbytes or t.offset + t.nbytes > size:
        raise Internal(f"tensor {t.name!r} does not fit its place in the area", field="tensors")
    if count == 0:
        return torch.empty(t.shape, dtype=dtype)
    return torch.frombuffer(mm, dtype=dtype, count=count, offset=t.offset).view(t.shape)


class ModelsMixin:
    """The model calls of `TierdClient` (it provides these attributes)."""

    tenant: str
    _timeout: float
    _ready: bool
    _stub: Any
    _metadata: Any
    _unary: Callable[[str, Any], Any]
    _retrying: Callable[[Callable[[], Any]], Any]

    @property
    def _bearer(self) -> str | None:
        """The tenant's token, as every call carries it (the handoff asks for it too)."""
        md = self._metadata
        return str(md[0][1]).removeprefix("Bearer ") if md else None

    def register_model(self, path: str, *, dtype: str = "", name: str = "",
                       shared: bool = False, timeout: float | None = None) -> ModelInfo:  # fmt: skip
        """Have the daemon read the model at `path` (a safetensors directory or file, or a
        GGUF file, on the daemon's host) once and hold it; idempotent for the same content.
        `dtype`: bfloat16 | float16 | float32 ("": the file's float dtype, GGUF bfloat16).
        `shared`: every tenant may list and load it."""
        return self._register(pb.RegisterModelRequest(
            path=str(path), dtype=dtype, name=name, shared=shared, tenant=self.tenant), timeout)  # fmt: skip

    def register_adapter(self, path: str, base_model: str, *, dtype: str = "", name: str = "",
                         shared: bool = False, timeout: float | None = None) -> ModelInfo:  # fmt: skip
        """Have the daemon hold the LoRA adapter in the PEFT directory `path`
        (adapter_config.json and adapter_model.safetensors, on the daemon's host) for
        `base_model` (a model this tenant sees, by name or fingerprint), checked against it.
        Evicted only when room is needed and no KV of it is hot (see `open_namespace`)."""
        return self._register(pb.RegisterModelRequest(
            path=str(path), dtype=dtype, name=name, shared=shared, tenant=self.tenant,
            base_model=base_model), timeout)  # fmt: skip

    def _register(self, req: Any, timeout: float | None) -> ModelInfo:
        from .rpc import error_from_rpc

        deadline = timeout if timeout is not None else max(self._timeout, REGISTER_TIMEOUT_S)

        def call() -> Any:
            import grpc

            try:
                resp = self._stub.RegisterModel(req, timeout=deadline, metadata=self._metadata,
                                                wait_for_ready=not self._ready)  # fmt: skip
            except grpc.RpcError as e:
                raise error_from_rpc(e) from e
            self._ready = True
            return resp

        return ModelInfo.from_proto(self._retrying(call).model)

    def _list_models(self, model: str, tensors: bool) -> Any:
        req = pb.ListModelsRequest(model=model, tensors=tensors, tenant=self.tenant)
        return self._retrying(lambda: self._unary("ListModels", req))

    def list_models(self) -> list[ModelInfo]:
        """The models this tenant may load: its own, then those others shared."""
        return [ModelInfo.from_proto(m) for m in self._list_models("", False).models]

    def model_info(self, model: str, *, tensors: bool = False) -> ModelInfo:
        """One model by name or fingerprint (NotFound when this tenant cannot see it)."""
        resp = self._list_models(model, tensors)
        if len(resp.models) != 1:
            raise Internal(f"{len(resp.models)} models for one name", field="models")
        return ModelInfo.from_proto(resp.models[0])

    def drop_model(self, model: str) -> None:
        """Forget this tenant's registration; the daemon frees the area when no tenant
        names it (mappings already made stay valid)."""
        req = pb.DropModelRequest(model=model, tenant=self.tenant)
        self._retrying(lambda: self._unary("DropModel", req))

    def load_adapter(self, adapter: str) -> Weights:
        """The LoRA matrices of `adapter` (a name or fingerprint), mapped read-only as
        `load_weights` maps a model's; `info.adapter` says what they adapt. Apply them with
        `tierd_client.hf_lora.apply_adapter`."""
        weights = self.load_weights(adapter)
        if weights.info.adapter is None:
            raise FailedPrecondition(f"{adapter!r} is a model, not an adapter", field="model")
        return weights

    def load_weights(self, model: str) -> Weights:
        """Every tensor of `model`, as read-only views of the daemon's weights area mapped
        into this process (no copy). Only on the daemon's host."""
        import torch

        resp = self._list_models(model, True)
        if len(resp.models) != 1:
            raise Internal(f"{len(resp.models)} models for one name", field="models")
        info = ModelInfo.from_proto(resp.models[0])
        seg = resp.segment
        if not seg.handoff or seg.host_id != host_id():
            raise FailedPrecondition("weights are mapped only on the daemon's host, through "
                                     "its unix socket", field="model")  # fmt: skip
        # By fingerprint: the content just described, even if the name moved meanwhile.
        fd, size, fp = self._retrying(lambda: receive_weights_fd(
            seg.handoff, self.tenant, self._bearer, info.fingerprint,
            max(self._timeout, REGISTER_TIMEOUT_S)))  # fmt: skip
        try:
            if (fp, size) != (info.fingerprint, info.size) or os.fstat(fd).st_size < size:
                raise Internal(f"daemon handed over {fp[:16]} ({size} bytes) for "
                               f"{info.fingerprint[:16]} ({info.size} bytes)", field="model")  # fmt: skip
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        out = Weights()
        with warnings.catch_warnings():  # torch warns that the buffer is not writable: on purpose
            warnings.simplefilter("ignore", UserWarning)
            for t in info.tensors:
                out[t.name] = _tensor(mm, t, size)
            out.address = torch.frombuffer(mm, dtype=torch.uint8, count=1).data_ptr()
        out.info, out.size = info, size
        return out
