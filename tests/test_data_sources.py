"""Data sources: local files (jsonl/json/csv/parquet), presets and hub ids, rejection of bad rows."""

import csv
import json
import re
from pathlib import Path

import pytest

from nested_reft.data import (
    PRESETS,
    load_source,
    prepare,
    read_examples,
    summary_path,
)
from nested_reft.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K_SAMPLE = FIXTURES / "gsm8k_sample.jsonl"
MATH_SAMPLE = FIXTURES / "math_sample.jsonl"
# The usable rows of gsm8k_sample.jsonl, by source row index: row 4 has no final answer, row 5 repeats row 0.
GSM8K_EXPECTED = {0: "72", 1: "1200", 2: "32", 3: "84", 6: "6", 7: "-7"}


def _raw_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# --- Local files -------------------------------------------------------------------------------------------


def _check_gsm8k_sample(examples, summary, name="gsm8k_sample"):
    assert {e.id: e.answer for e in examples} == {f"{name}-train-{i:06d}": a for i, a in GSM8K_EXPECTED.items()}
    raw = _raw_rows(GSM8K_SAMPLE)
    assert [e.question for e in examples] == [raw[i]["question"] for i in GSM8K_EXPECTED]
    assert {e.source for e in examples} == {name}
    assert (summary.rows_read, summary.rows_written) == (8, 6)
    assert summary.rejected == {"duplicate_question": 1, "unparsable_answer": 1}
    assert summary.answer_format == "gsm8k"


def test_local_gsm8k_jsonl(tmp_path):
    out = tmp_path / "gsm8k.jsonl"
    summary = prepare(str(GSM8K_SAMPLE), out)
    _check_gsm8k_sample(read_examples(out), summary)
    assert "café" in out.read_text(encoding="utf-8")  # written as is, not \u-escaped
    assert json.loads(summary_path(out).read_text())["rejected"] == summary.rejected


def test_local_gsm8k_csv_and_parquet(tmp_path):
    import datasets

    raw = _raw_rows(GSM8K_SAMPLE)
    with open(tmp_path / "gsm8k_sample.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(raw)
    datasets.Dataset.from_list(raw).to_parquet(str(tmp_path / "gsm8k_sample.parquet"))
    for suffix in ("csv", "parquet"):
        _check_gsm8k_sample(*load_source(str(tmp_path / f"gsm8k_sample.{suffix}")))


def test_local_math_boxed():
    examples, summary = load_source(str(MATH_SAMPLE), question_field="problem", answer_field="solution")
    assert summary.answer_format == "boxed"
    assert [e.answer for e in examples] == ["\\frac{5}{6}", "4", "7", "x^2 + 2x + 1"]
    assert summary.rejected == {"unparsable_answer": 1}  # row 3: its \boxed{ is never closed
    assert [e.id for e in examples] == [f"math_sample-train-{i:06d}" for i in (0, 1, 2, 4)]


def test_a_sources_other_fields_are_kept_as_columns(tmp_path):
    source = tmp_path / "raw.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": 7, "question": "One plus one?", "answer": "#### 2", "level": 1, "tests": ["2"], "step": "x"},
        {"id": 8, "question": "Two plus two?", "answer": "#### 4", "level": 2, "tests": [], "step": "y"},
    ]))
    out = tmp_path / "prepared.jsonl"
    summary = prepare(str(source), out)
    assert [e.columns for e in read_examples(out)] == [{"level": 1, "tests": ["2"]}, {"level": 2, "tests": []}]
    # `id` is the row's own key, `step` what reward functions receive the step as: neither can be a column.
    assert summary.columns == ["level", "tests"]
    assert summary.dropped_columns == {"id": "the name is taken", "step": "the name is taken"}
    assert json.loads(summary_path(out).read_text())["columns"] == ["level", "tests"]


def test_a_hub_data_sets_other_fields_are_kept_as_columns(monkeypatch):
    import datasets

    from nested_reft.data import sources

    table = datasets.Dataset.from_dict({"problem": ["What is 1 + 1?"], "solution": [r"so \boxed{2}"],
                                        "subject": ["Algebra"], "blob": [b"\x00\x01"]})
    monkeypatch.setattr(sources, "_load_hub", lambda *args, **kwargs: table)
    examples, summary = load_source("someone/math", question_field="problem", answer_field="solution",
                                    answer_format="boxed")
    assert [(e.answer, e.columns) for e in examples] == [("2", {"subject": "Algebra"})]
    assert summary.dropped_columns == {"blob": "not JSON values"}


def test_a_recipe_names_a_sources_fields(tmp_path):
    from nested_reft.data import load_examples
    from nested_reft.recipe import DataSource

    source = tmp_path / "raw.csv"
    source.write_text("prompt,target,level\nOne plus one?,2,1\n")
    spec = DataSource(source=str(source), question_field="prompt", answer_field="target", answer_format="plain")
    (example,) = load_examples(spec, split="train", limit=None, seed=0)
    assert (example.question, example.answer, example.columns) == ("One plus one?", "2", {"level": 1})


def test_question_from_several_fields_and_numeric_answers(tmp_path):
    path = tmp_path / "svamp_like.jsonl"
    rows = [
        {"Body": "Jack has 8 apples.", "Question": "How many apples does he have after eating 3?", "Answer": 5.0},
        {"Body": "A rope is 7.5 m long.", "Question": "How long are two such ropes?", "Answer": 15.0},
        {"Body": "Pens cost 0.5 dollars.", "Question": "What do 3 pens cost?", "Answer": 1.5},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, summary = load_source(str(path), question_field="Body, Question", answer_field="Answer")
    assert examples[0].question == "Jack has 8 apples. How many apples does he have after eating 3?"
    assert [e.answer for e in examples] == ["5", "15", "1.5"] and summary.answer_format == "plain"
    assert PRESETS["svamp"].question_fields == ("Body", "Question")


def test_empty_question_rejected(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "  ", "answer": "3"}\n{"question": "What is 1+2?", "answer": "3"}\n')
    examples, summary = load_source(str(path))
    assert [e.question for e in examples] == ["What is 1+2?"] and summary.rejected == {"empty_question": 1}


def test_limit_draws_a_seeded_subset_in_source_order():
    subsets = []
    for seed in range(5):
        examples, summary = load_source(str(GSM8K_SAMPLE), limit=3, seed=seed)
        assert examples == load_source(str(GSM8K_SAMPLE), limit=3, seed=seed)[0]
        assert len(examples) == 3 == summary.rows_written and summary.rows_over_limit == 3
        assert [e.id for e in examples] == sorted(e.id for e in examples)
        subsets.append(tuple(e.id for e in examples))
    assert len(set(subsets)) > 1
    assert len(load_source(str(GSM8K_SAMPLE), limit=100)[0]) == 6


# --- Bad input ---------------------------------------------------------------------------------------------


def test_local_file_errors(tmp_path):
    with pytest.raises(UserError, match=r"missing\.jsonl: no such file"):
        load_source(str(tmp_path / "missing.jsonl"))
    for name, content in [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.csv", "question,answer\n")]:
        (tmp_path / name).write_text(content)
        with pytest.raises(UserError, match=rf"{re.escape(name)}: no rows$"):
            load_source(str(tmp_path / name))
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{oops\n')
    with pytest.raises(UserError, match=r"broken\.jsonl: could not be read as json: .+"):
        load_source(str(tmp_path / "broken.jsonl"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match=r"notes\.txt: unsupported file type; expected one of \.jsonl"):
        load_source(str(tmp_path / "notes.txt"))


def test_unknown_field_lists_columns():
    with pytest.raises(UserError, match=r"no field 'problem'; available: question, answer \(choose with"):
        load_source(str(GSM8K_SAMPLE), question_field="problem")


def test_no_usable_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"question": "q", "answer": "#### many"}\n')
    with pytest.raises(UserError, match=r"rows\.jsonl: no usable rows \(rejected: \{'unparsable_answer': 1\}\)"):
        load_source(str(path))


def test_unknown_source_suggests():
    with pytest.raises(UserError, match=r"unknown SOURCE 'gsm8': did you mean 'gsm8k'\? .*math500"):
        load_source("gsm8")
    with pytest.raises(UserError, match=r"unknown SOURCE 'zzz': expected the built-in 'arithmetic'"):
        load_source("zzz")


def test_option_errors(tmp_path):
    with pytest.raises(UserError, match="a hub data set needs --answer-field, --answer-format"):
        load_source("someone/dataset", question_field="q")
    with pytest.raises(UserError, match="--answer-format must be one of gsm8k, boxed, plain, got 'latex'"):
        load_source(str(GSM8K_SAMPLE), answer_format="latex")
    with pytest.raises(UserError, match="--difficulty applies only to the arithmetic generator"):
        load_source(str(GSM8K_SAMPLE), difficulty=3)
    with pytest.raises(UserError, match=r"expected a path ending in \.jsonl"):
        prepare("arithmetic", tmp_path / "out.json", limit=3)
    same = tmp_path / "same.jsonl"
    same.write_text(GSM8K_SAMPLE.read_text())
    with pytest.raises(UserError, match="would overwrite the SOURCE file"):
        prepare(str(same), same)


def test_hub_offline_fails_fast_with_one_line(monkeypatch):
    message = (
        r"^could not download openai/gsm8k \(offline\?\); pass a local \.jsonl/\.json/\.csv/\.parquet file instead$"
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time: no connection attempt at all
    with pytest.raises(UserError, match=message):
        load_source("gsm8k")


def test_hub_offline_mode_of_datasets_is_reported_the_same_way(monkeypatch):
    import datasets

    # As when HF_HUB_OFFLINE is set before `datasets` is imported: the hub is not probed, datasets looks in its
    # cache, finds nothing and raises ConnectionError.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"^could not download HuggingFaceH4/MATH-500 \(offline\?\)"):
        load_source("math500", split="test")
