"""The command line: registered commands, and bad input as one line with exit code 2 and no traceback."""

import subprocess
import sys

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
