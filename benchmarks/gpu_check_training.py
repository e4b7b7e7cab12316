"""gpu_check's training sections: `update` (the shipped `update.optimise` on one scored batch) and `train`
(`trainer.train` of the shipped GPU recipe, dynamic and static cache, then a resume), and the timing helper both
files use. See gpu_check.py for the report they fill."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from nested_reft.memory import set_gradient_checkpointing
from nested_reft.models import peak_memory_mb, reset_peak_memory
from nested_reft.objective import group_advantages
from nested_reft.precision import MasterWeights, describe, keeps_fp32_head, resolve_runtime
from nested_reft.recipe import Recipe, load_recipe
from nested_reft.rollout import generate
from nested_reft.sampling import SamplingParams
from nested_reft.scoring import ScoredRollout
from nested_reft.skipping import SkipSampler
from nested_reft.trainer import train
from nested_reft.update import optimise, optimizer_and_schedule

GPU_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "gpu" / "qwen2.5-math-1.5b-gsm8k.yaml"
EOS = "<|endoftext|>"  # Qwen2.5's


def synced(start: float, device: torch.device) -> float:
    """Seconds since `start`, once the device has finished the work queued on it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def shipped_recipe(device: torch.device, sizes: dict[str, Any], completion_len: int, *overrides: str) -> Recipe:
    """The shipped GPU recipe on `device` at this check's sizes, its `auto` choices resolved for the device."""
    recipe = load_recipe(GPU_RECIPE, [f"model.device={device.type}", f"rollout.max_completion_length={completion_len}",
                                      f"rollout.num_generations={sizes['train_generations']}",
                                      f"train.prompts_per_step={sizes['train_prompts']}", *overrides])
    return resolve_runtime(recipe)[0]


def first_token_parity(_text: str, ids: list[int], _example: Any) -> tuple[float, bool]:
    """A reward that gives signal to a random model: 1 when the completion's first token id is odd."""
    reward = float(ids[0] % 2) if ids else 0.0
    return reward, reward == 1.0


def update_step(config, sizes: dict[str, Any], device: torch.device, prompts: list[list[int]]) -> dict[str, Any]:
    """One step of the shipped update (`optimise` with `MasterWeights`: float32 masters, bf16 compute, the LM head
    in the recipe's `head_dtype`, gradient checkpointing on CUDA) on a batch sampled by the skipped model and scored
    as the trainer would. Timed after one warm-up step (allocator, AdamW states); the peak memory is the timed
    step's."""
    completion = sizes["update_completion_len"]
    recipe = shipped_recipe(device, sizes, completion)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
    masters = MasterWeights(model, recipe.model.mixed_precision, fp32_head=keeps_fp32_head(recipe.model))
    set_gradient_checkpointing(model, recipe.train.gradient_checkpointing)
    params = SamplingParams(recipe.rollout.temperature, recipe.rollout.top_k, recipe.rollout.top_p)
    _, skip = SkipSampler.from_config(recipe.skipping, config.num_hidden_layers, recipe.run.seed).sample()
    group = recipe.rollout.num_generations
    rollout = generate(model, prompts, num_generations=group, max_new_tokens=completion, min_new_tokens=completion,
                       params=params, eos_token_ids=[config.eos_token_id], pad_token_id=0, skip=skip, seed=0,
                       kv_cache=recipe.rollout.kv_cache, cuda_graphs=recipe.rollout.cuda_graphs)
    scored = [first_token_parity("", ids, None) for ids in rollout.completions()]  # as `scoring.score` does
    rewards = torch.tensor([reward for reward, _ in scored])
    batch = ScoredRollout(rollout, rewards, [correct for _, correct in scored], [""] * len(scored),
                          group_advantages(rewards, group, recipe.objective.scale_rewards))
    optimizer, scheduler = optimizer_and_schedule(masters.params, recipe)
    optimise(model, None, optimizer, scheduler, batch, recipe, params, masters)  # warm-up
    synced(time.perf_counter(), device)
    reset_peak_memory(device)
    start = time.perf_counter()
    stats = optimise(model, None, optimizer, scheduler, batch, recipe, params, masters)
    seconds = synced(start, device)
    rows, width = rollout.completion_ids.shape[0], rollout.prompt_ids.shape[1] + completion
    return {"precision": describe(recipe.model.mixed_precision, recipe.model.dtype, recipe.model.head_dtype),
            "lm_head_dtype": str(model.lm_head.weight.dtype), "master_weights": masters.active,
            "gradient_checkpointing": recipe.train.gradient_checkpointing, "sequences": rows,
            "sequence_tokens": width, "micro_batch": recipe.train.micro_batch_size, "skipped_layers": list(skip),
            "step_seconds": seconds, "tokens_per_s": rows * width / seconds, "peak_memory_mb": peak_memory_mb(device),
            **{key: stats[key] for key in ("loss", "grad_norm", "trained_sequences", "kl_mu_pi", "ess")}}


ROW_FIELDS = ("step", "reward_mean", "trained_sequences", "skipped_layers", "time_generate", "time_train",
              "rollout_tokens_per_sec", "peak_memory_mb")


def train_runs(config, sizes: dict[str, Any], device: torch.device, folder: Path) -> dict[str, Any]:
    """`trainer.train` of the shipped recipe on the random model saved in `folder`: with the dynamic cache, with
    the static cache (CUDA graphs auto), then the static run resumed for one more step. Per run: the metrics
    rows' step times, peak memory and rewards, and the wall time including loading and checkpointing."""
    model_dir = write_model_folder(config, folder / "model", device)
    data = write_questions(folder / "train.jsonl", 4 * sizes["train_prompts"], sizes["train_prompt_words"])
    steps = sizes["train_steps"]

    def run(name: str, kv_cache: str, steps: int, resume: bool = False) -> dict[str, Any]:
        recipe = shipped_recipe(device, sizes, sizes["train_completion_len"], f"model.name_or_path={model_dir}",
                                f"data.train={data}", "data.eval=null", "data.chat_template=false",
                                "data.system_prompt=null", f"run.output_dir={folder / name}",
                                f"rollout.kv_cache={kv_cache}", f"train.steps={steps}", f"train.save_every={steps}",
                                "train.keep_last=1", "train.eval_every=0", "train.log_rollouts_every=0")
        rows: list[dict[str, Any]] = []
        reset_peak_memory(device)
        start = time.perf_counter()
        logged = train(recipe, resume=resume, reward_fn=first_token_parity, on_step=rows.append).read_metrics()
        return {"wall_seconds": time.perf_counter() - start, "logged_steps": [row["step"] for row in logged],
                "rows": [{key: row[key] for key in ROW_FIELDS} for row in rows]}

    dynamic = run("dynamic", "dynamic", steps)
    shutil.rmtree(folder / "dynamic")  # its checkpoint: free the disk before the next one
    static = run("static", "static", steps)
    resumed = run("static", "static", steps + 1, resume=True)
    continued = ([r["step"] for r in resumed["rows"]] == [steps + 1]
                 and resumed["logged_steps"] == list(range(1, steps + 2)))
    return {"dynamic": dynamic, "static": static, "resumed": {**resumed, "continued": continued}}


def write_model_folder(config, folder: Path, device: torch.device) -> Path:
    """The random model as a Hugging Face folder that `load_model` reads: bf16 safetensors (the recipe loads them
    as float32 masters) and a byte-level tokenizer whose ids are the bytes' values, with EOS = 256. Byte-level
    because transformers loads a qwen2 folder's tokenizer as `Qwen2Tokenizer` whatever it was saved as, which
    rebuilds a byte-level BPE from the vocabulary (a word-level one would encode nothing). Ids beyond the
    vocabulary, which the random model samples, decode to nothing."""
    chars = bytes_to_unicode()
    backend = Tokenizer(models.BPE(vocab={**{chars[b]: b for b in range(256)}, EOS: 256}, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS,
                            unk_token=EOS).save_pretrained(folder)
    config = copy.deepcopy(config)
    config.bos_token_id, config.eos_token_id = None, 256  # the tokenizer's
    torch.manual_seed(0)
    with torch.device(device):
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    return folder


def write_questions(path: Path, count: int, words: int) -> Path:
    """`count` training rows whose questions are `words` random words ("w17 w3 ...": about 4 tokens each)."""
    generator = torch.Generator().manual_seed(0)
    rows = [{"id": str(i), "answer": "0", "source": "random",
             "question": " ".join(f"w{int(w)}" for w in torch.randint(100, (words,), generator=generator))}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
