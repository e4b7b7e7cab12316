#!/usr/bin/env bash
# One-shot GPU check on a randomly initialised model with Qwen2.5-1.5B's configuration, with no network: rollout
# throughput against model.generate, nested (layer-skipped) efficiency, decode's fraction of the HBM roofline and a
# decode-step profile (pure bf16); then the shipped GPU recipe (float32 masters, bf16 compute): one step of the real
# update (`optimise` with `MasterWeights`), and a short real `train` (3 steps with the dynamic cache, 3 with the
# static cache and CUDA graphs, then a resume), with step times, peak memory and rewards. Meant to fit 8 minutes on
# one H100/H200; the train runs need ~40 GB free under $TMPDIR (float32 checkpoints with their optimiser states).
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
