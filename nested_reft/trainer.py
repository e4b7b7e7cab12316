"""The training loop: GRPO whose rollouts come from a layer-skipped view of the policy (Nested-ReFT).

One step, top to bottom (`_step`):

    prompts  -> draw a skip set S -> sample G completions per prompt from mu_S (rollout engine)
             -> score them (the recipe's reward functions) -> group advantages (scoring)
             -> num_iterations passes of micro-batched PPO-clipped updates over the rows with signal, each
                token weighted by an importance-correction weight w(lp_old, lp_b) that accounts for sampling
                from mu_S, not pi_theta (update)
             -> the skip bridges learn to make the next skip set track the policy (`skipping.robustness_weight`)
             -> the skip controller reads the measured KL(mu || pi) (strategy `adaptive`)
             -> metrics row (with a one-line warning when the run cannot learn), trackers, rollouts

and around it (`_train`): checkpoints every `save_every` steps, and stopping on request. The empty skip set is
baseline ReFT: the same loop, with rho = 1 exactly. Everything a resumed run needs to continue bit for bit is in
the checkpoint (`checkpointing`), and per-layer skip costs a run measured for itself are in its reports/;
sampling seeds are derived from (seed, step, prompt group), so they need no state. A stop request (SIGTERM,
SIGUSR1, Ctrl-C: `stopping`) abandons the step if its update is not complete yet, else finishes it; either way
the last finished step is checkpointed and `TrainingStopped` is raised on every rank once rank 0 has written.
Non-finite steps are skipped and, after `train.max_nonfinite_steps` in a row, end the run with the last
checkpoint intact (`guards`).

Under torchrun (`distributed`, `parallel`) every rank runs this same loop on its own contiguous block of the
step's prompt groups: the data stream, skip sampler and controller are replicated (same seeds, same global
inputs, so the same decisions), each group samples from its own seed (so N ranks sample what one process
samples), advantages come from the whole batch's rewards, the loss divides by the whole batch's counts and
gradients are summed over ranks, so an update equals the single-process one up to float summation order.
Statistics cover the whole batch; rank 0 alone writes the run directory and feeds the trackers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nested_reft import distributed, lora
from nested_reft.calibrate import probe_layer_costs
from nested_reft.checkpointing import TrainingState
from nested_reft.data import Example, PromptStream, load_examples
from nested_reft.distributed import World
from nested_reft.errors import UserError
from nested_reft.evaluate import evaluate_examples
from nested_reft.guards import NonFiniteGuard
from nested_reft.health import TrainingHealth
from nested_reft.memory import set_gradient_checkpointing
from nested_reft.models import base_model_path, disable_dropout, load_model, peak_memory_mb, reset_peak_memory
from nested_reft.parallel import Parallel
from nested_reft.preflight import check_parallel
from nested_reft.precision import MasterWeights, keeps_fp32_head, resolve_runtime
from nested_reft.prompts import encode_prompts, eos_token_ids
from nested_reft.recipe import Recipe
from nested_reft.rollout import Rollout, generate
from nested_reft.robustness import Robustness
from nested_reft.rundir import RunDir, resolve_model_path
from nested_reft.sampling import SamplingParams
from nested_reft.scoring import RewardFn, Scorer, batch_metrics, reward_scorer, save_rollouts, score
from nested_reft.skip_control import LayerCosts
from nested_reft.skipping import SkipSampler, decoder_layers
from nested_reft.stopping import GracefulStop, StepAbandoned, StopCheck, TrainingStopped
from nested_reft.tracking import Tracker
from nested_reft.update import Reference, optimise, optimizer_and_schedule

LAYER_COSTS = "layer_costs.json"  # in reports/: the per-layer skip costs a run measured for itself
PROBE_ROWS = 4  # completions (one per prompt) the per-layer cost probe runs on: ~1 forward per eligible layer


def sampling_seed(seed: int, step: int, group: int) -> int:
    """The seed of prompt group `group` (its index in the step's whole batch) at `step`: a function of neither the
    rank nor the batch around it, so any number of ranks samples the same completions."""
    return ((seed * 1_000_003 + step) * 1_000_003 + group) % 2**63


def train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, reward_fn: RewardFn | None = None,
          on_step: Callable[[dict[str, Any]], None] | None = None, stop: GracefulStop | None = None) -> RunDir:
    """Run (or resume) the recipe's training; returns its run directory. `on_step` receives each metrics row.
    When `stop` is requested, the last finished step is checkpointed and `TrainingStopped` is raised.

    Under torchrun every rank calls this with the same arguments and receives the same (global) rows. A rank
    that fails leaves the process group on its way out, so its peers stop too (`distributed.PeerFailure`).
    """
    # The world is checked before anything else, so that a bad split is the same error on every rank.
    distributed.check_world(recipe.train.prompts_per_step, distributed.env_world_size())
    check_parallel(recipe, distributed.env_world_size())
    world = distributed.init(recipe.model.device, recipe.train.distributed_timeout_s)
    try:
        return _train(recipe, world, resume=resume, overwrite=overwrite, reward_fn=reward_fn, on_step=on_step,
                      stop=stop)
    except UserError as exc:
        if world.distributed and not isinstance(exc, distributed.PeerFailure):
            raise type(exc)(f"rank {world.rank}/{world.size}: {exc}") from None
        raise
    except Exception as exc:
        if world.distributed and distributed.is_peer_failure(exc):
            raise distributed.peer_failure(world, exc) from None
        raise
    finally:
        distributed.teardown(world)


@dataclass
class Session:
    """One training run between its steps: the checkpointed state and what the steps use alongside it."""

    recipe: Recipe
    world: World
    run: RunDir
    state: TrainingState
    reference: Reference | None
    scorer: Scorer  # the recipe's reward functions, or `reward_fn`
    eval_examples: list[Example]
    source: str
    tracker: Tracker
    health: TrainingHealth
    guard: NonFiniteGuard
    params: SamplingParams
    eos: set[int]
    start_step: int
    clock_start: float  # perf_counter() at the run's step 0, counting the time before a resume


def _train(recipe: Recipe, world: World, *, resume: bool, overwrite: bool, reward_fn: RewardFn | None,
           on_step: Callable[[dict[str, Any]], None] | None, stop: GracefulStop | None) -> RunDir:
    s = _start(recipe, world, resume=resume, overwrite=overwrite, reward_fn=reward_fn)
    recipe, state, stops, saved = s.recipe, s.state, StopCheck(stop, world), s.start_step
    with s.tracker:
        for step in range(s.start_step + 1, recipe.train.steps + 1):
            drawn = state.snapshot()
            try:
                row = _step(s, step, stops)
            except StepAbandoned as abandoned:  # no weight has changed: the last finished step is the one to keep
                state.restore(drawn)
                if step - 1 > saved:
                    state.save(s.run, step - 1, recipe.train.keep_last)
                _stopped(s, step - 1, abandoned.signum, abandoned=step)
            signum = stops.agreed()  # every rank stops at the same step
            if step % recipe.train.save_every == 0 or step == recipe.train.steps or signum:
                state.save(s.run, step, recipe.train.keep_last)
                saved = step
            if on_step:
                on_step(row)
            if signum and step < recipe.train.steps:
                _stopped(s, step, signum)
    world.barrier()  # every rank returns once rank 0 has written the last checkpoint
    return s.run


def _stopped(s: Session, step: int, signum: int, abandoned: int | None = None) -> None:
    """End a stopped run on every rank, once rank 0 has written its checkpoint, with the same exit code."""
    checkpoint = s.world.on_main(s.run.latest_checkpoint)  # a collective: rank 0 has finished writing
    raise TrainingStopped(step, checkpoint, signum, abandoned=abandoned)


def _step(s: Session, step: int, stops: StopCheck) -> dict[str, Any]:
    """One training step (module docstring); returns its metrics row, already logged. Raises `StepAbandoned`
    when a stop was requested before the update changed any weight."""
    recipe, world, state = s.recipe, s.world, s.state
    group_size = recipe.rollout.num_generations
    first_group, examples = world.shard(state.stream.next(recipe.train.prompts_per_step))  # this rank's groups
    ratio, skip = state.sampler.sample()
    reset_peak_memory(state.device)
    t0 = time.perf_counter()
    with state.policy.gathered(skip):  # sharded: the kept layers are gathered once for the whole rollout
        rollout = generate(
            state.model, encode_prompts(state.tokenizer, [e.question for e in examples], recipe.data),
            num_generations=group_size, max_new_tokens=recipe.rollout.max_completion_length, params=s.params,
            eos_token_ids=s.eos, pad_token_id=state.tokenizer.pad_token_id, skip=skip,
            seeds=[sampling_seed(recipe.run.seed, step, first_group + g) for g in range(len(examples))],
            kv_cache=recipe.rollout.kv_cache, cuda_graphs=recipe.rollout.cuda_graphs, should_stop=stops.local,
            compile_layers=recipe.rollout.compile == "on",
            bridges=state.robustness.bridges if state.robustness else None)
        stops.check()
        t1 = time.perf_counter()
        if state.sampler.needs_costs:  # once per run: per-layer skip costs, measured on this full-model batch
            costs = measure_layer_costs(state.model, rollout, world, first_group, group_size,
                                        state.sampler.eligible, s.params)
            if world.is_main:
                costs.write(s.run.reports_dir / LAYER_COSTS)
            state.sampler.set_costs(costs)
    t2 = time.perf_counter()
    batch = score(rollout, examples, state.tokenizer, s.scorer, group_size, recipe.objective.scale_rewards, world,
                  step=step)
    t3 = time.perf_counter()
    stops.check()
    stats = optimise(state.model, s.reference, state.optimizer, state.scheduler, batch, recipe, s.params,
                     state.masters, policy=state.policy, stop=stops)
    t4 = time.perf_counter()
    robust, control = _adapt_skipping(s, step, skip, batch, stats["kl_mu_pi"])
    t5 = time.perf_counter()

    # The slowest rank sets the pace; tokens/sec is the whole batch's tokens over that time.
    times = world.max(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, rollout.prefill_seconds + rollout.decode_seconds,
                      peak_memory_mb(state.device))
    row: dict[str, Any] = {
        "step": step, **batch_metrics(batch, group_size, world), "skip_ratio": ratio, "num_skipped": len(skip),
        "skipped_layers": list(skip), **stats, **robust, **control, "lr": state.scheduler.get_last_lr()[0],
        "time_generate": times[0], "time_probe": times[1], "time_score": times[2], "time_train": times[3],
        **({"time_robust": times[4]} if state.robustness is not None else {}),
        "rollout_tokens_per_sec": world.sum(rollout.tokens_generated)[0] / times[5] if times[5] > 0 else 0.0,
        "peak_memory_mb": times[6],  # of this step: the peak is reset when the step starts
    }
    _log_step(s, step, row, batch, examples)
    return row


def _adapt_skipping(s: Session, step: int, skip: tuple[int, ...], batch, kl_mu_pi: float) -> tuple[dict, dict]:
    """Train the skip bridges on this batch when due (`robustness`), then let the skip controller see the KL
    measured for this step's skip set (and the bridges' KL of the set it would try next). Returns both metric
    groups; the KLs are global, so every rank's controller agrees."""
    state = s.state
    robust = {}
    if state.robustness is not None and state.robustness.due(step) and (target := state.sampler.next_layers(skip)):
        robust = state.robustness.step(state.model, batch, target, s.params, state.policy,
                                       s.recipe.objective.logprob_chunk_size)
    measured_next = (robust["robust_skipped_layers"], robust["robust_kl_mu_pi"]) if robust else None
    return robust, state.sampler.observe(skip, kl_mu_pi, measured_next)


def _log_step(s: Session, step: int, row: dict[str, Any], batch, examples) -> None:
    """Complete the step's row (held-out pass@1 when due, a health warning, elapsed time), log it on the main
    rank, save the rollouts when due, and count a non-finite update (raises after max_nonfinite_steps in a row)."""
    recipe, world = s.recipe, s.world
    if s.eval_examples and step % recipe.train.eval_every == 0:
        row["eval_pass@1"] = _evaluate(s, step)
    if warning := s.health.check(row):
        row["warning"] = warning
    row["time_elapsed"] = time.perf_counter() - s.clock_start
    if world.is_main:
        s.run.log_metrics(row)
        s.tracker.log(row)
    if recipe.train.log_rollouts_every and step % recipe.train.log_rollouts_every == 0:
        save_rollouts(s.run, step, batch, examples, recipe.rollout.num_generations, world)
    s.guard.step_done(step, row["nonfinite_updates"])


def _evaluate(s: Session, step: int) -> float:
    """pass@1 of the policy on the recipe's eval set; rank 0 evaluates the whole set while the others wait."""
    recipe, state = s.recipe, s.state
    with state.policy.gathered():
        report = s.world.on_main(lambda: evaluate_examples(
            state.model, state.tokenizer, s.eval_examples, recipe.data,
            max_new_tokens=recipe.rollout.max_completion_length, reward_cfg=recipe.reward, seed=recipe.run.seed,
            kv_cache=recipe.rollout.kv_cache, cuda_graphs=recipe.rollout.cuda_graphs,
            compile_layers=recipe.rollout.compile == "on"))
    if s.world.is_main:
        s.run.write_report(f"eval-step-{step}", report.to_dict(model=str(s.source), data=recipe.data.eval))
    return report.metrics["pass@1"]


def _start(recipe: Recipe, world: World, *, resume: bool, overwrite: bool, reward_fn: RewardFn | None) -> Session:
    """Everything a run needs before its first step, in the order that fails fastest: data, run directory,
    model, optimiser, then the checkpoint's state when resuming."""
    # Data first: bad data fails in a second, before a model is loaded or a run directory is touched.
    data = recipe.data
    stream = PromptStream(load_examples(data.train, split=data.train_split, limit=data.train_limit,
                                        seed=recipe.run.seed), recipe.run.seed)
    eval_examples = (load_examples(data.eval, split=data.eval_split, limit=data.eval_limit, seed=recipe.run.seed)
                     if data.eval and recipe.train.eval_every else [])
    scorer = reward_scorer(recipe, reward_fn)  # users' reward functions resolve before any model loads
    recipe, _ = resolve_runtime(recipe)  # `auto` precision/checkpointing resolved: recipe.yaml records what ran
    if world.distributed and recipe.train.parallel == "fsdp" and recipe.model.mixed_precision != "no":
        raise UserError("train.parallel: fsdp runs with model.mixed_precision: no (FSDP2's own mixed precision is "
                        f"not wired yet); found {recipe.model.mixed_precision}; use train.parallel: ddp for bf16")
    # Rank 0 alone touches the run directory (every rank sees it: resuming reads its checkpoint).
    run = world.on_main(lambda: RunDir.open(Path(recipe.run.output_dir), recipe.to_yaml(), resume=resume,
                                            overwrite=overwrite))
    checkpoint = run.latest_checkpoint() if resume else None
    torch.manual_seed(recipe.run.seed)

    source = resolve_model_path(recipe.model.name_or_path)
    model, tokenizer, adapters, reference = _load_policy(recipe, world, source, checkpoint)
    policy = Parallel(model, world, recipe.train.parallel)  # ddp: replicas made equal; fsdp: layers sharded
    masters = MasterWeights(model, recipe.model.mixed_precision,  # compute dtype in the model, masters for AdamW
                            fp32_head=keeps_fp32_head(recipe.model))
    set_gradient_checkpointing(model, recipe.train.gradient_checkpointing)
    sampler = SkipSampler.from_config(recipe.skipping, len(decoder_layers(model)), recipe.run.seed)
    costs_path = run.reports_dir / LAYER_COSTS
    # Costs this run measured before it stopped; a resume without a checkpoint starts over and measures again.
    if checkpoint is not None and sampler.needs_costs and costs_path.is_file():
        sampler.set_costs(LayerCosts.read(costs_path, sampler.num_layers))
    optimizer, scheduler = optimizer_and_schedule(masters.params, recipe)
    device = next(model.parameters()).device
    robustness = Robustness(model, recipe.skipping, sampler.eligible, world) if recipe.skipping.robustness_weight else None
    state = TrainingState(model, tokenizer, adapters, masters, policy, optimizer, scheduler, stream, sampler, world,
                          device, robustness)
    start, elapsed_before = 0, 0.0
    if checkpoint is not None:
        start = state.load(checkpoint)
        elapsed_before = world.on_main(lambda: max((row.get("time_elapsed", 0.0) for row in run.read_metrics()),
                                                   default=0.0))
    tracker = (Tracker.open(recipe.train.report_to, run.root, recipe.model_dump(mode="json"), start_step=start)
               if world.is_main else Tracker([]))
    return Session(
        recipe=recipe, world=world, run=run, state=state, reference=reference,
        scorer=scorer, eval_examples=eval_examples, source=source, tracker=tracker,
        health=TrainingHealth(recipe), guard=NonFiniteGuard(recipe.train.max_nonfinite_steps),
        params=SamplingParams(recipe.rollout.temperature, recipe.rollout.top_k, recipe.rollout.top_p),
        eos=eos_token_ids(tokenizer, model.generation_config), start_step=start,
        clock_start=time.perf_counter() - elapsed_before,
    )


def _load_policy(recipe: Recipe, world: World, source: str,
                 checkpoint: Path | None) -> tuple[Any, Any, lora.Adapters | None, Reference | None]:
    """(model, tokenizer, LoRA adapters or None, the frozen KL reference or None) of a new or resumed run.

    LoRA: the base loads from the source and a checkpoint holds only the adapters. The reference (beta > 0) is
    the starting policy: the base with its adapters switched off, or else a second, frozen copy. Dropout is
    off: lp_b, lp_old and lp must be log-probs of one deterministic policy, or every ratio carries noise.
    """
    where = str(world.device) if world.distributed else recipe.model.device
    cfg = recipe.model
    model, tokenizer = load_model(str(source if cfg.lora else checkpoint or source), dtype=cfg.dtype, device=where)
    adapters = lora.attach(model, cfg.lora, base_model_path(source), checkpoint) if cfg.lora else None
    disable_dropout(model)
    reference: Reference | None = None
    if recipe.objective.beta > 0:
        if adapters is not None:
            reference = adapters.reference
        else:
            ref_model, _ = load_model(source, dtype=cfg.dtype, device=where, mixed_precision=cfg.mixed_precision,
                                      head_dtype=cfg.head_dtype)
            ref_model.requires_grad_(False)
            reference = lambda: nullcontext(ref_model)  # noqa: E731
    return model, tokenizer, adapters, reference


def measure_layer_costs(model, rollout: Rollout, world: World, first_group: int, group_size: int,
                        eligible: list[int], params: SamplingParams) -> LayerCosts:
    """Per-layer skip costs on the first completion of each of the step's first PROBE_ROWS prompt groups, as a
    single process measures them: each rank probes the groups it holds, and the per-layer means are combined
    weighted by token counts, so every rank (and its adaptive controller) gets the same costs."""
    groups = range(first_group, first_group + len(rollout.prompt_ids) // group_size)
    rows = [(g - first_group) * group_size for g in groups if g < PROBE_ROWS]
    if not world.distributed:
        return probe_layer_costs(model, rollout, rows, eligible, params)
    costs = probe_layer_costs(model, rollout, rows, eligible, params) if rows else None
    n = int(rollout.completion_mask[rows].sum()) if rows else 0
    sums = world.sum(n, *(costs.kl[i] * n if costs else 0.0 for i in eligible))
    return LayerCosts({i: total / sums[0] for i, total in zip(eligible, sums[1:])}, len(decoder_layers(model)))
