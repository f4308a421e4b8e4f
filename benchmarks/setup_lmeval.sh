#!/usr/bin/env bash
# Creates a separate virtual environment with lm-evaluation-harness for benchmarks/lmeval_parity.py.
#
#   bash benchmarks/setup_lmeval.sh            # -> $HOME/.cache/medtune/lmeval-venv
#   LMEVAL_VENV=/some/dir bash benchmarks/setup_lmeval.sh
#
# Kept apart from medtune's own environment because lm_eval pins other versions of shared dependencies
# (it downgrades python-dateutil, for one). torch is installed first and pinned to medtune's version so that both
# sides compute with the same kernels. Where torch does not come from a local wheel store, set
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu to get the CPU build rather than the CUDA one.
# Idempotent: a venv that already imports the pinned versions is left as it is.
set -euo pipefail

VENV="${LMEVAL_VENV:-$HOME/.cache/medtune/lmeval-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
LMEVAL_VERSION="0.4.13"
PEFT_VERSION="0.21.2"

check() {
    "$VENV/bin/python" - <<EOF 2>/dev/null
import importlib.metadata as m
import torch, lm_eval, peft  # noqa: F401
assert m.version("lm_eval") == "$LMEVAL_VERSION", m.version("lm_eval")
assert m.version("peft") == "$PEFT_VERSION", m.version("peft")
assert torch.__version__.split("+")[0] == "$TORCH_VERSION", torch.__version__
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
    echo "lm-eval venv ready: $VENV"
    exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet)
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
else
    "${PIP[@]}" "torch==$TORCH_VERSION"
fi
"${PIP[@]}" "torch==$TORCH_VERSION" "lm_eval[hf]==$LMEVAL_VERSION" "peft==$PEFT_VERSION"

check || { echo "error: $VENV does not import torch $TORCH_VERSION, lm_eval $LMEVAL_VERSION, peft $PEFT_VERSION" >&2; exit 1; }
echo "lm-eval venv ready: $VENV"
