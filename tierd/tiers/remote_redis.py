"""The Redis tier kind ("redis"): copies in a Redis or Valkey cluster (or one server) that
several daemons share, through redis-py.

Keys. A block of namespace `ns` is stored under

    <key_prefix>:{<tenant>:<namespace id, hex>}:<block key, hex>

with the tenant percent-encoded (no braces or colons survive), so keys of two tenants
never collide and the daemon only ever names keys under the caller's own tenant and
namespace. The braces are a cluster hash tag: all blocks of a namespace share one slot,
so one pipeline of a lookup's probes goes to one node in one round trip. The price is
placement: a namespace lives on one master (and its replica), so one very large
namespace is not spread over the cluster and its node takes all its traffic; many
namespaces spread as usual.

Copies, values, checks and availability are every shared store's (`tierd.tiers.
remote_store`); this module is the Redis side of them: a lookup reads each key's header
with GETRANGE in one pipeline (one slot: one node, one round trip), attend reads a
layer's range and the header in one pipeline, background work is one pipeline of SETs
and DELs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import quote

from tierd.config import TierSpec
from tierd.errors import ConfigError
from tierd.tiers import redis_conn
from tierd.tiers.base import NamespaceRef
from tierd.tiers.redis_conn import RedisOptions
from tierd.tiers.registry import TierContext
from tierd.tiers.remote_store import StoreTier

log = logging.getLogger("tierd.tiers")


class RedisTier(StoreTier):
    kind = "redis"
    OPTIONS: ClassVar[dict[str, Any]] = redis_conn.OPTIONS
    opts: RedisOptions

    @classmethod
    def check_spec(cls, spec: TierSpec, where: str) -> None:
        RedisOptions.of(spec, where)

    @classmethod
    def open(cls, spec: TierSpec, context: TierContext) -> RedisTier:
        where = spec.name
        opts = RedisOptions.of(spec, where)
        password = redis_conn.read_password(opts, where)
        redis_conn.check_files(opts, where)
        try:
            import redis  # noqa: F401 - the optional dependency, named in the error
        except ImportError:
            raise ConfigError(f"{where}.kind", "the redis tier needs redis-py: pip install "
                              "'tierd[redis]'") from None  # fmt: skip

        def refused(e: Exception) -> Exception | None:
            if not redis_conn.is_auth_failure(e):
                return None
            return ConfigError(f"{where}.password", f"the store at {_nodes(opts)} refused "
                               f"these credentials: {e}")  # fmt: skip

        link = cls.open_link(spec.name, lambda: redis_conn.connect(opts, password),
                             redis_conn.probe, redis_conn.is_outage, opts.timeout_ms,
                             opts.io_threads, refused)  # fmt: skip
        return cls(spec, opts, link)

    @property
    def backend(self) -> str:
        return "redis-cluster" if self.opts.mode == "cluster" else "redis"

    def details(self) -> dict[str, Any]:
        queued, drops = self.held()
        return {"nodes": _nodes(self.opts), "mode": self.opts.mode, "write": self.opts.write,
                "state": "up" if self.link.up else f"down: {self.link.reason}",
                "queued_bytes": queued, "pending_deletes": drops}  # fmt: skip

    def key_of(self, ns: NamespaceRef, key: bytes) -> str:
        tenant = quote(ns.tenant, safe="")
        return f"{self.opts.key_prefix}:{{{tenant}:{ns.id.hex()}}}:{key.hex()}"

    # -- the store's calls -----------------------------------------------------------------

    def _io_set(self, client: Any, rkey: str, value: bytes) -> None:
        client.set(rkey, value)

    def _io_get(self, client: Any, rkey: str) -> bytes | None:
        return client.get(rkey)  # type: ignore[no-any-return]

    def _io_heads(self, client: Any, rkeys: Sequence[str], hlen: int) -> list[bytes | None]:
        pipe = client.pipeline(transaction=False)
        for rkey in rkeys:
            pipe.getrange(rkey, 0, hlen - 1)
        return list(pipe.execute())

    def _io_range(self, client: Any, rkey: str, hlen: int, lo: int, hi: int
                  ) -> tuple[bytes | None, bytes]:  # fmt: skip
        pipe = client.pipeline(transaction=False)
        pipe.getrange(rkey, 0, hlen - 1)
        pipe.getrange(rkey, lo, hi)
        head, part = pipe.execute()
        return head, part

    def _io_flush(self, client: Any, writes: Sequence[tuple[str, bytes]],
                  drops: Sequence[str]) -> Sequence[str]:  # fmt: skip
        pipe = client.pipeline(transaction=False)
        for rkey, value in writes:
            pipe.set(rkey, value)
        for rkey in drops:
            pipe.delete(rkey)
        pipe.execute()
        return ()


def _nodes(opts: RedisOptions) -> str:
    return ", ".join(f"{h}:{p}" for h, p in opts.nodes)
