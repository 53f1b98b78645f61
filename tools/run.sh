#!/usr/bin/env bash
# Run the daemon on its embedded defaults (any `tierd serve` flag may follow).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" run
exec "$VENV/bin/tierd" serve "$@"
