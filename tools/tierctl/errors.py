"""The exit-code convention of every tierctl command, and the one error they raise."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0  # clean / done
    PROBLEMS = 1  # the check found problems (whether or not they were repaired)
    USAGE = 2  # bad arguments, or the command could not run at all (daemon running ...)


class UsageError(Exception):
    """Bad input, or an environment the command cannot work in: exit 2 with the message."""
