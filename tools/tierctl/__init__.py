"""tierctl: the operator's command line for tierd.

Subcommands live in their own modules and are registered in `tierctl.cli.COMMANDS`:
`capacity` (what fits where on this machine, and how fast) and `fsck` (offline check and
repair of a data dir). Nothing here talks to a running daemon yet; `status`, `top` and
`bench` will, through tierd_client.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
