#!/usr/bin/env bash
# The checks that need a GPU, in one run that fits 10 minutes on one GPU. Figures go under $OUT.
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh          # on a CUDA or ROCm machine, from the repository root
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh --tiny   # on a CPU: the same steps at toy sizes (the test)
#
# Steps (each under its own time limit; a failing step is recorded and the next one still runs):
#   1 tests     `make test` (--tiny: the hardware tests only; the suite is already what runs this script)
#   2 train     benchmarks/gpu_train.py: the seed's job (Qwen3-1.7B shape) vs medtune, $SEQUENCES sequences x 2 epochs
#   3 eval      MedQA letter scoring, medtune vs lm-eval on the same device (benchmarks/lmeval_parity.py), when the
#               lm-eval venv exists (benchmarks/setup_lmeval.sh, needs the network); otherwise medtune alone, timed
#   4 qlora     `medtune train` with lora.quantize=4bit: one NF4 step, adapter saved
# Writes $OUT/gpu_check.json (per step: exit code, seconds, log, figures file) and each step's own output.
# Exit code: 0 when every step that ran passed. Environment: PY (python), MODEL (base model for steps 3-4, default
# embedded), DATA (the shared data directory), SEQUENCES (step 2, default 600: ~2 min on an H100-class GPU, estimated).
set -uo pipefail

TINY=0
[ "${1:-}" = "--tiny" ] && TINY=1
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-runs/gpu-check}"
PY="${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 )}"
MODEL="${MODEL:-embedded}"
DATA="${DATA:-$ROOT/../shared/data}"
SEQUENCES="${SEQUENCES:-600}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
STEPS="$OUT/steps.jsonl"
: > "$STEPS"
FAILED=0

step() {  # step NAME LIMIT_S FIGURES_FILE CMD...
    local name=$1 limit=$2 figures=$3
    shift 3
    local start=$SECONDS rc
    echo "== $name: $*" >&2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    [ "$rc" -ne 0 ] && FAILED=1 && tail -20 "$OUT/$name.log" >&2
    printf '{"step": "%s", "rc": %d, "seconds": %d, "log": "%s", "figures": "%s"}\n' \
        "$name" "$rc" "$((SECONDS - start))" "$name.log" "$figures" >> "$STEPS"
}

# 1 tests
if [ "$TINY" = 1 ]; then
    step tests 300 "" "$PY" -m pytest -q -x tests/test_hardware.py -k "this_machine or bnb_probe"
else
    step tests 330 "" make test
fi

# 2 training throughput
if [ "$TINY" = 1 ]; then
    step train 300 gpu_train.json "$PY" benchmarks/gpu_train.py --tiny --device cpu --json "$OUT/gpu_train.json"
else
    step train 150 gpu_train.json "$PY" benchmarks/gpu_train.py --sequences "$SEQUENCES" --json "$OUT/gpu_train.json"
fi

# 3 MedQA eval speed
LIMIT=$([ "$TINY" = 1 ] && echo 8 || echo 0)
LMEVAL_PY="${LMEVAL_VENV:-$HOME/.cache/medtune/lmeval-venv}/bin/python"
if [ "$TINY" = 0 ] && [ -x "$LMEVAL_PY" ]; then
    step eval 150 parity-medqa/parity.json "$PY" benchmarks/lmeval_parity.py --data "$DATA/medqa/test.jsonl" \
        --benchmark medqa --model "$MODEL" --lmeval-device cuda:0 --out "$OUT/parity-medqa"
else  # no lm-eval here (or --tiny): medtune's own timed run, its results.json has the wall time
    step eval 150 eval-medqa/results.json "$PY" -m medtune eval --model "$MODEL" --data "$DATA/medqa/test.jsonl" \
        $([ "$LIMIT" -gt 0 ] && echo --limit "$LIMIT") --out "$OUT/eval-medqa" --quiet --json
fi

# 4 one QLoRA step
step qlora 120 qlora/metrics.jsonl "$PY" -m medtune train --out "$OUT/qlora" --quiet --set "model=$MODEL" \
    --set lora.quantize=4bit --set train.max_steps=1 --set train.batch_size=2 --set train.max_length=128 \
    --set train.target=answer --set train.warmup=0

"$PY" - "$OUT" <<'EOF'
import json, platform, sys
from pathlib import Path

out = Path(sys.argv[1])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
summary = {"host": platform.node(), "steps": steps, "passed": all(s["rc"] == 0 for s in steps)}
try:
    from medtune.hardware import decide, detect

    info = detect()
    summary["device"] = {"kind": info.kind, "names": info.names, "qlora": decide(info).qlora_available}
except Exception as e:  # noqa: BLE001 -- the summary is written whatever went wrong above
    summary["device"] = {"error": str(e)}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
EOF
exit $FAILED
