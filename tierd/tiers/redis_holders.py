"""The prefix directory's entries in a Redis tier's cluster (`[peers] directory`): which
daemon holds which block, through the tier's own link (its nodes, ACL user, password and
TLS, its deadline and its view of whether the cluster is up).

Primitives: `RedisHolderBook(tier)` (a `tierd.core.holders.HolderBook`).

Keys. The entries of a block are one hash,

    <key_prefix>:held:{<tenant>:<namespace id, hex>}:<block key, hex>

named like the tier's block values (the tenant percent-encoded, the same hash tag: a
namespace's entries share one slot, so a lookup's batch is one round trip to one node),
and distinct from them ("held" is neither a hash tag nor a block key). Field: a daemon's
address; value: when its entry expires (unix ms), so each daemon's entry ages on its own
while the hash as a whole expires with its longest-lived entry (PEXPIRE NX and GT: Redis
7 or Valkey 7.2 and later).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Protocol
from urllib.parse import quote

from tierd.tiers.remote_redis import RedisTier


class NamespaceRef(Protocol):
    """What naming an entry takes of a namespace."""

    @property
    def id(self) -> bytes: ...

    @property
    def tenant(self) -> str: ...


class RedisHolderBook:
    def __init__(self, tier: RedisTier) -> None:
        self.tier = tier
        self.name = tier.name

    def available(self) -> bool:
        return self.tier.link.up

    def key_of(self, ns: NamespaceRef, key: bytes) -> str:
        tenant = quote(ns.tenant, safe="")
        return f"{self.tier.opts.key_prefix}:held:{{{tenant}:{ns.id.hex()}}}:{key.hex()}"

    def record(self, holder: str, held: Sequence[tuple[NamespaceRef, bytes]],
               gone: Sequence[tuple[NamespaceRef, bytes]], ttl_ms: int) -> None:  # fmt: skip
        expiry = int(time.time() * 1000) + ttl_ms
        sets = list(dict.fromkeys(self.key_of(ns, k) for ns, k in held))
        drops = [self.key_of(ns, k) for ns, k in gone]

        def io(client: Any) -> None:
            pipe = client.pipeline(transaction=False)
            for rkey in sets:
                pipe.hset(rkey, holder, expiry)
                # Set on a new hash, only lengthened on one another daemon renews: a daemon
                # with a shorter TTL must not cut the others' entries short.
                pipe.pexpire(rkey, ttl_ms, nx=True)
                pipe.pexpire(rkey, ttl_ms, gt=True)
            for rkey in drops:
                pipe.hdel(rkey, holder)
            pipe.execute()

        self.tier.link.call(io, lambda _: None).result()

    def holders(self, ns: NamespaceRef, keys: Sequence[bytes]) -> list[dict[str, int]]:
        rkeys = [self.key_of(ns, k) for k in keys]

        def io(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for rkey in rkeys:
                pipe.hgetall(rkey)
            return list(pipe.execute())

        def deliver(got: list[Any]) -> list[dict[str, int]]:
            out: list[dict[str, int]] = []
            for fields in got:
                entry: dict[str, int] = {}
                for addr, expiry in (fields or {}).items():
                    try:
                        entry[addr.decode()] = int(expiry)
                    except (UnicodeDecodeError, ValueError):
                        continue  # not an entry this scheme writes: no advice
                out.append(entry)
            return out

        return self.tier.link.call(io, deliver).result()
