"""`tierctl top` lives with `status` (same data, redrawn); this module registers it."""

from tierctl.status import TOP as COMMAND

__all__ = ["COMMAND"]
