#!/usr/bin/env bash
# The reviewer figures of docs/benchmarks.md: the shortcut audit and conformal sets of the embedded model on MedQA.
#   bash benchmarks/reviewer_figures.sh [N] [OUT]      (default: the first 300 questions of each file, runs/figures)
# Conformal sets are calibrated on MedQA dev (never test) and evaluated on MedQA test; the audit runs on MedQA test.
# Writes OUT/medqa-dev, OUT/medqa-test (evals), OUT/audit-medqa-test, OUT/conformal-{lac,aps}.json and prints each.
set -euo pipefail
N=${1:-300}
OUT=${2:-runs/figures}
DATA=${MEDTUNE_DATA:-../shared/data}/medqa
MT=${MEDTUNE:-.venv/bin/medtune}
mkdir -p "$OUT"
for split in dev test; do
  "$MT" eval --model embedded --data "$DATA/$split.jsonl" --limit "$N" --out "$OUT/medqa-$split" --overwrite --quiet
done
for method in lac aps; do
  "$MT" conformal "$OUT/medqa-dev" "$OUT/medqa-test" --method "$method" --json > "$OUT/conformal-$method.json"
  "$MT" conformal "$OUT/medqa-dev" "$OUT/medqa-test" --method "$method"
done
"$MT" audit --model embedded --data "$DATA/test.jsonl" --limit "$N" --out "$OUT/audit-medqa-test" --overwrite --quiet
