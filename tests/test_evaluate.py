"""Evaluation metrics: pass@k against its closed form and brute force; maj@k; a report on a tiny model."""

import itertools
import json
from math import comb

import pytest

from nested_reft.evaluate import evaluate, majority_correct, pass_at_k
from nested_reft.recipe import load_recipe

from .tiny import write_examples, write_tiny_model


@pytest.mark.parametrize("n, c, k", [(n, c, k) for n in range(1, 9) for c in range(n + 1) for k in range(1, n + 1)])
def test_pass_at_k_matches_closed_form_and_enumeration(n, c, k):
    closed = 1 - comb(n - c, k) / comb(n, k)
    # Brute force: the fraction of all k-subsets of the n samples that contain at least one correct sample.
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    enumerated = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(enumerated, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_groups_equivalent_answers():
    # "1/2" and "0.5" are one answer (2 votes) and beat "3" (1 vote), whatever the order.
    assert majority_correct(["3", "1/2", "0.5"], [False, True, True], timeout_s=2.0)
    assert not majority_correct(["3", "3", "0.5", None], [False, False, True, False], timeout_s=2.0)
    assert not majority_correct([None, None], [False, False], timeout_s=2.0)
    assert majority_correct(["7", "8"], [True, False], timeout_s=2.0)  # a tie goes to the first answer


def test_evaluate_writes_report_and_examples(tmp_path):
    model = write_tiny_model(tmp_path / "model")
    data = write_examples(tmp_path / "eval.jsonl", 5)
    recipe = load_recipe(None, ["data.chat_template=false", "data.system_prompt=null", "model.device=cpu"])
    report_path = tmp_path / "reports" / "eval.json"
    report = evaluate(str(model), str(data), split="test", limit=4, samples=3, temperature=1.0, max_new_tokens=4,
                      data_cfg=recipe.data, reward_cfg=recipe.reward, dtype="float32", device="cpu", seed=0,
                      report_path=report_path)
    assert json.loads(report_path.read_text()) == report
    assert {"model", "data", "settings", "metrics", "n", "seconds", "tokens_per_sec"} <= set(report)
    assert set(report["metrics"]) == {"pass@1", "pass@k", "maj@k"}
    assert report["n"] == 4 and report["tokens_per_sec"] > 0
    rows = [json.loads(line) for line in report_path.with_suffix(".examples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["completions"]) == 3 and len(r["correct"]) == 3 for r in rows)
    # The tiny model emits word tokens, never the integer gold answers: every metric is exactly 0.
    assert report["metrics"] == {"pass@1": 0.0, "pass@k": 0.0, "maj@k": 0.0}


def test_evaluate_compare_reports_both_models_on_the_same_problems(tmp_path, capsys):
    from .test_cli import run_cli

    first, second = write_tiny_model(tmp_path / "a"), write_tiny_model(tmp_path / "b", seed=1)
    data = write_examples(tmp_path / "eval.jsonl", 5)
    report = tmp_path / "eval.json"
    code, _, err = run_cli(["evaluate", "--model", str(first), "--compare", str(second), "--data", str(data),
                              "--limit", "3", "--max-new-tokens", "3", "--report", str(report),
                              "--set", "data.chat_template=false", "--set", "data.system_prompt=null",
                              "--set", "model.device=cpu"], capsys)
    assert code in (0, None), err
    ours, theirs = json.loads(report.read_text()), json.loads((tmp_path / "eval.compare.json").read_text())
    assert (ours["model"], theirs["model"]) == (str(first), str(second))
    assert ours["n"] == theirs["n"] == 3 and ours["settings"] == theirs["settings"]
