"""`tierctl fsck`: offline check of a data dir's catalog against its blocks, with repair.

Primitives: `COMMAND`, `run_fsck(data_dir, chain, ...) -> FsckOutcome`,
`repair(data_dir, chain, scan)`.

The tiers are the daemon's chain (`tierctl.fsck_tiers`): from --config, else the default
sections' host, nvme (at --nvme-path) and csd. Runs only while no daemon uses the data dir
(see `tierctl.datalock`). Without --repair the catalog is opened read-only and nothing is
written (beyond creating the lock file). --repair deletes the blocks left with no good
copy, rewrites the copies of blocks that keep a good one without their bad ones, and
rewrites a good NVMe copy's wrong header page; good rows are never touched. A damaged or
missing catalog (empty, garbage, another schema, failing `PRAGMA quick_check`) is
reported, and --repair moves it aside and rebuilds it from the tiers (`tierctl.rebuild`).
Exit status: 0 clean, 1 problems found (repaired or not), 2 could not check.
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
from tierctl.fsck_scan import CATALOG, Problem, RowVerdict, Scan, scan
from tierctl.fsck_tiers import TierPlace, local_shards, places, tier_chain
from tierctl.rebuild import Rebuilt, rebuild_catalog
from tierd.config import format_size
from tierd.core.catalog import BlockRow, CopyRow
from tierd.core.catalog_check import CatalogDamaged, CatalogTooNew, check_catalog, open_catalog
from tierd.tiers.block_header import BlockHeader
from tierd.tiers.host import SHM_DIR
from tierd.tiers.io_backend import ALIGNMENT, PosixBackend
from tierd.tiers.nvme import DATA_FILE, NvmeStore, StoreInUse


@dataclass
class FsckOutcome:
    scan: Scan
    deleted: int = 0  # rows removed by --repair
    cleared: int = 0  # rows that lost their bad copies and kept a good one
    headers: int = 0  # header pages rewritten in front of good NVMe copies
    rebuilt: Rebuilt | None = None  # the catalog was rebuilt from the tiers

    @property
    def exit_code(self) -> int:
        return ExitCode.PROBLEMS if self.scan.problems else ExitCode.OK


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="the daemon's data dir")
    p.add_argument("--config", type=Path,
                   help="the daemon's TOML file: its data_dir and its tiers")  # fmt: skip
    p.add_argument(
        "--nvme-path",
        type=Path,
        help="directory of the nvme tier's blocks.dat (default DATA_DIR/nvme)",
    )
    p.add_argument("--shm-dir", type=Path, default=SHM_DIR, help=argparse.SUPPRESS)
    p.add_argument("--socket", type=Path, action="append", default=[], metavar="PATH",
                   help="also refuse to run if a daemon answers on this unix socket")  # fmt: skip
    p.add_argument("--repair", action="store_true", help="delete or fix the rows that fail")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _chain(args: argparse.Namespace) -> tuple[Path, tuple[TierPlace, ...]]:
    data_dir, cfg = args.data_dir, None
    if args.config is not None:
        from tierd.config import load_config
        from tierd.errors import ConfigError

        try:
            cfg = load_config(args.config)
        except ConfigError as e:
            raise UsageError(f"configuration error: {e}") from None
        data_dir = data_dir or cfg.data_dir
    if data_dir is None:
        raise UsageError("--data-dir (or --config) is required")
    if not data_dir.is_dir():
        raise UsageError(f"{data_dir} is not a directory")
    return data_dir, tier_chain(data_dir, cfg, args.nvme_path)


def _action(v: RowVerdict, p: Problem) -> str:
    if v.delete:
        return "deleted row"
    if p.kind == "header" and p.tier not in v.bad:
        return "rewrote the header"
    return "dropped the bad copy"


def repair(data_dir: Path, chain: tuple[TierPlace, ...], result: Scan) -> tuple[int, int, int]:
    """Apply the scan's verdicts; (rows deleted, rows that kept a good copy, headers
    rewritten)."""
    doomed: list[tuple[bytes, bytes]] = []
    changed: list[tuple[bytes, bytes, tuple[CopyRow, ...]]] = []
    headers: dict[str, list[tuple[BlockRow, CopyRow]]] = {}
    for v in result.bad_rows:
        r = v.row
        if v.delete:
            doomed.append((r.ns_id, r.key))
        else:
            if v.bad:
                changed.append((r.ns_id, r.key, v.kept()))
            for c in v.kept():
                if c.tier in v.headers:
                    headers.setdefault(c.tier, []).append((r, c))
        for p in result.problems:
            if (p.ns_id, p.key) == (r.ns_id, r.key):
                p.action = _action(v, p)
    catalog = open_catalog(data_dir / CATALOG)  # the daemon's own writer, and its migration
    try:
        catalog.delete_blocks(doomed)
        catalog.set_copies(changed)
    finally:
        catalog.close()
    by_name = {p.name: p for p in chain}
    for tier, items in headers.items():
        _rewrite_headers(by_name[tier], result, items)
    return len(doomed), len(changed), sum(len(items) for items in headers.values())


def _rewrite_headers(place: TierPlace, result: Scan, items: list[tuple[BlockRow, CopyRow]]) -> None:
    assert place.path is not None
    size = (place.path / DATA_FILE).stat().st_size // ALIGNMENT * ALIGNMENT
    with NvmeStore(place.path, size, backend=PosixBackend(), headers=True) as store:
        for r, c in items:
            # The copy's stored bytes, which an encoded copy's are not the block's.
            header = BlockHeader(r.ns_id, r.key, c.length, c.checksum, result.meta.get(r.ns_id),
                                 0, c.encoding, r.nbytes, r.checksum)  # fmt: skip
            store.write_header(int(c.location), header)


def _offline_files(data_dir: Path, chain: tuple[TierPlace, ...]) -> list[Path]:
    files = [data_dir / CATALOG]
    for p in places(chain, "nvme"):
        assert p.path is not None
        files.append(p.path / DATA_FILE)
    for p in places(chain, "csd"):
        files += [shard / DATA_FILE for shard in local_shards(p).values()]
    return files


def run_fsck(
    data_dir: Path,
    chain: tuple[TierPlace, ...],
    *,
    repair_rows: bool = False,
    shm_dir: Path = SHM_DIR,
    sockets: list[Path] | None = None,
) -> FsckOutcome:
    socks = [data_dir / "tierd.sock", *(sockets or [])]
    try:
        lock = ensure_offline(data_dir, _offline_files(data_dir, chain), socks)
    except DataDirBusy as e:
        raise UsageError(str(e)) from None
    with lock:
        try:
            problem = _catalog_problem(data_dir, chain)
            if problem is None:
                outcome = FsckOutcome(scan(data_dir, chain, shm_dir))
                if repair_rows and outcome.scan.bad_rows:
                    outcome.deleted, outcome.cleared, outcome.headers = repair(
                        data_dir, chain, outcome.scan
                    )
            elif not repair_rows:
                outcome = FsckOutcome(Scan(problems=[problem]))
            else:
                outcome = _rebuild(data_dir, chain, shm_dir, problem)
        except StoreInUse as e:  # a daemon of another data dir shares the NVMe file
            raise UsageError(str(e)) from None
    return outcome


def _catalog_problem(data_dir: Path, chain: tuple[TierPlace, ...]) -> Problem | None:
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
    files = [p.path / DATA_FILE for p in places(chain, "nvme") if p.path is not None]
    shards = [local_shards(p) for p in places(chain, "csd")]
    if not any(f.is_file() for f in files) and not any(shards):
        raise UsageError(f"no catalog at {path}: not a tierd data dir")
    return Problem("catalog", "missing", f"{path} does not exist")


def _rebuild(data_dir: Path, chain: tuple[TierPlace, ...], shm_dir: Path,
             problem: Problem) -> FsckOutcome:  # fmt: skip
    rebuilt = rebuild_catalog(data_dir, chain)
    problem.action = "rebuilt from the tiers"
    if rebuilt.moved_aside:
        problem.action += f"; the damaged file is kept as {rebuilt.moved_aside}"
    outcome = FsckOutcome(scan(data_dir, chain, shm_dir), rebuilt=rebuilt)
    outcome.scan.problems.insert(0, problem)
    for c in rebuilt.corrupt:
        outcome.scan.problems.append(Problem(
            str(c["tier"]), "checksum", f"at offset {c['offset']}: {c['detail']}",
            bytes.fromhex(str(c["ns_id"])), bytes.fromhex(str(c["key"])), "not recovered",
        ))  # fmt: skip
    return outcome


def render_text(outcome: FsckOutcome) -> str:
    s = outcome.scan
    rows = [[tier, t.kind, tables.count(t.rows), format_size(t.bytes),
             tables.count(t.rows - t.bad - t.unchecked), tables.count(t.bad),
             tables.count(t.unchecked)] for tier, t in s.tally.items()]  # fmt: skip
    out = [f"catalog: {s.namespaces} namespaces, {s.rows} block rows",
           tables.render(["tier", "kind", "copies", "bytes", "ok", "bad", "unchecked"], rows,
                         right={2, 3, 4, 5, 6})]  # fmt: skip
    width = max([5, *(len(p.tier) for p in s.problems)])
    for p in s.problems:
        action = f"  -> {p.action}" if p.action else ""
        out.append(f"{p.tier:{width}} {p.kind:12} {p.where()}  {p.detail}{action}")
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
    elif outcome.deleted or outcome.cleared or outcome.headers:
        out.append(f"repaired: {outcome.deleted} rows deleted, {outcome.cleared} rows kept "
                   f"their good copy, {outcome.headers} header pages rewritten")  # fmt: skip
    else:
        out.append(f"{len(s.problems)} problems; run with --repair to fix the catalog")
    return "\n".join(out)


def render_json(outcome: FsckOutcome) -> str:
    s = outcome.scan
    return json.dumps({
        "namespaces": s.namespaces, "rows": s.rows,
        "tiers": {k: vars(t) for k, t in s.tally.items()},
        "problems": [{"tier": p.tier, "kind": p.kind, "detail": p.detail, "action": p.action,
                      "ns_id": p.ns_id.hex() if p.ns_id else None,
                      "key": p.key.hex() if p.key else None} for p in s.problems],
        "notes": s.notes, "deleted": outcome.deleted, "cleared": outcome.cleared,
        "headers": outcome.headers,
        "rebuilt": vars(outcome.rebuilt) if outcome.rebuilt is not None else None,
        "exit_code": int(outcome.exit_code),
    }, indent=2)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    data_dir, chain = _chain(args)
    outcome = run_fsck(data_dir, chain, repair_rows=args.repair, shm_dir=args.shm_dir,
                       sockets=args.socket)  # fmt: skip
    print(render_json(outcome) if args.json else render_text(outcome))
    return outcome.exit_code


COMMAND = Command(
    name="fsck",
    help="check a stopped daemon's catalog against the copies in its tiers (--repair)",
    add_arguments=_add_arguments,
    run=run,
)
