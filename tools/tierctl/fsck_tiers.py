"""Where a stopped daemon's tiers keep their bytes, as `tierctl fsck` and its rebuild see it.

Primitives: `TierPlace` (a tier's name, kind and directory), `tier_chain(data_dir, config,
nvme_path) -> tuple[TierPlace, ...]`, `places(chain, kind)`, `local_shards(place)`.

The chain is the daemon's own (`Config.tiers`): `[[tiers]]` tables, or the `[host]`,
`[nvme]`, `[csd]` sections expanded to tiers of those names. Without a config file it is the
shorthand's default, with a "csd" tier besides (its copies are checked wherever the catalog
names them). Directories resolve as the tier kinds do: a tier's `path`, else
`<data_dir>/<name>`; a local CSD worker `w<i>` keeps its shard in `<dir>/w<i>`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tierctl.errors import UsageError
from tierd.config import Config, TierSpec

SHARD_CATALOG = "shard.sqlite3"


@dataclass(frozen=True)
class TierPlace:
    name: str
    kind: str  # host | nvme | csd (other kinds are reported, not checked)
    path: Path | None = None  # the directory of a storage kind's files; None for memory
    configured: bool = True  # False: assumed (no config file), listed only if it holds copies


def _place(spec: TierSpec, data_dir: Path) -> TierPlace:
    if spec.kind == "host":
        return TierPlace(spec.name, spec.kind)
    return TierPlace(spec.name, spec.kind, spec.path or data_dir / spec.name)


def tier_chain(data_dir: Path, config: Config | None = None,
               nvme_path: Path | None = None) -> tuple[TierPlace, ...]:  # fmt: skip
    """The daemon's tiers on `data_dir` (which overrides the config's); `nvme_path` is where
    the shorthand's "nvme" tier (or the chain's only NVMe tier) keeps its file."""
    cfg = dataclasses.replace(config or Config(), data_dir=data_dir)
    chain = [_place(s, data_dir) for s in cfg.tiers]
    if config is None and not any(p.name == "csd" for p in chain):
        chain.append(TierPlace("csd", "csd", data_dir / "csd", configured=False))
    if nvme_path is not None:
        nvme = [p for p in chain if p.kind == "nvme"]
        named = [p for p in nvme if p.name == "nvme"] or nvme
        if len(named) != 1:
            raise UsageError(
                "--nvme-path names one NVMe tier's directory, and the "
                f"configuration has {len(nvme)}: set their paths in it instead"
            )
        chain[chain.index(named[0])] = dataclasses.replace(named[0], path=nvme_path)
    return tuple(chain)


def places(chain: Iterable[TierPlace], kind: str) -> list[TierPlace]:
    return [p for p in chain if p.kind == kind]


def local_shards(place: TierPlace) -> dict[str, Path]:
    """worker name -> shard directory, for the local workers of a CSD tier found on disk."""
    if place.path is None or not place.path.is_dir():
        return {}
    return {d.name: d for d in sorted(place.path.glob("w*"))
            if d.is_dir() and (d / SHARD_CATALOG).is_file()}  # fmt: skip
