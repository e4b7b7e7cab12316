"""The training loop on tiny random models: it learns, with and without skipping, and resumes bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nested_reft.recipe import load_recipe
from nested_reft.trainer import PromptStream, lr_lambda, train

from .tiny import TARGET_WORD, write_examples, write_tiny_model


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_examples(root / "train.jsonl", 24)


def tiny_recipe(model_dir, data, out, *overrides):
    return load_recipe(None, [
        f"run.output_dir={out}", f"model.name_or_path={model_dir}", "model.device=cpu",
        f"data.train={data}", "data.eval=null", "data.chat_template=false", "data.system_prompt=null",
        "rollout.num_generations=8", "rollout.max_completion_length=3", "rollout.temperature=1.0",
        "objective.correction=token_tis", "optimizer.lr=3e-2", "optimizer.max_grad_norm=10.0",
        "train.prompts_per_step=4", "train.micro_batch_size=16", "train.save_every=100",
        "train.log_rollouts_every=0", *overrides,
    ])


def starts_with_target(tokenizer_vocab_id):
    def reward(_text, ids, _example):
        hit = bool(ids) and ids[0] == tokenizer_vocab_id
        return float(hit), hit

    return reward


def target_id(model_dir):
    vocab = json.loads((model_dir / "tokenizer.json").read_text())["model"]["vocab"]
    return vocab[TARGET_WORD]


# -- learning: reward 1 when the completion starts with one given word (chance: 1/16) ------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(["skipping.ratio=0.0", "objective.correction=none"], id="baseline-no-skipping"),
        pytest.param(["skipping.ratio=0.25", "objective.correction=token_tis"], id="skip-token_tis"),
        pytest.param(["skipping.ratio=0.25", "objective.correction=seq_mask", "objective.mask_low=0.2",
                      "objective.mask_high=5.0"], id="skip-seq_mask"),
        pytest.param(["skipping.ratio=0.25", "objective.correction=retrace"], id="skip-retrace"),
        pytest.param(["skipping.ratio=0.0", "objective.correction=none", "model.mixed_precision=bf16"],
                     id="baseline-bf16"),
        pytest.param(["skipping.ratio=0.25", "objective.correction=token_tis", "model.mixed_precision=bf16",
                      "train.gradient_checkpointing=true"], id="skip-token_tis-bf16-checkpointing"),
    ],
)
def test_policy_learns_a_rewarded_first_token(tiny_run_inputs, tmp_path, overrides):
    model_dir, data = tiny_run_inputs
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", "train.steps=40", *overrides)
    rows = []

    def stop_when_learned(row):
        rows.append(row)
        if len(rows) >= 3 and sum(r["reward_mean"] for r in rows[-3:]) / 3 >= 0.8:
            raise StopIteration

    with pytest.raises(StopIteration):
        train(recipe, reward_fn=starts_with_target(target_id(model_dir)), on_step=stop_when_learned)
    assert rows[0]["reward_mean"] < 0.4  # it starts near chance...
    assert sum(r["reward_mean"] for r in rows[-3:]) / 3 >= 0.8  # ...and learns within 40 steps
    if "skipping.ratio=0.25" in overrides:
        assert all(len(r["skipped_layers"]) == 1 for r in rows)  # round(0.25 * 4) = 1 of the 2 eligible layers
        assert all(r["kl_mu_pi"] != 0.0 for r in rows)  # the behavior model really differs from the policy
        assert all("sampler_lp_abs_diff" not in r for r in rows)  # only measured when nothing is skipped
    else:
        assert all(r["kl_mu_pi"] == 0.0 and r["weight_min"] == r["weight_max"] == 1.0 for r in rows)  # on-policy
        # What the substitution lp_b := lp_old hides: rounding in float32 (measured ~1e-6), more in bf16.
        mismatch = [r["sampler_lp_abs_diff"] for r in rows]
        if "model.mixed_precision=bf16" in overrides:
            assert all(0 < m < 0.1 for m in mismatch)
        else:
            assert all(m < 1e-4 for m in mismatch)


def test_metrics_rows_hold_every_documented_field(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", "train.steps=2", "skipping.ratio=0.25",
                         "train.log_rollouts_every=1", "train.save_every=1", "train.keep_last=1")
    run = train(recipe, reward_fn=starts_with_target(target_id(model_dir)))
    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [1, 2]
    expected = {"reward_mean", "reward_std", "accuracy", "completion_length", "frac_reward_zero_std", "skip_ratio",
                "skipped_layers", "weight_mean", "weight_min", "weight_max", "frac_masked", "ess", "kl_mu_pi",
                "loss", "grad_norm", "lr", "time_generate", "time_score", "time_train", "rollout_tokens_per_sec",
                "peak_memory_mb"}
    assert expected <= set(rows[0])
    assert (run.rollouts_dir / "step-2.jsonl").is_file()
    assert [p.name for p in run.checkpoints()] == ["step-2"]  # keep_last=1
    model = AutoModelForCausalLM.from_pretrained(run.latest_checkpoint())
    assert model.config.num_hidden_layers == 4


def test_periodic_evaluation_is_logged(tiny_run_inputs, tmp_path):
    model_dir, data = tiny_run_inputs
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", "train.steps=2", f"data.eval={data}",
                         "data.eval_limit=3", "train.eval_every=2")
    run = train(recipe, reward_fn=starts_with_target(target_id(model_dir)))
    rows = run.read_metrics()
    assert "eval_pass@1" not in rows[0] and rows[1]["eval_pass@1"] == 0.0  # word tokens never match the gold numbers
    report = json.loads((run.reports_dir / "eval-step-2.json").read_text())
    assert report["n"] == 3 and report["metrics"]["pass@1"] == rows[1]["eval_pass@1"]


def test_reference_kl_and_several_iterations(tiny_run_inputs, tmp_path):
    """beta > 0 loads the frozen reference; with 2 passes per batch the second pass has moved away from it."""
    model_dir, data = tiny_run_inputs
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", "train.steps=2", "skipping.ratio=0.25",
                         "objective.beta=0.1", "objective.num_iterations=2", "train.micro_batch_size=5")
    rows = train(recipe, reward_fn=starts_with_target(target_id(model_dir))).read_metrics()
    assert all(r["kl_ref"] > 0 for r in rows)
    assert rows[-1]["lr"] == pytest.approx(3e-2)


# -- exact resume ---------------------------------------------------------------------------------------------------


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("num_examples, stop_after, precision", [
    (10, 2, []), (8, 2, []), (10, 2, ["model.mixed_precision=bf16", "train.gradient_checkpointing=true"]),
], ids=["mid-epoch", "at-epoch-boundary", "mid-epoch-bf16-checkpointing"])
def test_resume_is_bit_identical(tiny_run_inputs, tmp_path, num_examples, stop_after, precision):
    """Stop after `stop_after` steps, resume, and end with exactly the weights of an uninterrupted run.
    With 8 examples and 4 prompts per step, step 2 ends exactly at the end of the first epoch. In bf16 the
    checkpoint holds the float32 masters, so the resumed run continues from exactly the same state."""
    model_dir, _ = tiny_run_inputs
    data = write_examples(tmp_path / "train.jsonl", num_examples)
    common = ["train.steps=4", "train.save_every=1", "skipping.ratio_range=[0.0, 0.5]", "optimizer.warmup_steps=2",
              "optimizer.schedule=cosine", *precision]
    reward = starts_with_target(target_id(model_dir))

    full = train(tiny_recipe(model_dir, data, tmp_path / "full", *common), reward_fn=reward)

    def interrupt(row):
        if row["step"] == stop_after:
            raise Interrupt

    resumed_recipe = tiny_recipe(model_dir, data, tmp_path / "resumed", *common)
    with pytest.raises(Interrupt):
        train(resumed_recipe, reward_fn=reward, on_step=interrupt)
    resumed = train(resumed_recipe, resume=True, reward_fn=reward)

    a = load_file(full.latest_checkpoint() / "model.safetensors")
    b = load_file(resumed.latest_checkpoint() / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time_", "rollout_tokens", "peak"))}
                          for r in rows]
    assert strip(full.read_metrics()) == strip(resumed.read_metrics())


# -- precision --------------------------------------------------------------------------------------------------


def test_bf16_run_keeps_updates_of_lr_1e_7_and_records_the_resolved_precision(tiny_run_inputs, tmp_path, monkeypatch):
    """`auto` on a CPU with native bf16 (probes patched) trains in bf16: recipe.yaml records bf16, and the
    checkpoint holds float32 masters that moved under lr 1e-7, mostly by less than bf16 could represent."""
    from nested_reft import precision

    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: True)
    model_dir, data = tiny_run_inputs
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", "train.steps=2", "model.mixed_precision=auto",
                         "optimizer.lr=1e-7", "skipping.ratio=0.0", "train.save_every=2")
    run = train(recipe, reward_fn=lambda _t, ids, _e: (float(ids[0] % 2), False))  # rewards differ within groups
    written = run.recipe_path.read_text()
    assert "mixed_precision: bf16" in written and "gradient_checkpointing: false" in written
    start = load_file(model_dir / "model.safetensors")
    end = load_file(run.latest_checkpoint() / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in end.values())
    moved = {k: (end[k] - start[k]).abs() for k in start}
    assert sum(int((d > 0).sum()) for d in moved.values()) > 0.5 * sum(d.numel() for d in moved.values())
    # Each weight moved by at most ~2 lr (two Adam steps), which for most weights is under half a bf16 spacing
    # (2^(floor(log2 |w|) - 8)): bf16 weights updated directly would have rounded those moves away.
    assert max(float(d.max()) for d in moved.values()) < 3e-7
    lost_in_bf16 = sum(int(((d > 0) & (d < 2.0 ** (torch.floor(torch.log2(start[k].abs())) - 8))).sum())
                       for k, d in moved.items())
    assert lost_in_bf16 > 0.5 * sum(d.numel() for d in moved.values())
    rows = run.read_metrics()
    assert all(r["weight_min"] == r["weight_max"] == 1.0 for r in rows)  # baseline stays exactly on-policy
    assert all(r["sampler_lp_abs_diff"] > 0 for r in rows)


# -- components -----------------------------------------------------------------------------------------------------


def test_prompt_stream_reshuffles_each_epoch_and_restores(tmp_path):
    from nested_reft.data import read_examples

    examples = read_examples(write_examples(tmp_path / "d.jsonl", 5))
    stream = PromptStream(examples, seed=3)
    first_epoch = stream.next(5)
    assert sorted(e.id for e in first_epoch) == sorted(e.id for e in examples)
    state = stream.state_dict()
    second = stream.next(7)
    again = PromptStream(examples, seed=3)
    again.load_state_dict(state)
    assert [e.id for e in again.next(7)] == [e.id for e in second]


def test_lr_schedule_warmup_then_constant_or_cosine():
    constant = lr_lambda(2, 10, "constant")
    assert [constant(s) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]
    cosine = lr_lambda(0, 10, "cosine")
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.5) and cosine(10) == pytest.approx(0.0)
