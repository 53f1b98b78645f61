"""Revision comparison: one benchmark against several checkouts, rounds alternating in one run.

    python tools/bench_kv.py --trees /tmp/before,. --rounds 3 --sizes 2MiB --total 128MiB
    python tools/bench_concurrent.py --tree /tmp/before --tree . --seconds 10

Primitives: `add_arguments(parser)`, `trees_of(args)`, `compare(script, args, metrics)`,
`stamp(doc)`, `flatten(doc, prefix)`.

Each round re-executes the benchmark script (this checkout's copy, so the load generator
is the same for every tree) with the tree as its working directory and a directory of
links first on PYTHONPATH: `tierd`, `tierd_client`, `tierd_kernels` and `tierctl` point
into the tree. Links, because the client and kernels live in folders named otherwise
(`client/`, `kernels/`): with only the tree on PYTHONPATH they would still be imported
from wherever the venv's editable install points. The daemon, started as
`python -m tierd` from that working directory, resolves the same way. Each tree is probed
before the first round, and each round's JSON says which files it imported (`stamp`);
a round that imported code from outside its tree stops the run.

Rounds go A, B, A, B...: load from other work on the machine hits each tree alike. The
report gives each tree's median and its spread between rounds ((max - min) / median), and
against the first tree the median and range of the ratios of paired rounds (round r of B
over round r of A, so that load drifting during the run cancels). A ratio whose range
spans 1.0, or that sits inside the spread, is noise. The benches' tree-independent peers
(memcpy, disk, Redis) measured in the same rounds are a built-in A/A control.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROUND_ENV = "TIERD_BENCH_TREE"  # set in a round's environment: the tree it measures
PACKAGES = {
    "tierd": "tierd",
    "tierd_client": "client",
    "tierd_kernels": "kernels",
    "tierctl": "tools/tierctl",
}
MEASURED = ("tierd", "tierd_client", "tierd_kernels")
_PROBE = (
    "import json, os, sys\n"
    f"names = {list(MEASURED)!r}\n"
    "mods = [__import__(n) for n in names]\n"
    "print(json.dumps({n: os.path.realpath(m.__file__) for n, m in zip(names, mods)}))\n"
)
_OWN_OPTIONS = ("--tree", "--trees", "--rounds", "--json")  # the comparison's, not the bench's


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("revision comparison")
    g.add_argument(
        "--tree",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="measure the daemon and client of this checkout (repeatable)",
    )
    g.add_argument(
        "--trees",
        default="",
        metavar="A,B",
        help="comma-separated checkouts, same as repeating --tree",
    )
    g.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds per tree, alternating A, B, A, B... (default 3: the median drops one outlier)",
    )


def trees_of(args: argparse.Namespace) -> list[Path]:
    listed = [*args.tree, *(Path(t) for t in args.trees.split(",") if t)]
    trees = [t.resolve() for t in listed]
    for t in trees:
        if not (t / "tierd").is_dir() or not (t / "client").is_dir():
            raise SystemExit(f"{t} is not a checkout of this repository (no tierd/ or client/)")
    return trees


def provenance() -> dict[str, str]:
    """The files this process imported the measured packages from (real paths)."""
    return {
        n: os.path.realpath(sys.modules[n].__file__ or "") for n in MEASURED if n in sys.modules
    }


def stamp(doc: dict[str, Any]) -> None:
    """Inside a round: record in the benchmark's JSON which code it ran (what it imported)."""
    if ROUND_ENV in os.environ:
        import tierd_client  # noqa: F401  (every benchmark imports it; named for the record)

        doc["provenance"] = provenance()


def flatten(doc: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a JSON document as dotted keys (booleans left out)."""
    if isinstance(doc, dict):
        out: dict[str, float] = {}
        for k, v in doc.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        return {prefix: float(doc)}
    return {}


# -- running rounds -----------------------------------------------------------------------


def _link_dir(tree: Path) -> Path:
    links = Path(tempfile.mkdtemp(prefix="tierd-tree-"))
    for name, sub in PACKAGES.items():
        if (tree / sub).is_dir():
            (links / name).symlink_to(tree / sub)
    return links


def _env(tree: Path, links: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(links), env.get("PYTHONPATH")) if p)
    env[ROUND_ENV] = str(tree)
    return env


def _git(tree: Path, *args: str) -> str:
    r = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else "?"


def _check_inside(tree: Path, files: dict[str, str], what: str, need: tuple[str, ...]) -> None:
    outside = {n: f for n, f in files.items() if not Path(f).is_relative_to(tree)}
    if outside or not set(need) <= set(files):
        raise SystemExit(f"{what} did not import the code of {tree}: {files}")


def _child_argv(argv: list[str], workdir: Path) -> list[str]:
    """The bench's own options, less the comparison's; every round works in one dir."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _OWN_OPTIONS:
            skip = "=" not in a
            continue
        out.append(a)
    if not any(a == "--dir" or a.startswith("--dir=") for a in out):
        out += ["--dir", str(workdir)]  # the same disk for every tree, and not inside one
    return out


def compare(
    script: Path,
    args: argparse.Namespace,
    metrics: Callable[[dict[str, Any]], dict[str, float]],
    argv: list[str] | None = None,
) -> int:
    """Run `script` for each tree of `args`, `args.rounds` times alternating; report."""
    trees = trees_of(args)
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    labels = [chr(ord("A") + i) for i in range(len(trees))]
    child = _child_argv(sys.argv[1:] if argv is None else argv, Path.cwd())
    links: dict[Path, Path] = {}
    info = []
    try:
        for t in trees:  # a tree may be given twice (an A/A run): one set of links each
            links[t] = links.get(t) or _link_dir(t)
        for label, tree in zip(labels, trees):
            probe = subprocess.run(
                [sys.executable, "-c", _PROBE],
                cwd=tree,
                capture_output=True,
                text=True,
                env=_env(tree, links[tree]),
                check=True,
            )
            files = json.loads(probe.stdout)
            _check_inside(tree, files, f"a probe in tree {label}", MEASURED)
            dirty = bool(_git(tree, "status", "--porcelain", "--untracked-files=no"))
            info.append(
                {
                    "label": label,
                    "path": str(tree),
                    "dirty": dirty,
                    "imports": files,
                    "commit": _git(tree, "rev-parse", "--short", "HEAD"),
                }
            )
            print(f"tree {label}: {tree} at {info[-1]['commit']}{' (modified)' if dirty else ''}")
            for n, f in files.items():
                print(f"  {n}.__file__ = {f}")
        rounds: list[dict[str, Any]] = []
        failed = 0
        with tempfile.TemporaryDirectory(prefix="tierd-rounds-") as tmp:
            for r in range(args.rounds):
                for label, tree in zip(labels, trees):
                    out = Path(tmp) / f"{label}{r}.json"
                    print(f"\n== round {r + 1}/{args.rounds}, tree {label} ({tree})", flush=True)
                    proc = subprocess.run(
                        [sys.executable, str(script), *child, "--json", str(out)],
                        cwd=tree,
                        env=_env(tree, links[tree]),
                        check=False,
                    )
                    if not out.exists():
                        print(
                            f"round {r + 1} of tree {label} wrote no figures (rc {proc.returncode})"
                        )
                        failed += 1
                        continue
                    doc = json.loads(out.read_text())
                    _check_inside(
                        tree,
                        doc.get("provenance", {}),
                        f"round {r + 1} of {label}",
                        ("tierd_client",),
                    )
                    failed += proc.returncode != 0
                    rounds.append(
                        {
                            "tree": label,
                            "round": r + 1,
                            "rc": proc.returncode,
                            "imports": doc["provenance"],
                            "metrics": metrics(doc),
                        }
                    )
    finally:
        for d in links.values():
            for link in d.iterdir():
                link.unlink()
            d.rmdir()
    summary = summarize(rounds, labels)
    print_summary(summary, info)
    if args.json:
        args.json.write_text(
            json.dumps({"trees": info, "rounds": rounds, "summary": summary}, indent=2)
        )
        print(f"wrote {args.json}")
    return 1 if failed else 0


# -- report -------------------------------------------------------------------------------


def _spread(values: list[float]) -> float:
    mid = statistics.median(values)
    if mid == 0:
        return 0.0 if max(values) == min(values) else float("nan")
    return (max(values) - min(values)) / abs(mid)


def summarize(rounds: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """Per metric: each tree's median and spread; against the first tree, the median of the
    ratios of paired rounds (round r of B over round r of A: drift during the run cancels),
    their range, and the ratio of the medians."""
    by: dict[str, dict[str, dict[int, float]]] = {}
    for r in rounds:
        for k, v in r["metrics"].items():
            by.setdefault(k, {}).setdefault(r["tree"], {})[r["round"]] = v
    out: dict[str, dict[str, Any]] = {}
    base = labels[0]
    for k, per in by.items():
        entry: dict[str, Any] = {}
        for t, vals in per.items():
            v = list(vals.values())
            entry[t] = {"median": statistics.median(v), "spread": _spread(v), "values": v}
        a = per.get(base, {})
        for t in labels[1:]:
            b = per.get(t, {})
            paired = [b[r] / a[r] for r in sorted(a.keys() & b.keys()) if a[r]]
            if paired:
                entry[f"{t}/{base}"] = statistics.median(paired)
                entry[f"{t}/{base} range"] = [min(paired), max(paired)]
            if a and b and entry[base]["median"]:
                entry[f"{t}/{base} of medians"] = entry[t]["median"] / entry[base]["median"]
        out[k] = entry
    return out


def _num(x: float, fmt: str, width: int) -> str:
    return f"{x:>{width}{fmt}}" if not math.isnan(x) else "-".rjust(width)


def print_summary(summary: dict[str, dict[str, Any]], info: list[dict[str, Any]]) -> None:
    labels = [i["label"] for i in info]
    base = labels[0]
    print("\nper tree: median of its rounds (spread between its rounds: (max-min)/median);")
    print(f"ratios: median and range over paired rounds (round r of each tree over {base}'s)")
    width = max([len(k) for k in summary] + [6])
    head = "metric".ljust(width) + "".join(f"{t:>22}" for t in labels)
    head += "".join(f"{t + '/' + base:>10}{'range':>16}" for t in labels[1:])
    print(head)
    for k, e in summary.items():
        row = k.ljust(width)
        for t in labels:
            if t in e:
                row += _num(e[t]["median"], ".4g", 12) + f" ({_num(e[t]['spread'], '.1%', 6)})"
            else:
                row += " " * 22
        for t in labels[1:]:
            ratio, span = e.get(f"{t}/{base}"), e.get(f"{t}/{base} range")
            row += _num(ratio, ".3f", 10) if ratio is not None else "-".rjust(10)
            row += f"{span[0]:>8.3f}-{span[1]:<7.3f}" if span else " " * 16
        print(row)
    spreads = [e[t]["spread"] for e in summary.values() for t in labels if t in e]
    spreads = [s for s in spreads if not math.isnan(s)]
    if spreads:
        print(
            f"noise: median spread between rounds of one tree {statistics.median(spreads):.1%}"
            f", largest {max(spreads):.1%}"
        )
