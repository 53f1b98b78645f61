"""Shared pieces of the kernel tests: tolerances, error measures, random KV in block layout."""

from __future__ import annotations

import zlib

import torch

from tierd_kernels import AttentionOutput

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Relative error allowed against the float64 oracle, by storage dtype of q and KV (the
# oracle reads the same rounded inputs, so this bounds the fast path's own arithmetic).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def seed_of(*parts: object) -> int:
    """A stable seed per test case (str hashes change from one process to the next)."""
    return zlib.crc32(repr(parts).encode())


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||, in float64; 0 when both are all zeros."""
    got, want = got.double(), want.double()
    denom = want.norm().item()
    diff = (got - want).norm().item()
    return diff if denom == 0 else diff / denom


def assert_attention_close(got: AttentionOutput, want: AttentionOutput, tol: float) -> None:
    """Same shapes, float32, the same empty rows (lse -inf), and out and the finite lse
    within `tol` relative error."""
    assert got.out.shape == want.out.shape and got.lse.shape == want.lse.shape
    assert got.out.dtype == torch.float32 and got.lse.dtype == torch.float32
    assert torch.isfinite(got.out).all()
    seen = torch.isfinite(want.lse)
    assert torch.equal(torch.isfinite(got.lse), seen), "rows with no visible key differ"
    assert (got.lse[~seen] == float("-inf")).all()
    assert (got.out[~seen] == 0).all(), "a row with no visible key must be 0"
    err_out = rel_err(got.out, want.out)
    err_lse = rel_err(got.lse[seen], want.lse[seen])
    assert err_out <= tol, f"out relative error {err_out:.3g} > {tol:g}"
    assert err_lse <= tol, f"lse relative error {err_lse:.3g} > {tol:g}"


def random_blocks(
    n: int,
    layers: int,
    kv_heads: int,
    block_tokens: int,
    dim: int,
    dtype: torch.dtype,
    gen: torch.Generator,
) -> list[torch.Tensor]:
    """n blocks [layers, 2, kv_heads, block_tokens, dim], each a view into one pool in a
    shuffled slot order, as blocks in the host arena are."""
    pool = torch.randn(n, layers, 2, kv_heads, block_tokens, dim, generator=gen).to(dtype)
    order = torch.randperm(n, generator=gen).tolist()
    return [pool[i] for i in order]
