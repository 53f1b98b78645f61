"""A mooncake tier's options: checked at config load with errors that name the key, and
defaults an operator can rely on (no store needed)."""

from __future__ import annotations

from typing import Any

import pytest

from tierd.config import TierSpec
from tierd.errors import ConfigError
from tierd.tiers.mooncake_conn import (
    LEASED,
    NO_SPACE,
    MooncakeOptions,
    StoreDown,
    StoreRefused,
    check,
)


def opts(capacity: int = 64 << 20, **options: Any) -> MooncakeOptions:
    options = {"master": "10.0.0.5:50051", **options}
    return MooncakeOptions.of(
        TierSpec("far", "mooncake", capacity, options=tuple(options.items())), "far"
    )


def test_defaults() -> None:
    o = opts()
    assert o.master == ("10.0.0.5", 50051) and o.master_addr == "10.0.0.5:50051"
    assert o.metadata_server == "http://10.0.0.5:8080/metadata"
    assert o.protocol == "tcp" and o.segment_bytes == 64 << 20  # it lends its budget
    assert o.write == "demote" and o.max_queued_bytes == 0 and o.key_prefix == "tierd"
    assert opts(master="[::1]:7000").master_addr == "[::1]:7000"
    assert opts(lend=False).segment_bytes == 0  # a reader that lends nothing


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"master": ""}, "far.master"),
        ({"master": "host"}, "far.master"),
        ({"master": "host:70000"}, "far.master"),
        ({"metadata_server": "ftp://x"}, "far.metadata_server"),
        ({"protocol": "udp"}, "far.protocol"),
        ({"protocol": "rdma"}, "far.device"),
        ({"buffer_bytes": 1024}, "far.buffer_bytes"),
        ({"segment_bytes": 1 << 20}, "far.segment_bytes"),
        ({"key_prefix": "a/b"}, "far.key_prefix"),
        ({"write": "back"}, "far.write"),
        ({"timeout_ms": 0}, "far.timeout_ms"),
    ],
)
def test_bad_options_name_their_key(changes: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        opts(**changes)
    assert e.value.field == key


def test_a_budget_is_required() -> None:
    with pytest.raises(ConfigError) as e:
        opts(capacity=0)
    assert e.value.field == "far.capacity"


def test_status_codes_split_into_refusals_and_outages() -> None:
    check(0, "put")
    for rc in (NO_SPACE, LEASED):
        with pytest.raises(StoreRefused):
            check(rc, "put")
    with pytest.raises(StoreDown):
        check(-900, "put")  # an RPC to the master failed
