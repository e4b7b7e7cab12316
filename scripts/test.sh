#!/usr/bin/env bash
# The test suite on a fresh machine: install (skipped when nothing changed), then every test, the end-to-end
# tests on the embedded SmolLM2-135M-Instruct included. Extra arguments go to pytest (e.g. -m "not e2e").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
