#!/usr/bin/env bash
# The main job on a fresh machine: install, prepare the built-in data, run a short Nested-ReFT training of the
# embedded SmolLM2-135M-Instruct (recipes/quickstart.yaml, CPU is fine), then evaluate the trained model and the
# starting model on the same held-out problems, side by side, and say where it all is.
# Safe to re-run: the install is skipped when nothing changed, and the run directory is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
cli=.venv/bin/nested-reft

"$cli" prepare-data arithmetic --split train --limit 2000 --seed 0 --difficulty 1 --out data/arithmetic-train.jsonl
"$cli" prepare-data arithmetic --split test --limit 200 --seed 0 --difficulty 1 --out data/arithmetic-test.jsonl
"$cli" train recipes/quickstart.yaml --overwrite "$@"
"$cli" evaluate recipes/quickstart.yaml --model runs/quickstart --compare smollm2-135m-instruct
echo
echo "Run directory: runs/quickstart   (recipe.yaml, metrics.jsonl, checkpoints/, rollouts/, reports/)"
echo "Evaluation reports: runs/quickstart/reports/evaluate.json (trained), evaluate.compare.json (starting model)"
echo "Curves: $cli plot runs/quickstart --out runs/quickstart/curves.png"
