"""Daemon configuration: frozen dataclasses, parsed once at the edge.

Primitives: `Config` (and its sections), `load_config(path, overrides) -> Config`,
`parse_size("4GiB") -> int`, `default_config() -> Config`.

Every key has an embedded default, so `tierd serve` runs with no file at all. Defaults
that depend on the machine (host tier size, where the socket goes) are computed here
and nowhere else.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from tierd.errors import ConfigError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {
    "": 1, "b": 1,
    "k": KiB, "kb": 1000, "kib": KiB,
    "m": MiB, "mb": 1000**2, "mib": MiB,
    "g": GiB, "gb": 1000**3, "gib": GiB,
    "t": TiB, "tb": 1000**4, "tib": TiB,
}  # fmt: skip
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

# The host tier takes at most this share of available RAM by default, and never more
# than the cap: the inference process on the same host needs memory too.
HOST_DEFAULT_FRACTION = 0.25
HOST_DEFAULT_CAP = 16 * GiB
NVME_DEFAULT_FRACTION = 0.25
NVME_DEFAULT_CAP = 64 * GiB


def parse_size(value: int | str, *, key: str = "size") -> int:
    if isinstance(value, bool):
        raise ConfigError(key, "expected a size such as 512MiB, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, "size must not be negative")
        return value
    m = _SIZE_RE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(key, f"cannot read {value!r} as a size (examples: 4096, 512MiB, 8GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


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
    workers: int = 16
    drain_seconds: float = 10.0
    flush_on_stop: bool = False  # write host-only blocks to NVMe on SIGTERM (survive reboot)
    # TLS for TCP listeners (required for them); a client CA turns on mutual TLS.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None


@dataclass(frozen=True)
class HostTierConfig:
    capacity_bytes: int = 0  # 0: sized from free RAM at start
    high_watermark: float = 0.90  # demotion starts above this occupancy...
    low_watermark: float = 0.75  # ...and stops below this one
    pin_memory: bool = True  # cudaHostRegister the arena where CUDA exists


@dataclass(frozen=True)
class NvmeTierConfig:
    path: Path | None = None  # default: <data_dir>/nvme
    capacity_bytes: int = 0  # 0: sized from free disk at start
    backend: str = "auto"  # auto | posix | kvikio
    direct_io: bool = True
    io_threads: int = 8
    chunk_bytes: int = 1 * MiB


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
    host_quota: int = 0  # bytes in the host tier; 0: no quota
    nvme_quota: int = 0


@dataclass(frozen=True)
class CsdConfig:
    """Computational-storage workers that hold blocks and attend next to them."""

    workers: int = 0  # local workers the daemon spawns, each on <data_dir>/csd/w<i>
    capacity_bytes: int = 1 * GiB  # per local worker
    remote: tuple[str, ...] = ()  # addresses (unix:PATH or HOST:PORT) of workers run elsewhere


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = ""  # HOST:PORT for Prometheus' /metrics; empty: off


@dataclass(frozen=True)
class Config:
    data_dir: Path = field(default_factory=default_data_dir)
    server: ServerConfig = ServerConfig()
    host: HostTierConfig = HostTierConfig()
    nvme: NvmeTierConfig = NvmeTierConfig()
    leases: LeaseConfig = LeaseConfig()
    metrics: MetricsConfig = MetricsConfig()
    csd: CsdConfig = CsdConfig()
    tenants: tuple[TenantConfig, ...] = ()

    def tenant(self, name: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.name == name), None)

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
            tenants=new.tenants,
            server=dataclasses.replace(self.server, drain_seconds=new.server.drain_seconds,
                                       flush_on_stop=new.server.flush_on_stop),
        )  # fmt: skip
        restart = [
            f"{section}.{f.name}"
            for section in ("server", "host", "nvme", "metrics", "csd")
            for f in dataclasses.fields(getattr(live, section))
            if getattr(getattr(live, section), f.name) != getattr(getattr(new, section), f.name)
        ]
        if live.data_dir != new.data_dir:
            restart.append("data_dir")
        return live, restart

    def resolved(self) -> Config:
        """Fill the machine-dependent defaults (sizes, socket path) and check ranges."""
        server = self.server
        if not server.listen:
            server = dataclasses.replace(server, listen=default_listen(self.data_dir))
        host = self.host
        if host.capacity_bytes == 0:
            host = dataclasses.replace(host, capacity_bytes=default_host_capacity())
        nvme = self.nvme
        if nvme.capacity_bytes == 0:
            nvme = dataclasses.replace(nvme, capacity_bytes=default_nvme_capacity(self.nvme_path))
        cfg = dataclasses.replace(self, server=server, host=host, nvme=nvme)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not 0 < self.host.low_watermark < self.host.high_watermark <= 1:
            raise ConfigError("host.low_watermark", "need 0 < low_watermark < high_watermark <= 1")
        if self.nvme.backend not in ("auto", "posix", "kvikio"):
            raise ConfigError("nvme.backend", "must be one of auto, posix, kvikio")
        if self.nvme.io_threads < 1:
            raise ConfigError("nvme.io_threads", "must be at least 1")
        if self.server.workers < 1:
            raise ConfigError("server.workers", "must be at least 1")
        for addr in self.server.listen:
            if not (addr.startswith("unix:") or re.match(r"^(\[[^\]]+\]|[^:]+):\d+$", addr)):
                raise ConfigError("server.listen", f"{addr!r} is neither unix:PATH nor HOST:PORT")
            if not addr.startswith("unix:") and not (self.server.tls_cert and self.server.tls_key):
                raise ConfigError("server.listen", f"TCP listener {addr!r} needs server.tls_cert "
                                  "and server.tls_key (TCP is served only over TLS)")
        names = [t.name for t in self.tenants]
        for i, t in enumerate(self.tenants):
            if not t.name or names.count(t.name) > 1:
                raise ConfigError(f"tenants[{i}].name", "every tenant needs a unique name")
            if t.token_sha256 and not re.fullmatch(r"[0-9a-f]{64}", t.token_sha256):
                raise ConfigError(f"tenants[{i}].token_sha256", "expected 64 hex digits")
            if not (t.token_sha256 or t.cert_cn):
                raise ConfigError(f"tenants[{i}]", "needs token_sha256 or cert_cn")
            if t.weight <= 0:
                raise ConfigError(f"tenants[{i}].weight", "must be positive")
        if self.csd.workers < 0 or self.csd.workers > 64:
            raise ConfigError("csd.workers", "must be between 0 and 64")
        if self.metrics.listen and not re.match(r"^[^:]*:\d+$", self.metrics.listen):
            raise ConfigError("metrics.listen", f"{self.metrics.listen!r} is not HOST:PORT")
        if self.leases.default_ttl_ms <= 0 or self.leases.max_ttl_ms < self.leases.default_ttl_ms:
            raise ConfigError("leases", "need 0 < default_ttl_ms <= max_ttl_ms")


# TOML section -> (dataclass, {key: converter})
_SIZE_KEYS = {"capacity", "capacity_bytes", "max_message_bytes", "chunk_bytes", "host_quota",
              "nvme_quota"}  # fmt: skip


def _build_section(cls: type, raw: dict[str, Any], section: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = "capacity_bytes" if key == "capacity" else key
        if name not in names:
            raise ConfigError(f"{section}.{key}", f"unknown key (known: {', '.join(sorted(names))})")
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
            value = Path(str(value))
        else:
            expected = type(getattr(cls(), name))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(where, f"expected {expected.__name__}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "host": HostTierConfig,
    "nvme": NvmeTierConfig,
    "leases": LeaseConfig,
    "metrics": MetricsConfig,
    "csd": CsdConfig,
}


def config_from_dict(raw: dict[str, Any]) -> Config:
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "data_dir":
            kwargs["data_dir"] = Path(str(value))
        elif key == "tenants":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(key, "expected [[tenants]] tables")
            kwargs["tenants"] = tuple(
                _build_section(TenantConfig, t, f"tenants[{i}]") for i, t in enumerate(value)
            )
        elif key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(key, "expected a table")
            kwargs[key] = _build_section(_SECTIONS[key], value, key)
        else:
            raise ConfigError(key, f"unknown section (known: data_dir, {', '.join(_SECTIONS)})")
    return Config(**kwargs)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read `path` (TOML) if given, apply CLI overrides ({"host.capacity": "4GiB", ...})."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(str(path), f"cannot read: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(str(path), f"not valid TOML: {e}") from e
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.rpartition(".")
        target = raw.setdefault(section, {}) if section else raw
        target[key] = value
    try:
        return config_from_dict(raw)
    except ConfigError as e:
        if path is not None:
            raise ConfigError(f"{path}: {e.field}", e.message) from e
        raise
