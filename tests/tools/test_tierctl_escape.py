"""`tierctl status`/`top` print what a daemon says (tenant, tier and backend names) with
control characters escaped, so no name can drive the operator's terminal."""

from __future__ import annotations

import unicodedata

from tierctl.status import render_status
from tierctl.tables import printable, render

HOSTILE = "evil\x1b]0;owned\x07\x1b[2J\x1b[31m\r\n\u202e\x00\\x1b"


def stats(tenant: str, tier: str, backend: str) -> dict[str, object]:
    t = {"capacity_bytes": 1 << 20, "used_bytes": 4096, "blocks": 1, "hits": 2,
         "bytes_read": 8192, "bytes_written": 4096, "evictions": 0, "backend": backend}  # fmt: skip
    return {"tiers": {tier: t}, "lookups": 1, "misses": 0, "demotions": 0, "promotions": 0,
            "corrupt_reads": 0, "active_leases": 0, "namespaces": 1,
            "tenants": [{"tenant": tenant, "tier": tier, "used_bytes": 4096}]}  # fmt: skip


def assert_inert(text: str) -> None:
    """Nothing but printable characters, spaces and the table's own newlines."""
    bad = [c for c in text if c != "\n" and not c.isprintable()]
    assert not bad, [unicodedata.name(c, hex(ord(c))) for c in bad]


def test_printable_escapes_controls_and_keeps_text() -> None:
    assert printable("team-α 7") == "team-α 7"
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("\r\n\t\x00\x7f\u202e") == "\\r\\n\\t\\x00\\x7f\\u202e"
    # A name that spells an escape is told apart from one that holds it.
    assert printable("\\x1b") == "\\\\x1b" != printable("\x1b")


def test_status_escapes_daemon_supplied_names() -> None:
    out = render_status(stats(HOSTILE, "ho\x1bst", "po\x9bsix"))
    assert_inert(out)
    assert printable(HOSTILE) in out and "ho\\x1bst" in out and "po\\x9bsix" in out
    # `top` renders the same with rates from two snapshots.
    assert_inert(render_status(stats(HOSTILE, "h", "b"), stats(HOSTILE, "h", "b"), 1.0))


def test_columns_align_on_the_escaped_text() -> None:
    lines = render(["name", "n"], [["a\x1b", 1], ["bb", 22]], right={1}).splitlines()
    assert lines[2] == "a\\x1b   1" and lines[3] == "bb     22"
