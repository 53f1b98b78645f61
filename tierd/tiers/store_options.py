"""Options every shared-store tier kind takes, and their checks (config load).

Primitives: `COMMON` (keys and defaults), `check_common(options, spec, where)` (raises
ConfigError naming the key).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from tierd.config_checks import show
from tierd.errors import ConfigError

if TYPE_CHECKING:
    from tierd.config import TierSpec

COMMON: dict[str, Any] = {
    "key_prefix": "tierd",  # every key this daemon reads or writes starts <prefix>:
    "timeout_ms": 1000,  # no request waits longer on the store
    "max_queued_bytes": 0,  # demotions kept in memory while the store is down (0: dropped)
    "write": "demote",  # demote | through (every committed block is copied here too)
    "io_threads": 8,  # parallel calls to the store
}
_PREFIX_RE = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
MAX_QUEUED = 1 << 40


def check_common(o: dict[str, Any], spec: TierSpec, where: str) -> None:
    if spec.capacity_bytes <= 0:
        raise ConfigError(f"{where}.capacity", "set capacity: this daemon's budget in the "
                          "store (it cannot be sized from free space)")  # fmt: skip
    if not isinstance(o["key_prefix"], str) or not _PREFIX_RE.fullmatch(o["key_prefix"]):
        raise ConfigError(f"{where}.key_prefix", "1 to 64 of letters, digits, '.', '_' and "
                          f"'-' (no braces or colons), got {show(o['key_prefix'])}")  # fmt: skip
    if not 1 <= o["timeout_ms"] <= 60_000:
        raise ConfigError(f"{where}.timeout_ms", "must be between 1 and 60000")
    if not 0 <= o["max_queued_bytes"] <= MAX_QUEUED:
        raise ConfigError(f"{where}.max_queued_bytes", "must be between 0 and 1 TiB (bytes)")
    if o["write"] not in ("demote", "through"):
        raise ConfigError(f"{where}.write", f"must be demote or through, got "
                          f"{show(o['write'])}")  # fmt: skip
    if not 1 <= o["io_threads"] <= 256:
        raise ConfigError(f"{where}.io_threads", "must be between 1 and 256")
