#!/usr/bin/env bash
# One-shot GPU check: rollout throughput against model.generate, nested (layer-skipped) efficiency, decode's
# fraction of the HBM roofline, a decode-step profile, and a training step's time and peak memory, on a randomly
# initialised model with Qwen2.5-1.5B's configuration in bf16. No network. Under 8 minutes on one H100/H200.
#
#   bash benchmarks/gpu_check.sh [--out gpu_check.json] [--peak-bandwidth-tbs 4.8] [--repeats 2]
#   bash benchmarks/gpu_check.sh --smoke      # the same code on CPU at toy sizes, in seconds (CI runs this)
#
# Python: $PYTHON if set, else the repository's .venv, else python3 (the interpreter that holds PyTorch).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
else
    python=python3
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$python" benchmarks/gpu_check.py "$@"
