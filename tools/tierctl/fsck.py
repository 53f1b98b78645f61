"""`tierctl fsck`: offline check of a data dir's catalog against its blocks, with repair.

Primitives: `COMMAND`, `run_fsck(data_dir, ...) -> FsckOutcome`, `repair(data_dir, scan)`.

Runs only while no daemon uses the data dir (see `tierctl.datalock`). Without --repair the
catalog is opened read-only and nothing is written (beyond creating the lock file).
--repair deletes the rows left with no good copy and clears the bad copy of rows that keep
a good one; good rows are never touched. A damaged or missing catalog (empty, garbage,
another schema, failing `PRAGMA quick_check`) is reported, and --repair moves it aside and
rebuilds it from the tiers (`tierctl.rebuild`). Exit status: 0 clean, 1 problems found
(repaired or not), 2 could not check.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from tierctl import tables
from tierctl.cli import Command
from tierctl.datalock import DataDirBusy, ensure_offline
from tierctl.errors import ExitCode, UsageError
from tierctl.fsck_scan import CATALOG, Problem, Scan, scan
from tierctl.rebuild import Rebuilt, rebuild_catalog
from tierd.config import format_size
from tierd.core.catalog import Catalog
from tierd.core.catalog_check import CatalogDamaged, CatalogTooNew, check_catalog
from tierd.tiers.host import SHM_DIR
from tierd.tiers.nvme import DATA_FILE, StoreInUse


@dataclass
class FsckOutcome:
    scan: Scan
    deleted: int = 0  # rows removed by --repair
    cleared: int = 0  # rows that lost one bad copy and kept a good one
    rebuilt: Rebuilt | None = None  # the catalog was rebuilt from the tiers

    @property
    def exit_code(self) -> int:
        return ExitCode.PROBLEMS if self.scan.problems else ExitCode.OK


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="the daemon's data dir")
    p.add_argument("--config", type=Path, help="read data_dir and nvme.path from this TOML file")
    p.add_argument("--nvme-path", type=Path, help="directory of blocks.dat (default DATA_DIR/nvme)")
    p.add_argument("--shm-dir", type=Path, default=SHM_DIR, help=argparse.SUPPRESS)
    p.add_argument("--socket", type=Path, action="append", default=[], metavar="PATH",
                   help="also refuse to run if a daemon answers on this unix socket")  # fmt: skip
    p.add_argument("--repair", action="store_true", help="delete or fix the rows that fail")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    data_dir, nvme_dir = args.data_dir, args.nvme_path
    if args.config is not None:
        from tierd.config import load_config
        from tierd.errors import ConfigError

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise UsageError(f"configuration error: {e}") from None
        data_dir = data_dir or cfg.data_dir
        nvme_dir = nvme_dir or cfg.nvme.path
    if data_dir is None:
        raise UsageError("--data-dir (or --config) is required")
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir} is not a directory")
    return data_dir, nvme_dir or data_dir / "nvme"


def repair(data_dir: Path, result: Scan) -> tuple[int, int]:
    """Apply the scan's verdicts; (rows deleted, rows that lost one bad copy)."""
    doomed: list[tuple[bytes, bytes]] = []
    moved: list[tuple[bytes, bytes, int | None, int | None]] = []
    for v in result.bad_rows:
        r = v.row
        if v.delete:
            doomed.append((r.ns_id, r.key))
            action = "deleted row"
        else:
            host = None if v.host_bad else r.host_off
            nvme = None if v.nvme_bad else r.nvme_off
            moved.append((r.ns_id, r.key, host, nvme))
            action = "dropped the bad copy"
        for p in result.problems:
            if (p.ns_id, p.key) == (r.ns_id, r.key):
                p.action = action
    catalog = Catalog(data_dir / CATALOG)  # the daemon's own writer: same SQL, same WAL mode
    try:
        catalog.delete_blocks(doomed)
        catalog.update_locations(moved)
    finally:
        catalog.close()
    return len(doomed), len(moved)


def run_fsck(data_dir: Path, nvme_dir: Path, *, repair_rows: bool = False,
             shm_dir: Path = SHM_DIR, sockets: list[Path] | None = None) -> FsckOutcome:  # fmt: skip
    files = [data_dir / CATALOG, nvme_dir / "blocks.dat"]
    socks = [data_dir / "tierd.sock", *(sockets or [])]
    try:
        lock = ensure_offline(data_dir, files, socks)
    except DataDirBusy as e:
        raise UsageError(str(e)) from None
    with lock:
        try:
            problem = _catalog_problem(data_dir, nvme_dir)
            if problem is None:
                outcome = FsckOutcome(scan(data_dir, nvme_dir, shm_dir))
                if repair_rows and outcome.scan.bad_rows:
                    outcome.deleted, outcome.cleared = repair(data_dir, outcome.scan)
            elif not repair_rows:
                outcome = FsckOutcome(Scan(problems=[problem]))
            else:
                outcome = _rebuild(data_dir, nvme_dir, shm_dir, problem)
        except StoreInUse as e:  # a daemon of another data dir shares the NVMe file
            raise UsageError(str(e)) from None
    return outcome


def _catalog_problem(data_dir: Path, nvme_dir: Path) -> Problem | None:
    """What is wrong with the catalog file itself, if anything."""
    path = data_dir / CATALOG
    try:
        state = check_catalog(path, readonly=True)
    except CatalogDamaged as e:
        return Problem("catalog", "damaged", e.reason)
    except CatalogTooNew as e:
        raise UsageError(str(e)) from None
    if state != "missing":
        return None
    if not (nvme_dir / DATA_FILE).is_file():
        raise UsageError(f"no catalog at {path}: not a tierd data dir")
    return Problem("catalog", "missing", f"{path} does not exist")


def _rebuild(data_dir: Path, nvme_dir: Path, shm_dir: Path, problem: Problem) -> FsckOutcome:
    rebuilt = rebuild_catalog(data_dir, nvme_dir)
    problem.action = "rebuilt from the tiers"
    if rebuilt.moved_aside:
        problem.action += f"; the damaged file is kept as {rebuilt.moved_aside}"
    outcome = FsckOutcome(scan(data_dir, nvme_dir, shm_dir), rebuilt=rebuilt)
    outcome.scan.problems.insert(0, problem)
    for c in rebuilt.corrupt:
        outcome.scan.problems.append(Problem(
            "nvme", "checksum", f"at offset {c['offset']}: {c['detail']}",
            bytes.fromhex(str(c["ns_id"])), bytes.fromhex(str(c["key"])), "not recovered",
        ))  # fmt: skip
    return outcome


def render_text(outcome: FsckOutcome) -> str:
    s = outcome.scan
    rows = [[tier, tables.count(t.rows), format_size(t.bytes), tables.count(t.rows - t.bad),
             tables.count(t.bad)] for tier, t in s.tally.items()]  # fmt: skip
    csd = f" ({s.csd_rows} with a CSD worker copy, not checked offline)" if s.csd_rows else ""
    out = [f"catalog: {s.namespaces} namespaces, {s.rows} block rows{csd}",
           tables.render(["tier", "copies", "bytes", "ok", "bad"], rows, right={1, 2, 3, 4})]  # fmt: skip
    for p in s.problems:
        action = f"  -> {p.action}" if p.action else ""
        out.append(f"{p.tier:5} {p.kind:12} {p.where()}  {p.detail}{action}")
    out.extend(f"note: {n}" for n in s.notes)
    if (r := outcome.rebuilt) is not None:
        out.append(f"rebuilt the catalog: {r.namespaces} namespaces; {r.nvme_blocks} blocks from "
                   f"NVMe headers, {r.csd_blocks} from CSD workers; {len(r.corrupt)} corrupt, "
                   f"{r.duplicates} stale duplicates and {r.unknown_namespace} of unknown "
                   "namespace not recovered")  # fmt: skip
        out.extend(f"note: {n}" for n in r.notes)
    if not s.problems:
        out.append("clean")
    elif outcome.rebuilt is not None:
        out.append("repaired: the catalog was rebuilt")
    elif outcome.deleted or outcome.cleared:
        out.append(f"repaired: {outcome.deleted} rows deleted, {outcome.cleared} rows kept "
                   "their good copy")  # fmt: skip
    else:
        out.append(f"{len(s.problems)} problems; run with --repair to fix the catalog")
    return "\n".join(out)


def render_json(outcome: FsckOutcome) -> str:
    s = outcome.scan
    return json.dumps({
        "namespaces": s.namespaces, "rows": s.rows, "csd_rows": s.csd_rows,
        "tiers": {k: vars(t) for k, t in s.tally.items()},
        "problems": [{"tier": p.tier, "kind": p.kind, "detail": p.detail, "action": p.action,
                      "ns_id": p.ns_id.hex() if p.ns_id else None,
                      "key": p.key.hex() if p.key else None} for p in s.problems],
        "notes": s.notes, "deleted": outcome.deleted, "cleared": outcome.cleared,
        "rebuilt": vars(outcome.rebuilt) if outcome.rebuilt is not None else None,
        "exit_code": int(outcome.exit_code),
    }, indent=2)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    data_dir, nvme_dir = _dirs(args)
    outcome = run_fsck(data_dir, nvme_dir, repair_rows=args.repair, shm_dir=args.shm_dir,
                       sockets=args.socket)  # fmt: skip
    print(render_json(outcome) if args.json else render_text(outcome))
    return outcome.exit_code


COMMAND = Command(
    name="fsck",
    help="check a stopped daemon's catalog against its NVMe and host blocks (--repair)",
    add_arguments=_add_arguments,
    run=run,
)
