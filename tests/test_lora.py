"""LoRA adapters (peft): only adapters train, the reference is the adapter-free base, checkpoints are adapter
folders that peft, `load_model`, `evaluate` and `export` read."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nested_reft import lora, trainer
from nested_reft.models import load_model
from nested_reft.trainer import train

from .test_cli import run_cli
from .test_trainer import assert_same_run, starts_with_target, target_id, tiny_recipe, train_until
from .tiny import write_examples, write_tiny_model

LORA = "model.lora={r: 4, alpha: 8, target_modules: all-linear}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return write_tiny_model(root / "model"), write_examples(root / "train.jsonl", 24)


@pytest.fixture
def captured(monkeypatch):
    """The model object the trainer attaches adapters to (the one it trains)."""
    seen = {}
    real = lora.attach

    def attach(model, *args, **kwargs):
        seen["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(trainer.lora, "attach", attach)
    return seen


def test_only_adapters_train_and_base_weights_stay_bit_identical(inputs, tmp_path, captured):
    model_dir, data = inputs
    run = train(tiny_recipe(model_dir, data, tmp_path / "run", LORA, "train.steps=2", "skipping.ratio=0.25"),
                reward_fn=starts_with_target(target_id(model_dir)))
    assert not any(r["update_skipped"] for r in run.read_metrics())  # both steps updated something
    model = captured["model"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    start = load_file(model_dir / "model.safetensors")
    state = {name.replace(".base_layer", ""): p for name, p in model.named_parameters() if not p.requires_grad}
    assert state.keys() == start.keys()
    assert all(torch.equal(state[k], start[k]) for k in start)  # the base: bit for bit
    lora_b = [p for n, p in model.named_parameters() if ".lora_B." in n]
    assert all(p.abs().max() > 0 for p in lora_b)  # B starts at 0: every adapter has moved


def test_checkpoint_is_a_peft_adapter_folder_that_loads_everywhere(inputs, tmp_path, capsys):
    model_dir, data = inputs
    run = train(tiny_recipe(model_dir, data, tmp_path / "run", LORA, "train.steps=2"),
                reward_fn=starts_with_target(target_id(model_dir)))
    folder = run.latest_checkpoint()
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "model.safetensors").exists()  # adapters only
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(model_dir)

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), folder).eval()
    merged, _ = load_model(str(folder), device="cpu")  # the one loading path merges the adapters
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
    assert not torch.allclose(base, expected, atol=1e-4)  # the adapters do change the model

    code, out, err = run_cli(["evaluate", "--set", "data.chat_template=false", "--set", "data.system_prompt=null",
                              "--model", str(run.root), "--data", str(data), "--limit", "3",
                              "--max-new-tokens", "3"], capsys)
    assert code in (0, None), err
    assert json.loads((run.root / "reports" / "evaluate.json").read_text())["n"] == 3

    export = tmp_path / "merged"
    code, out, err = run_cli(["export", str(run.root), "--out", str(export)], capsys)
    assert code in (0, None), err
    exported = AutoModelForCausalLM.from_pretrained(export).eval()  # plain transformers, no peft
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-5)


def test_resume_with_lora_is_bit_identical(inputs, tmp_path):
    model_dir, data = inputs
    common = [LORA, "train.steps=3", "train.save_every=1", "skipping.ratio=0.25"]
    reward = starts_with_target(target_id(model_dir))
    full = train(tiny_recipe(model_dir, data, tmp_path / "full", *common), reward_fn=reward)
    recipe = tiny_recipe(model_dir, data, tmp_path / "resumed", *common)
    train_until(recipe, 2, reward)
    assert_same_run(full, train(recipe, resume=True, reward_fn=reward), weights="adapter_model.safetensors")


def test_reference_is_the_base_with_adapters_disabled(inputs, tmp_path, monkeypatch):
    """beta > 0 with LoRA loads no second model: the reference is the policy with its adapters switched off. Once
    a step has made the adapters non-zero, the reference computes the base model's logits and the policy does
    not; so the KL to the reference is 0 at step 1 (LoRA's B starts at 0) and positive at step 2."""
    model_dir, data = inputs
    loads, attached = [], []
    real_load, real_attach = trainer.load_model, lora.attach
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    monkeypatch.setattr(trainer.lora, "attach", lambda *a, **k: attached.append(real_attach(*a, **k)) or attached[0])
    recipe = tiny_recipe(model_dir, data, tmp_path / "run", LORA, "train.steps=2", "objective.beta=0.1",
                         "optimizer.lr=1e-1")
    rows = train(recipe, reward_fn=starts_with_target(target_id(model_dir))).read_metrics()
    assert len(loads) == 1  # the policy only: no reference copy
    assert rows[0]["kl_ref"] == 0.0 and rows[1]["kl_ref"] > 0

    adapters = attached[0]
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()(input_ids=ids).logits
        policy = adapters.peft_model.get_base_model()(input_ids=ids).logits  # the trained model, adapters on
        with adapters.reference() as reference:
            torch.testing.assert_close(reference(input_ids=ids).logits, base)
    assert not torch.allclose(policy, base, atol=1e-3)  # the adapters have moved: the check above means something


def test_lora_recipe_errors_are_one_line_before_training(inputs, tmp_path):
    model_dir, data = inputs
    from nested_reft.errors import UserError

    with pytest.raises(UserError, match="model.lora: .*nonexistent"):
        train(tiny_recipe(model_dir, data, tmp_path / "run", "model.lora={target_modules: [nonexistent]}"))
