"""The project's JSONL and the package API: prepare, read_examples, load_examples."""

import json
import re
from pathlib import Path

import pytest

from nested_reft.data import (
    ROW_KEYS,
    Example,
    generate_arithmetic,
    load_examples,
    prepare,
    read_examples,
    summary_path,
)
from nested_reft.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K_SAMPLE = FIXTURES / "gsm8k_sample.jsonl"


# --- Writing and reading the project's JSONL ---------------------------------------------------------------


def test_prepare_arithmetic_writes_valid_identical_files(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    summary = prepare("arithmetic", first, split="train", limit=1000, seed=0)
    prepare("arithmetic", second, split="train", limit=1000, seed=0)
    assert first.read_bytes() == second.read_bytes()
    lines = first.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1000 == summary.rows_written
    for line in lines:
        row = json.loads(line)
        assert tuple(row) == ROW_KEYS
        assert row["question"].strip() and re.fullmatch(r"\d+", row["answer"]) and row["source"] == "arithmetic"
    assert len({json.loads(line)["id"] for line in lines}) == 1000
    assert json.loads(summary_path(first).read_text()) == summary.to_dict()
    assert summary.to_dict()["out"] == str(first) and summary_path(first).name == "a.summary.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "a.summary.json", "b.jsonl", "b.summary.json"]


def test_read_examples_round_trip(tmp_path):
    out = tmp_path / "data.jsonl"
    prepare("arithmetic", out, split="test", limit=20)
    assert read_examples(out) == generate_arithmetic("test", 20, seed=0)


def test_a_rows_other_fields_are_its_columns(tmp_path):
    path = tmp_path / "data.jsonl"
    row = Example("a", "q", "1", "s", {"difficulty": 3, "tests": ["assert f(1) == 2"], "meta": {"k": None}})
    path.write_text(row.to_json() + "\n" + Example("b", "r", "2", "s").to_json() + "\n", encoding="utf-8")
    assert list(json.loads(path.read_text().splitlines()[0])) == [*ROW_KEYS, "difficulty", "tests", "meta"]
    assert read_examples(path) == [row, Example("b", "r", "2", "s")]
    assert load_examples(str(path), split="train", limit=None, seed=0)[0].columns["tests"] == ["assert f(1) == 2"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"data\.jsonl:2: not valid JSON"),
        ('{"id": "x", "question": "q", "answer": "1"}', r"data\.jsonl:2: expected an object with keys id, question"),
        ('["a", "b"]', r"data\.jsonl:2: expected an object .* found a JSON list"),
        ('{"id": "x", "question": " ", "answer": "1", "source": "s"}', r"jsonl:2: 'question' must be a non-empty"),
        ('{"id": "x", "question": "q", "answer": 1, "source": "s"}', r"jsonl:2: 'answer' must be a non-empty"),
        ('{"id": "a", "question": "r", "answer": "2", "source": "s"}', r"jsonl:2: duplicate id 'a' \(first on line 1"),
        ('{"id": "x", "question": "q", "answer": "1", "source": "s", "step": 3}',
         r"jsonl:2: a column may not be named 'step' \(reward functions receive prompts, completions, completion_ids, "
         r"step under these names\); rename it$"),
    ],
)
def test_read_examples_names_the_bad_line(tmp_path, bad_line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(Example("a", "q", "1", "s").to_json() + "\n" + bad_line + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=message):
        read_examples(path)


def test_read_examples_missing_or_empty(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file"):
        read_examples(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"empty\.jsonl: no rows"):
        read_examples(tmp_path / "empty.jsonl")


def test_load_examples_accepts_a_prepared_file_or_any_source(tmp_path):
    out = tmp_path / "prepared.jsonl"
    prepare(str(GSM8K_SAMPLE), out)
    prepared = read_examples(out)
    assert load_examples(str(out), split="ignored", limit=None, seed=0) == prepared
    assert load_examples(str(GSM8K_SAMPLE), split="train", limit=None, seed=0) == prepared
    assert load_examples("arithmetic", split="test", limit=5, seed=2) == generate_arithmetic("test", 5, seed=2)
    subset = load_examples(str(out), split="train", limit=3, seed=0)
    assert len(subset) == 3 and set(subset) <= set(prepared)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "caf\u00e9".encode("latin-1")],
                         ids=["binary", "latin-1"])
def test_a_file_that_is_not_utf8_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"data\.jsonl: not UTF-8 text") as e:
        load_examples(str(path), split="train", limit=None, seed=0)
    assert "\n" not in str(e.value)
