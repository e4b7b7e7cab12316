"""Data preparation: the arithmetic generator, local/hub sources, rejection of bad rows, the project's JSONL."""

import csv
import json
import os
import re
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from nested_reft.data import (
    PRESETS,
    ROW_KEYS,
    Example,
    arithmetic_problems,
    generate_arithmetic,
    load_examples,
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


# --- The arithmetic generator ------------------------------------------------------------------------------


def _answer_from_text(question: str) -> int:
    """Solve a generated problem from its words alone, without the generator's trace: the first sentence gives
    the starting count, each middle sentence one operation (recognised by its wording) on the number it names."""
    sentences = re.split(r"(?<=[.?]) ", question)
    value = Fraction(*map(int, re.findall(r"\d+", sentences[0])))
    for sentence in sentences[1:-1]:
        (operand,) = map(int, re.findall(r"\d+", sentence))
        if "times" in sentence:
            value *= operand
        elif "equal" in sentence or "one out of every" in sentence:
            value /= operand
        elif re.search(r"\bmore\b|gives (her|him)\b|\bwins\b", sentence):
            value += operand
        elif re.search(r"\b(loses|sells|uses)\b|\bto [A-Z]", sentence):
            value -= operand
        else:
            raise AssertionError(f"no operation recognised in {sentence!r}")
        assert value.denominator == 1 and value >= 2, f"{question!r}: a count becomes {value}"
    assert sentences[-1].startswith("How many") and sentences[-1].endswith("?")
    return int(value)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_arithmetic_answers_are_what_the_words_say(difficulty):
    problems = arithmetic_problems("train", 300, seed=difficulty, difficulty=difficulty)
    examples = generate_arithmetic("train", 300, seed=difficulty, difficulty=difficulty)
    for problem, example in zip(problems, examples, strict=True):
        assert example.question == problem.question
        assert example.answer == str(_answer_from_text(problem.question)) == str(problem.answer)
        # The trace and the text agree: the numbers appear in the order of the steps.
        numbers = [int(n) for n in re.findall(r"\d+", problem.question)]
        assert numbers == [problem.start, *(operand for _, operand in problem.steps)]


def test_arithmetic_difficulty_sets_steps_and_numbers():
    mean_steps = {}
    for difficulty in (1, 2, 3, 4):
        problems = arithmetic_problems("train", 400, seed=0, difficulty=difficulty)
        mean_steps[difficulty] = sum(len(p.steps) for p in problems) / len(problems)
        if difficulty == 1:
            assert {len(p.steps) for p in problems} == {1, 2}
            assert {op for p in problems for op, _ in p.steps} == {"+", "-"}
            assert max(max(p.start, *(k for _, k in p.steps)) for p in problems) <= 10
        else:
            assert {op for p in problems for op, _ in p.steps} == {"+", "-", "*", "/"}
    assert mean_steps[1] < mean_steps[2] < mean_steps[3] < mean_steps[4]


def test_arithmetic_variety():
    questions = [e.question for e in generate_arithmetic("train", 500, seed=0)]
    openings = {q.split(" ")[0] for q in questions}  # the names
    objects = {re.search(r"How many (.+?) does", q).group(1) for q in questions}
    assert len(openings) >= 20 and len(objects) >= 15
    assert len(set(questions)) == len(questions)


def test_arithmetic_splits_are_disjoint_whatever_the_seed():
    train = {e.question for e in generate_arithmetic("train", 2000, seed=0)}
    test = {e.question for e in generate_arithmetic("test", 500, seed=0)}
    test_other_seed = {e.question for e in generate_arithmetic("test", 500, seed=7)}
    assert len(train) == 2000 and len(test) == 500
    assert not train & test and not train & test_other_seed


def test_arithmetic_seeds():
    first = generate_arithmetic("test", 50, seed=3)
    assert generate_arithmetic("test", 50, seed=3) == first
    assert [e.question for e in generate_arithmetic("test", 50, seed=4)] != [e.question for e in first]
    assert [e.id for e in first] == [f"arithmetic-test-{i:06d}" for i in range(50)]


def test_arithmetic_does_not_depend_on_python_hash_seed():
    code = "from nested_reft.data import generate_arithmetic; print(generate_arithmetic('test', 20, seed=1)[-1])"
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": salt}, capture_output=True, text=True
        ).stdout
        for salt in ("1", "2")
    }
    assert len(outputs) == 1 and "arithmetic-test-000019" in outputs.pop()


def test_arithmetic_bad_arguments():
    with pytest.raises(UserError, match="no split 'validation'; expected one of train, test"):
        load_source("arithmetic", split="validation")
    with pytest.raises(UserError, match="--difficulty must be 1 to 4, got 5"):
        load_source("arithmetic", difficulty=5)
    with pytest.raises(UserError, match="do not apply to arithmetic"):
        load_source("arithmetic", question_field="q")
    with pytest.raises(UserError, match="--limit must be at least 1"):
        load_source("arithmetic", limit=0)


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


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", r"data\.jsonl:2: not valid JSON"),
        ('{"id": "x", "question": "q", "answer": "1"}', r"data\.jsonl:2: expected an object with keys id, question"),
        ('["a", "b"]', r"data\.jsonl:2: expected an object .* found a JSON list"),
        ('{"id": "x", "question": " ", "answer": "1", "source": "s"}', r"jsonl:2: 'question' must be a non-empty"),
        ('{"id": "x", "question": "q", "answer": 1, "source": "s"}', r"jsonl:2: 'answer' must be a non-empty"),
        ('{"id": "a", "question": "r", "answer": "2", "source": "s"}', r"jsonl:2: duplicate id 'a' \(first on line 1"),
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
