"""`prepare-data` on the command line: files written, the summary table, and one-line errors with exit code 2."""

import functools
import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from nested_reft.cli.prepare_data import prepare_data
from nested_reft.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"


def _app() -> typer.Typer:
    """A stand-in for the real app: `prepare-data` registered the same way, UserError -> one line, exit 2."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """Group callback, so that the command is invoked by name as in the real CLI."""

    @functools.wraps(prepare_data)
    def guarded(*args, **kwargs):
        try:
            prepare_data(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e

    app.command("prepare-data")(guarded)
    return app


def _run(*args: str):
    return CliRunner().invoke(_app(), ["prepare-data", *args])


def test_arithmetic_cli(tmp_path):
    out = tmp_path / "train.jsonl"
    args = ["arithmetic", "--split", "train", "--limit", "1000", "--seed", "0", "--out", str(out)]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    assert "rows written" in result.output and "1000" in result.output and f"wrote {out}" in result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1000
    for row in rows:
        assert list(row) == ["id", "question", "answer", "source"] and row["question"] and row["answer"].isdigit()
    first = out.read_bytes()
    assert _run(*args).exit_code == 0 and out.read_bytes() == first
    assert _run(*args[:-3], "1", "--out", str(out)).exit_code == 0 and out.read_bytes() != first


def test_difficulty_cli(tmp_path):
    easy, hard = tmp_path / "easy.jsonl", tmp_path / "hard.jsonl"
    assert _run("arithmetic", "--limit", "200", "--difficulty", "1", "--out", str(easy)).exit_code == 0
    assert _run("arithmetic", "--limit", "200", "--difficulty", "4", "--out", str(hard)).exit_code == 0

    def mean_sentences(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return sum(r["question"].count(". ") for r in rows) / len(rows)

    assert mean_sentences(easy) < mean_sentences(hard)


def test_local_file_cli_reports_rejections(tmp_path):
    out = tmp_path / "gsm8k.jsonl"
    result = _run(str(FIXTURES / "gsm8k_sample.jsonl"), "--out", str(out))
    assert result.exit_code == 0, result.output
    for label, count in [("rows read", 8), ("rejected: duplicate_question", 1), ("rejected: unparsable_answer", 1),
                         ("rows written", 6)]:  # fmt: skip
        line = next(line for line in result.output.splitlines() if label in line)
        assert str(count) in line
    assert len(out.read_text().splitlines()) == 6
    summary = json.loads((tmp_path / "gsm8k.summary.json").read_text())
    assert summary["rows_written"] == 6 and summary["out"] == str(out)


def test_limit_cli_reports_rows_left_out(tmp_path):
    result = _run(str(FIXTURES / "gsm8k_sample.jsonl"), "--limit", "4", "--out", str(tmp_path / "x.jsonl"))
    assert result.exit_code == 0, result.output
    assert "2" in next(line for line in result.output.splitlines() if "left out by --limit" in line)


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "source, extra, expected",
    [
        (lambda tmp: str(tmp / "missing.jsonl"), [], "missing.jsonl: no such file"),
        (lambda tmp: "gsm8", [], "unknown SOURCE 'gsm8': did you mean 'gsm8k'?"),
        (lambda tmp: _write(tmp, "empty.jsonl", ""), [], "empty.jsonl: no rows"),
        (lambda tmp: str(FIXTURES / "math_sample.jsonl"), ["--question-field", "problem", "--answer-field", "answer"],
         "no field 'answer'; available: problem, solution, level"),
        (lambda tmp: "gsm8k", [], "could not download openai/gsm8k (offline?); pass a local"),
        (lambda tmp: "arithmetic", ["--difficulty", "9"], "--difficulty must be 1 to 4, got 9"),
    ],
    ids=["missing-file", "unknown-source", "empty-file", "unknown-field", "preset-offline", "bad-difficulty"],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, source, extra, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the preset case must fail at once, not wait on the network
    out = tmp_path / "out.jsonl"
    result = _run(source(tmp_path), *extra, "--out", str(out))
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not out.exists()
