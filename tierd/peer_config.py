"""The `[peers]` section: other tierd daemons this one pulls blocks from, and the listener
they pull from it through (disaggregated serving: prefill on one host, decode on another).

Primitives: `PeersConfig` (frozen), `peers_config(raw) -> PeersConfig`.

Off by default: with neither `listen` nor `peers` nothing is started and nothing changes.
`listen` is a second gRPC server for daemons only (TCP), answering `Peer` calls; the bytes
themselves move by one-sided reads of this daemon's memory through a transfer engine
reached at `engine_hostname`. Every peer call carries the shared secret in `token_file`,
so it is required as soon as either side is configured. `ca_file`, `cert_file` and
`key_file` (all three or none) turn on mutual TLS between daemons.

`directory` names a `redis` tier of `[[tiers]]` whose cluster keeps the prefix directory
(`tierd.core.holders`): which daemon holds which blocks, each entry valid for
`directory_ttl_ms`. A daemon records itself there under `advertise` (default: `listen`),
the address the others list in their `peers` (so not 0.0.0.0 or [::], which name
no one).

`bulk = true` lets remote clients (on other hosts) get and put blocks through a transfer
engine instead of gRPC payloads (`BulkGet`/`BulkPut` on the client service, under its
tenant checks); it needs no secret, since no `Peer` call is involved. That engine is a
second one, on its own port at the same `engine_hostname`, and exposes only the exchange
area (`bulk_exchange` bytes, default 256 MiB): blocks in transit are copied through it,
the memory tier is never registered with it (`tierd.transfer.exchange`). Whoever reaches
its port can still read the blocks in transit and write into their slots (a write is
caught by the reader's checksum), so tenants that must not see each other's blocks in
transit need a network where only their own hosts reach it. A tenant naming an engine
address that never answers stalls the other tenants' bulk puts about a minute per put
(`tierd.core.bulk`): trusted tenants only.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierd.config_checks import host_port, key_name, show
from tierd.errors import ConfigError

PROTOCOLS = ("tcp", "rdma")
MAX_PEERS = 64
MIN_EXCHANGE, MAX_EXCHANGE = 1 << 20, 64 << 30


@dataclass(frozen=True)
class PeersConfig:
    listen: str = ""  # HOST:PORT of the daemons-only gRPC server; empty: serve no peer
    engine_hostname: str = "127.0.0.1"  # where peers reach this daemon's transfer engine
    protocol: str = "tcp"  # the transfer engine's transport: tcp or rdma
    peers: tuple[str, ...] = ()  # other daemons' `listen` addresses, asked in this order
    token_file: Path | None = None  # the secret every daemon of the group presents
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout_ms: int = 2_000  # deadline of one call to a peer (a slow peer is a miss)
    lease_ttl_ms: int = 10_000  # how long a source pins blocks for a pull that went quiet
    retry_ms: int = 2_000  # a peer that failed is not asked again for this long
    directory: str = ""  # a redis tier whose cluster keeps the prefix directory; "": none
    directory_ttl_ms: int = 30_000  # how long an entry stays without being renewed
    advertise: str = ""  # HOST:PORT the directory names this daemon by ("": listen)
    bulk: bool = False  # remote clients move blocks through an engine of their own
    bulk_exchange: int = 256 << 20  # bytes of blocks in transit through it at once

    @property
    def group(self) -> bool:
        """Whether this daemon talks to peer daemons (which needs the group's secret)."""
        return bool(self.listen or self.peers)

    @property
    def enabled(self) -> bool:
        """Whether the daemon opens a transfer engine at all."""
        return self.group or self.bulk

    @property
    def tls(self) -> bool:
        return self.ca_file is not None


def _address(value: object, where: str) -> str:
    host_port(value, where, "HOST:PORT (TCP)")
    return str(value)


def _size(value: object, where: str) -> int:
    from tierd.config import parse_size  # here: tierd.config imports this module

    size = parse_size(value, key=where)
    if not MIN_EXCHANGE <= size <= MAX_EXCHANGE:
        raise ConfigError(where, f"expected a size between {MIN_EXCHANGE >> 20} MiB and "
                          f"{MAX_EXCHANGE >> 30} GiB (as \"256MiB\"), got {show(value)}")  # fmt: skip
    return size


def _path(value: object, where: str) -> Path:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ConfigError(where, f"expected a path, got {show(value)}")
    return Path(value)


def _int(value: object, where: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ConfigError(where, f"expected an integer between {lo} and {hi}, got {show(value)}")
    return value


def peers_config(raw: dict[str, Any]) -> PeersConfig:
    """The section as written, checked; every error names its key."""
    known = {f.name for f in dataclasses.fields(PeersConfig)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"peers.{key_name(key)}"
        if key not in known:
            raise ConfigError(where, f"unknown key (known: {', '.join(sorted(known))})")
        if key in ("listen", "advertise"):
            kwargs[key] = _address(value, where)
        elif key == "directory":
            if not isinstance(value, str) or not value:
                raise ConfigError(where, f"expected the name of a redis tier, got {show(value)}")
            kwargs[key] = value
        elif key == "directory_ttl_ms":
            kwargs[key] = _int(value, where, 100, 3_600_000)
        elif key == "peers":
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or len(value) > MAX_PEERS:
                raise ConfigError(where, f"expected a list of at most {MAX_PEERS} HOST:PORT")
            kwargs[key] = tuple(_address(v, f"{where}[{i}]") for i, v in enumerate(value))
        elif key == "engine_hostname":
            if not isinstance(value, str) or not value or not value.isprintable() or " " in value:
                raise ConfigError(where, f"expected a host name or address, got {show(value)}")
            kwargs[key] = value
        elif key == "protocol":
            if value not in PROTOCOLS:
                raise ConfigError(where, f"expected one of {', '.join(PROTOCOLS)}, "
                                  f"got {show(value)}")  # fmt: skip
            kwargs[key] = value
        elif key == "bulk":
            if not isinstance(value, bool):
                raise ConfigError(where, f"expected true or false, got {show(value)}")
            kwargs[key] = value
        elif key == "bulk_exchange":
            kwargs[key] = _size(value, where)
        elif key in ("timeout_ms", "retry_ms"):
            kwargs[key] = _int(value, where, 1, 3_600_000)
        elif key == "lease_ttl_ms":
            kwargs[key] = _int(value, where, 1, 600_000)
        else:
            kwargs[key] = _path(value, where)
    cfg = PeersConfig(**kwargs)
    if cfg.group and cfg.token_file is None:
        raise ConfigError("peers.token_file", "required with peers.listen or peers.peers: "
                          "a file holding the secret every daemon of the group presents")  # fmt: skip
    if "bulk_exchange" in kwargs and not cfg.bulk:  # it sizes nothing then
        raise ConfigError("peers.bulk_exchange", "sizes the clients' engine: needs peers.bulk")
    if cfg.directory and not (cfg.listen or cfg.peers):
        raise ConfigError("peers.directory", "needs peers.listen (to be named in it) or "
                          "peers.peers (to ask it)")  # fmt: skip
    named = cfg.advertise or cfg.listen
    if cfg.directory and named and host_port(named, "peers.advertise")[0] in ("0.0.0.0", "::"):
        # Every interface is no address a peer can list: the entries would match no one.
        raise ConfigError("peers.advertise", f"{named} binds every interface; name the "
                          "HOST:PORT the other daemons list in their peers")  # fmt: skip
    tls = {"ca_file": cfg.ca_file, "cert_file": cfg.cert_file, "key_file": cfg.key_file}
    missing = [k for k, v in tls.items() if v is None]
    if missing and len(missing) < len(tls):
        raise ConfigError(f"peers.{missing[0]}", "mutual TLS between daemons needs ca_file, "
                          "cert_file and key_file together")  # fmt: skip
    return cfg


def read_token(cfg: PeersConfig) -> str:
    """The shared secret (read at start, whitespace around it dropped)."""
    assert cfg.token_file is not None
    try:
        token = cfg.token_file.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("peers.token_file", f"cannot read {cfg.token_file}: {e}") from e
    if len(token) < 16:
        raise ConfigError("peers.token_file", f"{cfg.token_file} holds fewer than 16 characters")
    return token
