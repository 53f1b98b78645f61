"""Daemon configuration: frozen dataclasses, parsed once at the edge.

Primitives: `Config` (and its sections), `load_config(path, overrides) -> Config`,
`parse_size("4GiB") -> int`, `default_config() -> Config`.

Every key has an embedded default, so `tierd serve` runs with no file at all. Defaults
that depend on the machine (host tier size, where the socket goes) are computed here
and nowhere else.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tierd.config_checks import MAX_SIZE, check_config, key_name, show
from tierd.errors import ConfigError
from tierd.peer_config import PeersConfig, peers_config
from tierd.slice_config import SliceConfig, slices_config

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": 1000, "kib": KiB,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
    "t": TiB, "tb": 1000**4, "tib": TiB,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*([0-9]{1,24}(?:\.[0-9]{1,24})?)\s*([a-zA-Z]{0,3})\s*$", re.ASCII)
CONFIG_FILE_LIMIT = 16 * MiB  # a config file is text an operator wrote, never this large

# The host tier takes at most this share of available RAM by default, and never more
# than the cap: the inference process on the same host needs memory too.
HOST_DEFAULT_FRACTION = 0.25
HOST_DEFAULT_CAP = 16 * GiB
NVME_DEFAULT_FRACTION = 0.25
NVME_DEFAULT_CAP = 64 * GiB
# Placement policy of every tier unless set: on a real conversation trace it was at or
# above LRU at every cache size tried (tools/BENCHMARKS.md, `tierctl replay`).
DEFAULT_POLICY = "spin"


def parse_size(value: object, *, key: str = "size") -> int:
    """Bytes from 4096, 4096.0, "512MiB" or "1.5 GiB"; refuses anything negative, not finite,
    fractional in bytes, or over 1 PiB (surely a typo, and past what a tier can address)."""
    if isinstance(value, bool):
        raise ConfigError(key, "expected a size such as 512MiB, not a boolean")
    if isinstance(value, int):
        n: float = value
    elif isinstance(value, float):
        n = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(key, f"cannot read {show(value)} as a size "
                              "(examples: 4096, 512MiB, 8GiB)")  # fmt: skip
        # Digits are bounded by the pattern, so float() is finite and exact enough here.
        n = float(m.group(1)) * _UNITS[m.group(2).lower()]
    else:
        raise ConfigError(key, f"expected a size such as 512MiB, got {show(value)}")
    if isinstance(n, float) and not math.isfinite(n):
        raise ConfigError(key, f"size must be a finite number, got {show(value)}")
    if n < 0:
        raise ConfigError(key, "size must not be negative")
    if n > MAX_SIZE:
        raise ConfigError(key, f"size {show(value)} is over the 1 PiB limit")
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(key, f"size {show(value)} is not a whole number of bytes")
    return int(n)  # "1.1GiB" rounds down to whole bytes


def format_size(n: int) -> str:
    for unit, scale in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def default_data_dir() -> Path:
    if env := os.environ.get("TIERD_DATA_DIR"):
        return Path(env)
    if os.geteuid() == 0 and not os.environ.get("XDG_DATA_HOME"):
        return Path("/var/lib/tierd")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "tierd"


def default_listen(data_dir: Path) -> tuple[str, ...]:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    sock = Path(runtime) / "tierd" / "tierd.sock" if runtime else data_dir / "tierd.sock"
    return (f"unix:{sock}",)


def default_host_capacity() -> int:
    available = psutil.virtual_memory().available
    try:
        shm_free = psutil.disk_usage("/dev/shm").free
    except OSError:
        shm_free = available
    return int(min(available * HOST_DEFAULT_FRACTION, HOST_DEFAULT_CAP, shm_free * 0.9))


def default_nvme_capacity(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = psutil.disk_usage(str(probe)).free
    return int(min(free * NVME_DEFAULT_FRACTION, NVME_DEFAULT_CAP))


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = ()
    max_message_bytes: int = 64 * MiB
    workers: int = 64  # each stream holds one while it waits on its client
    drain_seconds: float = 10.0
    flush_on_stop: bool = False  # write host-only blocks to NVMe on SIGTERM (survive reboot)
    # TLS for TCP listeners (required for them); a client CA turns on mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # TCP with neither tenants nor a client CA admits any peer; only on purpose.
    allow_anonymous: bool = False


@dataclass(frozen=True)
class HostTierConfig:
    capacity_bytes: int = 0  # 0: sized from free RAM at start
    high_watermark: float = 0.90  # demotion starts above this occupancy...
    low_watermark: float = 0.75  # ...and stops below this one
    pin_memory: bool = True  # cudaHostRegister the arena where CUDA exists
    policy: str = DEFAULT_POLICY  # eviction order (tierd.core.policies): spin | lru | lfu ...


@dataclass(frozen=True)
class NvmeTierConfig:
    path: Path | None = None  # default: <data_dir>/nvme
    capacity_bytes: int = 0  # 0: sized from free disk at start
    backend: str = "auto"  # auto | posix | kvikio
    policy: str = DEFAULT_POLICY  # order and admission (e.g. second_hit), as host.policy
    direct_io: bool = True
    io_threads: int = 8
    chunk_bytes: int = 1 * MiB


@dataclass(frozen=True)
class TierSpec:
    """One tier of the chain, in order from fastest to slowest. Built from a `[[tiers]]`
    table, or expanded from the `[host]`, `[nvme]` and `[csd]` shorthand sections."""

    name: str
    kind: str  # a kind registered in tierd.tiers.registry: host | nvme | csd ...
    capacity_bytes: int = 0  # 0: sized by the kind from free space at start
    path: Path | None = None  # where a storage kind keeps its files
    high_watermark: float = 0.90  # the placer makes room above this occupancy...
    low_watermark: float = 0.75  # ...down to this one
    policy: str = DEFAULT_POLICY  # eviction order and admission (tierd.core.policies)
    codec: str = "raw"  # how copies are encoded in this tier (tierd_kernels.codecs)
    codec_params: tuple[tuple[str, int], ...] = ()  # from `codec_params = {k_group = 32}`
    spill: bool = True  # takes the blocks the tier above it demotes
    options: tuple[tuple[str, Any], ...] = ()  # the kind's own keys (kind.OPTIONS)

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


@dataclass(frozen=True)
class LeaseConfig:
    default_ttl_ms: int = 30_000
    max_ttl_ms: int = 600_000
    max_keys_per_call: int = 65_536
    sequence_idle_ms: int = 60_000  # a sequence unused this long is closed (its blocks freed)


@dataclass(frozen=True)
class TenantConfig:
    """A tenant and how it proves who it is. With no tenants configured, the daemon runs
    open: callers name their tenant, and the socket's permissions are the only guard."""

    name: str = ""
    token_sha256: str = ""  # hex SHA-256 of the bearer token (the token itself is not kept)
    cert_cn: str = ""  # client certificate common name (mutual TLS)
    weight: float = 1.0  # share of contended capacity, relative to the other tenants
    host_quota: int = 0  # bytes in the host tier; 0: no quota (shorthand for quotas.host)
    nvme_quota: int = 0
    quotas: tuple[tuple[str, int], ...] = ()  # (tier name, bytes) from `quotas = {...}`

    def quota(self, tier: str) -> int:
        """This tenant's quota in `tier` (0: none)."""
        given = dict(self.quotas)
        if tier in given:
            return given[tier]
        return {"host": self.host_quota, "nvme": self.nvme_quota}.get(tier, 0)

    def all_quotas(self) -> dict[str, int]:
        return {"host": self.host_quota, "nvme": self.nvme_quota, **dict(self.quotas)}


@dataclass(frozen=True)
class CsdConfig:
    """Computational-storage workers that hold blocks and attend next to them."""

    workers: int = 0  # local workers the daemon spawns, each on <data_dir>/csd/w<i>
    capacity_bytes: int = 1 * GiB  # per local worker
    remote: tuple[str, ...] = ()  # addresses (unix:PATH or HOST:PORT) of workers run elsewhere


@dataclass(frozen=True)
class WeightsConfig:
    """Model weights the daemon holds for workers to map (RegisterModel)."""

    capacity_bytes: int = 0  # all models' areas together; 0: the memory tier's capacity
    roots: tuple[Path, ...] = ()  # directories models may be read from; empty: any path


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # [HOST:]PORT for Prometheus' /metrics (no host: loopback); empty: off
    tenant_labels: bool = False  # per-tenant series name tenants to whoever can scrape


def _limit(default: int, lo: int, hi: int) -> Any:
    """A [limits] key: its default and the range a daemon can run with."""
    return field(default=default, metadata={"range": (lo, hi)})


@dataclass(frozen=True)
class LimitsConfig:
    """What one request, stream, connection or tenant may make the daemon hold. A refusal
    names the key; the keepalive and connection keys apply at start, the others live."""

    # A namespace's layout and one block of it (never more than the host tier either).
    max_layers: int = _limit(1024, 1, 1 << 16)
    max_kv_heads: int = _limit(1024, 1, 1 << 16)
    max_head_dim: int = _limit(1024, 1, 1 << 16)
    max_block_tokens: int = _limit(65_536, 1, 1 << 20)
    max_block_bytes: int = _limit(256 * MiB, 1, 1 << 40)
    # Names live in the catalog forever: tenant, model and each extra key, in UTF-8 bytes.
    max_name_bytes: int = _limit(256, 1, 1 << 16)
    max_extra_keys: int = _limit(16, 0, 1024)
    # One call.
    max_lookup_tokens: int = _limit(1 << 20, 1, 1 << 26)
    max_query_tokens: int = _limit(8192, 1, 1 << 20)  # query (and new KV) tokens per item
    max_tail_tokens: int = _limit(16_384, 1, 1 << 22)  # per layer's open tail (>= a block)
    max_tail_bytes_per_tenant: int = _limit(2 * GiB, 1, 1 << 50)  # open tails, all layers
    # One tenant; without [[tenants]], each tenant name callers use.
    max_open_tenants: int = _limit(64, 1, 1 << 16)  # tenant names in open mode
    max_namespaces_per_tenant: int = _limit(1024, 1, 1 << 20)
    max_sequences_per_tenant: int = _limit(4096, 1, 1 << 20)
    max_leases_per_tenant: int = _limit(1024, 1, 1 << 20)
    max_lease_bytes_per_tenant: int = _limit(0, 0, 1 << 50)  # 0: host quota, else host tier
    max_pinned_bytes_per_tenant: int = _limit(0, 0, 1 << 50)  # 0: quotas, else the tiers
    # Streaming calls: each holds an RPC thread while it waits on its client.
    stream_first_message_ms: int = _limit(5_000, 1, 3_600_000)
    stream_idle_ms: int = _limit(60_000, 1, 86_400_000)
    stream_reserve_workers: int = _limit(8, 0, 1023)  # threads kept for unary calls, health
    max_streams_per_peer: int = _limit(32, 1, 1 << 16)  # per TCP peer address
    max_streams_per_tenant: int = _limit(32, 1, 1 << 16)
    # Connections (at start): keepalive pings, and idle connections closed.
    keepalive_time_ms: int = _limit(60_000, 1_000, 86_400_000)
    keepalive_timeout_ms: int = _limit(20_000, 1_000, 3_600_000)
    connection_idle_ms: int = _limit(600_000, 1_000, 86_400_000)

    RESTART_KEYS = ("keepalive_time_ms", "keepalive_timeout_ms", "connection_idle_ms")

    def check(self, workers: int) -> None:
        for f in dataclasses.fields(self):
            lo, hi = f.metadata["range"]
            value = getattr(self, f.name)
            if not lo <= value <= hi:
                raise ConfigError(f"limits.{f.name}", f"must be between {lo} and {hi}, "
                                  f"got {value}")  # fmt: skip
        if self.stream_reserve_workers >= workers:
            raise ConfigError("limits.stream_reserve_workers",
                              f"must be below server.workers ({workers})")  # fmt: skip


@dataclass(frozen=True)
class Config:
    data_dir: Path = field(default_factory=default_data_dir)
    server: ServerConfig = ServerConfig()
    host: HostTierConfig = HostTierConfig()
    nvme: NvmeTierConfig = NvmeTierConfig()
    leases: LeaseConfig = LeaseConfig()
    metrics: MetricsConfig = MetricsConfig()
    csd: CsdConfig = CsdConfig()
    limits: LimitsConfig = LimitsConfig()
    weights: WeightsConfig = WeightsConfig()
    peers: PeersConfig = field(default_factory=PeersConfig)  # tierd.peer_config
    tenants: tuple[TenantConfig, ...] = ()
    tier_list: tuple[TierSpec, ...] = ()  # [[tiers]]; empty: the shorthand sections
    slices: tuple[SliceConfig, ...] = ()  # [[slices]] (tierd.slice_config)

    def tenant(self, name: str) -> TenantConfig | None:
        return self._tenants_by_name.get(name)

    @functools.cached_property
    def _tenants_by_name(self) -> dict[str, TenantConfig]:
        # Asked on every placement decision (fair share, quotas): a dict, built once. The
        # config is frozen, so the cache never goes stale.
        return {t.name: t for t in self.tenants}

    @functools.cached_property
    def tiers(self) -> tuple[TierSpec, ...]:
        """The tier chain, fastest first: `[[tiers]]`, or `[host]`, `[nvme]`, `[csd]`."""
        if self.tier_list:
            return self.tier_list
        host, nvme, csd = self.host, self.nvme, self.csd
        chain = [
            TierSpec("host", "host", host.capacity_bytes, None, host.high_watermark,
                     host.low_watermark, host.policy, options=(("pin_memory", host.pin_memory),)),
            TierSpec("nvme", "nvme", nvme.capacity_bytes, self.nvme_path, policy=nvme.policy,
                     options=(("backend", nvme.backend), ("direct_io", nvme.direct_io),
                              ("io_threads", nvme.io_threads), ("chunk_bytes", nvme.chunk_bytes))),
        ]  # fmt: skip
        if csd.workers or csd.remote:
            # Blocks reach CSD workers by an explicit move, not by demotion.
            chain.append(TierSpec("csd", "csd", csd.capacity_bytes, self.data_dir / "csd",
                                  spill=False, options=(("workers", csd.workers),
                                                        ("remote", csd.remote))))  # fmt: skip
        return tuple(chain)

    @property
    def nvme_path(self) -> Path:
        return self.nvme.path or self.data_dir / "nvme"

    def reload_changes(self, new: Config) -> tuple[Config, list[str]]:
        """What a SIGHUP can apply: watermarks, leases, drain. Returns the config to run
        with and the keys that differ but need a restart."""
        live = dataclasses.replace(
            self,
            host=dataclasses.replace(self.host, high_watermark=new.host.high_watermark,
                                     low_watermark=new.host.low_watermark),
            leases=new.leases,
            limits=dataclasses.replace(new.limits, **{k: getattr(self.limits, k)
                                                      for k in LimitsConfig.RESTART_KEYS}),
            tenants=new.tenants,
            slices=new.slices,  # nothing in the daemon holds them
            tier_list=_live_tiers(self.tier_list, new.tier_list),
            server=dataclasses.replace(self.server, drain_seconds=new.server.drain_seconds,
                                       flush_on_stop=new.server.flush_on_stop),
        )  # fmt: skip
        restart = [
            f"{section}.{f.name}"
            for section in _RESTART_SECTIONS
            for f in dataclasses.fields(getattr(live, section))
            if getattr(getattr(live, section), f.name) != getattr(getattr(new, section), f.name)
        ]
        if live.data_dir != new.data_dir:
            restart.append("data_dir")
        if live.tier_list != new.tier_list:
            restart.append("tiers")
        return live, restart

    def resolved(self) -> Config:
        """Fill the machine-dependent defaults (sizes, socket path) and check ranges."""
        self.validate()  # first: the probes below must not see a malformed path
        server = self.server
        if not server.listen:
            server = dataclasses.replace(server, listen=default_listen(self.data_dir))
        host, nvme = self.host, self.nvme
        specs = list(self.tier_list)
        try:
            # A [[tiers]] chain sizes its own tiers; the shorthand sections stay unset then.
            if not specs and host.capacity_bytes == 0:
                host = dataclasses.replace(host, capacity_bytes=default_host_capacity())
            if not specs and nvme.capacity_bytes == 0:
                nvme = dataclasses.replace(
                    nvme, capacity_bytes=default_nvme_capacity(self.nvme_path)
                )
            for i, spec in enumerate(specs):
                if spec.capacity_bytes == 0:
                    size = (default_host_capacity() if spec.kind == "host" else
                            default_nvme_capacity(spec.path or self.data_dir / spec.name))
                    specs[i] = dataclasses.replace(spec, capacity_bytes=size)
        except OSError as e:
            raise ConfigError("capacity", f"cannot size a tier from free space: {e}") from e
        sized = [] if specs else [("host.capacity", host.capacity_bytes),
                                  ("nvme.capacity", nvme.capacity_bytes)]  # fmt: skip
        sized += [(f"tiers[{i}].capacity", s.capacity_bytes) for i, s in enumerate(specs)]
        for key, size in sized:
            if size <= 0:
                raise ConfigError(key, "no free space to size this tier from; set it")
        cfg = dataclasses.replace(self, server=server, host=host, nvme=nvme,
                                  tier_list=tuple(specs))  # fmt: skip
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_config(self)
        self.limits.check(self.server.workers)


# Sections whose every key needs a restart (the live ones are picked in reload_changes).
_RESTART_SECTIONS = ("server", "host", "nvme", "metrics", "csd", "limits", "weights", "peers")

# TOML section -> (dataclass, {key: converter})
_SIZE_KEYS = {"capacity", "capacity_bytes", "max_message_bytes", "chunk_bytes", "host_quota",
              "nvme_quota", "max_block_bytes", "max_lease_bytes_per_tenant",
              "max_pinned_bytes_per_tenant", "max_tail_bytes_per_tenant"}  # fmt: skip


def _build_section(cls: type, raw: dict[str, Any], section: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = "capacity_bytes" if key == "capacity" else key
        if name not in names:
            raise ConfigError(f"{section}.{key_name(key)}",
                              f"unknown key (known: {', '.join(sorted(names))})")  # fmt: skip
        where = f"{section}.{key}"
        if name in _SIZE_KEYS:
            value = parse_size(value, key=where)
        elif (name == "listen" and cls is ServerConfig) or (name == "remote" and cls is CsdConfig):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(where, "expected a list of addresses")
            value = tuple(value)
        elif name in ("path", "tls_cert", "tls_key", "tls_client_ca"):
            value = _path(value, where)
        elif name == "roots" and cls is WeightsConfig:
            if not isinstance(value, list):
                raise ConfigError(where, "expected a list of directories")
            value = tuple(_path(v, f"{where}[{i}]") for i, v in enumerate(value))
        elif name == "quotas" and cls is TenantConfig:
            value = _build_quotas(value, where)
        elif name == "codec_params" and cls is _TierCommon:
            value = _build_codec_params(value, where)
        else:
            expected = type(getattr(cls(), name))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = _float(value, where)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(where, f"expected {expected.__name__}, got {show(value)}")
            if expected is float and not math.isfinite(value):
                raise ConfigError(where, f"must be a finite number, got {show(value)}")
        kwargs[name] = value
    return cls(**kwargs)


def _live_tiers(old: tuple[TierSpec, ...], new: tuple[TierSpec, ...]) -> tuple[TierSpec, ...]:
    """The running chain with the new watermarks of the tiers both chains have (same name
    and kind); everything else about a tier needs a restart."""
    by_name = {s.name: s for s in new}
    out = []
    for spec in old:
        n = by_name.get(spec.name)
        if n is not None and n.kind == spec.kind:
            spec = dataclasses.replace(spec, high_watermark=n.high_watermark,
                                       low_watermark=n.low_watermark)  # fmt: skip
        out.append(spec)
    return tuple(out)


_TIER_KEYS = {f.name for f in dataclasses.fields(TierSpec)} - {"options", "capacity_bytes"}


def _build_tier(raw: dict[str, Any], where: str) -> TierSpec:
    """One [[tiers]] table: the common keys typed here, the rest kept as the kind's options
    (checked against the kind by config_checks)."""
    common = {k: v for k, v in raw.items() if k in _TIER_KEYS or k in ("capacity",
                                                                         "capacity_bytes")}
    for key in ("name", "kind"):
        if not isinstance(common.get(key), str) or not common[key]:
            raise ConfigError(f"{where}.{key}", "every tier needs a name and a kind")
    options = []
    for key, value in raw.items():
        if key in common:
            continue
        if isinstance(value, list):
            value = tuple(value)
        options.append((key_name(key), value))
    name, kind = common.pop("name"), common.pop("kind")
    base = _build_section(_TierCommon, common, where)
    return TierSpec(name, kind, **dataclasses.asdict(base), options=tuple(options))


@dataclass(frozen=True)
class _TierCommon:
    """The typed keys of a [[tiers]] table besides name and kind (parsing only)."""

    capacity_bytes: int = 0
    path: Path | None = None
    high_watermark: float = 0.90
    low_watermark: float = 0.75
    policy: str = DEFAULT_POLICY
    codec: str = "raw"
    codec_params: tuple[tuple[str, int], ...] = ()
    spill: bool = True


def _build_codec_params(value: object, where: str) -> tuple[tuple[str, int], ...]:
    """`codec_params = {k_group = 32, ...}`: integer options of the tier's codec (which
    ones it takes is checked against the codec by config_checks)."""
    if not isinstance(value, dict):
        raise ConfigError(where, "expected a table of codec option = integer")
    for k, v in value.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{where}.{key_name(k)}", f"expected int, got {show(v)}")
    return tuple((key_name(k), v) for k, v in value.items())


def _build_quotas(value: object, where: str) -> tuple[tuple[str, int], ...]:
    if not isinstance(value, dict):
        raise ConfigError(where, "expected a table of tier name = size")
    return tuple((key_name(k), parse_size(v, key=f"{where}.{key_name(k)}"))
                 for k, v in value.items())  # fmt: skip


def _path(value: object, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(where, f"expected a path, got {show(value)}")
    if "\0" in value:
        raise ConfigError(where, "path contains a NUL byte")
    return Path(value)


def _float(value: int, where: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer literal past 1e308
        raise ConfigError(where, f"number too large: {show(value)}") from None


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "host": HostTierConfig,
    "nvme": NvmeTierConfig,
    "leases": LeaseConfig,
    "metrics": MetricsConfig,
    "csd": CsdConfig,
    "limits": LimitsConfig,
    "weights": WeightsConfig,
}


def config_from_dict(raw: dict[str, Any]) -> Config:
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "data_dir":
            kwargs["data_dir"] = _path(value, key)
        elif key == "tenants":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(key, "expected [[tenants]] tables")
            kwargs["tenants"] = tuple(
                _build_section(TenantConfig, t, f"tenants[{i}]") for i, t in enumerate(value)
            )
        elif key == "tiers":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(key, "expected [[tiers]] tables")
            kwargs["tier_list"] = tuple(_build_tier(t, f"tiers[{i}]") for i, t in enumerate(value))
        elif key == "slices":
            kwargs["slices"] = slices_config(value)
        elif key == "peers":
            if not isinstance(value, dict):
                raise ConfigError(key, "expected a table")
            kwargs["peers"] = peers_config(value)
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(key, "expected a table")
            kwargs[key] = _build_section(_SECTIONS[key], value, key)
        else:
            raise ConfigError(
                key_name(key),
                "unknown section (known: data_dir, tiers, tenants, peers, slices, "
                f"{', '.join(_SECTIONS)})",
            )
    return Config(**kwargs)


def _read_toml(path: Path) -> dict[str, Any]:
    """The file's TOML document; every way a file can be unreadable is a ConfigError."""
    try:
        with open(path, "rb") as f:
            data = f.read(CONFIG_FILE_LIMIT + 1)
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror or e}") from e
    except ValueError as e:  # a NUL byte in the path
        raise ConfigError(show(str(path)), f"cannot read: {e}") from e
    if len(data) > CONFIG_FILE_LIMIT:
        raise ConfigError(str(path), f"larger than {format_size(CONFIG_FILE_LIMIT)}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(str(path), f"not UTF-8 text (byte {data[e.start]:#04x} at offset "
                          f"{e.start})") from None  # fmt: skip
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), f"not valid TOML: {e}") from None
    except ValueError as e:  # an integer literal past Python's digit limit
        raise ConfigError(str(path), f"not valid TOML: {str(e).split(':')[0]}") from None
    except RecursionError:
        raise ConfigError(str(path), "not valid TOML: arrays or tables nested too deeply") from None


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (TOML) if given, apply CLI overrides ({"host.capacity": "4GiB", ...}), and
    check every value; errors name the file, the key and the reason."""
    raw = _read_toml(path) if path is not None else {}
    try:
        for dotted, value in (overrides or {}).items():
            if value is None:
                continue
            section, _, key = dotted.rpartition(".")
            target = raw.setdefault(section, {}) if section else raw
            if not isinstance(target, dict):
                raise ConfigError(section, "expected a table")
            target[key] = value
        cfg = config_from_dict(raw)
        cfg.validate()
        return cfg
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e.field}", e.message) from e
        raise
