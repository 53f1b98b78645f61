"""What a model's KV cache costs: presets, HF config.json, GGUF headers, dtypes.

Primitives: `ModelSpec` (`kv_bytes_per_token(dtype)`), `PRESETS`, `resolve_model(text)`
(a preset name, a config.json, a directory holding one, or a .gguf file),
`from_hf_config(dict)`, `from_gguf_metadata(dict)`, `dtype_bytes(name)`.

Per token, every layer stores one K and one V vector per KV head, so
bytes/token = layers x kv_heads x (k_dim + v_dim) x dtype bytes. GQA models have fewer KV
heads than query heads, which is why head_count_kv matters and head_count alone misleads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tierctl.errors import UsageError
from tierctl.gguf import GGUFError, is_gguf, read_metadata

# Names an operator is likely to type -> bytes per element. The canonical names are
# tierd's own (tierd_client.layout.DTYPES); the rest are common spellings.
_DTYPES: dict[str, tuple[str, int]] = {
    "bf16": ("bfloat16", 2), "bfloat16": ("bfloat16", 2),
    "fp16": ("float16", 2), "f16": ("float16", 2), "float16": ("float16", 2),
    "half": ("float16", 2),
    "fp32": ("float32", 4), "f32": ("float32", 4), "float32": ("float32", 4),
    "fp8": ("float8_e4m3", 1), "e4m3": ("float8_e4m3", 1), "float8_e4m3": ("float8_e4m3", 1),
    "float8_e4m3fn": ("float8_e4m3", 1),
    "int8": ("uint8", 1), "uint8": ("uint8", 1),
}  # fmt: skip


def dtype_bytes(name: str) -> tuple[str, int]:
    """(canonical name, bytes per element) of a dtype spelling."""
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise UsageError(
            f"unknown dtype {name!r}; one of {', '.join(sorted(set(_DTYPES)))}"
        ) from None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    num_kv_heads: int  # the largest per layer when layers differ
    head_dim: int  # of K
    v_head_dim: int  # of V (equal to head_dim for nearly every model)
    source: str  # "preset", a config.json path, or a .gguf path
    max_context: int | None = None  # what the model was trained for, when known
    kv_heads_per_layer: tuple[int, ...] | None = None  # when layers differ (OpenELM ...)

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim", "v_head_dim"):
            if getattr(self, field) <= 0:
                raise UsageError(f"model {self.name}: {field} must be positive")

    @property
    def total_kv_heads(self) -> int:
        """KV heads summed over layers."""
        if self.kv_heads_per_layer is not None:
            return sum(self.kv_heads_per_layer)
        return self.num_layers * self.num_kv_heads

    def kv_bytes_per_token(self, dtype: str = "bf16") -> int:
        return self.total_kv_heads * (self.head_dim + self.v_head_dim) * dtype_bytes(dtype)[1]


def _preset(name: str, layers: int, kv_heads: int, dim: int, ctx: int) -> ModelSpec:
    return ModelSpec(name, layers, kv_heads, dim, dim, "preset", ctx)


PRESETS: dict[str, ModelSpec] = {
    p.name: p
    for p in (
        _preset("llama-3-8b", 32, 8, 128, 8192),
        _preset("llama-3-70b", 80, 8, 128, 8192),
        _preset("smollm2-135m", 30, 3, 64, 8192),
        _preset("mistral-7b", 32, 8, 128, 32768),
    )
}


def _first(cfg: Mapping[str, Any], *names: str) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return None


def from_hf_config(
    cfg: Mapping[str, Any], name: str = "model", source: str = "config.json"
) -> ModelSpec:
    """A transformers config.json (as a dict). Multimodal configs keep the language
    model's numbers under `text_config`, which is what the KV cache follows."""
    if _first(cfg, "num_hidden_layers", "n_layer", "num_layers") is None and isinstance(
        cfg.get("text_config"), Mapping
    ):
        cfg = cfg["text_config"]
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(cfg, "num_attention_heads", "n_head")
    kv_heads = _first(cfg, "num_key_value_heads", "num_kv_heads", "n_head_kv")
    if kv_heads is None and cfg.get("multi_query"):
        kv_heads = 1  # Falcon's older configs say multi_query instead of a count
    kv_heads = kv_heads if kv_heads is not None else heads
    head_dim = _first(cfg, "head_dim")
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model")
    if head_dim is None and hidden is not None and heads:
        head_dim = int(hidden) // int(heads)
    needed = [
        ("num_hidden_layers", layers),
        ("num_key_value_heads or num_attention_heads", kv_heads),
        ("head_dim or hidden_size", head_dim),
    ]
    missing = [n for n, v in needed if v is None]
    if missing:
        raise UsageError(f"{source}: cannot tell the KV layout; missing {', '.join(missing)}")
    per_layer: tuple[int, ...] | None = None
    if isinstance(kv_heads, Sequence):
        per_layer = tuple(int(h) for h in kv_heads)
        kv_heads = max(per_layer)
    ctx = _first(cfg, "max_position_embeddings", "n_positions", "max_sequence_length")
    return ModelSpec(
        name=str(cfg.get("_name_or_path") or cfg.get("model_type") or name),
        num_layers=int(layers), num_kv_heads=int(kv_heads), head_dim=int(head_dim),
        v_head_dim=int(head_dim), source=source, max_context=int(ctx) if ctx else None,
        kv_heads_per_layer=per_layer,
    )  # fmt: skip


def from_gguf_metadata(meta: Mapping[str, object], source: str = "model.gguf") -> ModelSpec:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise UsageError(f"{source}: GGUF header has no general.architecture")

    def get(key: str) -> object:
        return meta.get(f"{arch}.{key}")

    layers, heads = get("block_count"), get("attention.head_count")
    kv_heads = get("attention.head_count_kv")
    kv_heads = kv_heads if kv_heads is not None else heads  # no _kv key: plain multi-head
    embed, key_len, val_len = (
        get("embedding_length"),
        get("attention.key_length"),
        get("attention.value_length"),
    )
    per_layer: tuple[int, ...] | None = None
    if isinstance(kv_heads, list):
        per_layer = tuple(int(h) for h in kv_heads)
        kv_heads = max(per_layer)
    if isinstance(heads, list):
        heads = max(int(h) for h in heads)
    head_dim = key_len
    if head_dim is None and isinstance(embed, int) and isinstance(heads, int) and heads:
        head_dim = embed // heads
    if (
        not isinstance(layers, int)
        or not isinstance(kv_heads, int)
        or not isinstance(head_dim, int)
    ):
        raise UsageError(
            f"{source}: GGUF header lacks {arch}.block_count, {arch}.attention.head_count(_kv) "
            f"or {arch}.embedding_length / {arch}.attention.key_length"
        )
    ctx = get("context_length")
    return ModelSpec(
        name=str(meta.get("general.name") or arch), num_layers=layers, num_kv_heads=kv_heads,
        head_dim=head_dim, v_head_dim=int(val_len) if isinstance(val_len, int) else head_dim,
        source=source, max_context=ctx if isinstance(ctx, int) else None,
        kv_heads_per_layer=per_layer,
    )  # fmt: skip


def resolve_model(text: str) -> ModelSpec:
    """A preset name, a config.json, a directory with config.json or one .gguf, or a .gguf."""
    preset = PRESETS.get(text.lower().replace("_", "-"))
    if preset is not None:
        return preset
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            path = path / "config.json"
        else:
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) != 1:
                raise UsageError(f"{path}: expected a config.json or exactly one .gguf file")
            path = ggufs[0]
    if not path.is_file():
        raise UsageError(f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a readable file")
    if is_gguf(path):
        try:
            return from_gguf_metadata(read_metadata(path), source=str(path))
        except GGUFError as e:
            raise UsageError(f"{path}: {e}") from None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: neither GGUF nor a JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"{path}: a config.json holds a JSON object")
    return from_hf_config(cfg, name=path.parent.name or "model", source=str(path))
