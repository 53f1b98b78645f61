"""Address parsing and constructor argument checks (no daemon, no connection made)."""

from __future__ import annotations

import pytest

from tierd_client import TierdClient
from tierd_client.address import parse_address


@pytest.mark.parametrize(
    ("text", "target", "path"),
    [
        ("unix:/run/tierd/tierd.sock", "unix:/run/tierd/tierd.sock", "/run/tierd/tierd.sock"),
        ("unix:///run/tierd/tierd.sock", "unix:/run/tierd/tierd.sock", "/run/tierd/tierd.sock"),
        ("localhost:50051", "localhost:50051", None),
        ("10.0.0.7:1", "10.0.0.7:1", None),
        ("[::1]:8080", "[::1]:8080", None),
        ("tierd.internal:065535", "tierd.internal:65535", None),
    ],
)
def test_valid(text: str, target: str, path: str | None) -> None:
    addr = parse_address(text)
    assert addr.target == target
    assert addr.unix_path == path


@pytest.mark.parametrize(
    "text",
    [
        "",
        "unix:",
        "unix:relative/tierd.sock",
        "unix://host/tierd.sock",
        "unix:/" + "x" * 120,
        "localhost",
        ":50051",
        "localhost:",
        "localhost:0",
        "localhost:65536",
        "localhost:http",
        "::1:50051",
        "[::1:50051",
        "dns:///localhost:50051",
        "my host:50051",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(ValueError):
        parse_address(text)


def test_client_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        TierdClient("nowhere")
    with pytest.raises(ValueError, match="transport"):
        TierdClient("unix:/tmp/none.sock", transport="rdma")
    with pytest.raises(ValueError, match="timeout"):
        TierdClient("unix:/tmp/none.sock", timeout=0)
    with pytest.raises(ValueError, match="max_retries"):
        TierdClient("unix:/tmp/none.sock", max_retries=-1)
    with pytest.raises(ValueError, match="lease_ttl_ms"):
        TierdClient("unix:/tmp/none.sock", lease_ttl_ms=2**32)


def test_client_constructs_without_a_daemon() -> None:
    # grpc channels connect lazily: constructing must neither block nor fail.
    with TierdClient("unix:/nonexistent/tierd.sock", tenant="t1") as c:
        assert "unix:/nonexistent/tierd.sock" in repr(c)
