"""tierd_kernels: attention over KV in tierd's block layout.

Primitives: `attention_reference` (the torch oracle), `merge_partials` (exact log-sum-exp
merge), `attend_blocks` (fast CPU path), and, where Triton is installed,
`tierd_kernels.triton_attention.decode_attention` (imported on demand: Triton is optional).

Importing this package imports torch and nothing else.
"""

from __future__ import annotations

from .cpu_attention import attend_blocks
from .merge import merge_partials
from .reference import AttentionOutput, attention_reference, gather_layer_kv

__all__ = [
    "AttentionOutput",
    "attend_blocks",
    "attention_reference",
    "gather_layer_kv",
    "merge_partials",
]
