"""`prepare-data` on the command line: files written, the summary table, and one-line errors with exit code 2."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from nested_reft.cli.main import main

FIXTURES = Path(__file__).parent / "fixtures"


def _run(capsys, *args: str) -> SimpleNamespace:
    """`nested-reft prepare-data ARGS` through the real entry point (`nested_reft.cli.main.main`), in-process:
    its exit code and its stdout and stderr together."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["prepare-data", *args])
    out = capsys.readouterr()
    return SimpleNamespace(exit_code=e.value.code or 0, output=out.out + out.err, stderr=out.err)


def test_arithmetic_cli(tmp_path, capsys):
    out = tmp_path / "train.jsonl"
    args = ["arithmetic", "--split", "train", "--limit", "1000", "--seed", "0", "--out", str(out)]
    result = _run(capsys, *args)
    assert result.exit_code == 0, result.output
    assert "rows written" in result.output and "1000" in result.output and f"wrote {out}" in result.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 1000
    for row in rows:
        assert list(row) == ["id", "question", "answer", "source"] and row["question"] and row["answer"].isdigit()
    first = out.read_bytes()
    assert _run(capsys, *args).exit_code == 0 and out.read_bytes() == first
    assert _run(capsys, *args[:-3], "1", "--out", str(out)).exit_code == 0 and out.read_bytes() != first


def test_difficulty_cli(tmp_path, capsys):
    easy, hard = tmp_path / "easy.jsonl", tmp_path / "hard.jsonl"
    assert _run(capsys, "arithmetic", "--limit", "200", "--difficulty", "1", "--out", str(easy)).exit_code == 0
    assert _run(capsys, "arithmetic", "--limit", "200", "--difficulty", "4", "--out", str(hard)).exit_code == 0

    def mean_sentences(path):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return sum(r["question"].count(". ") for r in rows) / len(rows)

    assert mean_sentences(easy) < mean_sentences(hard)


def test_local_file_cli_reports_rejections(tmp_path, capsys):
    out = tmp_path / "gsm8k.jsonl"
    result = _run(capsys, str(FIXTURES / "gsm8k_sample.jsonl"), "--out", str(out))
    assert result.exit_code == 0, result.output
    for label, count in [("rows read", 8), ("rejected: duplicate_question", 1), ("rejected: unparsable_answer", 1),
                         ("rows written", 6)]:  # fmt: skip
        line = next(line for line in result.output.splitlines() if label in line)
        assert str(count) in line
    assert len(out.read_text().splitlines()) == 6
    summary = json.loads((tmp_path / "gsm8k.summary.json").read_text())
    assert summary["rows_written"] == 6 and summary["out"] == str(out)


def test_local_file_cli_reports_the_columns_it_keeps_and_drops(tmp_path, capsys):
    result = _run(capsys, str(FIXTURES / "math_sample.jsonl"), "--question-field", "problem", "--answer-field",
                  "solution", "--out", str(tmp_path / "math.jsonl"))
    assert result.exit_code == 0, result.output
    assert re.search(r"columns kept\s+.*level", result.output)
    assert all(json.loads(line)["level"].startswith("Level") for line in (tmp_path / "math.jsonl").read_text().splitlines())


def test_limit_cli_reports_rows_left_out(tmp_path, capsys):
    result = _run(capsys, str(FIXTURES / "gsm8k_sample.jsonl"), "--limit", "4", "--out", str(tmp_path / "x.jsonl"))
    assert result.exit_code == 0, result.output
    assert "2" in next(line for line in result.output.splitlines() if "left out by --limit" in line)


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def _write_bytes(tmp_path: Path, name: str, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
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
        (lambda tmp: _write_bytes(tmp, "binary.jsonl", b"\x89PNG\r\n\x1a\n\x00\xff"), [], "binary.jsonl: could not be read as json"),
        (lambda tmp: _write_bytes(tmp, "binary.parquet", b"\x89PNG\r\n\x1a\n\x00\xff"), [], "binary.parquet: could not be read as parquet"),
        (lambda tmp: _write_bytes(tmp, "binary.csv", b"\x89PNG\r\n\x1a\n\x00\xff"), [], "binary.csv: could not be read as csv"),
        (lambda tmp: "arithmetic", ["--split", "validation"], "no split 'validation'; expected one of train, test"),
        (lambda tmp: "arithmetic", ["--limit", "0"], "--limit must be at least 1"),
        (lambda tmp: "owner/name", [], "a hub data set needs --question-field, --answer-field, --answer-format"),
    ],
    ids=["missing-file", "unknown-source", "empty-file", "unknown-field", "preset-offline", "bad-difficulty",
         "binary-jsonl", "binary-parquet", "binary-csv", "bad-split", "bad-limit", "hub-without-mapping"],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, source, extra, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the preset case must fail at once, not wait on the network
    out = tmp_path / "out.jsonl"
    result = _run(capsys, source(tmp_path), *extra, "--out", str(out))
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.output
    assert not out.exists()


@pytest.mark.parametrize(
    "out, expected",
    [
        (lambda tmp: tmp / "file.txt" / "data.jsonl", r"--out .*data\.jsonl: cannot create folder .*file\.txt is a file"),
        (lambda tmp: tmp / "data.csv", "expected a path ending in .jsonl"),
        (lambda tmp: tmp / "dir.jsonl", "is a folder; expected a file path"),
        (lambda tmp: "/proc/nested-reft-test/data.jsonl", "cannot write in /proc"),
    ],
    ids=["under-a-file", "not-jsonl", "a-folder", "unwritable"],
)
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, out, expected):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "dir.jsonl").mkdir()
    monkeypatch.setattr("nested_reft.data.sources.load_source", lambda *a, **k: pytest.fail("loaded the source"))
    result = _run(capsys, "arithmetic", "--limit", "5", "--out", str(out(tmp_path)))
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(expected, lines[0]), result.output
