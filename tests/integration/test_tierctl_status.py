"""`tierctl status` and `top` against a real daemon."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tierctl.cli import main
from tierd_client import KVLayout, TierdClient


def test_status_table_json_and_top(daemon_address: str, capsys: pytest.CaptureFixture[str]):
    layout = KVLayout(1, 2, 64, "float16", 16)
    with TierdClient(daemon_address, tenant="status-tenant") as c:
        ns = c.open_namespace("status-model", layout)
        keys = c.block_keys(ns, np.arange(16 * 3))
        c.put(ns, keys, np.zeros((3, *layout.block_shape), dtype=np.float16))
        c.get(ns, keys)
    capsys.readouterr()
    assert main(["status", "--address", daemon_address]) == 0
    table = capsys.readouterr().out
    for word in ("tier", "host", "nvme", "capacity", "status-tenant", "lookup hit rate"):
        assert word in table
    assert main(["status", "--address", daemon_address, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tiers"]["host"]["blocks"] >= 3
    mine = [u for u in doc["tenants"] if u["tenant"] == "status-tenant"]
    assert mine == [{"tenant": "status-tenant", "tier": "host",
                     "used_bytes": 3 * layout.block_bytes}]  # fmt: skip
    assert main(["top", "--address", daemon_address, "--count", "2", "--interval", "0.05"]) == 0
    out = capsys.readouterr().out
    assert out.count("tierd at") == 2 and "read GB/s" in out


def test_status_of_an_absent_daemon_is_a_clear_error(tmp_path, capsys) -> None:
    assert main(["status", "--address", f"unix:{tmp_path}/none.sock"]) == 2
    assert "cannot read stats" in capsys.readouterr().err


def test_status_escapes_a_tenant_name_a_client_chose(daemon_address: str, capsys) -> None:
    # In open mode a client names its own tenant, and status shows it to the operator.
    hostile = "x\x1b]0;owned\x07\x1b[2J"
    layout = KVLayout(1, 1, 64, "float16", 16)
    with TierdClient(daemon_address, tenant=hostile) as c:
        ns = c.open_namespace("escape-model", layout)
        c.put(ns, c.block_keys(ns, np.arange(16)), np.zeros((1, *layout.block_shape), np.float16))
    capsys.readouterr()
    assert main(["status", "--address", daemon_address]) == 0
    assert main(["top", "--address", daemon_address, "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert out.count("x\\x1b]0;owned\\x07\\x1b[2J") == 2
