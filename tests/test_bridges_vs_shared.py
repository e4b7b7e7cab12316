"""benchmarks/bridges_vs_shared.py on the embedded model at toy sizes, so that the README's table stays reproducible:
one step of each route must lower the skipped view's held-out KL, and only the shared route may move the policy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def test_one_step_of_each_route_lowers_the_kl_and_only_the_shared_one_moves_the_policy(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bridges_vs_shared.py"), "--steps", "1", "--every", "1",
         "--completions", "2", "--heldout", "2", "--max-new-tokens", "12", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    routes = json.loads(out.read_text())["routes"]
    for name in ("bridges", "shared"):
        before, after = routes[name]
        assert (before["step"], after["step"]) == (0, 1)
        assert before["drift"] == 0.0 and after["kl_mu_pi"] < before["kl_mu_pi"], name
    assert routes["bridges"][1]["drift"] == 0.0  # the policy never runs a bridge: bit for bit where it was
    assert routes["shared"][1]["drift"] > 0.0
    assert routes["bridges"][0]["kl_mu_pi"] == routes["shared"][0]["kl_mu_pi"]  # the same start
