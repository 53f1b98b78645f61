"""Building and loading the fused CPU kernel: the cache, the fallback without a compiler,
and the portable code paths (builds for other x86 levels than this machine's)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tierd_kernels import build

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(build.compiler() is None, reason="no C++ compiler")

# Every storage dtype, decode and causal, against the oracle; prints the vector width.
CHECK = textwrap.dedent(
    """
    import torch
    from tests.kernels.helpers import assert_attention_close, random_blocks
    from tierd_kernels import _native, attend_blocks, attention_reference, gather_layer_kv
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2,
           torch.float8_e4m3fn: 1e-5, torch.float8_e5m2: 1e-5}
    for i, dtype in enumerate(tol):
        g = torch.Generator().manual_seed(i)
        blocks = random_blocks(5, 2, 2, 48, 80, dtype, g)
        q = torch.randn(7, 8, 80, generator=g) * 4.5
        k, v = gather_layer_kv(blocks, 1, 13)
        for offset in (None, 200):
            got = attend_blocks(blocks, 1, q, valid_tokens=13, causal_offset=offset)
            want = attention_reference(q, k, v, causal_offset=offset or k.shape[1])
            assert_attention_close(got, want, tol[dtype])
    # Attention on codes (codes.cpp): packed kivi codes with per-lane value scales, int8, fp8.
    from tierd_kernels.codecs import make_codec
    from tierd_kernels.codes_attention import attend_codes
    for name, params in (("kivi4", {"k_group": 8, "v_group": 16}), ("kivi2", {"v_group": 4}),
                         ("int8", {}), ("fp8", {})):
        codec, shape = make_codec(name, **params), (2, 2, 32, 80)
        g = torch.Generator().manual_seed(len(name))
        records = [codec.encode(torch.randn(1, *shape, generator=g)) for _ in range(3)]
        q = torch.randn(2, 6, 80, generator=g) * 4.5
        decoded = [codec.decode(r, (1, *shape), torch.float32)[0] for r in records]
        k = torch.cat([d[0] for d in decoded], dim=1)[:, :75]
        v = torch.cat([d[1] for d in decoded], dim=1)[:, :75]
        want = attention_reference(q, k, v, causal_offset=75)
        assert_attention_close(attend_codes(records, codec, shape, q, valid_tokens=11), want, 1e-5)
    print(_native._load().tk_vector_floats())
    """
)


def run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env=os.environ | env, timeout=300, check=False)  # fmt: skip


def test_built_once_per_machine_then_found(tmp_path):
    cmd = [sys.executable, "-m", "tierd_kernels.build"]
    env = os.environ | {"TIERD_KERNELS_CACHE": str(tmp_path)}
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    lib = Path(first.stdout.strip())
    assert lib.parent == tmp_path and lib.name.startswith("tierd_attention-")
    built = lib.stat().st_mtime_ns
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=True)
    assert Path(again.stdout.strip()) == lib and lib.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary left behind
    checked = run(CHECK, TIERD_KERNELS="cpp", TIERD_KERNELS_CACHE=str(tmp_path))
    assert checked.returncode == 0, checked.stderr[-3000:]
    assert lib.stat().st_mtime_ns == built


def test_without_a_compiler_the_torch_path_serves(tmp_path):
    """A failed build is logged once; attend_blocks answers from the torch path, and
    TIERD_KERNELS=cpp refuses instead."""
    env = {"TIERD_KERNELS_CACHE": str(tmp_path), "CXX": "false"}
    auto = run(CHECK.replace("print(_native._load().tk_vector_floats())",
                             "assert not _native.available()"), **env)  # fmt: skip
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert auto.stderr.count("fused CPU attention unavailable") == 1, auto.stderr
    strict = run(CHECK, TIERD_KERNELS="cpp", **env)
    assert strict.returncode != 0 and "TIERD_KERNELS=cpp" in strict.stderr


def _cpu_has(*flags: str) -> bool:
    text = Path("/proc/cpuinfo").read_text(errors="replace")
    have = set(text.split("flags", 1)[1].split("\n", 1)[0].split()) if "flags" in text else set()
    return all(f in have for f in flags)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 targets")
def test_portable_code_paths(tmp_path):
    """Builds for baseline x86-64 (the compiler's generic vector code, bit-exact float16
    conversion) and for AVX2 + F16C: 8-float vectors, as correct as the native build."""
    arches = ["x86-64"] + (["haswell"] if _cpu_has("avx2", "f16c", "fma") else [])
    procs = {}
    for arch in arches:
        cmd = [sys.executable, "-m", "tierd_kernels.build", "--arch", arch,
               "--out", str(tmp_path / f"{arch}.so")]  # fmt: skip
        procs[arch] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)  # fmt: skip
    for arch, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        checked = run(CHECK, TIERD_KERNELS="cpp",
                      TIERD_KERNELS_LIBRARY=str(tmp_path / f"{arch}.so"))  # fmt: skip
        assert checked.returncode == 0, checked.stderr[-3000:]
        assert checked.stdout.split()[-1] == "8"


def test_old_builds_are_pruned(tmp_path):
    """A source change leaves the previous library behind: the newest KEEP stay, and
    temporaries of builds killed long ago go."""
    now = time.time()
    for i in range(build.KEEP + 3):
        lib = tmp_path / f"{build.STEM}-{i:016x}-00000000.so"
        lib.write_bytes(b"")
        os.utime(lib, (now - 1000 + i, now - 1000 + i))
    old_tmp, new_tmp = tmp_path / f".{build.STEM}-a.so", tmp_path / f".{build.STEM}-b.so"
    for t, age in ((old_tmp, 7200), (new_tmp, 10)):
        t.write_bytes(b"")
        os.utime(t, (now - age, now - age))
    build._prune(tmp_path)
    kept = sorted(p.name for p in tmp_path.glob(f"{build.STEM}-*.so"))
    assert kept == [f"{build.STEM}-{i:016x}-00000000.so" for i in range(3, build.KEEP + 3)]
    assert not old_tmp.exists() and new_tmp.exists()
