#!/usr/bin/env bash
# Run the test suite on a fresh machine: venv, Redis (Debian package), the vLLM
# environment (tools/vllm_env.sh, cached), then pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" test

if ! command -v redis-server >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing redis-server (Debian package) for the benchmark tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) \
      >/dev/null || echo "redis-server could not be installed; its tests will be skipped"
  else
    echo "redis-server is missing and this is not root; its tests will be skipped"
  fi
fi

# The vLLM tests (marker vllm) run in their own venv; minutes the first time, then cached.
bash "$TIERD_ROOT/tools/vllm_env.sh" \
  || echo "the vLLM environment could not be prepared; the vllm tests will be skipped"

cd "$TIERD_ROOT"
"$VENV/bin/python" tools/gen_protos.py --check
exec "$VENV/bin/python" -m pytest -q "$@"
