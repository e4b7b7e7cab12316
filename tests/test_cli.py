"""The command line: registered commands, and bad input as one line with exit code 2 and no traceback."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from nested_reft.cli.main import main


def run_cli(argv, capsys):
    """Run `nested-reft ARGV` in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_help_lists_every_command(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for command in ("prepare-data", "calibrate-skips", "train", "evaluate", "bench", "plot"):
        assert command in out


def test_version_alone_prints_the_version(capsys):
    from nested_reft import __version__

    code, out, err = run_cli(["--version"], capsys)
    assert (code, out.strip(), err) == (0, __version__, "")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["train", "--resume", "true", "r.yaml"], ["train", "--resume", "r.yaml"]),
        (["train", "--overwrite", "False", "r.yaml"], ["train", "r.yaml"]),
        (["train", "--resume=yes"], ["train", "--resume"]),
        (["--debug", "no", "train", "--overwrite=false"], ["train"]),
        (["train", "--resume", "r.yaml"], ["train", "--resume", "r.yaml"]),  # a path after a flag stays a path
        (["train", "--set", "train.steps=3", "true"], ["train", "--set", "train.steps=3", "true"]),  # not a flag
    ],
)
def test_boolean_flags_take_the_words_their_help_suggests(args, expected):
    from nested_reft.cli.main import flag_words

    assert flag_words(args) == expected


@pytest.mark.parametrize(
    ("command", "example"),
    [("train", "train.steps=3"), ("evaluate", "data.eval_limit=20"), ("calibrate-skips", "skipping.keep_first=2"),
     ("bench", "rollout.max_completion_length=64"), ("recipe", "reward.timeout_s=5")],
)
def test_each_commands_set_example_is_a_field_it_reads(command, example, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = run_cli([command, "--help"], capsys)
    assert code == 0 and f"--set {example}" in out


def test_help_texts_say_what_the_commands_do(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    _, out, _ = run_cli(["evaluate", "--help"], capsys)
    assert "drawn at random with run.seed" in out and "first N" not in out
    _, out, _ = run_cli(["export", "--help"], capsys)
    assert "--merge" not in out and "always merged" in out


def test_recipe_with_unknown_key(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  setps: 3\n")
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert_one_line_error(code, err, str(recipe), "train.setps", "did you mean 'steps'")


def test_recipe_with_wrong_type(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("rollout:\n  temperature: hot\n")
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert_one_line_error(code, err, "rollout.temperature", "found 'hot'")


def test_override_with_wrong_type(capsys):
    code, _, err = run_cli(["evaluate", "--set", "train.steps=many"], capsys)
    assert_one_line_error(code, err, "train.steps (from --set)")


def test_missing_data_file(tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    code, _, err = run_cli(["prepare-data", str(tmp_path / "nope.jsonl"), "--out", str(out)], capsys)
    assert_one_line_error(code, err, "nope.jsonl")
    assert not out.exists()


def test_missing_training_data_file(tmp_path, capsys):
    code, _, err = run_cli(["train", "--set", f"data.train={tmp_path / 'missing.jsonl'}",
                            "--set", f"run.output_dir={tmp_path / 'run'}"], capsys)
    assert_one_line_error(code, err, "missing.jsonl")


def test_unknown_source(tmp_path, capsys):
    code, _, err = run_cli(["prepare-data", "arithmetik", "--out", str(tmp_path / "o.jsonl")], capsys)
    assert_one_line_error(code, err, "arithmetik", "arithmetic")


def test_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_cli(["prepare-data", str(empty), "--out", str(tmp_path / "o.jsonl")], capsys)
    assert_one_line_error(code, err, "empty.jsonl")


def test_bad_flag_values(capsys):
    code, _, err = run_cli(["bench", "--compare", "vllm"], capsys)
    assert_one_line_error(code, err, "--compare")
    code, _, err = run_cli(["calibrate-skips", "--ratios", "0.1,abc"], capsys)
    assert_one_line_error(code, err, "--ratios")


def test_debug_shows_the_traceback_instead(tmp_path):
    """Through the installed console script, as a user runs it."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("nope: 1\n")
    plain = subprocess.run([sys.executable, "-m", "nested_reft.cli.main", "train", str(recipe)],
                           capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and "nope: unknown key" in plain.stderr
    debug = subprocess.run([sys.executable, "-m", "nested_reft.cli.main", "--debug", "train", str(recipe)],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "UserError" in debug.stderr


# -- bad input found before any model loads, command by command ---------------------------------------------------


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: each error below must be found before one."""

    def refuse(*_, **__):
        raise AssertionError("a model was loaded before the bad input was found")

    for module in ("trainer", "evaluate", "bench", "calibrate"):
        monkeypatch.setattr(f"nested_reft.{module}.load_model", refuse)


@pytest.fixture
def inputs(tmp_path):
    """A tiny model folder (its config.json says 4 layers), a data file, a plain file and a run with results."""
    from nested_reft.rundir import RunDir

    from .tiny import write_examples, write_tiny_model

    model = write_tiny_model(tmp_path / "model")
    data = write_examples(tmp_path / "train.jsonl", 4)
    (tmp_path / "file.txt").write_text("x")
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def short(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    run = RunDir.open(tmp_path / "done", "a: 1\n")
    run.log_metrics({"step": 1})
    return SimpleNamespace(root=tmp_path, model=model, data=data, file=tmp_path / "file.txt", done=run.root,
                           rewards=rewards,
                           sets=["--set", f"model.name_or_path={model}", "--set", f"data.train={data}",
                                 "--set", "model.device=cpu", "--set", f"run.output_dir={tmp_path / 'run'}"])


def write_bytes(path, data):
    path.write_bytes(data)
    return str(path)


TRAIN_BAD = {
    "binary-recipe": (lambda i: [write_bytes(i.root / "r.yaml", b"\x89PNG\r\n\x1a\n\x00\x00")], "is a binary file"),
    "latin-1-recipe": (lambda i: [write_bytes(i.root / "r.yaml", "train:\n  steps: 3 # caf\xe9\n".encode("latin-1"))],
                       "not UTF-8 text"),
    "folder-as-recipe": (lambda i: [str(i.root)], "is a folder; expected a recipe YAML file"),
    "one-generation": (lambda i: ["--set", "rollout.num_generations=1"], "rollout.num_generations (from --set)"),
    "epsilon-1.5": (lambda i: ["--set", "objective.epsilon=1.5"], "objective.epsilon (from --set)"),
    "mask-bounds": (lambda i: ["--set", "objective.mask_low=3"], "mask_low must be <= mask_high"),
    "greedy-rollouts": (lambda i: ["--set", "rollout.temperature=0"], "rollout.temperature (from --set)"),
    "betas": (lambda i: ["--set", "optimizer.betas=[0.9,1.5]"], "betas must each be in [0, 1)"),
    "eval-without-set": (lambda i: ["--set", "train.eval_every=2", "--set", "data.eval=null"], "needs data.eval"),
    "output-under-a-file": (lambda i: ["--set", f"run.output_dir={i.file}/run"], "cannot create folder"),
    "output-is-a-file": (lambda i: ["--set", f"run.output_dir={i.file}"], "is a file; expected a folder"),
    "output-unwritable": (lambda i: ["--set", "run.output_dir=/proc/nested-reft-test"], "cannot write in /proc"),
    "overwrite-a-non-run": (lambda i: ["--set", f"run.output_dir={i.root}", "--overwrite"],
                            "not a nested-reft run directory"),
    "rerun-with-results": (lambda i: ["--set", f"run.output_dir={i.done}"], "pass --resume to continue it"),
    "resume-and-overwrite": (lambda i: ["--resume", "--overwrite"], "mutually exclusive"),
    "resume-nothing": (lambda i: ["--resume"], "nothing to resume"),
    "keep-more-than-layers": (lambda i: ["--set", "skipping.keep_first=3", "--set", "skipping.keep_last=2"],
                              "summing to at most 4"),
    "fixed-layer-past-the-last": (lambda i: ["--set", "skipping.strategy=fixed", "--set", "skipping.layers=[7]"],
                                  "layer indices must be integers in [0, 3]"),
    "missing-calibration": (lambda i: ["--set", "skipping.strategy=calibrated",
                                       "--set", f"skipping.calibration_file={i.root / 'nope.json'}"], "no such file"),
    "missing-tracker": (lambda i: ["--set", "train.report_to=[wandb]"], "pip install 'nested-reft[wandb]'"),
    "cuda-on-cpu": (lambda i: ["--set", "model.device=cuda"], "CUDA is not available"),
    "data-not-utf8": (lambda i: ["--set", "data.train=" + write_bytes(i.root / "bin.jsonl", b'{"id": "\xff"}')],
                      "bin.jsonl: not UTF-8 text"),
    "reward-file-missing": (lambda i: ["--set", f"reward.functions=[{{name: '{i.root}/nope.py:short'}}]"],
                            "reward.functions: cannot import", "nope.py: no such file"),
    "reward-function-missing": (lambda i: ["--set", f"reward.functions=[{{name: '{i.rewards}:shrot'}}]"],
                                "has no 'shrot' (it defines: short)"),
    "reward-file-broken": (lambda i: ["--set", "reward.functions=[{name: '"
                                      + write_bytes(i.root / "broken.py", b"def short(:\n") + ":short'}]"],
                           "cannot import", "SyntaxError", "(broken.py line 1)"),
    "reward-module-missing": (lambda i: ["--set", "reward.functions=[{name: 'no_such_pkg.rewards:f'}]"],
                              "No module named 'no_such_pkg'"),
    "overlong-cache-past-the-limit": (lambda i: ["--set", "reward.functions=[{name: soft_overlong, cache: 200}]"],
                                      "soft_overlong: cache (200) must be at most max_length (128"),
}


@pytest.mark.parametrize("case", TRAIN_BAD, ids=list(TRAIN_BAD))
def test_train_bad_input(case, inputs, no_model, monkeypatch, capsys):
    import importlib.util

    import torch

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args, *fragments = TRAIN_BAD[case]
    argv = args(inputs)
    recipe = [argv.pop(0)] if argv and not argv[0].startswith("--") else []
    code, _, err = run_cli(["train", *recipe, *inputs.sets, *argv], capsys)
    assert_one_line_error(code, err, *fragments)


EVALUATE_BAD = {
    "greedy-samples": (lambda i: ["--samples", "4"], "--temperature > 0"),
    "report-under-a-file": (lambda i: ["--report", f"{i.file}/r.json"], "cannot create folder"),
    "report-is-a-folder": (lambda i: ["--report", str(i.root)], "is a folder; expected a file path"),
    "run-without-checkpoint": (lambda i: ["--model", str(i.done)], "has no checkpoint yet"),
    "missing-data": (lambda i: ["--data", str(i.root / "nope.jsonl")], "nope.jsonl"),
    "reward-function-missing": (lambda i: ["--set", f"reward.functions=[{{name: '{i.rewards}:shrot'}}]"],
                                "has no 'shrot'"),
    "overlong-cache-past-max-new-tokens": (lambda i: ["--set", "reward.functions=[{name: soft_overlong, cache: 16}]",
                                                      "--max-new-tokens", "8"], "cache (16) must be at most max_length (8"),
}


@pytest.mark.parametrize("case", EVALUATE_BAD, ids=list(EVALUATE_BAD))
def test_evaluate_bad_input(case, inputs, no_model, capsys):
    args, fragment = EVALUATE_BAD[case]
    code, _, err = run_cli(["evaluate", *inputs.sets, "--report", str(inputs.root / "ok.json"), *args(inputs)], capsys)
    assert_one_line_error(code, err, fragment)


BENCH_BAD = {
    "report-under-a-file": (lambda i: ["--report", f"{i.file}/b.json"], "cannot create folder"),
    "plot-under-a-file": (lambda i: ["--plot", f"{i.file}/b.png"], "--plot"),
    "what": (lambda i: ["--what", "everything"], "--what: expected 'rollout' or 'train'"),
    "ratio-out-of-range": (lambda i: ["--skip-ratios", "0.5,1.5"], "--skip-ratios: expected ratios in (0, 1)"),
    "keep-more-than-layers": (lambda i: ["--set", "skipping.keep_first=4", "--set", "skipping.keep_last=1"],
                              "summing to at most 4"),
}


@pytest.mark.parametrize("case", BENCH_BAD, ids=list(BENCH_BAD))
def test_bench_bad_input(case, inputs, no_model, capsys):
    args, fragment = BENCH_BAD[case]
    code, _, err = run_cli(["bench", *inputs.sets, *args(inputs)], capsys)
    assert_one_line_error(code, err, fragment)


CALIBRATE_BAD = {
    "out-under-a-file": (lambda i: ["--out", f"{i.file}/c.json"], "cannot create folder"),
    "out-is-a-folder": (lambda i: ["--out", str(i.root)], "is a folder"),
    "no-eligible-layer": (lambda i: ["--set", "skipping.keep_first=2", "--set", "skipping.keep_last=2"],
                          "no eligible layer among 4"),
    "ratio-zero": (lambda i: ["--ratios", "0"], "--ratios: expected ratios in (0, 1)"),
}


@pytest.mark.parametrize("case", CALIBRATE_BAD, ids=list(CALIBRATE_BAD))
def test_calibrate_bad_input(case, inputs, no_model, capsys):
    args, fragment = CALIBRATE_BAD[case]
    code, _, err = run_cli(["calibrate-skips", *inputs.sets, *args(inputs)], capsys)
    assert_one_line_error(code, err, fragment)
