#!/usr/bin/env bash
# Run the test suite on a fresh machine: venv, Redis and libibverbs (Debian packages), the vLLM
# environment (tools/vllm_env.sh, cached), then pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" test

# Debian packages the shared-tier tests need: redis-server, and libibverbs1 (Mooncake's
# transfer engine links it even over TCP).
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 ' || need+=(libibverbs1)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing ${need[*]} (Debian packages) for the shared-tier tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") \
      >/dev/null || echo "${need[*]} could not be installed; their tests will be skipped"
  else
    echo "${need[*]} missing and this is not root; their tests will be skipped"
  fi
fi

# The vLLM tests (marker vllm) run in their own venv; minutes the first time, then cached.
bash "$TIERD_ROOT/tools/vllm_env.sh" \
  || echo "the vLLM environment could not be prepared; the vllm tests will be skipped"

cd "$TIERD_ROOT"
"$VENV/bin/python" tools/gen_protos.py --check
exec "$VENV/bin/python" -m pytest -q "$@"
