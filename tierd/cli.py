"""`tierd` command line: `serve` runs the daemon, `check-config` validates a file,
`csd-worker` runs one computational-storage worker.

Flags override the config file, which overrides the embedded defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Any

from tierd.config import Config, load_config, parse_size
from tierd.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tierd", description="KV-cache tiering daemon")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", type=Path, help="TOML configuration file")
    serve.add_argument("--listen", action="append", metavar="ADDR",
                       help="unix:PATH or HOST:PORT (repeatable)")
    serve.add_argument("--data-dir", type=Path, help="catalog, NVMe tier and default socket")
    serve.add_argument("--host-capacity", metavar="SIZE", help="host tier size, e.g. 8GiB")
    serve.add_argument("--nvme-capacity", metavar="SIZE", help="NVMe tier size, e.g. 200GiB")
    serve.add_argument("--nvme-path", type=Path, help="directory of the NVMe tier's data file")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    serve.add_argument("--log-format", default="text", choices=["text", "json"],
                       help="json: one object per line, for log collectors")
    serve.add_argument("--metrics", metavar="[HOST:]PORT",
                       help="serve Prometheus /metrics here (a bare port: 127.0.0.1 only)")
    serve.add_argument("--csd-workers", type=int, metavar="N",
                       help="spawn N local computational-storage workers")
    check = sub.add_parser("check-config", help="validate a config file, print the result")
    check.add_argument("file", type=Path)
    csd = sub.add_parser("csd-worker", help="run a computational-storage worker on one shard")
    csd.add_argument("--dir", type=Path, required=True, help="shard directory (blocks, catalog)")
    csd.add_argument("--listen", required=True, metavar="ADDR", help="unix:PATH or HOST:PORT")
    csd.add_argument("--capacity", required=True, metavar="SIZE", help="shard size, e.g. 64GiB")
    csd.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])
    csd.add_argument("--log-format", default="text", choices=["text", "json"],
                     help="json: one object per line, for log collectors")
    return p


def _config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        "server.listen": args.listen,
        "data_dir": str(args.data_dir) if args.data_dir else None,
        "host.capacity": args.host_capacity,
        "nvme.capacity": args.nvme_capacity,
        "nvme.path": str(args.nvme_path) if args.nvme_path else None,
        "metrics.listen": args.metrics,
        "csd.workers": args.csd_workers,
    }
    return load_config(args.config, overrides).resolved()


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 6), "level": record.levelname, "logger": record.name,
               "msg": record.getMessage()}  # fmt: skip
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        _JsonFormatter() if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )  # fmt: skip
    logging.basicConfig(level=level, handlers=[handler])


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            cfg = load_config(args.file).resolved()
            print(json.dumps(_jsonable(cfg), indent=2))
            return 0
        _setup_logging(args.log_level, args.log_format)
        if args.command == "csd-worker":
            from tierd.csd.worker import run_worker  # grpc and the shard load only here

            return run_worker(args.dir, args.listen, parse_size(args.capacity, key="--capacity"))
        cfg = _config_from_args(args)
        from tierd.server.app import serve  # grpc and the tiers load only to serve

        return serve(cfg, reload_config=lambda: _config_from_args(args))
    except ConfigError as e:
        print(f"tierd: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
