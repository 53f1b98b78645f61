"""tierd_kernels: attention over KV in tierd's block layout `[layer][K|V][kv_head][token][dim]`.

Primitives:
  reference  `attention_reference` (the torch oracle), `gather_layer_kv`, `AttentionOutput`
  merge      `merge_partials`, `merge_stacked`, `merge_into_` (exact log-sum-exp merge)
  CPU        `attend_blocks` (decode and multi-token queries over a list of blocks: the
             fused C++ kernel of csrc/, built per machine by `python -m
             tierd_kernels.build` or on first use, else the torch path)
  codes      `codecs` (block codecs: raw, int8, fp8, kivi4, kivi2) and
             `codes_attention.attend_codes` (decode attention on encoded layer records,
             never dequantized: csrc/codes.cpp when it loads, else a torch reference)
  Triton     `decode_attention` (paged decode over a block pool on a GPU, or on the CPU
             under TRITON_INTERPRET=1), `decode_attention_codes` (the same over a pool of
             encoded blocks, codes turned into K and V in registers only),
             `triton_available`

Importing this package imports torch and nothing else: Triton is imported by the first
`decode_attention` call, and the package works without it.
"""

from __future__ import annotations

from .cpu_attention import attend_blocks
from .merge import merge_into_, merge_partials, merge_stacked
from .reference import AttentionOutput, LayerKV, attention_reference, empty_output, gather_layer_kv
from .triton_attention import decode_attention, triton_available
from .triton_codes import decode_attention_codes

__all__ = [
    "AttentionOutput",
    "LayerKV",
    "attend_blocks",
    "attention_reference",
    "decode_attention",
    "decode_attention_codes",
    "empty_output",
    "gather_layer_kv",
    "merge_into_",
    "merge_partials",
    "merge_stacked",
    "triton_available",
]
