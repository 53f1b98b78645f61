"""`tierctl capacity --plot`: the report as a PNG (matplotlib, imported only here).

Without a model: read bandwidth per tier. With one: tokens each tier holds, and the
per-token attend time against context length (a straight line per tier on log axes, since
attend time is context x bytes/token / bandwidth), marking the chosen context.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tierctl.capacity import Report


def plot_report(report: Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    measured = [t for t in report.tiers if t.read_bps]
    names = [t.name for t in report.tiers]
    if report.model is None or report.kv_bytes_per_token is None:
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.barh([t.name for t in measured], [t.read_bps / 1e9 for t in measured])  # type: ignore[operator]
        ax.set_xlabel("read bandwidth (GB/s)")
        ax.set_title("tierd tiers on this machine")
    else:
        per_token, ctx = report.kv_bytes_per_token, report.context or 1
        fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
        tokens = [max(t.tokens or 0, 1) for t in report.tiers]
        left.barh(names, tokens)
        left.set_xscale("log")
        # Log bars start at the axis' left edge: put it well below the smallest tier so
        # every bar has visible length.
        left.set_xlim(left=max(1.0, min(tokens) / 10))
        for y, n in enumerate(tokens):
            left.annotate(f"{n:,}", (n, y), xytext=(-4, 0), textcoords="offset points",
                          ha="right", va="center", color="white", fontsize="small")  # fmt: skip
        left.set_xlabel("tokens that fit")
        left.set_title(f"{report.model['name']}, {report.dtype}: {per_token:,} B/token")
        contexts = [2**k for k in range(8, 21)]  # 256 .. 1M tokens
        for t in measured:
            right.plot(contexts, [c * per_token / t.read_bps * 1e3 for c in contexts],  # type: ignore[operator]
                       label=t.name)  # fmt: skip
        if not measured:
            right.set_title("no bandwidth measured (--no-bench)")
        right.axvline(ctx, color="grey", linestyle=":", label=f"context {ctx:,}")
        right.set_xscale("log", base=2)
        right.set_yscale("log")
        right.set_xlabel("context length (tokens)")
        right.set_ylabel("attend time per token (ms)")
        right.legend(fontsize="small")  # the context marker is always there
        right.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
