"""`bench` on a tiny model: report keys, fair fixed-length work, and the plot."""

import json
import statistics

import pytest
from typer.testing import CliRunner

from nested_reft.cli.main import app

from .tiny import write_examples, write_tiny_model


@pytest.mark.parametrize("what", ["rollout", "train"])
def test_bench_report_and_plot(tmp_path, what):
    model = write_tiny_model(tmp_path / "model", num_layers=6)
    data = write_examples(tmp_path / "train.jsonl", 8)
    report, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    result = CliRunner().invoke(app, [
        "bench", "--skip-ratios", "0.2,0.5", "--repeats", "2", "--what", what, "--report", str(report),
        "--plot", str(plot), "--set", f"model.name_or_path={model}", "--set", f"data.train={data}",
        "--set", "data.chat_template=false", "--set", "data.system_prompt=null", "--set", "model.device=cpu",
        "--set", "rollout.max_completion_length=6", "--set", "train.prompts_per_step=2",
    ])
    assert result.exit_code == 0, result.output
    out = json.loads(report.read_text())
    assert {"model", "device", "num_layers", "results", "comparisons"} <= set(out)
    assert out["num_layers"] == 6
    assert [(r["mode"], r["skip_ratio"]) for r in out["results"]] == [("baseline", 0.0), ("nested", 0.2), ("nested", 0.5)]
    assert [len(r["skipped_layers"]) for r in out["results"]] == [0, 1, 3]
    for r in out["results"]:
        assert {"mode", "skip_ratio", "skipped_layers", "tokens_per_sec"} <= set(r) and r["tokens_per_sec"] > 0
        assert len(r["tokens_per_sec_repeats"]) == 2
    for c in out["comparisons"]:
        assert {"skip_ratio", "speedup", "ideal_speedup", "efficiency"} <= set(c)
        assert c["efficiency"] == pytest.approx(c["speedup"] / c["ideal_speedup"])
    assert out["comparisons"][1]["ideal_speedup"] == pytest.approx(6 / 3)
    base = out["results"][0]["tokens_per_sec_repeats"]
    for c, r in zip(out["comparisons"], out["results"][1:]):  # speedup: the median of paired per-repeat ratios
        assert c["speedup"] == pytest.approx(statistics.median(n / b for n, b in zip(r["tokens_per_sec_repeats"], base)))
    if what == "train":
        assert all(r["step_seconds"] >= r["generate_seconds"] for r in out["results"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


