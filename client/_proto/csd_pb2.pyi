from . import tierd_pb2 as _tierd_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CsdBlock(_message.Message):
    __slots__ = ("namespace_id", "key", "checksum", "data", "encoding")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    key: bytes
    checksum: int
    data: bytes
    encoding: str
    def __init__(self, namespace_id: _Optional[bytes] = ..., key: _Optional[bytes] = ..., checksum: _Optional[int] = ..., data: _Optional[bytes] = ..., encoding: _Optional[str] = ...) -> None: ...

class StoreBlocksRequest(_message.Message):
    __slots__ = ("layout", "blocks")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    layout: _tierd_pb2.KVLayout
    blocks: _containers.RepeatedCompositeFieldContainer[CsdBlock]
    def __init__(self, layout: _Optional[_Union[_tierd_pb2.KVLayout, _Mapping]] = ..., blocks: _Optional[_Iterable[_Union[CsdBlock, _Mapping]]] = ...) -> None: ...

class StoreBlocksResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class CsdKeys(_message.Message):
    __slots__ = ("namespace_id", "keys")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class DropBlocksResponse(_message.Message):
    __slots__ = ("dropped",)
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    dropped: int
    def __init__(self, dropped: _Optional[int] = ...) -> None: ...

class PartialAttendRequest(_message.Message):
    __slots__ = ("namespace_id", "layout", "keys", "layer", "q", "scale")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    layout: _tierd_pb2.KVLayout
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    layer: int
    q: _tierd_pb2.Tensor
    scale: float
    def __init__(self, namespace_id: _Optional[bytes] = ..., layout: _Optional[_Union[_tierd_pb2.KVLayout, _Mapping]] = ..., keys: _Optional[_Iterable[bytes]] = ..., layer: _Optional[int] = ..., q: _Optional[_Union[_tierd_pb2.Tensor, _Mapping]] = ..., scale: _Optional[float] = ...) -> None: ...

class PartialAttendResponse(_message.Message):
    __slots__ = ("out", "lse", "missing")
    OUT_FIELD_NUMBER: _ClassVar[int]
    LSE_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    out: _tierd_pb2.Tensor
    lse: _tierd_pb2.Tensor
    missing: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, out: _Optional[_Union[_tierd_pb2.Tensor, _Mapping]] = ..., lse: _Optional[_Union[_tierd_pb2.Tensor, _Mapping]] = ..., missing: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ListBlocksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListBlocksResponse(_message.Message):
    __slots__ = ("namespaces",)
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    namespaces: _containers.RepeatedCompositeFieldContainer[CsdKeys]
    def __init__(self, namespaces: _Optional[_Iterable[_Union[CsdKeys, _Mapping]]] = ...) -> None: ...

class WorkerStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatsResponse(_message.Message):
    __slots__ = ("blocks", "used_bytes", "capacity_bytes", "corrupt_reads")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_READS_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    used_bytes: int
    capacity_bytes: int
    corrupt_reads: int
    def __init__(self, blocks: _Optional[int] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., corrupt_reads: _Optional[int] = ...) -> None: ...
