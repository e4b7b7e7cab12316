"""`nested-reft recipe`: the fully resolved recipe, which train takes back as it is."""

import yaml

from nested_reft.recipe import load_recipe

from .test_cli import assert_one_line_error, run_cli


def test_prints_the_resolved_recipe_that_train_would_record(tmp_path, capsys, monkeypatch):
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text("data: {train: ../data/train.jsonl, eval: null}\nmodel: {mixed_precision: auto}\n")
    monkeypatch.chdir(tmp_path / "recipes")
    code, out, _ = run_cli(["recipe", str(recipe), "--set", "train.steps=3", "--set", "model.device=cpu"], capsys)
    assert code in (0, None)
    printed = yaml.safe_load(out)
    assert printed["train"]["steps"] == 3 and printed["optimizer"]["lr"] == 1e-6  # overrides and defaults
    assert printed["data"]["train"] == str(tmp_path / "data" / "train.jsonl")  # absolute, against the recipe
    assert printed["model"]["mixed_precision"] in ("no", "bf16")  # `auto` resolved for this machine
    again = tmp_path / "again.yaml"
    again.write_text(out)
    assert load_recipe(again).to_yaml() == out  # a recipe train takes back unchanged


def test_a_bad_recipe_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["recipe", "--set", "reward.functions=[{name: maths}]"], capsys)
    assert_one_line_error(code, err, "unknown reward function 'maths'", "did you mean 'math'")
