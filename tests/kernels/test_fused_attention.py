"""The fused C++ CPU kernel against the float64 oracle: every storage dtype, head dims,
GQA ratios, block sizes, partial last blocks, decode and causal multi-token queries, with
peaked scores as trained models have; its thread split and merge; and its GIL release."""

from __future__ import annotations

import itertools
import math
import os
import threading
import time

import pytest
import torch

from tests.kernels.conftest import require_fused
from tests.kernels.helpers import assert_attention_close, random_blocks, seed_of
from tierd_kernels import _native, attend_blocks, attention_reference, gather_layer_kv

KV_HEADS = 2
# q scaled so scores have a standard deviation above 3 (checked per case).
PEAK = 4.5
# The oracle reads the same rounded K, V and q: what remains is the kernel's float32
# arithmetic, so float8 KV (with a float32 q) is held to float32's bound.
TOL = {
    torch.float32: 1e-5,
    torch.bfloat16: 1e-2,
    torch.float16: 1e-2,
    torch.float8_e4m3fn: 1e-5,
    torch.float8_e5m2: 1e-5,
}
# (block tokens, blocks, valid tokens in the last block)
LAYOUTS = [(16, 1, 7), (16, 37, None), (48, 5, 1), (64, 3, 63), (128, 9, 100), (256, 6, 17)]
CASES = [
    pytest.param(dt, d, g, lay, id=f"{str(dt)[6:]}-d{d}-g{g}-bt{lay[0]}x{lay[1]}-v{lay[2]}")
    for dt, d, g, lay in itertools.product(TOL, (64, 128), (1, 3, 4), LAYOUTS)
]


@pytest.fixture
def fused(monkeypatch: pytest.MonkeyPatch) -> None:
    require_fused()
    monkeypatch.setenv("TIERD_KERNELS", "cpp")


def oracle(blocks, q, valid, causal_offset, scale=None):
    k, v = gather_layer_kv(blocks, 1, valid)
    offset = k.shape[1] if causal_offset is None else causal_offset
    return attention_reference(q, k, v, causal_offset=offset, scale=scale)


def score_std(blocks, q, valid) -> float:
    k, _ = gather_layer_kv(blocks, 1, valid)
    group = q.shape[1] // k.shape[0]
    kk = k.double().repeat_interleave(group, dim=0)
    return (torch.einsum("qhd,hsd->hqs", q.double(), kk) / math.sqrt(q.shape[-1])).std().item()


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize(("dtype", "dim", "group", "layout"), CASES)
def test_matches_oracle(dtype, dim, group, layout):
    bt, n, valid = layout
    g = torch.Generator().manual_seed(seed_of(str(dtype), dim, group, layout))
    blocks = random_blocks(n, 2, KV_HEADS, bt, dim, dtype, g)
    q_dtype = dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32
    seq = (n - 1) * bt + (bt if valid is None else valid)
    q_tokens = min(seq, 40)
    q = (torch.randn(q_tokens, KV_HEADS * group, dim, generator=g) * PEAK).to(q_dtype)
    assert score_std(blocks, q, valid) >= 3
    # A decode step; a causal query ending the sequence; one in its middle (later keys
    # hidden); one before it (its first rows see nothing).
    for q_rows, causal_offset in (
        (1, None), (q_tokens, seq - q_tokens), (min(5, q_tokens), seq // 3), (3, -1),
    ):  # fmt: skip
        qq = q[:q_rows]
        got = attend_blocks(blocks, 1, qq, valid_tokens=valid, causal_offset=causal_offset)
        assert_attention_close(got, oracle(blocks, qq, valid, causal_offset), TOL[dtype])


@pytest.mark.usefixtures("fused")
@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_split_key_ranges_merge_exactly(threads):
    """One KV head over 2,600 keys: with several threads its keys split into ranges whose
    partials merge by max and sum; a long causal query splits into query tiles instead."""
    g = torch.Generator().manual_seed(threads)
    blocks = random_blocks(41, 2, 1, 64, 128, torch.float32, g)
    seq = 40 * 64 + 33
    q = torch.randn(300, 4, 128, generator=g) * PEAK
    for q_rows, offset in ((1, None), (2, None), (300, seq - 300), (300, 1000)):
        q3 = q[:q_rows]
        got = _native.attend([b for b in blocks], 1, q3, scale=1 / math.sqrt(128), seq=seq,
                             causal_offset=offset, threads=threads)  # fmt: skip
        assert got is not None
        assert_attention_close(got, oracle(blocks, q3, 33, offset), 1e-5)


@pytest.mark.usefixtures("fused")
def test_odd_head_dim_and_scale():
    """A head dim that is no multiple of the vector width (padded inside the kernel)."""
    g = torch.Generator().manual_seed(11)
    blocks = random_blocks(3, 2, KV_HEADS, 16, 40, torch.bfloat16, g)
    q = torch.randn(6, 6, 40, generator=g).to(torch.bfloat16)
    got = attend_blocks(blocks, 1, q, scale=0.4, valid_tokens=5, causal_offset=30)
    assert_attention_close(got, oracle(blocks, q, 5, 30, scale=0.4), 1e-2)


@pytest.mark.usefixtures("fused")
def test_blocks_of_other_strides_take_the_torch_path():
    """Blocks the kernel cannot read in place (dims not contiguous) still get the right
    answer, from the torch path."""
    g = torch.Generator().manual_seed(12)
    blocks = [torch.randn(64, 16, KV_HEADS, 2, 2, generator=g).permute(4, 3, 2, 1, 0)
              for _ in range(3)]  # fmt: skip
    q = torch.randn(1, 4, 64, generator=g) * PEAK
    assert _native.attend(blocks, 1, q, scale=0.125, seq=48, causal_offset=None) is None
    assert_attention_close(attend_blocks(blocks, 1, q), oracle(blocks, q, None, None), 1e-5)


@pytest.mark.usefixtures("fused")
def test_the_call_releases_the_gil():
    """While the kernel computes, other Python threads run: the main thread's timestamps
    leave no gap as long as half a kernel call (in at least one call of five: another
    process may take this thread's core for a while; a held GIL stalls it in every call)."""
    g = torch.Generator().manual_seed(13)
    pool = torch.randn(64, 1, 2, 8, 256, 128, generator=g).to(torch.bfloat16)  # 64 MiB
    blocks = list(pool.unbind(0))
    q = torch.randn(1, 32, 128, generator=g)
    calls: list[tuple[float, float]] = []

    def attend() -> None:
        for _ in range(5):
            t0 = time.perf_counter()
            _native.attend(blocks, 0, q, scale=0.088, seq=64 * 256, causal_offset=None, threads=1)
            calls.append((t0, time.perf_counter()))

    worker = threading.Thread(target=attend)
    stamps = []
    worker.start()
    while worker.is_alive():
        stamps.append(time.perf_counter())
    worker.join()
    gaps = []
    for t0, t1 in calls:
        inside = [t0] + [s for s in stamps if t0 < s < t1] + [t1]
        gaps.append(max(b - a for a, b in itertools.pairwise(inside)) / (t1 - t0))
    assert min(gaps) < 0.5, f"the main thread stalled through every call: {gaps}"


@pytest.mark.usefixtures("fused")
def test_calls_from_many_threads_at_once():
    """Concurrent calls share the kernel's thread pool; each gets its own answer."""
    g = torch.Generator().manual_seed(14)
    cases = []
    for i in range(6):
        blocks = random_blocks(8 + i, 2, KV_HEADS, 64, 128, torch.bfloat16, g)
        q = (torch.randn(1 + i % 3, 8, 128, generator=g) * PEAK).to(torch.bfloat16)
        cases.append((blocks, q, oracle(blocks, q, 20, None)))
    errors: list[BaseException] = []

    def attend(blocks, q, want) -> None:
        try:
            for _ in range(20):
                assert_attention_close(attend_blocks(blocks, 1, q, valid_tokens=20), want, 1e-2)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    workers = [threading.Thread(target=attend, args=case) for case in cases]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors[0]


@pytest.mark.usefixtures("fused")
def test_a_forked_child_gets_its_own_threads():
    """After a fork the parent's pool threads do not exist in the child (and its pool lock
    may have been held at the fork): the child's calls still finish, correct."""
    g = torch.Generator().manual_seed(15)
    blocks = random_blocks(40, 2, 1, 64, 128, torch.float32, g)
    q = torch.randn(1, 4, 128, generator=g) * PEAK
    want = oracle(blocks, q, None, None)
    assert_attention_close(attend_blocks(blocks, 1, q), want, 1e-5)  # the parent's pool runs
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 1
        try:
            assert_attention_close(attend_blocks(blocks, 1, q), want, 1e-5)
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's attend never finished")
