"""A Redis tier's options and its connection: checked once at config load, turned into a
redis-py client (`RedisCluster`, or `Redis` for one server) when the tier opens.

Primitives: `OPTIONS` (the kind's keys and defaults), `RedisOptions.of(spec, where)`
(raises ConfigError naming the key), `connect(opts, password)`, `probe(client)`,
`is_outage(exc)`, `is_auth_failure(exc)`, `read_password(opts, where)`.

redis-py's own retries are off: the tier's link (`tierd.tiers.remote_link`) decides what
a failed call means, and a retry would only stretch a call past its deadline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tierd.config_checks import host_port, show
from tierd.errors import ConfigError
from tierd.tiers.store_options import COMMON, check_common

if TYPE_CHECKING:
    from tierd.config import TierSpec

OPTIONS: dict[str, Any] = {
    "nodes": (),  # "host:port" seeds: every node of a cluster is found from any of them
    "mode": "cluster",  # cluster | single (one server, no cluster)
    "username": "",  # ACL user ("": the default user)
    "password": "",
    "password_file": "",  # read once at start (first line); instead of password
    "tls": False,
    "ca_file": "",
    "cert_file": "",  # client certificate (mutual TLS), with key_file
    "key_file": "",
    **COMMON,
}


@dataclass(frozen=True)
class RedisOptions:
    nodes: tuple[tuple[str, int], ...]
    mode: str
    username: str
    password: str
    password_file: str
    tls: bool
    ca_file: str
    cert_file: str
    key_file: str
    key_prefix: str
    timeout_ms: int
    max_queued_bytes: int
    write: str
    io_threads: int

    @classmethod
    def of(cls, spec: TierSpec, where: str) -> RedisOptions:
        """The spec's options, checked; `where` prefixes the keys errors name."""
        o = {k: spec.option(k, d) for k, d in OPTIONS.items()}
        check_common(o, spec, where)
        nodes = [host_port(addr, f"{where}.nodes") for addr in o["nodes"]]
        if not nodes:
            raise ConfigError(f"{where}.nodes", 'name at least one node, e.g. ["10.0.0.5:6379"]')
        if o["mode"] not in ("cluster", "single"):
            raise ConfigError(f"{where}.mode", f"must be cluster or single, got {show(o['mode'])}")
        if o["mode"] == "single" and len(nodes) != 1:
            raise ConfigError(f"{where}.nodes", "mode = single takes exactly one node")
        if o["password"] and o["password_file"]:
            raise ConfigError(f"{where}.password_file", "set password or password_file, not both")
        if not o["tls"]:
            for key in ("ca_file", "cert_file", "key_file"):
                if o[key]:
                    raise ConfigError(f"{where}.{key}", "needs tls = true")
        if bool(o["cert_file"]) != bool(o["key_file"]):
            raise ConfigError(f"{where}.cert_file", "cert_file and key_file go together")
        return cls(**{**o, "nodes": tuple(nodes)})


def read_password(opts: RedisOptions, where: str) -> str:
    """The password, from the option or the first line of password_file."""
    if not opts.password_file:
        return opts.password
    try:
        text = Path(opts.password_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}.password_file", f"cannot read {opts.password_file}: "
                          f"{getattr(e, 'strerror', None) or e}") from None  # fmt: skip
    lines = text.splitlines()
    if not lines or not lines[0]:
        raise ConfigError(f"{where}.password_file", f"{opts.password_file} is empty")
    return lines[0]


def check_files(opts: RedisOptions, where: str) -> None:
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(opts, key)
        if path and not Path(path).is_file():
            raise ConfigError(f"{where}.{key}", f"{path} is not a readable file")


def connect(opts: RedisOptions, password: str) -> Any:
    """A client of the store (connects: a cluster client learns the slots here)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.cluster import ClusterNode, RedisCluster
    from redis.retry import Retry

    timeout = opts.timeout_ms / 1000
    common: dict[str, Any] = {
        "username": opts.username or None,
        "password": password or None,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    if opts.tls:
        common.update(ssl=True, ssl_cert_reqs="required", ssl_ca_certs=opts.ca_file or None,
                      ssl_certfile=opts.cert_file or None, ssl_keyfile=opts.key_file or None)  # fmt: skip
    if opts.mode == "single":
        host, port = opts.nodes[0]
        return redis.Redis(host=host, port=port, **common)
    return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in opts.nodes], **common)


def probe(client: Any) -> None:
    """Raise unless the store serves: one server answers PING; a cluster's every master
    says cluster_state:ok (a restarted cluster answers before it agrees on its slots)."""
    from redis.cluster import RedisCluster
    from redis.exceptions import ClusterDownError

    if not isinstance(client, RedisCluster):
        client.ping()
        return
    infos: dict[str, Any] = client.cluster_info(target_nodes=RedisCluster.PRIMARIES)
    if "cluster_state" in infos:  # one master: its own answer, not one per node
        infos = {"": infos}
    for node, info in infos.items():
        if info.get("cluster_state") != "ok":
            raise ClusterDownError(f"node {node} says cluster_state:{info.get('cluster_state')}")


def is_auth_failure(exc: BaseException) -> bool:
    from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError

    return isinstance(exc, (AuthenticationError, AuthorizationError, NoPermissionError))


def is_outage(exc: BaseException) -> bool:
    """A failure that says the store (or the part of a cluster a key lives on) cannot be
    reached or does not serve now, rather than one about the request."""
    from redis.exceptions import (
        BusyLoadingError,
        ClusterDownError,
        ClusterError,
        ConnectionError,
        ReadOnlyError,
        RedisClusterException,
        TimeoutError,
        TryAgainError,
    )

    return isinstance(exc, (ConnectionError, TimeoutError, ClusterError, ClusterDownError,
                            RedisClusterException, BusyLoadingError, ReadOnlyError,
                            TryAgainError, OSError))  # fmt: skip
