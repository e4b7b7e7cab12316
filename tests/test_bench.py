"""`bench` on a tiny model: report keys, fair fixed-length work, and the plot."""

import json
import os
import statistics
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nested_reft.cli.main import app

from .tiny import write_examples, write_tiny_model


COLUMNS = ["mode", "ratio", "k", "tok/s", "prefill s", "decode s", "peak MB", "speedup", "ideal", "effic.",
           "FLOP ideal", "FLOP effic."]
TRAIN_COLUMNS = ["step s", "gen s", "score s", "train s", "step x"]


def assert_table_in_full(output, report, what):
    """Every header and every value of the table is in the output whole: nothing cut to `m…`."""
    assert "…" not in output
    for header in COLUMNS + (TRAIN_COLUMNS if what == "train" else []):
        assert header in output, header
    by_ratio = {c["skip_ratio"]: c for c in report["comparisons"]}
    for r in report["results"]:
        values = [r["mode"], f"{r['skip_ratio']:.2f}", f"{r['tokens_per_sec']:.1f}", f"{r['prefill_seconds']:.2f}",
                  f"{r['decode_seconds']:.2f}", f"{r['peak_memory_mb']:.0f}"]
        if r["mode"] == "nested":
            c = by_ratio[r["skip_ratio"]]
            values += [f"{c[k]:.3f}" for k in ("speedup", "ideal_speedup", "efficiency", "flop_ideal_speedup",
                                               "flop_efficiency")]
            values += [f"{c['step_speedup']:.3f}"] if what == "train" else []
        if what == "train":
            values += [f"{r[k]:.2f}" for k in ("step_seconds", "generate_seconds", "score_seconds", "train_seconds")]
        for value in values:
            assert value in output, (value, output)


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
        # Same tokens in every mode: the FLOP ideal is the decode FLOPs' ratio, below L / (L - k) by the head's share
        nested = next(r for r in out["results"] if r["skip_ratio"] == c["skip_ratio"])
        assert c["flop_ideal_speedup"] == pytest.approx(out["results"][0]["decode_flops"] / nested["decode_flops"])
        assert 1 < c["flop_ideal_speedup"] < c["ideal_speedup"]
        assert c["flop_efficiency"] == pytest.approx(c["speedup"] / c["flop_ideal_speedup"])
    assert out["comparisons"][1]["ideal_speedup"] == pytest.approx(6 / 3)
    base = out["results"][0]["tokens_per_sec_repeats"]
    for c, r in zip(out["comparisons"], out["results"][1:]):  # speedup: the median of paired per-repeat ratios
        assert c["speedup"] == pytest.approx(statistics.median(n / b for n, b in zip(r["tokens_per_sec_repeats"], base)))
    if what == "train":
        assert all(r["step_seconds"] >= r["generate_seconds"] for r in out["results"])
    parts = ["prefill", "decode"] + (["train"] if what == "train" else [])
    assert out["settings"]["matmul_peak_gflops"] > 0 and out["settings"]["peak_dtype"] == "float32"
    for r in out["results"]:  # the step split: each part's rate and its model FLOPs over the probed peak
        assert all(r[f"{p}_tokens_per_sec"] > 0 and r[f"{p}_peak_fraction"] > 0 for p in parts), r
    generated = out["settings"]["sequences"] * out["settings"]["completion_length"]  # fixed-length work
    assert out["results"][0]["decode_tokens_per_sec"] == pytest.approx(generated / out["results"][0]["decode_seconds"],
                                                                       rel=0.5)  # medians of per-repeat figures
    assert "step split: peak" in result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_table_in_full(result.output, out, what)  # CliRunner's output is not a terminal: like a log file


@pytest.mark.parametrize("columns", ["40", "80"])
def test_bench_table_in_a_narrow_terminal_is_split_not_truncated(tmp_path, columns):
    model = write_tiny_model(tmp_path / "model", num_layers=6)
    data = write_examples(tmp_path / "train.jsonl", 4)
    report = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "--skip-ratios", "0.5", "--repeats", "1", "--what", "train", "--report", str(report),
        "--set", f"model.name_or_path={model}", "--set", f"data.train={data}", "--set", "data.chat_template=false",
        "--set", "data.system_prompt=null", "--set", "model.device=cpu", "--set", "rollout.max_completion_length=3",
        "--set", "train.prompts_per_step=1", "--set", "rollout.num_generations=2",
    ], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    table_lines = [line for line in result.output.splitlines() if not line.startswith("report: ")]
    assert max(map(len, table_lines)) <= int(columns)
    assert "(continued, 2/" in result.output
    assert_table_in_full(result.output, json.loads(report.read_text()), "train")


def test_bench_output_redirected_to_a_file(tmp_path):
    """The real command, stdout redirected to a file as in a batch job: rich would lay it out 80 columns wide."""
    model = write_tiny_model(tmp_path / "model", num_layers=6)
    data = write_examples(tmp_path / "train.jsonl", 4)
    report, log = tmp_path / "bench.json", tmp_path / "bench.log"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "nested_reft.cli.main", "bench", "--skip-ratios", "0.5",
                               "--repeats", "1", "--what", "train", "--report", str(report),
                               "--set", f"model.name_or_path={model}", "--set", f"data.train={data}",
                               "--set", "data.chat_template=false", "--set", "data.system_prompt=null",
                               "--set", "model.device=cpu", "--set", "rollout.max_completion_length=3",
                               "--set", "train.prompts_per_step=1", "--set", "rollout.num_generations=2"],
                              stdout=f, stderr=subprocess.PIPE, text=True, env=env)
    assert done.returncode == 0, done.stderr
    output = log.read_text()
    assert "(continued" not in output  # one table: a log is laid out wide
    assert_table_in_full(output, json.loads(report.read_text()), "train")




def test_bench_train_reports_precision_and_memory_with_and_without_checkpointing(tmp_path):
    """`--gradient-checkpointing both` runs every mode both ways; the report says the precision, how peak memory
    was measured, and compares the baseline's peaks (a tiny model's activations are too small for RSS to order
    them, so only the shape is checked here; see the README for SmolLM2's figures)."""
    model = write_tiny_model(tmp_path / "model", num_layers=4)
    data = write_examples(tmp_path / "train.jsonl", 8)
    report = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "--skip-ratios", "0.25", "--repeats", "1", "--what", "train", "--gradient-checkpointing", "both",
        "--report", str(report), "--set", f"model.name_or_path={model}", "--set", f"data.train={data}",
        "--set", "data.chat_template=false", "--set", "data.system_prompt=null", "--set", "model.device=cpu",
        "--set", "model.mixed_precision=bf16", "--set", "rollout.max_completion_length=4",
        "--set", "train.prompts_per_step=2",
    ])
    assert result.exit_code == 0, result.output
    assert "precision: bf16 compute (bf16 LM head), float32 master weights" in result.output
    out = json.loads(report.read_text())
    assert out["settings"]["mixed_precision"] == "bf16" and "VmHWM" in out["settings"]["peak_memory"]
    assert [(r["mode"], r["gradient_checkpointing"]) for r in out["results"]] == [
        ("baseline", False), ("nested", False), ("baseline", True), ("nested", True)]
    assert all(r["train_peak_memory_mb"] > 0 and r["peak_memory_mb"] >= r["train_peak_memory_mb"]
               for r in out["results"])
    assert [c["gradient_checkpointing"] for c in out["comparisons"]] == [False, True]
    gc = out["gradient_checkpointing"]
    assert set(gc) == {"train_peak_memory_mb", "peak_memory_mb", "train_seconds"}
    assert gc["train_seconds"]["on_over_off"] == pytest.approx(gc["train_seconds"]["on"] / gc["train_seconds"]["off"])


def test_bench_rejects_checkpointing_for_rollouts_and_fp16_on_cpu(tmp_path):
    for args, message in [(["--what", "rollout", "--gradient-checkpointing", "on"], "--what train only"),
                          (["--set", "model.mixed_precision=fp16", "--set", "model.device=cpu"], "fp16 needs a CUDA")]:
        result = CliRunner().invoke(app, ["bench", "--set", f"model.name_or_path={tmp_path / 'absent'}", *args])
        assert result.exit_code != 0 and message in str(result.exception or result.output)


@pytest.mark.parametrize("strategy", ["fixed", "contiguous", "calibrated", "adaptive"])
def test_bench_draws_skip_sets_the_way_the_recipe_does(tmp_path, strategy):
    model = write_tiny_model(tmp_path / "model", num_layers=8)
    data = write_examples(tmp_path / "train.jsonl", 8)
    costs = {1: 0.9, 2: 0.1, 3: 0.8, 4: 0.2, 5: 0.7, 6: 0.3}
    profile = tmp_path / "costs.json"
    profile.write_text(json.dumps({"num_layers": 8, "layers": [{"layer": i, "kl": c} for i, c in costs.items()]}))
    by_strategy = {"fixed": ["skipping.layers=[3, 5]"], "contiguous": [], "calibrated": [f"skipping.calibration_file={profile}"],
                   "adaptive": []}  # adaptive without a profile: bench measures the costs itself
    report = tmp_path / "bench.json"
    result = CliRunner().invoke(app, [
        "bench", "--skip-ratios", "0.25,0.5", "--repeats", "1", "--report", str(report),
        "--set", f"model.name_or_path={model}", "--set", f"data.train={data}", "--set", "data.chat_template=false",
        "--set", "data.system_prompt=null", "--set", "model.device=cpu", "--set", "rollout.max_completion_length=4",
        "--set", "train.prompts_per_step=2", "--set", f"skipping.strategy={strategy}",
        *[arg for item in by_strategy[strategy] for arg in ("--set", item)],
    ])
    assert result.exit_code == 0, result.output
    out = json.loads(report.read_text())
    sets = [r["skipped_layers"] for r in out["results"][1:]]
    assert out["settings"]["strategy"] == strategy
    if strategy == "fixed":
        assert sets == [[3, 5]]  # the fixed set is the one nested mode
    elif strategy == "contiguous":
        assert [len(s) for s in sets] == [2, 4] and all(s == list(range(s[0], s[0] + len(s))) for s in sets)
    elif strategy == "calibrated":
        assert set(sets[0]) <= {2, 4, 6} and len(sets[1]) == 4  # k = 2 from the cheapest 3
    else:
        assert [len(s) for s in sets] == [2, 4]  # the cheapest layers by the costs bench measured
