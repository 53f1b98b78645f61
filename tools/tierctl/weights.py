"""`tierctl models`: the models a running daemon holds for the caller's tenant.

Primitives: `COMMAND`, `render_models(models) -> str`.

One row per model the tenant may load (its own, then those other tenants shared): name,
fingerprint (the id KV namespaces use), bytes of its weights area, decoder layers, dtype,
the tenant that registered it, and what it is: a model, or a LoRA adapter of the model
whose fingerprint it names (rank, alpha, and the KV blocks that depend on it now).
Registering and dropping are the client's calls (`TierdClient.register_model`,
`register_adapter`, `drop_model`); this view only reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from tierctl.cli import Command
from tierctl.errors import ExitCode, UsageError
from tierctl.status import _token, add_connection_arguments, default_address
from tierctl.tables import count, printable, render


def _kind(m: Any) -> str:
    a = m.adapter
    if a is None:
        return "model"
    return (f"adapter of {a.base_model[:12]} r={a.rank} alpha={a.alpha:g}, "
            f"{count(a.dependent_blocks)} KV blocks")  # fmt: skip


def render_models(models: list[Any]) -> str:
    if not models:
        return "no models"
    from tierd.config import format_size

    rows = [[printable(m.name), m.fingerprint, format_size(m.size), count(m.layers), m.dtype,
             printable(m.tenant) + (" (shared)" if m.shared else ""), _kind(m)]
            for m in models]  # fmt: skip
    return render(["name", "fingerprint", "bytes", "layers", "dtype", "tenant", "kind"], rows,
                  right={2, 3})  # fmt: skip


def _models(args: argparse.Namespace) -> int:
    from tierd_client import TierdClient, TierdError

    address = args.address or default_address()
    try:
        with TierdClient(address, tenant=args.tenant, token=_token(args), timeout=10,
                         max_retries=1) as client:  # fmt: skip
            models = client.list_models()
    except TierdError as e:
        raise UsageError(f"cannot list models at {address}: {e}") from e
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
    else:
        print(render_models(models))
    return ExitCode.OK


def _args(p: argparse.ArgumentParser) -> None:
    add_connection_arguments(p)
    p.add_argument("--tenant", default="default",
                   help="whose models (open daemons; with tenants, the token decides)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the models as JSON")


COMMAND = Command("models", "models a running daemon holds (name, fingerprint, bytes, layers)",
                  _args, _models)  # fmt: skip
