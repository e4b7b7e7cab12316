#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare the built-in data, run a short Nested-ReFT training of the
# embedded SmolLM2-135M-Instruct (recipes/quickstart.yaml, CPU is fine), evaluate it, and say where it all is.
# Safe to re-run: the install is skipped when nothing changed, and the run directory is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
cli=.venv/bin/nested-reft

"$cli" prepare-data arithmetic --split train --limit 2000 --seed 0 --difficulty 1 --out data/arithmetic-train.jsonl
"$cli" prepare-data arithmetic --split test --limit 200 --seed 0 --difficulty 1 --out data/arithmetic-test.jsonl
"$cli" train recipes/quickstart.yaml --overwrite "$@"
"$cli" evaluate recipes/quickstart.yaml --model runs/quickstart
echo
echo "Run directory: runs/quickstart   (recipe.yaml, metrics.jsonl, checkpoints/, rollouts/, reports/)"
echo "Evaluation report: runs/quickstart/reports/evaluate.json"
