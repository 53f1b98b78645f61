"""`tierctl bench kv|attend [ARGS...]`: the benchmarks in tools/, run in this process.

Arguments after the benchmark's name go to it unchanged (`tierctl bench kv --json f.json`).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from tierctl.cli import Command
from tierctl.errors import ExitCode, UsageError

SCRIPTS = {"kv": "bench_kv.py", "attend": "bench_attend.py"}


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=sorted(SCRIPTS), help="kv: put/get; attend: decode attention")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def _run(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parent.parent / SCRIPTS[args.which]
    if not script.exists():
        raise UsageError(f"{script} is missing: the benchmarks ship with the source tree")
    argv, sys.argv = sys.argv, [str(script), *args.rest]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else ExitCode.USAGE
    finally:
        sys.argv = argv
    return ExitCode.OK


COMMAND = Command("bench", "run a benchmark: kv (put/get) or attend (decode attention)",
                  _args, _run)  # fmt: skip
