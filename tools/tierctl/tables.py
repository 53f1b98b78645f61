"""Plain-text tables for terminal output (no dependency; columns sized to their content).

Every cell is passed through `printable`: names come from the daemon and, through it, from
any client (a tenant in open mode names itself), so a name must not be able to move the
cursor, retitle the window or clear the operator's screen.
"""

from __future__ import annotations

from collections.abc import Sequence


def printable(text: object) -> str:
    """`str(text)` with control and other non-printable characters escaped as Python does
    (\\x1b, \\n, \\u202e), and backslashes doubled so an escape cannot be forged."""
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode("ascii")
        for c in str(text)
    )


def render(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int] | None = None
) -> str:
    """Rows as aligned columns; columns whose index is in `right` align right (numbers)."""
    cells = [[printable(h) for h in headers]] + [[printable(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = right if right is not None else set()

    def line(row: list[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))
        ]
        return "  ".join(parts).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def rate(bytes_per_s: float | None) -> str:
    if bytes_per_s is None:
        return "-"
    return f"{bytes_per_s / 1e9:.2f} GB/s"


def count(n: int | None) -> str:
    """Big counts with thousands separators, so 1234567 tokens reads at a glance."""
    return "-" if n is None else f"{n:,}"
