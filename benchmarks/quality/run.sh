#!/usr/bin/env bash
# The end-to-end tables of docs/quality.md (hours on 2 CPU cores: generation is ~90 tokens/s).
#   [SEEDS="0 1"] bash benchmarks/quality/run.sh [N_CAPTIONS] [WORK_DIR]
# Every row trains on pairs from the same first N captions of CapRetrieval (default 512),
# once per seed in SEEDS (default 0), and is scored on all 3,024 captions with the dev
# queries; results go to WORK/results.jsonl (benchmarks/quality/table.py renders them).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-512}
W=${2:-/tmp/capgen-quality}
SEEDS=${SEEDS:-0}
CAPTIONS=tests/fixtures/capretrieval_captions.jsonl
# The labelled dev queries are kept outside the repository (docs/quality.md).
LABELS=${CAPGEN_DATA:-../shared/data/capretrieval}/dev_queries.jsonl
[ -f "$LABELS" ] || { echo "no labelled queries at $LABELS: set CAPGEN_DATA to the folder holding dev_queries.jsonl" >&2; exit 2; }
PY=.venv/bin/python
mkdir -p "$W"
head -n "$N" "$CAPTIONS" > "$W/captions$N.jsonl"
E=(--corpus "$CAPTIONS" --labels "$LABELS" --results "$W/results.jsonl")

$PY -m gen.eval zeroshot "${E[@]}" --name zero-shot
# Baseline 1: jieba nouns and verbs of the same captions.
$PY -m gen.eval jieba --corpus "$W/captions$N.jsonl" --out "$W/jieba.parquet"
# Baseline 2: the same local model with a plain one-line prompt.
$PY benchmarks/quality/plain_prompt.py --captions "$W/captions$N.jsonl" --out "$W/plain.jsonl"
# capgen: generation (resumes from WORK/capgen's store), then the same queries raw and curated.
$PY -m gen.run --captions "$W/captions$N.jsonl" --out "$W/capgen" --no-progress
for S in $SEEDS; do
  F=(finetune "${E[@]}" --seed "$S")
  $PY -m gen.eval "${F[@]}" --name "jieba-$N-s$S" --pairs "$W/jieba.parquet"
  $PY -m gen.eval "${F[@]}" --name "plain-$N-s$S" --pairs "$W/plain.jsonl"
  $PY -m gen.eval "${F[@]}" --name "capgen-raw-$N-s$S" --pairs "$W/capgen"
  $PY -m gen.eval "${F[@]}" --name "capgen-$N-s$S" --pairs "$W/capgen/shards/latest"
done
