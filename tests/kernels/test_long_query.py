"""A long multi-token query runs in passes of query tokens: the same answer as the float64
oracle, in memory that does not grow with the square of the query."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.kernels.helpers import TOL, assert_attention_close, random_blocks
from tierd_kernels import attend_blocks, attention_reference, gather_layer_kv

ROOT = Path(__file__).resolve().parents[2]

# Every test here runs on the torch path and on the fused C++ kernel (conftest.py).
pytestmark = pytest.mark.usefixtures("kernel_path")


@pytest.mark.parametrize("query_chunk", [None, 1, 37, 256])
@pytest.mark.parametrize("where", ["tail", "middle", "decode"])
def test_passes_of_query_tokens_match_the_oracle(query_chunk, where):
    g = torch.Generator().manual_seed(7)
    blocks = random_blocks(40, 2, 2, 32, 32, torch.float32, g)  # 1,280 keys, the last 9 valid
    seq = 39 * 32 + 9
    q_tokens = 700
    q = torch.randn(q_tokens, 6, 32, generator=g)
    offset = {"tail": seq - q_tokens, "middle": 300, "decode": None}[where]
    k, v = gather_layer_kv(blocks, 1, 9)
    want = attention_reference(q, k, v, causal_offset=seq if offset is None else offset)
    got = attend_blocks(blocks, 1, q, valid_tokens=9, causal_offset=offset, chunk_tokens=64,
                        query_chunk=query_chunk)  # fmt: skip
    assert_attention_close(got, want, TOL[torch.float32])


def test_a_two_dim_query_keeps_its_rank_and_bad_chunks_are_refused():
    g = torch.Generator().manual_seed(8)
    blocks = random_blocks(2, 1, 1, 16, 8, torch.float32, g)
    q = torch.randn(4, 8, generator=g)
    got = attend_blocks(blocks, 0, q, query_chunk=1)
    assert got.out.shape == (4, 8) and got.lse.shape == (4,)
    with pytest.raises(ValueError, match="query_chunk"):
        attend_blocks(blocks, 0, q, query_chunk=0)


# The causal tail of a 4,096-token query over 8 query heads: the unchunked triangle alone
# is 8 x 4096 x 4096 float32 scores (512 MiB), several times over in temporaries.
PEAK_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from tierd_kernels import attend_blocks
    torch.set_num_threads(2)
    q_tokens, bt = 4096, 4112
    g = torch.Generator().manual_seed(0)
    tail = torch.randn(1, 2, 2, bt, 64, generator=g)
    q = torch.randn(q_tokens, 8, 64, generator=g)
    attend_blocks([tail], 0, q[:2], valid_tokens=bt, causal_offset=bt - 2)  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = attend_blocks([tail], 0, q, valid_tokens=bt, causal_offset=bt - q_tokens)
    assert torch.isfinite(out.out).all()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """
)


def test_peak_memory_of_a_long_causal_query_is_bounded():
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True,
                         cwd=ROOT, timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    grown_mib = int(run.stdout.split()[-1])
    # Bounded passes: tens of MiB (q, out and one pass's intermediates).
    assert grown_mib < 160, f"peak RSS grew by {grown_mib} MiB for one attend call"
