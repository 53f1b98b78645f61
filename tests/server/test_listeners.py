"""Listen addresses: the daemon, its CSD workers and the client read a unix address alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierd.server.listeners import bind_address
from tierd_client.address import parse_address


@pytest.mark.parametrize("text", ["unix:/run/tierd/t.sock", "unix:///run/tierd/t.sock"])
def test_unix_address_binds_where_the_client_connects(text: str) -> None:
    target, path = bind_address(text)
    assert (target, path) == ("unix:/run/tierd/t.sock", Path("/run/tierd/t.sock"))
    client = parse_address(text)
    assert (client.target, client.unix_path) == (target, str(path))


def test_tcp_address_is_bound_as_written() -> None:
    assert bind_address("[::1]:50051") == ("[::1]:50051", None)
