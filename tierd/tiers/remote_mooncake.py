"""The Mooncake tier kind ("mooncake"): copies in a Mooncake Store that several daemons
share (its master places objects in the memory segments its clients lend to the pool and
moves bytes with its transfer engine: TCP here, RDMA where the hardware has it).

Keys. A block of namespace `ns` is stored under

    <key_prefix>/<tenant>/<namespace id, hex>/<block key, hex>

with the tenant percent-encoded (no '/' survives), so keys of two tenants never collide
and the daemon only names keys under the caller's own tenant and namespace; its header
also under the same key + "/h", so a lookup reads a batch of small headers rather than
whole blocks (Mooncake reads objects whole).

Copies, values, checks and availability are every shared store's (`tierd.tiers.
remote_store`). What differs: writes are upserts (a value written again replaces the
old one); the daemon lends `segment_bytes` of its memory to the pool (by default its
budget, so a pool of N daemons holds what they put); Mooncake's own eviction may drop
any object when the pool is full (a later read is a miss); an object a reader holds a
lease on cannot be deleted until the lease ends (the deletion is tried again); a
restarted master has lost every object (reads are misses) and the daemon sets its client
up again. A read that finds nothing is a miss: Mooncake does not tell a missing object
from a master that went away, so the first write that fails marks the tier down.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar
from urllib.parse import quote

from tierd.config import TierSpec
from tierd.errors import ConfigError
from tierd.tiers import mooncake_conn
from tierd.tiers.base import NamespaceRef
from tierd.tiers.mooncake_conn import LEASED, NOT_FOUND, MooncakeOptions, StoreDown, check
from tierd.tiers.registry import TierContext
from tierd.tiers.remote_store import StoreTier
from tierd.tiers.remote_value import stated_header_bytes

log = logging.getLogger("tierd.tiers")

HEAD_SUFFIX = "/h"


class MooncakeTier(StoreTier):
    kind = "mooncake"
    OPTIONS: ClassVar[dict[str, Any]] = mooncake_conn.OPTIONS
    opts: MooncakeOptions

    @classmethod
    def check_spec(cls, spec: TierSpec, where: str) -> None:
        MooncakeOptions.of(spec, where)

    @classmethod
    def open(cls, spec: TierSpec, context: TierContext) -> MooncakeTier:
        where = spec.name
        opts = MooncakeOptions.of(spec, where)
        try:
            import mooncake.store  # noqa: F401 - the optional dependency, named in the error
        except ImportError as e:
            raise ConfigError(f"{where}.kind", "the mooncake tier needs Mooncake Store: pip "
                              "install mooncake-transfer-engine-non-cuda (and the system's "
                              f"libibverbs1): {e}") from None  # fmt: skip
        link = cls.open_link(spec.name, lambda: mooncake_conn.connect(opts),
                             mooncake_conn.probe_with(opts), mooncake_conn.is_outage,
                             opts.timeout_ms, opts.io_threads)  # fmt: skip
        return cls(spec, opts, link)

    @property
    def backend(self) -> str:
        return "mooncake"

    def details(self) -> dict[str, Any]:
        queued, drops = self.held()
        return {"master": self.opts.master_addr, "protocol": self.opts.protocol,
                "segment_bytes": self.opts.segment_bytes, "write": self.opts.write,
                "state": "up" if self.link.up else f"down: {self.link.reason}",
                "queued_bytes": queued, "pending_deletes": drops}  # fmt: skip

    def key_of(self, ns: NamespaceRef, key: bytes) -> str:
        tenant = quote(ns.tenant, safe="")
        return f"{self.opts.key_prefix}/{tenant}/{ns.id.hex()}/{key.hex()}"

    # -- the store's calls -----------------------------------------------------------------

    def _io_set(self, client: Any, rkey: str, value: bytes) -> None:
        head = value[: stated_header_bytes(value)]
        rcs = client.upsert_batch([rkey, rkey + HEAD_SUFFIX], [value, head])
        for rc in rcs if isinstance(rcs, list) else [rcs]:
            check(rc, f"writing {rkey}")

    def _io_get(self, client: Any, rkey: str) -> bytes | None:
        return client.get(rkey) or None  # type: ignore[no-any-return]

    def _io_heads(self, client: Any, rkeys: Sequence[str], hlen: int) -> list[bytes | None]:
        got = client.get_batch([k + HEAD_SUFFIX for k in rkeys])
        return [g[:hlen] if g else None for g in got]

    def _io_range(self, client: Any, rkey: str, hlen: int, lo: int, hi: int
                  ) -> tuple[bytes | None, bytes]:  # fmt: skip
        value = client.get(rkey)
        if not value:
            return None, b""
        return value[:hlen], value[lo : hi + 1]

    def _io_flush(self, client: Any, writes: Sequence[tuple[str, bytes]],
                  drops: Sequence[str]) -> Sequence[str]:  # fmt: skip
        for rkey, value in writes:
            self._io_set(client, rkey, value)
        if not drops:
            return ()
        names = [k for rkey in drops for k in (rkey, rkey + HEAD_SUFFIX)]
        rcs = client.batch_remove(names)
        kept = []
        for i, rkey in enumerate(drops):
            for rc in rcs[2 * i : 2 * i + 2]:
                if rc == LEASED:
                    kept.append(rkey)
                    break
                if rc not in (0, NOT_FOUND):
                    raise StoreDown(f"deleting {rkey}: Mooncake status {rc}")
        return kept
