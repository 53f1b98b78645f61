"""`tierctl status` and `tierctl top`: what a running daemon holds, as tables or JSON.

Primitives: `COMMAND` (status), `TOP` (top), `fetch(address, token) -> dict`,
`render_status(stats, previous, seconds) -> str`.

Tiers are shown by the names the daemon's config gives them, with their kind and whether
they serve now (a CSD tier with no worker up is DOWN). `top` redraws every `--interval`
seconds and adds rates computed from the difference of two snapshots (hits, bytes read
and written per second).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from tierctl.cli import Command
from tierctl.errors import ExitCode, UsageError
from tierctl.tables import count, printable, render


def default_address() -> str:
    from tierd.config import default_data_dir, default_listen

    return default_listen(default_data_dir())[0]


def add_connection_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=os.environ.get("TIERD_ADDRESS"),
        help="unix:PATH or HOST:PORT (default: the daemon's default socket)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        help="file holding a tenant's bearer token (daemons with tenants)",
    )


def fetch(address: str, token: str | None) -> dict[str, Any]:
    from tierd_client import TierdClient, TierdError

    try:
        with TierdClient(address, token=token, timeout=10, max_retries=1) as client:
            return client.stats()
    except TierdError as e:
        raise UsageError(f"cannot read stats from {address}: {e}") from e


def _size(n: float) -> str:
    from tierd.config import format_size

    return format_size(int(n))


def render_status(
    stats: dict[str, Any], previous: dict[str, Any] | None = None, seconds: float = 0.0
) -> str:
    """One row per configured tier, in chain order, by the name the config gives it."""
    rows = []
    for name, t in stats["tiers"].items():
        cap, used = t["capacity_bytes"], t["used_bytes"]
        row: list[object] = [name, t.get("kind", ""), t["backend"],
                             "up" if t.get("available", True) else "DOWN", _size(cap),
                             _size(used), f"{100 * used / cap:.1f}%" if cap else "-",
                             count(t["blocks"]), count(t["hits"]), count(t.get("misses", 0)),
                             _size(t["bytes_read"]), _size(t["bytes_written"]),
                             count(t["evictions"])]  # fmt: skip
        if previous is not None and seconds > 0:
            before = previous["tiers"].get(name, t)
            row.append(f"{(t['hits'] - before['hits']) / seconds:.1f}")
            row.append(f"{(t['bytes_read'] - before['bytes_read']) / seconds / 1e9:.2f}")
            row.append(f"{(t['bytes_written'] - before['bytes_written']) / seconds / 1e9:.2f}")
        rows.append(row)
    headers = ["tier", "kind", "backend", "state", "capacity", "used", "occ", "blocks", "hits",
               "misses", "read", "written", "evictions"]  # fmt: skip
    if previous is not None and seconds > 0:
        headers += ["hits/s", "read GB/s", "write GB/s"]
    out = [render(headers, rows, right=set(range(4, len(headers))))]
    lookups, misses = stats["lookups"], stats["misses"]
    hit_rate = f"{100 * (1 - misses / lookups):.1f}%" if lookups else "-"
    out.append("")
    out.append(render(
        ["lookups", "miss events", "lookup hit rate", "demotions", "promotions",
         "corrupt reads", "leases", "namespaces"],
        [[count(lookups), count(misses), hit_rate, count(stats["demotions"]),
          count(stats["promotions"]), count(stats["corrupt_reads"]),
          count(stats["active_leases"]), count(stats["namespaces"])]],
        right=set(range(8)),
    ))  # fmt: skip
    if stats.get("tenants"):
        by_tenant: dict[str, dict[str, int]] = {}
        for u in stats["tenants"]:
            by_tenant.setdefault(u["tenant"], {})[u["tier"]] = u["used_bytes"]
        tiers = list(stats["tiers"])
        out.append("")
        out.append(render(["tenant", *tiers],
                          [[t, *(_size(u.get(x, 0)) for x in tiers)]
                           for t, u in sorted(by_tenant.items())],
                          right=set(range(1, len(tiers) + 1))))  # fmt: skip
    if stats.get("peers"):  # daemons this one pulls blocks from ([peers])
        out.append("")
        out.append(render(["peer", "state", "pulls", "blocks", "pulled", "errors", "corrupt"],
                          [[addr, "up" if p["available"] else "DOWN", count(p["pulls"]),
                            count(p["blocks"]), _size(p["bytes"]), count(p["errors"]),
                            count(p["corrupt"])] for addr, p in stats["peers"].items()],
                          right=set(range(2, 7))))  # fmt: skip
    d = stats.get("directory")
    if d:  # the prefix directory ([peers] directory)
        out.append("")
        out.append(render(["directory", "state", "hits", "misses", "writes", "dropped"],
                          [[d["tier_name"], "up" if d["available"] else "DOWN", count(d["hits"]),
                            count(d["misses"]), count(d["writes"]),
                            count(d["writes_dropped"])]], right=set(range(2, 6))))  # fmt: skip
    return "\n".join(out)


def _token(args: argparse.Namespace) -> str | None:
    if args.token_file is None:
        return None
    try:
        return args.token_file.read_text().strip()
    except OSError as e:
        raise UsageError(f"cannot read {args.token_file}: {e.strerror}") from e


def _status(args: argparse.Namespace) -> int:
    stats = fetch(args.address or default_address(), _token(args))
    print(json.dumps(stats, indent=2) if args.json else render_status(stats))
    return ExitCode.OK


def _top(args: argparse.Namespace) -> int:
    address, token = args.address or default_address(), _token(args)
    previous, t_prev = None, 0.0
    n = 0
    while args.count == 0 or n < args.count:
        stats, now = fetch(address, token), time.monotonic()
        if sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")  # home and clear: redraw in place
        print(f"tierd at {printable(address)}  {time.strftime('%H:%M:%S')}")
        print(render_status(stats, previous, now - t_prev if previous else 0.0), flush=True)
        previous, t_prev, n = stats, now, n + 1
        if args.count == 0 or n < args.count:
            time.sleep(args.interval)  # the refresh period of the display
    return ExitCode.OK


def _status_args(p: argparse.ArgumentParser) -> None:
    add_connection_arguments(p)
    p.add_argument("--json", action="store_true", help="print the raw counters as JSON")


def _top_args(p: argparse.ArgumentParser) -> None:
    add_connection_arguments(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--count", type=int, default=0, help="stop after N refreshes (0: forever)")


COMMAND = Command("status", "tiers, occupancy, hit rates and tenants of a running daemon",
                  _status_args, _status)  # fmt: skip
TOP = Command("top", "live view of a running daemon, refreshed with rates", _top_args, _top)
