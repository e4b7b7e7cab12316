"""Recipe validation: typed sections, unknown keys with suggestions, dotted overrides, one-line errors."""

from pathlib import Path

import pytest
import yaml

from nested_reft.errors import UserError
from nested_reft.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_validate_and_round_trip(tmp_path):
    recipe = load_recipe(None)
    again = load_recipe(write(tmp_path, recipe.to_yaml()))
    assert again == recipe


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    assert isinstance(load_recipe(path), Recipe)


def test_unknown_key_suggests_the_closest(tmp_path):
    path = write(tmp_path, "train:\n  stepz: 3\n")
    with pytest.raises(UserError, match=r"train\.stepz: unknown key \(did you mean 'steps'\?\)") as e:
        load_recipe(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_unknown_section_suggests_the_closest(tmp_path):
    with pytest.raises(UserError, match=r"rollotu: unknown key \(did you mean 'rollout'\?\)"):
        load_recipe(write(tmp_path, "rollotu:\n  temperature: 1.0\n"))


def test_wrong_type_names_field_expected_and_found(tmp_path):
    with pytest.raises(UserError, match=r"recipe\.yaml: train\.steps: expected a valid integer.*found 'many'"):
        load_recipe(write(tmp_path, "train:\n  steps: many\n"))


def test_section_that_is_not_a_mapping(tmp_path):
    with pytest.raises(UserError, match=r"train: .*found 3"):
        load_recipe(write(tmp_path, "train: 3\n"))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="invalid YAML"):
        load_recipe(write(tmp_path, "train: [1, 2\n"))
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_overrides_are_typed_like_the_field():
    recipe = load_recipe(None, ["train.steps=3", "skipping.ratio=[0.1, 0.25]", "optimizer.lr=3e-6", "data.eval=null"])
    assert recipe.train.steps == 3
    assert recipe.skipping.ratio == [0.1, 0.25]
    assert recipe.optimizer.lr == pytest.approx(3e-6)
    assert recipe.data.eval is None


def test_bad_overrides_are_one_line_errors():
    with pytest.raises(UserError, match=r"train\.steps \(from --set\): expected a valid integer"):
        load_recipe(None, ["train.steps=three"])
    with pytest.raises(UserError, match=r"trian: unknown key \(did you mean 'train'\?\)"):
        load_recipe(None, ["trian.steps=3"])
    with pytest.raises(UserError, match="expected section.field=value"):
        load_recipe(None, ["train.steps"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("skipping.ratio=1.0", "ratio must be in"),
        ("skipping.ratio_range=[0.4, 0.1]", "ratio_range must satisfy"),
        ("skipping.strategy=fixed", "needs `layers`"),
        ("skipping.strategy=adaptive & skipping.ratio=0.25", "bound it with `ratio_range`"),
        ("skipping.target_kl=0", "greater than 0"),
        ("objective.correction=tis", "expected 'none', 'is'"),
        ("rollout.top_p=0", "greater than 0"),
    ],
)
def test_cross_field_checks(override, message):
    with pytest.raises(UserError, match=message):
        load_recipe(None, override.split(" & "))


def test_ratio_and_ratio_range_are_exclusive():
    assert load_recipe(None, ["skipping.ratio_range=[0.1, 0.4]"]).skipping.ratio_range == (0.1, 0.4)
    with pytest.raises(UserError, match="either ratio or ratio_range"):
        load_recipe(None, ["skipping.ratio=0.2", "skipping.ratio_range=[0.1, 0.4]"])


def test_resolved_yaml_is_complete():
    dumped = yaml.safe_load(load_recipe(None, ["train.steps=7"]).to_yaml())
    assert set(dumped) == set(Recipe.model_fields)
    assert dumped["train"]["steps"] == 7
