"""Recipes: one YAML file, validated into typed configuration.

A recipe has one section per concern (run, model, data, rollout, skipping, objective, reward, optimizer,
train). Every field has a default, so a recipe only states what differs. Names follow TRL's GRPOConfig where
users already know them (`num_generations`, `epsilon`, `beta`, `loss_type`, `scale_rewards`, ...).

Validation is pydantic's; this module only turns its errors into one line naming the file, the dotted field
path, what was expected and what was found, with a "did you mean" for misspelt keys. Every constraint that the
recipe alone decides is checked here, when it loads, so a bad value never waits for a model to load before it
fails. What depends on the model (`keep_first + keep_last` against its number of layers, `fixed` layer indices
past its last layer, a calibration profile for another depth) can only be checked once the model's config is
known: `nested_reft.preflight` does that from `config.json` when it can, the skip sampler otherwise. Command-line overrides
(`--set train.steps=3`) are parsed as YAML scalars and merged before validation, so they are typed exactly
like the field they set.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, ValidationError
from pydantic import field_validator, model_validator

from nested_reft.errors import UserError
from nested_reft.recipe_errors import describe_validation_error
from nested_reft.recipe_paths import resolve_recipe_paths
from nested_reft.rewards.builtin import BUILTINS
from nested_reft.rewards.user import split_ref

ReportTo = Literal["tensorboard", "wandb"]
NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]

class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    output_dir: str = Field("runs/quickstart", min_length=1, description="The run directory (recipe, metrics, checkpoints, reports).")
    seed: int = Field(0, description="Seeds data order, skip sets, sampling and initialisation.")


class LoraSettings(Section):
    """LoRA adapters (peft): only they train; the base model stays frozen."""

    r: int = Field(16, ge=1, description="Rank of each adapter.")
    alpha: float = Field(32.0, gt=0.0, description="Scaling numerator: the update is (alpha / r) * B A.")
    dropout: float = Field(
        0.0, description="Must be 0: RL compares log-probs of the same tokens across passes, and dropout's random "
        "masks would make every ratio noise (training turns all dropout off, as verl and OpenRLHF do)."
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]), or 'all-linear' (every linear "
        "layer but the LM head)."
    )

    @model_validator(mode="after")
    def _check(self) -> LoraSettings:
        if self.dropout != 0.0:
            raise ValueError(f"dropout must be 0, found {self.dropout}: the importance ratios and PPO's q compare "
                             "log-probs of one deterministic policy, and training turns every dropout off")
        if isinstance(self.target_modules, list) and (not self.target_modules or not all(self.target_modules)):
            raise ValueError("target_modules must name at least one module")
        return self


class ModelConfig(Section):
    name_or_path: str = Field(
        "smollm2-135m-instruct",
        min_length=1,
        description="Embedded alias, local Hugging Face folder, .gguf file, run directory or hub id.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Storage dtype: the weights as loaded, the optimiser's master weights, and checkpoints.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    lora: LoraSettings | None = Field(None, description="LoRA adapters {r, alpha, dropout, target_modules}; null: "
                                      "full fine-tuning.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "no",
        description="Compute dtype of forwards and backwards (accelerate's names). auto: bf16 where the hardware "
        "computes it natively (CUDA with bf16, a CPU with AMX-BF16/AVX512-BF16), else no. With dtype float32, "
        "bf16/fp16 keep float32 master weights; fp16 needs CUDA. Run directories record the resolved value.",
    )

    head_dtype: Literal["auto", "float32", "compute"] = Field(
        "auto",
        description="Under mixed precision, the LM head's matmul: float32 (float32 weights and logits) or compute "
        "(the compute dtype, float32 master kept); log-softmax and log-probs are float32 either way. auto: compute "
        "(measured on SmolLM2 in bf16: decode steps 1.17x faster, sampler-vs-trainer bias unchanged at 0.003 "
        "nats/token; benchmarks/head_dtype.py). Run directories record the resolved value.",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `no` (in a recipe or --set) as the boolean false.
        return "no" if value is False else value


class DataSource(Section):
    """A data set whose fields need naming (a hub data set, a raw local file), as prepare-data's flags name them."""

    source: str = Field(min_length=1, description="A preset, a hub data set id (owner/name[:config]) or a local "
                        ".jsonl/.json/.csv/.parquet file.")
    question_field: str | None = Field(None, description="prepare-data's --question-field: the field(s) holding the "
                                       "question (comma-separated: joined). Default: a preset's own, else `question`.")
    answer_field: str | None = Field(None, description="prepare-data's --answer-field. Default: a preset's own, else "
                                     "`answer`.")
    answer_format: Literal["gsm8k", "boxed", "plain"] | None = Field(
        None, description="prepare-data's --answer-format. Default: a preset's own, or detected in a local file."
    )

    def __str__(self) -> str:
        return self.source


# A file or SOURCE name, or a DataSource mapping; tagged by the input's shape, so that an error names one of them.
DataSpec = Annotated[
    Union[Annotated[NonEmptyStr, Tag("path")], Annotated[DataSource, Tag("fields")]],
    Discriminator(lambda value: "fields" if isinstance(value, (dict, DataSource)) else "path"),
]


class DataConfig(Section):
    train: DataSpec = Field(
        "arithmetic", description="Project JSONL file, or a prepare-data SOURCE prepared in memory (a preset, a hub "
        "data set id, a local .jsonl/.json/.csv/.parquet file); {source, question_field, answer_field, answer_format} "
        "names the fields of one that needs it."
    )
    train_split: str = "train"
    train_limit: int | None = Field(None, ge=1)
    eval: DataSpec | None = Field("arithmetic", description="Evaluation set (same forms as `train`); null "
                                          "disables eval.")
    eval_split: str = "test"
    eval_limit: int | None = Field(50, ge=1)
    system_prompt: str | None = Field(
        "Solve the math problem step by step. End with the final answer on its own line as '#### <number>'.",
        description="System message of the chat template (null: none).",
    )
    chat_template: bool = Field(True, description="Wrap questions with the tokenizer's chat template.")
    max_prompt_length: int = Field(256, ge=8, description="Prompts longer than this (in tokens) are left-truncated.")


class RolloutConfig(Section):
    num_generations: int = Field(
        4, ge=2, description="Completions per prompt (the GRPO group size G); advantages compare a group, so G >= 2."
    )
    max_completion_length: int = Field(128, ge=1)
    temperature: float = Field(
        1.0, gt=0.0, description="> 0: greedy sampling (0) would make the G completions of a prompt identical."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 disables top-k.")
    kv_cache: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="Rollout KV cache: 'dynamic' (transformers' DynamicCache, every supported family) or 'static' "
        "(preallocated and written in place; llama, mistral, qwen2, qwen3; needed for CUDA graphs).",
    )
    cuda_graphs: Literal["auto", "off"] = Field(
        "auto",
        description="With kv_cache static on a CUDA device, replay decoding from CUDA graphs captured per decoder "
        "layer, which every skip set reuses; never used on CPU. 'off' decodes eagerly.",
    )

    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="With kv_cache static, run each decoder layer's decode step through torch.compile (one "
        "compilation for every layer, bucket and skip set; inside the CUDA graphs on a GPU); compiled artefacts "
        "are cached under $NESTED_REFT_CACHE/compiled. auto: off (on a 2-core AVX512-BF16 CPU it measured no "
        "faster than eager decoding with packed bf16 weights; on GPUs not measured yet: benchmarks/gpu_check.sh).",
    )

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false (and `on` as true): take them as the words the user wrote."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("compile", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        return {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check(self) -> RolloutConfig:
        if self.compile == "on" and self.kv_cache != "static":
            raise ValueError("compile: on needs kv_cache: static (the dynamic cache changes shape every step)")
        return self


class SkippingConfig(Section):
    strategy: Literal["random", "contiguous", "fixed", "calibrated", "adaptive"] = Field(
        "random", description="How skip sets are drawn; 'adaptive' holds KL(mu||pi) at target_kl with the cheapest layers."
    )
    ratio: float | list[float] = Field(0.0, description="Fraction of decoder layers skipped; a list is drawn from per batch.")
    ratio_range: tuple[float, float] | None = Field(
        None, description="[lo, hi]: ratio drawn uniformly per batch; for 'adaptive', the bounds of its choice."
    )
    layers: list[int] | None = Field(None, description="The skipped layers for strategy 'fixed'.")
    keep_first: int = Field(1, ge=0, description="The first N layers are never skipped.")
    keep_last: int = Field(1, ge=0, description="The last N layers are never skipped.")
    calibration_file: str | None = Field(
        None, description="Per-layer skip costs (calibrate-skips output) for 'calibrated'/'adaptive'; "
        "without one the run measures them on its first batch."
    )
    target_kl: float = Field(0.1, gt=0.0, description="'adaptive': the KL(mu||pi) per token, in nats, to stay at.")
    robustness_weight: float = Field(
        0.0, ge=0.0, description="lambda of the skip-robustness term: > 0 trains a low-rank bridge in place of each "
        "skipped layer so that the skipped view tracks the policy (the policy itself is untouched); 0: off."
    )
    robustness_rank: int = Field(32, ge=1, description="Rank of each skip bridge.")
    robustness_lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate of the skip bridges.")
    robustness_rows: int = Field(4, ge=1, description="Completions of each step's batch the term trains on.")
    robustness_every: int = Field(1, ge=1, description="Train the bridges every N steps.")

    @model_validator(mode="after")
    def _check(self) -> SkippingConfig:
        ratios = self.ratio if isinstance(self.ratio, list) else [self.ratio]
        if self.ratio_range is not None:
            if self.ratio != 0.0:
                raise ValueError("set either ratio or ratio_range, not both")
            lo, hi = self.ratio_range
            if not 0.0 <= lo <= hi < 1.0:
                raise ValueError(f"ratio_range must satisfy 0 <= lo <= hi < 1, found {list(self.ratio_range)}")
            ratios = [lo, hi]
        if not ratios or any(not 0.0 <= r < 1.0 for r in ratios):
            raise ValueError(f"ratio must be in [0, 1), found {self.ratio}")
        if self.strategy == "fixed" and not self.layers:
            raise ValueError("strategy 'fixed' needs `layers`")
        if self.strategy == "adaptive" and self.ratio != 0.0:
            raise ValueError("strategy 'adaptive' chooses the ratio itself; bound it with `ratio_range` instead of `ratio`")
        return self

    @field_validator("layers")
    @classmethod
    def _distinct_layer_indices(cls, layers: list[int] | None) -> list[int] | None:
        # Indices past the model's last layer are checked when its depth is known (preflight / SkipSampler).
        if layers is not None and (any(i < 0 for i in layers) or len(set(layers)) != len(layers)):
            raise ValueError(f"layers must be distinct layer indices >= 0, found {layers}")
        return layers


class ObjectiveConfig(Section):
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = "grpo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="PPO clip: ratios are clipped to [1 - epsilon, ...].")
    epsilon_high: float | None = Field(None, gt=0.0, description="Upper clip (DAPO clip-higher); null: epsilon.")
    beta: float = Field(0.0, ge=0.0, description="KL-to-reference weight (k3); the reference loads only when > 0.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes over each batch of rollouts.")
    correction: Literal["none", "is", "token_tis", "seq_tis", "token_mask", "seq_mask", "retrace"] = "token_tis"
    is_threshold: float = Field(2.0, gt=0.0, description="C of token_tis / seq_tis.")
    mask_low: float = Field(0.5, ge=0.0, description="Lower bound of token_mask / seq_mask.")
    mask_high: float = Field(2.0, gt=0.0, description="Upper bound of token_mask / seq_mask.")
    retrace_lambda: float = Field(1.0, ge=0.0, le=1.0)
    logprob_chunk_size: int = Field(1024, ge=1, description="Token rows per lm_head chunk when computing log-probs.")

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        if self.mask_low > self.mask_high:
            raise ValueError(f"mask_low must be <= mask_high, found {self.mask_low} > {self.mask_high}")
        return self


class RewardFunctionConfig(Section):
    """One reward function: its name, its weight in the total reward, and its parameters (every other key)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str = Field(
        min_length=1, description="A built-in (math, format, soft_overlong, length, repetition), path/to/file.py:function "
        "(relative to the recipe's folder) or package.module:function."
    )
    weight: float = Field(1.0, allow_inf_nan=False, description="Its weight in the total reward (negative: a penalty).")

    @model_validator(mode="after")
    def _check(self) -> RewardFunctionConfig:
        builtin = BUILTINS.get(self.name)
        if builtin is not None:
            try:
                builtin.params.model_validate(self.params)
            except ValidationError as e:  # one line, as every recipe error; an unknown key first (a typo)
                raise ValueError(_describe_params(self.name, list(builtin.params.model_fields), e)) from None
        elif split_ref(self.name) is None:
            close = difflib.get_close_matches(self.name, list(BUILTINS), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown reward function {self.name!r}: {hint}expected a built-in "
                             f"({', '.join(BUILTINS)}), path/to/file.py:function or package.module:function")
        return self

    @property
    def params(self) -> dict[str, Any]:
        """The keys beyond name and weight: a built-in's settings, or keyword arguments for a user's function."""
        return dict(self.model_extra or {})


def _describe_params(name: str, known: list[str], error: ValidationError) -> str:
    errors = error.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    key = ".".join(str(p) for p in err["loc"])
    expected = f"(parameters of {name}: {', '.join(known) or 'none'})"
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(key, known, n=1)
        return f"{name}: unknown parameter {key!r}" + (f", did you mean {close[0]!r}? " if close else " ") + expected
    if err["type"] == "missing":
        return f"{name}: {key} is required {expected}"
    return f"{name}: {key}: {err['msg'].replace('Input should be', 'expected')}, found {err['input']!r}"


class RewardConfig(Section):
    functions: list[RewardFunctionConfig] | None = Field(
        None, description="The reward functions, [{name, weight, ...parameters}]; the reward is their weighted sum. "
        "null: math (weight 1) and format (weight format_weight)."
    )
    last_number_fallback: bool = Field(False, description="math: use the last number in the text when no answer marker is found.")
    format_weight: float = Field(0.0, ge=0.0, description="Without `functions`: the weight of `format`, the bonus for a "
                                 "well-formed final-answer marker.")
    timeout_s: float = Field(2.0, gt=0.0, description="Wall-clock bound of one call of a user's reward function (on a "
                             "whole batch) and of one symbolic equivalence check.")
    correct_threshold: float = Field(1.0, allow_inf_nan=False, description="Without `math` among the functions: a "
                                     "completion counts as correct (accuracy, pass@k) when its total reward reaches this.")

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.functions is not None:
            if not self.functions:
                raise ValueError("functions: list at least one reward function, or null for math + format")
            if self.format_weight:
                raise ValueError(f"format_weight ({self.format_weight}) applies only without `functions`; list "
                                 f"{{name: format, weight: {self.format_weight}}} among them instead")
        return self

    def default_functions(self) -> list[RewardFunctionConfig]:
        """What a recipe without `functions` is rewarded by: math, and the format bonus at `format_weight`."""
        return [RewardFunctionConfig(name="math"), RewardFunctionConfig(name="format", weight=self.format_weight)]


class OptimizerConfig(Section):
    lr: float = Field(1e-6, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's (beta1, beta2), each in [0, 1).")
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    max_grad_norm: float = Field(1.0, gt=0.0)

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must each be in [0, 1), found {list(betas)}")
        return betas


class TrainConfig(Section):
    steps: int = Field(30, ge=1)
    prompts_per_step: int = Field(4, ge=1)
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward (gradient accumulation).")
    save_every: int = Field(10, ge=1)
    keep_last: int = Field(2, ge=1)
    eval_every: int = Field(0, ge=0, description="Evaluate on data.eval every N steps (0: never during training).")
    log_rollouts_every: int = Field(10, ge=0, description="Save sampled completions every N steps (0: never).")
    max_nonfinite_steps: int = Field(
        3, ge=1, description="Stop with an error after this many steps in a row whose loss or gradient is not finite."
    )
    report_to: list[ReportTo] = Field(
        default_factory=list, description="Experiment trackers fed each metrics row: tensorboard, wandb (extras); "
        "one name alone, or none, as in TRL."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute decoder layers' activations in backward: activation memory of one layer instead of "
        "all, for about one more forward per update. auto: on with CUDA, off on CPU. Run directories record the "
        "resolved value.",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Under torchrun: replicate the model on every rank (ddp) or shard it with FSDP2 (fsdp)."
    )
    distributed_timeout_s: float = Field(
        1800.0, gt=0.0, description="Under torchrun: how long a rank waits in a collective before the job fails; "
        "must exceed the longest rank-0-only work (evaluation, checkpoint writing)."
    )

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, value: Any) -> Any:
        """`report_to: wandb`, as TRL takes it, is the list of that one tracker (and `none`, TRL's, no tracker)."""
        if isinstance(value, str):
            return [] if value == "none" else [value]
        return value

    @field_validator("report_to")
    @classmethod
    def _distinct_trackers(cls, report_to: list[str]) -> list[str]:
        if len(set(report_to)) != len(report_to):
            raise ValueError(f"report_to names a tracker twice: {report_to}")
        return report_to


class Recipe(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    skipping: SkippingConfig = SkippingConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    reward: RewardConfig = RewardConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        if self.train.eval_every and self.data.eval is None:
            raise ValueError(f"train.eval_every={self.train.eval_every} needs data.eval, which is null "
                             "(set data.eval, or train.eval_every=0)")
        return self

    def to_yaml(self) -> str:
        """The resolved recipe, every field included, as the run directory stores it."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# -- loading --------------------------------------------------------------------------------------------------------


def load_recipe(path: str | Path | None, overrides: list[str] = ()) -> Recipe:
    """Read and validate a recipe file (None: all defaults) with `section.field=value` overrides applied. The file's
    relative input paths are made absolute against its folder (`recipe_paths`); overrides are taken as they are.

    Raises UserError with one line naming the file and the dotted field on any problem.
    """
    where = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(_read_text(path))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f" line {mark.line + 1}" if mark else ""
            raise UserError(f"{path}:{line} invalid YAML ({getattr(e, 'problem', e)})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level, found {type(loaded).__name__}")
        raw = loaded or {}
        resolve_recipe_paths(raw, path.parent)  # before the overrides: --set values are relative to the shell's folder
    for item in overrides:
        _apply_override(raw, item)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(describe_validation_error(where, e, overrides, Recipe)) from None


def _read_text(path: Path) -> str:
    """The recipe file's text; anything that is not a readable UTF-8 text file is a one-line UserError."""
    if path.is_dir():
        raise UserError(f"{path}: is a folder; expected a recipe YAML file")
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read the recipe ({e.strerror})") from None
    if b"\0" in data:  # valid UTF-8 can hold NUL bytes; YAML text never does
        raise UserError(f"{path}: is a binary file, not a YAML recipe")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save the recipe as UTF-8") from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Merge `a.b.c=value` into the raw mapping; the value is a YAML scalar/list, so `3` is an int."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected section.field=value")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {key}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value
