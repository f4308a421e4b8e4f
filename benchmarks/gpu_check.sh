#!/usr/bin/env bash
# The checks that need a GPU, in one run that fits 10 minutes on one GPU. Figures go under $OUT.
#
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh          # on a CUDA or ROCm machine, from the repository root
#   OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh --tiny   # on a CPU: the same steps at toy sizes (the test)
#
# Steps (each under its own time limit; a failing step is recorded and the next one still runs):
#   1 tests     the device-dependent tests (device policy, scoring, hardware); the whole suite runs in CI
#   2 train     benchmarks/gpu_train.py: the seed's job (Qwen3-1.7B shape) vs medtune, $SEQUENCES sequences x 2 epochs
#   3 eval      MedQA letter scoring, medtune vs lm-eval on the same device (benchmarks/lmeval_parity.py), when the
#               lm-eval venv exists (benchmarks/setup_lmeval.sh, needs the network); otherwise medtune alone, timed
#   4 qlora     `medtune train` with lora.quantize=4bit: one NF4 step, adapter saved
#   5 verbs     benchmarks/gpu_verbs.py: eval, ask, predict, serve (gradio_client), train, run, export --gguf on the
#               device; each verb's recorded placement must name only the device; peak device memory per verb and
#               training's peak beside the doctor's estimate
#   6 memory    benchmarks/memory_fit.py on the device: the random Qwen3-1.7B-shaped bf16 model, eval vs lm-eval (when
#               its venv exists) and run vs train, peak RSS and peak GPU memory
#   7 parity    `medtune compare --parity`: the same 200 MedQA questions scored on the device (default mode) and on the
#               CPU (exact, fp32): the cross-device certificate, OUT/parity/certificate.json
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
DEVICE=$([ "$TINY" = 1 ] && echo cpu || echo cuda)
if [ "$TINY" = 1 ]; then
    step tests 300 "" "$PY" -m pytest -q -x tests/test_hardware.py -k "this_machine or bnb_probe"
else
    step tests 150 "" "$PY" -m pytest -q -x -m "not slow" tests/test_device.py tests/test_hardware.py \
        tests/test_scoring.py
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
step qlora 90 qlora/metrics.jsonl "$PY" -m medtune train --out "$OUT/qlora" --quiet --set "model=$MODEL" \
    --set lora.quantize=4bit --set train.max_steps=1 --set train.batch_size=2 --set train.max_length=128 \
    --set train.target=answer --set train.warmup=0

# 5 every verb on the device
VERBS_TINY=$([ "$TINY" = 1 ] && echo --tiny)
step verbs 180 verbs/gpu_verbs.json "$PY" benchmarks/gpu_verbs.py --device "$DEVICE" --model "$MODEL" \
    --data "$DATA/medqa/test.jsonl" --out "$OUT/verbs" $VERBS_TINY

# 6 memory that fits the card (lm-eval side only where its venv exists: the GPU machine may have no network)
LMEVAL_ARG=$([ "$TINY" = 0 ] && [ -x "$LMEVAL_PY" ] && echo --lmeval-python "$LMEVAL_PY" || echo --skip-lmeval)
MEM_TINY=$([ "$TINY" = 1 ] && echo --tiny --limit 4)
step memory 150 memory/memory_fit.json "$PY" benchmarks/memory_fit.py --device "$DEVICE" --out "$OUT/memory" \
    --data "$DATA/medqa/test.jsonl" $LMEVAL_ARG $MEM_TINY

# 7 cross-device parity certificate: the device's default mode against the CPU's exact fp32
PARITY_N=$([ "$TINY" = 1 ] && echo 8 || echo 200)
PARITY_MODE=$([ "$TINY" = 1 ] && echo exact || echo fast)  # --tiny: CPU against CPU, the plumbing only
mkdir -p "$OUT/parity"
step parity 120 parity/certificate.json bash -c "
  '$PY' -m medtune eval --model '$MODEL' --data '$DATA/medqa/test.jsonl' --limit $PARITY_N --device $DEVICE \
      --mode $PARITY_MODE --out '$OUT/parity/device' --quiet --overwrite --json > /dev/null &&
  '$PY' -m medtune eval --model '$MODEL' --data '$DATA/medqa/test.jsonl' --limit $PARITY_N --device cpu \
      --mode exact --out '$OUT/parity/cpu' --quiet --overwrite --json > /dev/null &&
  '$PY' -m medtune compare '$OUT/parity/device' '$OUT/parity/cpu' --parity --json > '$OUT/parity/certificate.json'"

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
