"""Semantic checks of a parsed configuration, run before a daemon starts or reloads.

Primitives: `check_config(cfg)` raises `ConfigError(key, reason)` for the first value out of
range; `anonymous_listeners(cfg)` names the TCP listeners that would admit any peer.

Every number is finite and inside a range the daemon can actually run with: a value that
parses but would fail later (a thread pool of a million threads, a lease TTL past the wire's
uint32, a gRPC message limit past int32) must be refused here, where the old configuration
can still be kept, rather than inside a running daemon.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from tierd.core.policies import POLICIES
from tierd.errors import ConfigError
from tierd_client.address import unix_socket_path

if TYPE_CHECKING:
    from tierd.config import Config, TierSpec
    from tierd.tiers.base import Tier

MiB, GiB = 1 << 20, 1 << 30
MAX_SIZE = 1 << 50  # 1 PiB: larger than any tier this daemon can address, so surely a typo
DAY_MS = 86_400_000
BLOCK_ALIGN = 4096  # O_DIRECT transfers are whole filesystem blocks

_TCP_RE = re.compile(r"^(\[[^\]]+\]|[^:\[\]]+):([0-9]{1,5})$", re.ASCII)
_METRICS_RE = re.compile(r"^(?:(\[[^\]]+\]|[^:\[\]]*):)?([0-9]{1,5})$", re.ASCII)
_HEX64_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)


def show(value: object, limit: int = 60) -> str:
    """`repr(value)` cut to `limit` characters: messages quote what was written, not megabytes."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def key_name(key: str) -> str:
    """A key as written when it is plain text, else quoted: errors must not carry escapes."""
    return key if key.isprintable() and len(key) <= 40 else show(key, 40)


def _number(key: str, value: float, lo: float, hi: float, what: str = "") -> None:
    if not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {show(value)}")
    if not lo <= value <= hi:
        raise ConfigError(key, what or f"must be between {lo:g} and {hi:g}, got {show(value)}")


def _path(key: str, path: Path | None) -> None:
    if path is None:
        return
    text = str(path)
    if "\0" in text:
        raise ConfigError(key, "path contains a NUL byte")


def _address(key: str, addr: str) -> bool:
    """Check unix:PATH or HOST:PORT; True for a TCP address."""
    sock = unix_socket_path(addr)
    if sock is not None:
        if not sock or "\0" in sock:
            raise ConfigError(key, f"{show(addr)}: unix socket path is empty or has a NUL byte")
        return False
    m = _TCP_RE.match(addr)
    if not m:
        raise ConfigError(key, f"{show(addr)} is neither unix:PATH nor HOST:PORT")
    if int(m.group(2)) > 65535:
        raise ConfigError(key, f"{show(addr)}: port must be at most 65535")
    return True


_HOST_PORT_RE = re.compile(r"^(\[[^\]]+\]|[^:\[\]\s]+):([0-9]{1,5})$", re.ASCII)


def host_port(value: object, key: str, what: str = "host:port") -> tuple[str, int]:
    """A TCP HOST:PORT ([v6]:PORT too) as (host without brackets, port); otherwise a
    ConfigError naming `key`: "<value> is not <what>"."""
    m = _HOST_PORT_RE.match(value) if isinstance(value, str) else None
    if m is None or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(key, f"{show(value)} is not {what}")
    return m.group(1).strip("[]"), int(m.group(2))


def _printable(key: str, text: str) -> None:
    if not text.isprintable():
        raise ConfigError(key, f"{show(text)} contains control or non-printable characters")


def anonymous_listeners(cfg: Config) -> list[str]:
    """TCP listeners that authenticate nobody: no tenants and no client CA."""
    if cfg.tenants or cfg.server.tls_client_ca is not None:
        return []
    return [a for a in cfg.server.listen if not a.startswith("unix:")]


def _check_server(cfg: Config) -> None:
    srv = cfg.server
    for addr in srv.listen:
        if _address("server.listen", addr) and not (srv.tls_cert and srv.tls_key):
            raise ConfigError("server.listen", f"TCP listener {show(addr)} needs server.tls_cert "
                              "and server.tls_key (TCP is served only over TLS)")  # fmt: skip
    anonymous = anonymous_listeners(cfg)
    if anonymous and not srv.allow_anonymous:
        raise ConfigError("server.listen", f"TCP listener {show(anonymous[0])} would admit any "
                          "peer (no [[tenants]], no server.tls_client_ca): configure one of them, "
                          "or set server.allow_anonymous = true")  # fmt: skip
    # gRPC takes the message limit as an int32; below 1 MiB a single block would not fit.
    _number("server.max_message_bytes", srv.max_message_bytes, MiB, 2 * GiB - 1)
    _number("server.workers", srv.workers, 1, 1024)
    _number("server.drain_seconds", srv.drain_seconds, 0, 86_400)
    for name in ("tls_cert", "tls_key", "tls_client_ca"):
        _path(f"server.{name}", getattr(srv, name))


def _check_tiers(cfg: Config) -> None:
    host, nvme = cfg.host, cfg.nvme
    _number("host.capacity", host.capacity_bytes, 0, MAX_SIZE)
    for name in ("high_watermark", "low_watermark"):
        _number(f"host.{name}", getattr(host, name), 0, 1)
    if not 0 < host.low_watermark < host.high_watermark <= 1:
        raise ConfigError("host.low_watermark", "need 0 < low_watermark < high_watermark <= 1")
    for key, name in (("host.policy", host.policy), ("nvme.policy", nvme.policy)):
        if name not in POLICIES:
            raise ConfigError(key, f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    _path("nvme.path", nvme.path)
    _number("nvme.capacity", nvme.capacity_bytes, 0, MAX_SIZE)
    if nvme.backend not in ("auto", "posix", "kvikio"):
        raise ConfigError("nvme.backend", "must be one of auto, posix, kvikio")
    _number("nvme.io_threads", nvme.io_threads, 1, 256)
    _number("nvme.chunk_bytes", nvme.chunk_bytes, BLOCK_ALIGN, GiB)
    if nvme.chunk_bytes % BLOCK_ALIGN:
        raise ConfigError("nvme.chunk_bytes", f"must be a multiple of {BLOCK_ALIGN}")
    csd = cfg.csd
    _number("csd.workers", csd.workers, 0, 64)
    _number("csd.capacity", csd.capacity_bytes, 1, MAX_SIZE, "must be between 1 byte and 1 PiB")
    for addr in csd.remote:
        _address("csd.remote", addr)


_TIER_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}", re.ASCII)


def _check_tier_list(cfg: Config) -> None:
    """The [[tiers]] chain: names, kinds, each kind's own keys, and the shape of the chain."""
    from tierd.config import CsdConfig, HostTierConfig, NvmeTierConfig
    from tierd.tiers.registry import KINDS, kind_class

    if not cfg.tier_list:
        return
    for section, default in (("host", HostTierConfig()), ("nvme", NvmeTierConfig()),
                             ("csd", CsdConfig())):  # fmt: skip
        if getattr(cfg, section) != default:
            raise ConfigError(section, "[[tiers]] replaces the [host], [nvme] and [csd] "
                              "sections: set this tier's keys in its [[tiers]] table")  # fmt: skip
    names = [s.name for s in cfg.tier_list]
    for i, spec in enumerate(cfg.tier_list):
        where = f"tiers[{i}]"
        if not _TIER_NAME_RE.fullmatch(spec.name) or names.count(spec.name) > 1:
            raise ConfigError(f"{where}.name", "every tier needs a unique name of lowercase "
                              "letters, digits, - and _ (at most 32)")  # fmt: skip
        if spec.kind not in KINDS:
            raise ConfigError(f"{where}.kind", f"unknown tier kind {show(spec.kind)}; known: "
                              f"{', '.join(KINDS)}")  # fmt: skip
        kind = kind_class(spec.kind)
        if (i == 0) != kind.memory:
            raise ConfigError(f"{where}.kind", "the first tier must be a memory tier clients "
                              "map (kind host), and only the first" if i == 0 else
                              "only the first tier may be a memory tier")  # fmt: skip
        _number(f"{where}.capacity", spec.capacity_bytes, 0, MAX_SIZE)
        _path(f"{where}.path", spec.path)
        if not 0 < spec.low_watermark < spec.high_watermark <= 1:
            raise ConfigError(f"{where}.low_watermark",
                              "need 0 < low_watermark < high_watermark <= 1")  # fmt: skip
        if spec.policy not in POLICIES:
            raise ConfigError(f"{where}.policy", f"unknown policy {spec.policy!r}; known: "
                              f"{', '.join(POLICIES)}")  # fmt: skip
        _check_codec(spec, kind, where)
        for key, value in spec.options:
            if key not in kind.OPTIONS:
                known = ", ".join(sorted(kind.OPTIONS)) or "none"
                raise ConfigError(f"{where}.{key}", f"unknown key for a {spec.kind} tier "
                                  f"(its own keys: {known})")  # fmt: skip
            want = type(kind.OPTIONS[key])
            if not isinstance(value, want) or (want is int and isinstance(value, bool)):
                raise ConfigError(f"{where}.{key}", f"expected {want.__name__}, got {show(value)}")
        kind.check_spec(spec, where)


def _check_codec(spec: TierSpec, kind: type[Tier], where: str) -> None:
    """A tier's codec: known, its options taken by it, and not the memory tier's (what
    clients map and write, raw). Storage, CSD and shared kinds store encoded copies: CSD
    workers attend over the codes, and a shared value's header names its encoding."""
    if spec.codec == "raw" and not spec.codec_params:
        return
    from tierd_kernels.codecs import ENCODINGS, make_codec

    if spec.codec not in ENCODINGS:
        raise ConfigError(f"{where}.codec", f"unknown codec {show(spec.codec)}; known: "
                          f"{', '.join(ENCODINGS)}")  # fmt: skip
    for key, value in spec.codec_params:
        try:
            make_codec(spec.codec, **{key: value})
        except ValueError as e:
            raise ConfigError(f"{where}.codec_params.{key}", str(e)) from None
    if spec.codec != "raw" and kind.memory:
        raise ConfigError(f"{where}.codec", f"a {spec.kind} tier stores blocks raw (clients "
                          "write and map its bytes as they are); set a codec on a tier "
                          "below it")  # fmt: skip


def _check_leases(cfg: Config) -> None:
    leases = cfg.leases
    # Lease TTLs travel as uint32 milliseconds; a day is far past any useful lease.
    _number("leases.max_ttl_ms", leases.max_ttl_ms, 1, DAY_MS)
    _number("leases.default_ttl_ms", leases.default_ttl_ms, 1, leases.max_ttl_ms,
            "need 0 < default_ttl_ms <= max_ttl_ms")  # fmt: skip
    _number("leases.max_keys_per_call", leases.max_keys_per_call, 1, 1 << 24)
    _number("leases.sequence_idle_ms", leases.sequence_idle_ms, 1, DAY_MS)


def _check_tenants(cfg: Config) -> None:
    names = [t.name for t in cfg.tenants]
    for i, t in enumerate(cfg.tenants):
        where = f"tenants[{i}]"
        if not t.name or names.count(t.name) > 1:
            raise ConfigError(f"{where}.name", "every tenant needs a unique name")
        _printable(f"{where}.name", t.name)
        if t.token_sha256 and not _HEX64_RE.fullmatch(t.token_sha256):
            raise ConfigError(f"{where}.token_sha256", "expected 64 hex digits")
        _printable(f"{where}.cert_cn", t.cert_cn)
        if not (t.token_sha256 or t.cert_cn):
            raise ConfigError(where, "needs token_sha256 or cert_cn")
        _number(f"{where}.weight", t.weight, 0, 1e6)
        if t.weight <= 0:
            raise ConfigError(f"{where}.weight", "must be positive")
        _number(f"{where}.host_quota", t.host_quota, 0, MAX_SIZE)
        _number(f"{where}.nvme_quota", t.nvme_quota, 0, MAX_SIZE)
        tiers = {s.name for s in cfg.tiers}
        for tier, size in t.quotas:
            if tier not in tiers:
                raise ConfigError(f"{where}.quotas.{tier}", f"no tier named {show(tier)} "
                                  f"(tiers: {', '.join(sorted(tiers))})")  # fmt: skip
            _number(f"{where}.quotas.{tier}", size, 0, MAX_SIZE)


def check_config(cfg: Config) -> None:
    """Raise ConfigError for the first value the daemon cannot run with."""
    _path("data_dir", cfg.data_dir)
    _check_server(cfg)
    _check_tiers(cfg)
    _check_tier_list(cfg)
    _check_leases(cfg)
    _check_tenants(cfg)
    listen = cfg.metrics.listen
    if listen:
        m = _METRICS_RE.match(listen)
        if not m or int(m.group(2)) > 65535:
            raise ConfigError("metrics.listen", f"{show(listen)} is not [HOST:]PORT")
