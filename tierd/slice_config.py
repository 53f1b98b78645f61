"""The `[[slices]]` tables: which models a GPU, or a MIG instance of one, may serve, and how
many bytes of their weights it may hold.

Primitives: `SliceConfig` (frozen; `serves(ref)`, `is_mig`, `gpu_index`),
`slices_config(raw) -> tuple[SliceConfig, ...]`.

    [[slices]]
    slice = 0                      # a GPU index: the whole GPU
    models = ["smollm2", "<fingerprint>"]
    weight_budget = "8GiB"         # bytes (a number or a size)

    [[slices]]
    slice = "MIG-0f2c..."          # a MIG instance, by the UUID `nvidia-smi -L` prints
    models = ["<fingerprint>"]
    weight_budget = 2147483648

A model is named as `register_model` names it or by its fingerprint. The budget bounds the
weights a worker on that slice keeps on the device at once (a `WeightStreamer` built from
it streams the rest from the host mapping). tierctl capacity shows the slices against the
GPUs it finds; the daemon itself only parses them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tierd.config_checks import key_name, show
from tierd.errors import ConfigError

# nvidia-smi -L: "MIG-" and a UUID (older drivers: "MIG-GPU-<uuid>/<gi>/<ci>").
_MIG_RE = re.compile(r"^MIG-[0-9A-Za-z][0-9A-Za-z/-]{7,80}$", re.ASCII)
_MODEL_RE = re.compile(r"^[\x21-\x7e]{1,256}$", re.ASCII)  # printable, no spaces
MAX_GPUS = 64
MAX_SLICES = 512
MAX_MODELS = 256
_KEYS = ("slice", "models", "weight_budget")


@dataclass(frozen=True)
class SliceConfig:
    slice: str  # a GPU index ("0") or a MIG instance's UUID ("MIG-...")
    models: tuple[str, ...]  # names or fingerprints it may serve
    weight_budget: int  # bytes of weights resident on the slice at once

    @property
    def is_mig(self) -> bool:
        return self.slice.startswith("MIG-")

    @property
    def gpu_index(self) -> int | None:
        return None if self.is_mig else int(self.slice)

    def serves(self, *refs: str) -> bool:
        """Whether any of `refs` (a model's name, its fingerprint) is one this slice may serve."""
        return any(r in self.models for r in refs)


def _slice(value: object, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MAX_GPUS:
        return str(value)
    if isinstance(value, str) and value.isdecimal() and int(value) < MAX_GPUS:
        return str(int(value))
    if isinstance(value, str) and _MIG_RE.match(value):
        return value
    raise ConfigError(where, f"expected a GPU index (0-{MAX_GPUS - 1}) or a MIG instance's "
                      f"UUID (MIG-...), got {show(value)}")  # fmt: skip


def _models(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_MODELS:
        raise ConfigError(where, f"expected a list of 1 to {MAX_MODELS} model names or "
                          f"fingerprints, got {show(value)}")  # fmt: skip
    for i, m in enumerate(value):
        if not isinstance(m, str) or not _MODEL_RE.match(m):
            raise ConfigError(
                f"{where}[{i}]", f"expected a model name or fingerprint, got {show(m)}"
            )
    if len(set(value)) != len(value):
        raise ConfigError(where, "names a model twice")
    return tuple(value)


def _one(raw: dict[str, Any], where: str) -> SliceConfig:
    from tierd.config import parse_size  # here: tierd.config imports this module

    for key in raw:
        if key not in _KEYS:
            raise ConfigError(
                f"{where}.{key_name(key)}", f"unknown key (known: {', '.join(_KEYS)})"
            )
    missing = [k for k in _KEYS if k not in raw]
    if missing:
        raise ConfigError(f"{where}.{missing[0]}", "required")
    budget = parse_size(raw["weight_budget"], key=f"{where}.weight_budget")
    if budget == 0:
        raise ConfigError(f"{where}.weight_budget", "must be more than 0 bytes")
    return SliceConfig(_slice(raw["slice"], f"{where}.slice"),
                       _models(raw["models"], f"{where}.models"), budget)  # fmt: skip


def slices_config(raw: object) -> tuple[SliceConfig, ...]:
    """The `[[slices]]` tables as written, checked; every error names its key."""
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        raise ConfigError("slices", "expected [[slices]] tables")
    if len(raw) > MAX_SLICES:
        raise ConfigError("slices", f"more than {MAX_SLICES} slices")
    out = tuple(_one(t, f"slices[{i}]") for i, t in enumerate(raw))
    seen: dict[str, int] = {}
    for i, s in enumerate(out):
        if s.slice in seen:
            raise ConfigError(f"slices[{i}].slice",
                              f"{s.slice} is already slices[{seen[s.slice]}]")  # fmt: skip
        seen[s.slice] = i
    return out
