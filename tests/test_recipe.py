"""Recipe validation: typed sections, unknown keys with suggestions, dotted overrides, one-line errors."""

from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from nested_reft.errors import UserError
from nested_reft.objective import CorrectionConfig, LossConfig, group_advantages
from nested_reft.recipe import ObjectiveConfig, Recipe, load_recipe
from nested_reft.skipping import SkipSampler

CORRECTIONS = list(ObjectiveConfig.model_fields["correction"].annotation.__args__)

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
        # Refused inside the first update before these were recipe checks (the model had loaded by then).
        ("rollout.num_generations=1", r"num_generations \(from --set\): expected greater than or equal to 2.*G >= 2"),
        ("objective.epsilon=1.0", r"objective\.epsilon \(from --set\): expected less than 1"),
        ("objective.mask_low=3.0", r"mask_low must be <= mask_high, found 3\.0 > 2\.0"),
        ("optimizer.betas=[0.9, 1.0]", r"betas must each be in \[0, 1\)"),  # AdamW's own check, after loading
        ("rollout.temperature=0", "greater than 0.*identical"),
        ("skipping.layers=[3, 3]", "distinct layer indices"),
        ("skipping.layers=[-1]", "distinct layer indices >= 0"),
        ("train.max_nonfinite_steps=0", "greater than or equal to 1"),
        ("train.report_to=[mlflow]", "expected 'tensorboard' or 'wandb'"),
        ("train.report_to=[wandb, wandb]", "names a tracker twice"),
        ("run.output_dir=''", r"run\.output_dir.*at least 1 character"),
        ("train.report_to=mlflow", "expected 'tensorboard' or 'wandb'"),
        ("data.train=''", r"data\.train \(from --set\): .*at least 1 character"),
        ("data.train={sourc: x.csv}", r"data\.train\.sourc: unknown key \(did you mean 'source'\?\)"),
        ("data.eval={source: o/n, answer_format: latex}", r"data\.eval\.answer_format: expected 'gsm8k', 'boxed'"),
        ("reward.functions=[{name: maths}]", r"reward\.functions\.0: unknown reward function 'maths': did you mean "
         r"'math'\? expected a built-in \(math, format, soft_overlong, length, repetition\), path/to/file\.py:function"),
        ("reward.functions=[{name: soft_overlong, cach: 8}]", r"soft_overlong: unknown parameter 'cach', did you mean "
         r"'cache'\? \(parameters of soft_overlong: cache, max_length\)"),
        ("reward.functions=[{name: soft_overlong}]", r"soft_overlong: cache is required"),
        ("reward.functions=[{name: repetition, ngram_size: 0}]", r"repetition: ngram_size: expected greater than or "
         r"equal to 1, found 0"),
        ("reward.functions=[{name: math, weight: .inf}]", r"reward\.functions\.0\.weight: expected a finite number"),
        ("reward.functions=[]", r"list at least one reward function"),
        ("reward.functions=[{name: math}] & reward.format_weight=0.1", r"format_weight \(0\.1\) applies only without "
         r"`functions`; list \{name: format, weight: 0\.1\} among them instead"),
    ],
)
def test_cross_field_checks(override, message):
    with pytest.raises(UserError, match=message) as e:
        load_recipe(None, override.split(" & "))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("value", "expected"), [("wandb", ["wandb"]), ("none", []), ("[tensorboard, wandb]",
                                                  ["tensorboard", "wandb"])])
def test_report_to_takes_one_tracker_alone_as_trl_does(value, expected):
    assert load_recipe(None, [f"train.report_to={value}"]).train.report_to == expected


def test_periodic_evaluation_needs_an_eval_set():
    with pytest.raises(UserError, match=r"train\.eval_every=5 needs data\.eval, which is null"):
        load_recipe(None, ["train.eval_every=5", "data.eval=null"])
    assert load_recipe(None, ["train.eval_every=0", "data.eval=null"]).data.eval is None


@pytest.mark.parametrize(
    "content, message",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file, not a YAML recipe"),
        ("train:\n  steps: 3  # caf\u00e9\n".encode("latin-1"), r"not UTF-8 text \(byte 24"),
        (b"\xff\xfe t\x00r\x00a\x00i\x00n\x00", "binary file"),  # UTF-16
    ],
    ids=["binary", "latin-1", "utf-16"],
)
def test_a_recipe_that_is_not_utf8_text_is_a_one_line_error(tmp_path, content, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        load_recipe(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_folder_is_not_a_recipe(tmp_path):
    with pytest.raises(UserError, match="is a folder; expected a recipe YAML file"):
        load_recipe(tmp_path)


def test_ratio_and_ratio_range_are_exclusive():
    assert load_recipe(None, ["skipping.ratio_range=[0.1, 0.4]"]).skipping.ratio_range == (0.1, 0.4)
    with pytest.raises(UserError, match="either ratio or ratio_range"):
        load_recipe(None, ["skipping.ratio=0.2", "skipping.ratio_range=[0.1, 0.4]"])


def test_resolved_yaml_is_complete():
    dumped = yaml.safe_load(load_recipe(None, ["train.steps=7"]).to_yaml())
    assert set(dumped) == set(Recipe.model_fields)
    assert dumped["train"]["steps"] == 7


# -- what a valid recipe promises: nothing that only the recipe decides is refused later ---------------------------

_NUMBERS = st.one_of(st.sampled_from([-1.0, 0.0, 0.5, 0.999, 1.0, 1.5, 2.0]), st.floats(-2, 5, allow_nan=False))


@settings(max_examples=300, deadline=None)
@given(epsilon=_NUMBERS, epsilon_high=st.one_of(st.none(), _NUMBERS), beta=_NUMBERS, threshold=_NUMBERS,
       mask_low=_NUMBERS, mask_high=_NUMBERS, retrace_lambda=_NUMBERS, length=st.integers(-1, 3),
       loss_type=st.sampled_from(["grpo", "dr_grpo", "dapo"]), correction=st.sampled_from(CORRECTIONS),
       generations=st.integers(0, 4))
def test_objective_accepts_every_recipe_that_validates(epsilon, epsilon_high, beta, threshold, mask_low, mask_high,
                                                       retrace_lambda, length, loss_type, correction, generations):
    """The trainer builds LossConfig/CorrectionConfig and group advantages from the recipe after the model has
    loaded: whatever the recipe accepts, they must accept too (else the error comes minutes late)."""
    overrides = [f"objective.epsilon={epsilon}", f"objective.epsilon_high={'null' if epsilon_high is None else epsilon_high}",
                 f"objective.beta={beta}", f"objective.is_threshold={threshold}", f"objective.mask_low={mask_low}",
                 f"objective.mask_high={mask_high}", f"objective.retrace_lambda={retrace_lambda}",
                 f"objective.loss_type={loss_type}", f"objective.correction={correction}",
                 f"rollout.max_completion_length={length}", f"rollout.num_generations={generations}"]
    try:
        recipe = load_recipe(None, overrides)
    except UserError:
        return
    obj = recipe.objective
    CorrectionConfig(kind=obj.correction, threshold=obj.is_threshold, mask_low=obj.mask_low, mask_high=obj.mask_high,
                     retrace_lambda=obj.retrace_lambda)
    LossConfig(loss_type=obj.loss_type, epsilon=obj.epsilon, epsilon_high=obj.epsilon_high, beta=obj.beta,
               max_completion_length=recipe.rollout.max_completion_length)
    group_advantages(torch.zeros(2 * recipe.rollout.num_generations), recipe.rollout.num_generations,
                     recipe.objective.scale_rewards)


@settings(max_examples=300, deadline=None)
@given(strategy=st.sampled_from(["random", "contiguous", "fixed"]),
       ratio=st.one_of(_NUMBERS, st.lists(_NUMBERS, max_size=3)),
       ratio_range=st.one_of(st.none(), st.tuples(_NUMBERS, _NUMBERS)),
       layers=st.one_of(st.none(), st.lists(st.integers(-2, 10), max_size=4)),
       keep_first=st.integers(-1, 3), keep_last=st.integers(-1, 3))
def test_skip_sampler_accepts_every_recipe_that_validates(strategy, ratio, ratio_range, layers, keep_first, keep_last):
    """Model-independent skipping settings are checked by the recipe; the sampler (built once the model is loaded)
    may only refuse what depends on the model's depth. With 12 layers, every drawn index and keep fits."""
    overrides = [f"skipping.strategy={strategy}", f"skipping.ratio={ratio}",
                 f"skipping.ratio_range={'null' if ratio_range is None else list(ratio_range)}",
                 f"skipping.layers={'null' if layers is None else layers}", f"skipping.keep_first={keep_first}",
                 f"skipping.keep_last={keep_last}"]
    try:
        recipe = load_recipe(None, overrides)
    except UserError:
        return
    SkipSampler.from_config(recipe.skipping, num_layers=12, seed=0).sample()


def test_lora_dropout_is_refused_in_one_line(tmp_path):
    """RL compares log-probs of the same tokens across passes (q, and the importance weights): dropout's random
    masks would make them noise, so training runs without it and a recipe that asks for it is told why."""
    with pytest.raises(UserError, match=r"model\.lora \(from --set\): dropout must be 0, found 0\.05"):
        load_recipe(None, ["model.lora={r: 8, dropout: 0.05}"])
    assert load_recipe(None, ["model.lora={r: 8, dropout: 0.0}"]).model.lora.dropout == 0.0
