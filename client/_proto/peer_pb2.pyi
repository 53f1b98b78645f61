from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PeerLocateRequest(_message.Message):
    __slots__ = ("tenant", "namespace_id", "keys", "lease_ttl_ms")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    lease_ttl_ms: int
    def __init__(self, tenant: _Optional[str] = ..., namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class PeerBlock(_message.Message):
    __slots__ = ("found", "remote_address", "length", "checksum", "layer_sums")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    LAYER_SUMS_FIELD_NUMBER: _ClassVar[int]
    found: bool
    remote_address: int
    length: int
    checksum: int
    layer_sums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, found: _Optional[bool] = ..., remote_address: _Optional[int] = ..., length: _Optional[int] = ..., checksum: _Optional[int] = ..., layer_sums: _Optional[_Iterable[int]] = ...) -> None: ...

class PeerLocateResponse(_message.Message):
    __slots__ = ("lease_id", "engine_address", "protocol", "blocks")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    engine_address: str
    protocol: str
    blocks: _containers.RepeatedCompositeFieldContainer[PeerBlock]
    def __init__(self, lease_id: _Optional[int] = ..., engine_address: _Optional[str] = ..., protocol: _Optional[str] = ..., blocks: _Optional[_Iterable[_Union[PeerBlock, _Mapping]]] = ...) -> None: ...

class PeerReleaseRequest(_message.Message):
    __slots__ = ("tenant", "lease_id")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    lease_id: int
    def __init__(self, tenant: _Optional[str] = ..., lease_id: _Optional[int] = ...) -> None: ...

class PeerReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
