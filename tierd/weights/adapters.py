"""LoRA adapters held like models: a PEFT adapter directory read once into its own area.

Primitives: `open_adapter(path, dtype) -> Source`, `describe(source, base) -> AdapterMeta`,
`module_of(name) -> (module, "A" | "B")`.

A PEFT LoRA directory holds `adapter_config.json` and `adapter_model.safetensors`, whose
tensors are named `base_model.model.<module>.lora_A.weight` (rank x in) and
`...lora_B.weight` (out x rank), `<module>` being a linear layer of the base model whose
`<module>.weight` is out x in. The adapter's area holds these tensors under these names,
and its manifest records the base model's fingerprint, the rank, lora_alpha and the
target modules (`AdapterMeta`, part of the fingerprint); `config_json` is the adapter's
config as the directory has it.

An adapter is checked against its base when registered: every module has both matrices,
at the config's rank, and the base has that module's weight with matching sides; so a
client can apply it to a model built on the base without another check. Options that
change the computation beyond `W x + (alpha / r) B A x` (or `alpha / sqrt(r)` with
use_rslora) are refused: DoRA, fan_in_fan_out, per-module rank or alpha patterns, LoRA
biases, modules_to_save, embedding adapters and the variants named in `_DEFAULTS`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from tierd.errors import InvalidArgument, NotFound
from tierd.weights.area import AdapterMeta, Manifest
from tierd.weights.sources import (
    DTYPES,
    Source,
    _read_config,
    _safetensors,
    _stat,
    resolve_dtype,
    within,
)

CONFIG = "adapter_config.json"
TENSORS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_SUFFIX = {".lora_A.weight": "A", ".lora_B.weight": "B"}
# Options the plain LoRA computation ignores only at their default.
_DEFAULTS = {"use_dora": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
             "lora_bias": False, "modules_to_save": None, "bias": "none",
             # Variants whose forward is not the plain one (activated only after invocation
             # tokens, layers repeated, routed, block-diagonal factors, SVD-truncated base).
             "alora_invocation_tokens": None, "layer_replication": None, "arrow_config": None,
             "use_bdlora": None, "kasa_config": None, "monteclora_config": None}  # fmt: skip


def module_of(name: str) -> tuple[str, str] | None:
    """(module, "A" | "B") of a PEFT LoRA tensor name; None for any other name."""
    if not name.startswith(_PREFIX):
        return None
    for suffix, which in _SUFFIX.items():
        if name.endswith(suffix):
            return name[len(_PREFIX) : -len(suffix)], which
    return None


def _bad(path: Path, why: str) -> InvalidArgument:
    return InvalidArgument(f"{path} is not a LoRA adapter tierd can hold: {why}", field="path")


def open_adapter(path: Path, dtype: str, roots: tuple[Path, ...] = ()) -> Source:
    """The adapter in the PEFT directory `path` (absolute), read only from files inside
    `roots` (`sources.within`); its config is the adapter's."""
    dtype = resolve_dtype(dtype)
    if not path.is_absolute():
        raise InvalidArgument(f"{path} is not an absolute path", field="path")
    if not path.is_dir():
        raise NotFound(f"{path} is not a directory on the daemon's host", field="path")
    root = path.resolve()
    for name in (CONFIG, TENSORS):
        if not (root / name).is_file():
            raise _bad(path, f"it has no {name}")
    config, tensors = within(roots, [root / CONFIG, root / TENSORS])
    source = _safetensors(root, [tensors], None, dtype)
    try:
        source.config_json = _read_config(config)
        source.stamp.append(_stat(config))
    except BaseException:
        source.close()
        raise
    return source


def describe(source: Source, base: Manifest) -> AdapterMeta:
    """What the manifest records of the adapter, once it is checked against `base`."""
    path = source.path
    if base.adapter is not None:
        raise InvalidArgument("the base model is itself an adapter", field="base_model")
    cfg = json.loads(source.config_json)
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise _bad(path, f"peft_type is {cfg.get('peft_type')!r}, not LORA")
    for key, default in _DEFAULTS.items():
        if cfg.get(key, default) not in (default, None, {}, [], False, "none"):
            raise _bad(path, f"{key} = {cfg[key]!r} is not supported")
    try:
        rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError, OverflowError):  # JSON allows 1e400 and NaN
        raise _bad(path, "its config lacks r or lora_alpha") from None
    if not math.isfinite(alpha):
        raise _bad(path, f"its config's r or lora_alpha is out of range (lora_alpha = {alpha})")
    if rank <= 0:
        raise _bad(path, f"r = {rank}")
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in source.tensors:
        found = module_of(t.name)
        if found is None or len(t.shape) != 2:
            raise _bad(path, f"tensor {t.name!r} is not a LoRA A or B matrix")
        if t.dtype not in DTYPES:  # integers keep their dtype; no LoRA layer computes in one
            raise _bad(path, f"tensor {t.name!r} is {t.dtype}, not floating point")
        pairs.setdefault(found[0], {})[found[1]] = t.shape
    if not pairs:
        raise _bad(path, "it holds no LoRA matrices")
    shapes = {t.name: t.shape for t in base.tensors}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise _bad(path, f"module {module!r} lacks its lora_{'B' if 'A' in ab else 'A'}")
        (r_a, d_in), (d_out, r_b) = ab["A"], ab["B"]
        if r_a != rank or r_b != rank:
            raise _bad(path, f"module {module!r} has rank {r_a}/{r_b}, the config says {rank}")
        want = shapes.get(f"{module}.weight")
        if want is None:
            raise InvalidArgument(f"the base model has no {module}.weight to adapt",
                                  field="base_model")  # fmt: skip
        if tuple(want) != (d_out, d_in):
            raise InvalidArgument(f"{module}.weight is {list(want)} in the base model, the "
                                  f"adapter's matrices make {[d_out, d_in]}",
                                  field="base_model")  # fmt: skip
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in pairs}))
    return AdapterMeta(base.fingerprint, rank, alpha, targets)
