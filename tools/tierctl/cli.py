"""`tierctl` entry point: a registry of subcommands and one exit-code convention.

Primitives: `Command` (name, help, `add_arguments(parser)`, `run(args) -> int`),
`COMMAND_MODULES` (the registry), `UsageError`, `ExitCode`, `main(argv) -> int`.

To add a subcommand (status, top, bench ...): write a module with a `COMMAND = Command(...)`
and append its name to `COMMAND_MODULES`. Command modules keep heavy imports (torch,
matplotlib, grpc) inside their functions, since building the parser imports them all.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

from tierctl.errors import ExitCode, UsageError

__all__ = ["COMMAND_MODULES", "Command", "ExitCode", "UsageError", "build_parser", "main"]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


# The registry: each module defines COMMAND. Order is the order `tierctl --help` lists them.
COMMAND_MODULES: list[str] = [
    "tierctl.status", "tierctl.top", "tierctl.capacity", "tierctl.fsck", "tierctl.benchcmd",
    "tierctl.replay", "tierctl.weights",
]  # fmt: skip


def commands() -> list[Command]:
    out: list[Command] = []
    for name in COMMAND_MODULES:
        module = importlib.import_module(name)
        out.append(module.COMMAND)
    return out


def build_parser(cmds: list[Command] | None = None) -> argparse.ArgumentParser:
    from tierctl import __version__

    p = argparse.ArgumentParser(
        prog="tierctl", description="Operator tools for the tierd KV-cache daemon."
    )
    p.add_argument("--version", action="version", version=f"tierctl {__version__}")
    p.add_argument(
        "--progress",
        choices=["auto", "always", "never"],
        default="auto",
        help="progress bars on stderr for steps over a second (auto: when stderr is a TTY)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in cmds if cmds is not None else commands():
        sp = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(sp)
        sp.set_defaults(_run=cmd.run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on bad usage and 0 on --help
        return int(e.code) if isinstance(e.code, int) else ExitCode.USAGE
    from tierctl import progress

    progress.configure(args.progress)
    try:
        return int(args._run(args))
    except UsageError as e:
        from tierctl.tables import printable  # messages quote daemons and files: no escapes

        print(f"tierctl {args.command}: {printable(e)}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print("tierctl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
