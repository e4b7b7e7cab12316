"""benchmarks/gpu_check.sh --smoke: the GPU check's code, on CPU at toy sizes, so that it cannot rot unseen; its
`update` and `train` sections run the shipped update, trainer and resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out)],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] is True
    sections = ("environment", "throughput", "graphs", "nested", "roofline", "profile", "update", "train", "compiled")
    failed = {name: report[name] for name in sections if "error" in report[name] or "skipped" in report[name]}
    assert not failed
    speeds = report["throughput"]["tokens_per_s"]
    assert set(speeds) == {"model.generate", "ours dynamic", "ours static eager", "ours static auto"}
    assert all(math.isfinite(v) and v > 0 for v in speeds.values())
    for ratio in ("0.25", "0.4"):
        nested = report["nested"][ratio]
        assert nested["skipped"] and nested["ideal"] > 1 and nested["efficiency"] > 0
    assert report["roofline"]["weight_bytes"] > 0 and report["roofline"]["hbm_fraction"] > 0
    assert report["profile"]["eager"]["top_cpu_ops"], "the profile of a decode step must list operators"
    update = report["update"]  # the shipped recipe's precision: bf16 compute and LM head, float32 masters
    assert update["master_weights"] and update["lm_head_dtype"] == "torch.bfloat16"
    assert "float32 master weights" in update["precision"] and update["trained_sequences"] > 0
    assert update["step_seconds"] > 0 and update["peak_memory_mb"] > 0
    train = report["train"]
    for name in ("dynamic", "static"):
        assert [r["step"] for r in train[name]["rows"]] == [1, 2, 3]
        assert any(r["trained_sequences"] > 0 for r in train[name]["rows"])  # the parity reward gives signal
    # The static cache samples what the dynamic one does (bit for bit on CPU), so the rewards agree.
    assert [r["reward_mean"] for r in train["static"]["rows"]] == [r["reward_mean"] for r in train["dynamic"]["rows"]]
    assert [r["step"] for r in train["resumed"]["rows"]] == [4] and train["resumed"]["logged_steps"] == [1, 2, 3, 4]
    assert train["resumed"]["continued"]
    assert report["compiled"]["tokens_per_s"]["graphs + compile"] > 0
    assert "== summary ==" in result.stdout
