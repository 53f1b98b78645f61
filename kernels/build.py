"""Build the fused CPU attention kernel (kernels/csrc) for this machine, and find it again.

    python -m tierd_kernels.build [--force]    # tools/env.sh runs it after installing

Primitives: `find() -> Path | None` (a library built for these sources, this compiler and
this CPU), `build(force=False) -> Path` (find, or compile one: a few seconds),
`BuildError`.

Route: plain C++17 with `extern "C"` entry points, every .cpp of csrc/ (attention.cpp over
raw blocks, codes.cpp over encoded records) compiled by the machine's C++ compiler
(`$CXX`, else g++, c++, clang++) into one shared library that ctypes loads. It needs no
torch headers (the compile takes seconds, not the minutes of a torch extension) and no
Python headers, and ctypes releases the GIL for the whole call. `-march=native` is used,
so the library is per machine: its file name carries a hash of the sources, the flags,
the CPU's feature flags and the compiler's identity, and a library built elsewhere or
for older sources is never loaded.

Where it lives: `$TIERD_KERNELS_CACHE` when set; else under the virtual environment
(`<venv>/lib/tierd-kernels`, written at install time) and the user's cache
(`$XDG_CACHE_HOME/tierd-kernels`, for lazy builds where the venv is read-only, as under
the systemd unit). Writes go to a temporary name and are renamed into place, so
processes building at once never load a half-written file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
STEM = "tierd_attention"
FLAGS = (
    "-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fvisibility=hidden",
    "-fno-math-errno", "-ffp-contract=fast",
)  # fmt: skip
NATIVE = "-march=native"
COMPILE_TIMEOUT_S = 300
KEEP = 8


class BuildError(RuntimeError):
    """No library could be found or built (the message says why)."""


def compiler() -> str | None:
    """The C++ compiler to use: $CXX, else the first of g++, c++, clang++ on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or cxx
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _cpu_flags() -> str:
    """The CPU's feature list (x86 `flags`, Arm `Features`), so -march=native builds of
    one machine are never loaded on another."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _source_key() -> str:
    h = hashlib.sha256()
    for path in sorted(CSRC.iterdir()):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(" ".join((*FLAGS, NATIVE)).encode() + b"\0")
    h.update(f"{platform.machine()}\0{_cpu_flags()}".encode())
    return h.hexdigest()[:16]


def _compiler_key(cxx: str) -> str:
    try:
        run = subprocess.run(
            [cxx, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        ident = run.stdout.splitlines()[0] if run.stdout else run.stderr
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"the C++ compiler {cxx} does not run: {e}") from None
    return hashlib.sha256(f"{os.path.realpath(cxx)}\0{ident}".encode()).hexdigest()[:8]


def cache_dirs() -> list[Path]:
    """Where libraries are looked for, in order; builds go to the first writable one."""
    explicit = os.environ.get("TIERD_KERNELS_CACHE")
    if explicit:
        return [Path(explicit)]
    dirs = []
    if sys.prefix != sys.base_prefix:  # a virtual environment
        dirs.append(Path(sys.prefix) / "lib" / "tierd-kernels")
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    dirs.append(Path(xdg) / "tierd-kernels")
    return dirs


def find() -> Path | None:
    """A library built from these sources for this CPU, by this machine's compiler when
    there is one (by any compiler when there is none: a library built at install time
    still loads on a host without a compiler)."""
    src = _source_key()
    cxx = compiler()
    pattern = f"{STEM}-{src}-{_compiler_key(cxx) if cxx else '*'}.so"
    for d in cache_dirs():
        for path in sorted(d.glob(pattern)):
            return path
    return None


def build(force: bool = False) -> Path:
    """The library for this machine, compiled first when none is cached (or `force`)."""
    if not force:
        found = find()
        if found is not None:
            return found
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX, or install g++)")
    name = f"{STEM}-{_source_key()}-{_compiler_key(cxx)}.so"
    errors = []
    for d in cache_dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{STEM}-", suffix=".so", dir=d)
            os.close(fd)
        except OSError as e:
            errors.append(f"{d}: {e}")
            continue
        try:
            _compile(cxx, Path(tmp))
            os.chmod(tmp, 0o755)
            os.replace(tmp, d / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        _prune(d)
        return d / name
    raise BuildError("no writable cache directory: " + "; ".join(errors))


def _prune(d: Path) -> None:
    """Drop all but the KEEP newest libraries of a directory (each source change leaves one
    behind; a few are kept for other checkouts sharing a user cache), and temporaries of
    builds killed over an hour ago. A process that has one loaded keeps its mapping."""

    def age(path: Path) -> float:
        try:
            return time.time() - path.stat().st_mtime
        except OSError:  # removed meanwhile by another process's prune
            return math.inf

    libs = sorted(d.glob(f"{STEM}-*.so"), key=age)
    stale = libs[KEEP:] + [t for t in d.glob(f".{STEM}-*.so") if age(t) > 3600]
    for path in stale:
        with contextlib.suppress(OSError):
            path.unlink()


def sources() -> list[Path]:
    """The translation units of the one library (every .cpp of csrc/)."""
    return sorted(CSRC.glob("*.cpp"))


def _compile(cxx: str, out: Path, arches: tuple[str, ...] = (NATIVE, "")) -> None:
    # Without -march=native when the compiler refuses it (some targets spell it -mcpu):
    # the kernel then uses the portable vector code.
    last = ""
    for arch in arches:
        flags = [arch] if arch else []
        cmd = [cxx, *FLAGS, *flags, "-o", str(out), *map(str, sources())]
        try:
            run = subprocess.run(
                cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S, check=False
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise BuildError(f"{' '.join(cmd)}: {e}") from None
        if run.returncode == 0:
            return
        last = run.stderr.strip()[-2000:]
    raise BuildError(f"{cxx} failed to compile {', '.join(p.name for p in sources())}:\n{last}")


def build_for(arch: str, out: Path) -> Path:
    """Compile for another target (`-march=x86-64`: the portable vector code) into `out`,
    uncached: for testing the code paths this machine's native build does not take."""
    cxx = compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (set CXX, or install g++)")
    _compile(cxx, out, (arch,))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tierd_kernels.build", description=__doc__)
    ap.add_argument("--force", action="store_true", help="compile even when one is cached")
    ap.add_argument("--arch", help="compile for this -march into --out instead (uncached)")
    ap.add_argument("--out", type=Path, help="where --arch puts the library")
    args = ap.parse_args(argv)
    if bool(args.arch) != bool(args.out):
        ap.error("--arch and --out go together")
    try:
        path = build_for(f"-march={args.arch}", args.out) if args.arch else build(args.force)
    except BuildError as e:
        print(f"tierd_kernels: fused CPU attention not built ({e}); the torch path is used",
              file=sys.stderr)  # fmt: skip
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
