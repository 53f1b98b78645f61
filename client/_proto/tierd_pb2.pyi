from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT8_E4M3: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    TIER_HOST: _ClassVar[Tier]
    TIER_NVME: _ClassVar[Tier]
    TIER_HBM: _ClassVar[Tier]
    TIER_CSD: _ClassVar[Tier]
    TIER_REMOTE: _ClassVar[Tier]

class SlotState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SLOT_STATE_UNSPECIFIED: _ClassVar[SlotState]
    SLOT_STATE_LEASED: _ClassVar[SlotState]
    SLOT_STATE_ALREADY_PRESENT: _ClassVar[SlotState]

class PutResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUT_RESULT_UNSPECIFIED: _ClassVar[PutResult]
    PUT_RESULT_STORED: _ClassVar[PutResult]
    PUT_RESULT_ALREADY_PRESENT: _ClassVar[PutResult]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT8_E4M3: DType
DTYPE_UINT8: DType
TIER_UNSPECIFIED: Tier
TIER_HOST: Tier
TIER_NVME: Tier
TIER_HBM: Tier
TIER_CSD: Tier
TIER_REMOTE: Tier
SLOT_STATE_UNSPECIFIED: SlotState
SLOT_STATE_LEASED: SlotState
SLOT_STATE_ALREADY_PRESENT: SlotState
PUT_RESULT_UNSPECIFIED: PutResult
PUT_RESULT_STORED: PutResult
PUT_RESULT_ALREADY_PRESENT: PutResult

class KVLayout(_message.Message):
    __slots__ = ("num_layers", "num_kv_heads", "head_dim", "dtype", "block_tokens")
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BLOCK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: DType
    block_tokens: int
    def __init__(self, num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ..., block_tokens: _Optional[int] = ...) -> None: ...

class Namespace(_message.Message):
    __slots__ = ("tenant", "model", "layout", "extra_keys", "lossless", "adapter")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEYS_FIELD_NUMBER: _ClassVar[int]
    LOSSLESS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    model: str
    layout: KVLayout
    extra_keys: _containers.RepeatedScalarFieldContainer[str]
    lossless: bool
    adapter: str
    def __init__(self, tenant: _Optional[str] = ..., model: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., extra_keys: _Optional[_Iterable[str]] = ..., lossless: _Optional[bool] = ..., adapter: _Optional[str] = ...) -> None: ...

class ShmSegment(_message.Message):
    __slots__ = ("size", "host_id", "handoff", "staging_size", "instance")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    STAGING_SIZE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    size: int
    host_id: str
    handoff: str
    staging_size: int
    instance: bytes
    def __init__(self, size: _Optional[int] = ..., host_id: _Optional[str] = ..., handoff: _Optional[str] = ..., staging_size: _Optional[int] = ..., instance: _Optional[bytes] = ...) -> None: ...

class BlockShape(_message.Message):
    __slots__ = ("dims", "dtype")
    DIMS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    dims: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    def __init__(self, dims: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class OpenNamespaceRequest(_message.Message):
    __slots__ = ("namespace",)
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    namespace: Namespace
    def __init__(self, namespace: _Optional[_Union[Namespace, _Mapping]] = ...) -> None: ...

class OpenNamespaceResponse(_message.Message):
    __slots__ = ("namespace_id", "block_bytes", "segment", "bulk_engine")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    BULK_ENGINE_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    block_bytes: int
    segment: ShmSegment
    bulk_engine: BulkEngine
    def __init__(self, namespace_id: _Optional[bytes] = ..., block_bytes: _Optional[int] = ..., segment: _Optional[_Union[ShmSegment, _Mapping]] = ..., bulk_engine: _Optional[_Union[BulkEngine, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("namespace_id", "tokens")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    tokens: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace_id: _Optional[bytes] = ..., tokens: _Optional[_Iterable[int]] = ...) -> None: ...

class BlockLocation(_message.Message):
    __slots__ = ("key", "tier", "tier_name")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_NAME_FIELD_NUMBER: _ClassVar[int]
    key: bytes
    tier: Tier
    tier_name: str
    def __init__(self, key: _Optional[bytes] = ..., tier: _Optional[_Union[Tier, str]] = ..., tier_name: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("cached_tokens", "blocks", "held_by", "held_blocks")
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HELD_BY_FIELD_NUMBER: _ClassVar[int]
    HELD_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    cached_tokens: int
    blocks: _containers.RepeatedCompositeFieldContainer[BlockLocation]
    held_by: str
    held_blocks: int
    def __init__(self, cached_tokens: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[BlockLocation, _Mapping]]] = ..., held_by: _Optional[str] = ..., held_blocks: _Optional[int] = ...) -> None: ...

class KeysRequest(_message.Message):
    __slots__ = ("namespace_id", "keys")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PreparePutRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "shape", "lease_ttl_ms")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    shape: BlockShape
    lease_ttl_ms: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., shape: _Optional[_Union[BlockShape, _Mapping]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class PutSlot(_message.Message):
    __slots__ = ("state", "offset")
    STATE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    state: SlotState
    offset: int
    def __init__(self, state: _Optional[_Union[SlotState, str]] = ..., offset: _Optional[int] = ...) -> None: ...

class PreparePutResponse(_message.Message):
    __slots__ = ("lease_id", "slots", "segment")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    slots: _containers.RepeatedCompositeFieldContainer[PutSlot]
    segment: ShmSegment
    def __init__(self, lease_id: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[PutSlot, _Mapping]]] = ..., segment: _Optional[_Union[ShmSegment, _Mapping]] = ...) -> None: ...

class CommitPutRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    def __init__(self, lease_id: _Optional[int] = ...) -> None: ...

class CommitPutResponse(_message.Message):
    __slots__ = ("stored",)
    STORED_FIELD_NUMBER: _ClassVar[int]
    stored: int
    def __init__(self, stored: _Optional[int] = ...) -> None: ...

class PrepareGetRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "lease_ttl_ms")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    lease_ttl_ms: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class GetSlot(_message.Message):
    __slots__ = ("found", "offset", "tier", "tier_name")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_NAME_FIELD_NUMBER: _ClassVar[int]
    found: bool
    offset: int
    tier: Tier
    tier_name: str
    def __init__(self, found: _Optional[bool] = ..., offset: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., tier_name: _Optional[str] = ...) -> None: ...

class PrepareGetResponse(_message.Message):
    __slots__ = ("lease_id", "slots", "segment")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    slots: _containers.RepeatedCompositeFieldContainer[GetSlot]
    segment: ShmSegment
    def __init__(self, lease_id: _Optional[int] = ..., slots: _Optional[_Iterable[_Union[GetSlot, _Mapping]]] = ..., segment: _Optional[_Union[ShmSegment, _Mapping]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    def __init__(self, lease_id: _Optional[int] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PutHeader(_message.Message):
    __slots__ = ("namespace_id", "keys", "shape")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    shape: BlockShape
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., shape: _Optional[_Union[BlockShape, _Mapping]] = ...) -> None: ...

class PutChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: PutHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[PutHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class PutResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedScalarFieldContainer[PutResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResult, str]]] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("namespace_id", "keys")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetChunk(_message.Message):
    __slots__ = ("found", "block_bytes", "data")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    found: _containers.RepeatedScalarFieldContainer[bool]
    block_bytes: int
    data: bytes
    def __init__(self, found: _Optional[_Iterable[bool]] = ..., block_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class BulkEngine(_message.Message):
    __slots__ = ("address", "protocol")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    address: str
    protocol: str
    def __init__(self, address: _Optional[str] = ..., protocol: _Optional[str] = ...) -> None: ...

class BulkGetRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "lease_ttl_ms")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    lease_ttl_ms: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., lease_ttl_ms: _Optional[int] = ...) -> None: ...

class BulkBlock(_message.Message):
    __slots__ = ("found", "remote_address", "length", "checksum", "tier", "tier_name")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    REMOTE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_NAME_FIELD_NUMBER: _ClassVar[int]
    found: bool
    remote_address: int
    length: int
    checksum: int
    tier: Tier
    tier_name: str
    def __init__(self, found: _Optional[bool] = ..., remote_address: _Optional[int] = ..., length: _Optional[int] = ..., checksum: _Optional[int] = ..., tier: _Optional[_Union[Tier, str]] = ..., tier_name: _Optional[str] = ...) -> None: ...

class BulkGetResponse(_message.Message):
    __slots__ = ("lease_id", "engine", "blocks")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    lease_id: int
    engine: BulkEngine
    blocks: _containers.RepeatedCompositeFieldContainer[BulkBlock]
    def __init__(self, lease_id: _Optional[int] = ..., engine: _Optional[_Union[BulkEngine, _Mapping]] = ..., blocks: _Optional[_Iterable[_Union[BulkBlock, _Mapping]]] = ...) -> None: ...

class BulkPutRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "shape", "engine", "buffer_address", "buffer_length", "checksums")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHECKSUMS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    shape: BlockShape
    engine: BulkEngine
    buffer_address: int
    buffer_length: int
    checksums: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., shape: _Optional[_Union[BlockShape, _Mapping]] = ..., engine: _Optional[_Union[BulkEngine, _Mapping]] = ..., buffer_address: _Optional[int] = ..., buffer_length: _Optional[int] = ..., checksums: _Optional[_Iterable[int]] = ...) -> None: ...

class BulkPutResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedScalarFieldContainer[PutResult]
    def __init__(self, results: _Optional[_Iterable[_Union[PutResult, str]]] = ...) -> None: ...

class LocateResponse(_message.Message):
    __slots__ = ("tiers", "tier_names")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    TIER_NAMES_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedScalarFieldContainer[Tier]
    tier_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tiers: _Optional[_Iterable[_Union[Tier, str]]] = ..., tier_names: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    def __init__(self, deleted: _Optional[int] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("changed",)
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    changed: int
    def __init__(self, changed: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierStats(_message.Message):
    __slots__ = ("tier", "capacity_bytes", "used_bytes", "blocks", "hits", "bytes_read", "bytes_written", "evictions", "backend", "tier_name", "kind", "misses", "available")
    TIER_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    BYTES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    TIER_NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    tier: Tier
    capacity_bytes: int
    used_bytes: int
    blocks: int
    hits: int
    bytes_read: int
    bytes_written: int
    evictions: int
    backend: str
    tier_name: str
    kind: str
    misses: int
    available: bool
    def __init__(self, tier: _Optional[_Union[Tier, str]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., blocks: _Optional[int] = ..., hits: _Optional[int] = ..., bytes_read: _Optional[int] = ..., bytes_written: _Optional[int] = ..., evictions: _Optional[int] = ..., backend: _Optional[str] = ..., tier_name: _Optional[str] = ..., kind: _Optional[str] = ..., misses: _Optional[int] = ..., available: _Optional[bool] = ...) -> None: ...

class TenantUsage(_message.Message):
    __slots__ = ("tenant", "tier", "used_bytes", "tier_name")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    TIER_NAME_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    tier: Tier
    used_bytes: int
    tier_name: str
    def __init__(self, tenant: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., used_bytes: _Optional[int] = ..., tier_name: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("tiers", "lookups", "misses", "demotions", "promotions", "corrupt_reads", "active_leases", "namespaces", "tenants", "active_sequences", "peers", "directory")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    LOOKUPS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    DEMOTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMOTIONS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_READS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[TierStats]
    lookups: int
    misses: int
    demotions: int
    promotions: int
    corrupt_reads: int
    active_leases: int
    namespaces: int
    tenants: _containers.RepeatedCompositeFieldContainer[TenantUsage]
    active_sequences: int
    peers: _containers.RepeatedCompositeFieldContainer[PeerStats]
    directory: PrefixDirectoryStats
    def __init__(self, tiers: _Optional[_Iterable[_Union[TierStats, _Mapping]]] = ..., lookups: _Optional[int] = ..., misses: _Optional[int] = ..., demotions: _Optional[int] = ..., promotions: _Optional[int] = ..., corrupt_reads: _Optional[int] = ..., active_leases: _Optional[int] = ..., namespaces: _Optional[int] = ..., tenants: _Optional[_Iterable[_Union[TenantUsage, _Mapping]]] = ..., active_sequences: _Optional[int] = ..., peers: _Optional[_Iterable[_Union[PeerStats, _Mapping]]] = ..., directory: _Optional[_Union[PrefixDirectoryStats, _Mapping]] = ...) -> None: ...

class PrefixDirectoryStats(_message.Message):
    __slots__ = ("tier_name", "available", "hits", "misses", "writes", "writes_dropped", "errors")
    TIER_NAME_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    WRITES_FIELD_NUMBER: _ClassVar[int]
    WRITES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    tier_name: str
    available: bool
    hits: int
    misses: int
    writes: int
    writes_dropped: int
    errors: int
    def __init__(self, tier_name: _Optional[str] = ..., available: _Optional[bool] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., writes: _Optional[int] = ..., writes_dropped: _Optional[int] = ..., errors: _Optional[int] = ...) -> None: ...

class PeerStats(_message.Message):
    __slots__ = ("address", "available", "pulls", "blocks", "bytes", "errors", "corrupt", "asked", "directory_hits")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    CORRUPT_FIELD_NUMBER: _ClassVar[int]
    ASKED_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_HITS_FIELD_NUMBER: _ClassVar[int]
    address: str
    available: bool
    pulls: int
    blocks: int
    bytes: int
    errors: int
    corrupt: int
    asked: int
    directory_hits: int
    def __init__(self, address: _Optional[str] = ..., available: _Optional[bool] = ..., pulls: _Optional[int] = ..., blocks: _Optional[int] = ..., bytes: _Optional[int] = ..., errors: _Optional[int] = ..., corrupt: _Optional[int] = ..., asked: _Optional[int] = ..., directory_hits: _Optional[int] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "dtype", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: DType
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[_Union[DType, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OpenSequenceRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "ttl_ms")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    ttl_ms: int
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class OpenSequenceResponse(_message.Message):
    __slots__ = ("sequence_id", "cached_tokens")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    cached_tokens: int
    def __init__(self, sequence_id: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class CloseSequenceRequest(_message.Message):
    __slots__ = ("sequence_id",)
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    def __init__(self, sequence_id: _Optional[int] = ...) -> None: ...

class CloseSequenceResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AttendItem(_message.Message):
    __slots__ = ("sequence_id", "layer", "q", "k_new", "v_new", "new_tokens", "scale")
    SEQUENCE_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    Q_FIELD_NUMBER: _ClassVar[int]
    K_NEW_FIELD_NUMBER: _ClassVar[int]
    V_NEW_FIELD_NUMBER: _ClassVar[int]
    NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    sequence_id: int
    layer: int
    q: Tensor
    k_new: Tensor
    v_new: Tensor
    new_tokens: _containers.RepeatedScalarFieldContainer[int]
    scale: float
    def __init__(self, sequence_id: _Optional[int] = ..., layer: _Optional[int] = ..., q: _Optional[_Union[Tensor, _Mapping]] = ..., k_new: _Optional[_Union[Tensor, _Mapping]] = ..., v_new: _Optional[_Union[Tensor, _Mapping]] = ..., new_tokens: _Optional[_Iterable[int]] = ..., scale: _Optional[float] = ...) -> None: ...

class AttendRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[AttendItem]
    def __init__(self, items: _Optional[_Iterable[_Union[AttendItem, _Mapping]]] = ...) -> None: ...

class AttendResult(_message.Message):
    __slots__ = ("out", "lse")
    OUT_FIELD_NUMBER: _ClassVar[int]
    LSE_FIELD_NUMBER: _ClassVar[int]
    out: Tensor
    lse: Tensor
    def __init__(self, out: _Optional[_Union[Tensor, _Mapping]] = ..., lse: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AttendResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[AttendResult]
    def __init__(self, results: _Optional[_Iterable[_Union[AttendResult, _Mapping]]] = ...) -> None: ...

class MoveRequest(_message.Message):
    __slots__ = ("namespace_id", "keys", "tier", "tier_name")
    NAMESPACE_ID_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TIER_NAME_FIELD_NUMBER: _ClassVar[int]
    namespace_id: bytes
    keys: _containers.RepeatedScalarFieldContainer[bytes]
    tier: Tier
    tier_name: str
    def __init__(self, namespace_id: _Optional[bytes] = ..., keys: _Optional[_Iterable[bytes]] = ..., tier: _Optional[_Union[Tier, str]] = ..., tier_name: _Optional[str] = ...) -> None: ...

class MoveResponse(_message.Message):
    __slots__ = ("moved",)
    MOVED_FIELD_NUMBER: _ClassVar[int]
    moved: int
    def __init__(self, moved: _Optional[int] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("path", "dtype", "name", "shared", "tenant", "base_model")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    path: str
    dtype: str
    name: str
    shared: bool
    tenant: str
    base_model: str
    def __init__(self, path: _Optional[str] = ..., dtype: _Optional[str] = ..., name: _Optional[str] = ..., shared: _Optional[bool] = ..., tenant: _Optional[str] = ..., base_model: _Optional[str] = ...) -> None: ...

class ModelTensor(_message.Message):
    __slots__ = ("name", "shape", "dtype", "offset", "nbytes", "layer")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    offset: int
    nbytes: int
    layer: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ..., layer: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "fingerprint", "size", "layers", "tenant", "shared", "dtype", "source", "tensor_count", "tensors", "config_json", "adapter")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TENSOR_COUNT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    size: int
    layers: int
    tenant: str
    shared: bool
    dtype: str
    source: str
    tensor_count: int
    tensors: _containers.RepeatedCompositeFieldContainer[ModelTensor]
    config_json: str
    adapter: AdapterInfo
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., size: _Optional[int] = ..., layers: _Optional[int] = ..., tenant: _Optional[str] = ..., shared: _Optional[bool] = ..., dtype: _Optional[str] = ..., source: _Optional[str] = ..., tensor_count: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[ModelTensor, _Mapping]]] = ..., config_json: _Optional[str] = ..., adapter: _Optional[_Union[AdapterInfo, _Mapping]] = ...) -> None: ...

class AdapterInfo(_message.Message):
    __slots__ = ("base_model", "rank", "alpha", "target_modules", "dependent_blocks")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DEPENDENT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    dependent_blocks: int
    def __init__(self, base_model: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., dependent_blocks: _Optional[int] = ...) -> None: ...

class RegisterModelResponse(_message.Message):
    __slots__ = ("model", "created")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    created: bool
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("model", "tensors", "tenant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    tensors: bool
    tenant: str
    def __init__(self, model: _Optional[str] = ..., tensors: _Optional[bool] = ..., tenant: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "segment")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    segment: ShmSegment
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., segment: _Optional[_Union[ShmSegment, _Mapping]] = ...) -> None: ...

class DropModelRequest(_message.Message):
    __slots__ = ("model", "tenant")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    model: str
    tenant: str
    def __init__(self, model: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class DropModelResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
