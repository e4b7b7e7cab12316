"""A recipe's input paths are relative to its folder; run.output_dir and --set values to the current folder."""

import pytest

from nested_reft.recipe import load_recipe


@pytest.fixture
def recipe_dir(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "recipes"
    folder.mkdir(parents=True)
    (folder / "local-model").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recipe is run from another folder
    return folder


def write(folder, text):
    path = folder / "r.yaml"
    path.write_text(text)
    return path


def test_input_paths_resolve_against_the_recipes_folder(recipe_dir):
    project = recipe_dir.parent
    recipe = load_recipe(write(recipe_dir, """
run: {output_dir: runs/x}
model: {name_or_path: local-model}
data:
  train: ../data/train.jsonl
  eval: {source: ./raw/test.csv, question_field: q, answer_field: a}
skipping: {strategy: calibrated, calibration_file: ../reports/calibration.json}
reward:
  functions:
    - {name: math}
    - {name: ../rewards/mine.py:short, weight: 0.5}
    - {name: my_package.rewards:judge}
"""))
    assert recipe.data.train == str(project / "data" / "train.jsonl")
    assert recipe.data.eval.source == str(recipe_dir / "raw" / "test.csv")
    assert recipe.skipping.calibration_file == str(project / "reports" / "calibration.json")
    assert [f.name for f in recipe.reward.functions] == [
        "math", f"{project / 'rewards' / 'mine.py'}:short", "my_package.rewards:judge"]
    assert recipe.model.name_or_path == str(recipe_dir / "local-model")  # a folder beside the recipe
    assert recipe.run.output_dir == "runs/x"  # outputs go where the command runs


@pytest.mark.parametrize("name", ["arithmetic", "gsm8k", "openai/gsm8k:main", "owner/name"])
def test_sources_that_are_names_are_left_alone(recipe_dir, name):
    assert load_recipe(write(recipe_dir, f"data: {{train: '{name}', eval: null}}\n")).data.train == name


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "Qwen/Qwen2.5-Math-1.5B-Instruct"])
def test_model_names_that_are_not_beside_the_recipe_are_left_alone(recipe_dir, name):
    assert load_recipe(write(recipe_dir, f"model: {{name_or_path: '{name}'}}\n")).model.name_or_path == name


def test_set_values_and_absolute_paths_are_taken_as_they_are(recipe_dir, tmp_path):
    absolute = tmp_path / "abs.jsonl"
    recipe = load_recipe(write(recipe_dir, f"data: {{train: '{absolute}', eval: null}}\n"),
                         ["skipping.calibration_file=reports/c.json", "reward.functions=[{name: 'r.py:f'}]"])
    assert recipe.data.train == str(absolute)
    assert recipe.skipping.calibration_file == "reports/c.json"  # relative to the shell's folder
    assert recipe.reward.functions[0].name == "r.py:f"
