"""Evaluation metrics: pass@k against its closed form and brute force; maj@k; a report on a tiny model."""

import itertools
import json
from math import comb
from types import SimpleNamespace

import pytest

import nested_reft.evaluate as evaluate_module
from nested_reft.errors import UserError
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
    assert report["n"] == 4 and report["tokens_per_sec"] > 0
    rows = [json.loads(line) for line in report_path.with_suffix(".examples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["completions"]) == 3 and len(r["correct"]) == 3 for r in rows)
    assert all(r["rewards"]["math"] == [0.0] * 3 and r["reward"] == [0.0] * 3 and r["columns"] == {} for r in rows)
    # The tiny model emits word tokens, never the integer gold answers or a marker: every metric is exactly 0.
    assert report["metrics"] == {"pass@1": 0.0, "pass@k": 0.0, "maj@k": 0.0, "rewards/math/mean": 0.0,
                                 "rewards/format/mean": 0.0}


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


# -- metrics on answers that are sometimes right: completions scripted, everything else real ----------------------

# Gold answer -> the 4 completions "sampled" for it; counted by hand below.
SCRIPT = {
    "7": ["#### 7", "#### 8", "#### 7", "#### 9"],  # 2 correct; majority 7 (2 votes): right
    "3": ["#### 3", "#### 5", "#### 5", "w1 w2"],  # 1 correct; majority 5 (2 votes): wrong
    "4": ["#### 6", "w2", "#### 6", "#### 6"],  # 0 correct; majority 6: wrong
}
HAND = {"pass@1": (2 / 4 + 1 / 4 + 0 / 4) / 3, "pass@k": (1 + 1 + 0) / 3, "maj@k": (1 + 0 + 0) / 3,
        "rewards/math/mean": (2 + 1 + 0) / 12, "rewards/format/mean": (4 + 3 + 3) / 12}


def scripted_generate(tokenizer, completions):
    """A stand-in for the rollout engine that "samples" the given texts, in order, K per prompt."""
    queue = list(completions)

    def generate(model, prompts, *, num_generations, **_):
        texts = [queue.pop(0) for _ in range(len(prompts) * num_generations)]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        return SimpleNamespace(completions=lambda: ids, tokens_generated=sum(map(len, ids)), prefill_seconds=0.01,
                               decode_seconds=0.01)

    return generate


def evaluate_script(tmp_path, monkeypatch, *overrides):
    """`evaluate` with 4 samples per SCRIPT problem, "sampled" from the script; the report."""
    model_dir = write_tiny_model(tmp_path / "model", extra_words=("####", *"0123456789"))
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "question": f"w{i} w3", "answer": gold, "source": "t"}) + "\n"
                            for i, gold in enumerate(SCRIPT)))
    _, tokenizer = evaluate_module.load_model(str(model_dir), device="cpu")
    monkeypatch.setattr(evaluate_module, "generate",
                        scripted_generate(tokenizer, [c for cs in SCRIPT.values() for c in cs]))
    recipe = load_recipe(None, ["data.chat_template=false", "data.system_prompt=null", *overrides])
    return evaluate(str(model_dir), str(data), split="test", limit=None, samples=4, temperature=1.0,
                    max_new_tokens=4, data_cfg=recipe.data, reward_cfg=recipe.reward, dtype="float32",
                    device="cpu", seed=0, report_path=tmp_path / "eval.json")


def test_pass_at_k_and_maj_at_k_on_answers_that_are_sometimes_right(tmp_path, monkeypatch):
    report = evaluate_script(tmp_path, monkeypatch)
    report_path = tmp_path / "eval.json"
    assert report["metrics"] == pytest.approx(HAND)
    rows = [json.loads(line) for line in report_path.with_suffix(".examples.jsonl").read_text().splitlines()]
    assert [sum(r["correct"]) for r in rows] == [2, 1, 0]
    assert rows[1]["predicted"] == ["3", "5", "5", None]


def test_without_math_pass_at_k_counts_totals_that_reach_the_threshold(tmp_path, monkeypatch):
    """Rewarded by `format` alone, a completion is correct when it has a marker (total 1 >= correct_threshold 1):
    4, 3 and 3 of 4. maj@k votes among final answers, which only `math` defines: not reported."""
    report = evaluate_script(tmp_path, monkeypatch, "reward.functions=[{name: format}]", "reward.correct_threshold=1")
    assert report["metrics"] == pytest.approx({"pass@1": (4 / 4 + 3 / 4 + 3 / 4) / 3, "pass@k": 1.0,
                                               "rewards/format/mean": 10 / 12})


def test_pass_at_k_below_k_is_the_unbiased_estimate():
    """k < n: pass@2 from 4 samples with 1 correct is 1 - C(3,2)/C(4,2) = 1/2, not 1."""
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(4, 2, 2) == pytest.approx(1 - 1 / 6)


@pytest.mark.parametrize("samples, temperature", [(4, 0.0), (0, 1.0), (1, -0.5)])
def test_meaningless_sampling_settings_are_refused_before_loading(tmp_path, monkeypatch, samples, temperature):
    def no_model(*_, **__):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(evaluate_module, "load_model", no_model)
    recipe = load_recipe(None)
    with pytest.raises(UserError, match="--samples") as e:
        evaluate("no-such-model", "arithmetic", split="test", limit=2, samples=samples, temperature=temperature,
                 max_new_tokens=4, data_cfg=recipe.data, reward_cfg=recipe.reward, dtype="float32", device="cpu",
                 seed=0, report_path=tmp_path / "r.json")
    if samples == 4:
        assert "identical greedy completions" in str(e.value) and "--temperature" in str(e.value)


def test_greedy_answers_do_not_depend_on_the_batch_size(tmp_path):
    """Left padding, dropped finished rows and batch boundaries must not change what a greedy model answers."""
    model = write_tiny_model(tmp_path / "model")
    data = write_examples(tmp_path / "eval.jsonl", 7)
    recipe = load_recipe(None, ["data.chat_template=false", "data.system_prompt=null"])
    records = []
    for batch_size in (1, 3, 64):
        report_path = tmp_path / f"eval-{batch_size}.json"
        evaluate(str(model), str(data), split="test", limit=None, samples=1, temperature=0.0, max_new_tokens=6,
                 data_cfg=recipe.data, reward_cfg=recipe.reward, dtype="float32", device="cpu", seed=0,
                 report_path=report_path, batch_size=batch_size)
        records.append(report_path.with_suffix(".examples.jsonl").read_text())
    assert records[0] == records[1] == records[2]
    assert len(records[0].splitlines()) == 7
