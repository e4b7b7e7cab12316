"""How much does skipping each layer, and each skip ratio, cost? (`nested-reft calibrate-skips`)

On N training prompts, completions are sampled with the full model. Then:

(a) per eligible layer i: the mean per-token KL between the full model and the full model without layer i,
    in both directions (`kl` = KL(full || skipped); `kl_mu_pi` = KL(skipped || full), the direction a training
    run measures as `kl_mu_pi`), the greedy agreement, and the block influence 1 - cos(h_in, h_out) of the
    layer on the same tokens (how much it changes the residual);
(b) per ratio: the k cheapest layers by (a) form the skip set; on the full model's samples we measure both
    KLs and greedy-token agreement, and on samples drawn from that skipped view the importance weights
    rho = exp(lp_full - lp_skipped) a training run would see (mean, p95, max, ESS), and the rollout
    tokens/sec against the full model, timed side by side at a fixed completion length.

The report's `layers` list is the per-layer cost profile that `skipping.strategy: calibrated` and `adaptive`
read (`skip_control.LayerCosts`); a training run without one measures the same costs on its first batch
(`probe_layer_costs`).
"""

from __future__ import annotations

from dataclasses import asdict
from collections.abc import Callable
from typing import Any

import torch

from nested_reft.data import load_examples
from nested_reft.errors import UserError
from nested_reft.models import load_model
from nested_reft.objective import completion_hidden_states, completion_log_probs, correction_stats
from nested_reft.precision import resolve_runtime
from nested_reft.prompts import encode_prompts, eos_token_ids
from nested_reft.recipe import Recipe
from nested_reft.rollout import Rollout, generate
from nested_reft.rundir import resolve_model_path
from nested_reft.sampling import SamplingParams, log_probs
from nested_reft.skip_control import LayerCosts
from nested_reft.skipping import SkipSampler, decoder_layers, skip_layers

Progress = Callable[[str], None]


def _sequences(rollout: Rollout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(input_ids, attention_mask, completion mask, prompt width) of a rollout's prompt+completion rows."""
    return *rollout.sequences(), rollout.completion_mask, rollout.prompt_ids.shape[1]


@torch.no_grad()
def compare_to_full(model, full_hidden: torch.Tensor, sequences: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
                    skip: tuple[int, ...], params: SamplingParams) -> dict[str, float]:
    """KL(full || skipped), KL(skipped || full) and greedy agreement, averaged over the completion tokens.

    `sequences` is (input_ids, attention_mask, completion mask, prompt width) and `full_hidden` the full model's
    `completion_hidden_states` for them.
    """
    ids, attention, mask, width = sequences
    with skip_layers(model, skip):
        skipped_hidden = completion_hidden_states(model, ids, attention, width)
    return _divergence(model, _FullLogProbs(model, full_hidden, mask, params), skipped_hidden, params)


@torch.no_grad()
def single_layer_divergences(model, sequences: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int],
                             layers: list[int], params: SamplingParams) -> dict[int, dict[str, float]]:
    """`compare_to_full` of skipping each of `layers` alone, without recomputing the layers before it.

    Skipping layer i leaves layers 0..i-1 untouched, so one full forward records what the decoder passes every
    layer (hidden state, mask, position embeddings, ...) and skipping i restarts from layer i's input at layer
    i + 1: about half the work of a full forward per layer.
    """
    ids, attention, mask, width = sequences
    decoder, all_layers = model.get_decoder(), decoder_layers(model)
    calls: dict[int, tuple[tuple, dict]] = {}
    handles = [layer.register_forward_pre_hook(lambda _m, args, kwargs, i=i: calls.__setitem__(i, (args, kwargs)),
                                               with_kwargs=True) for i, layer in enumerate(all_layers)]
    try:
        full_hidden = completion_hidden_states(model, ids, attention, width)
    finally:
        for handle in handles:
            handle.remove()
    full = _FullLogProbs(model, full_hidden, mask, params)  # the same for every layer: computed once if it fits
    results = {}
    for i in layers:
        hidden = _replace_hidden(*calls[i], None)[0]
        for j in range(i + 1, len(all_layers)):
            args, kwargs = _replace_hidden(*calls[j], hidden)[1:]
            output = all_layers[j](*args, **kwargs)
            hidden = output[0] if isinstance(output, tuple) else output
        hidden = decoder.norm(hidden)
        skipped_hidden = hidden[:, width - 1 : -1].reshape(-1, hidden.shape[-1])
        results[i] = _divergence(model, full, skipped_hidden, params)
    return results


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor | None) -> tuple[torch.Tensor, tuple, dict]:
    """(the recorded hidden-state input, args and kwargs with `hidden` in its place when given)."""
    if args:
        return args[0], (hidden if hidden is not None else args[0], *args[1:]), kwargs
    recorded = kwargs["hidden_states"]
    return recorded, args, {**kwargs, "hidden_states": hidden if hidden is not None else recorded}


class _FullLogProbs:
    """The full model's next-token log-probs at the valid completion positions, in chunks of CHUNK positions, so
    no [tokens, V] tensor is needed at once. When all of them fit in CACHE_ELEMENTS they are kept after the first
    pass: comparing many skip sets with the same full model then runs its LM head and softmax once."""

    CHUNK = 512
    CACHE_ELEMENTS = 2**26  # 256 MiB of float32

    def __init__(self, model, full_hidden: torch.Tensor, mask: torch.Tensor, params: SamplingParams):
        self.model, self.hidden, self.valid, self.params = model, full_hidden, mask.reshape(-1), params
        self.cache: list[torch.Tensor] | None = []  # None once they turn out not to fit

    def chunks(self):
        """Yields (the full model's log-probs, the valid mask) per chunk of positions."""
        for k, (hidden, valid) in enumerate(zip(self.hidden.split(self.CHUNK), self.valid.split(self.CHUNK))):
            if self.cache is not None and k < len(self.cache):
                yield self.cache[k], valid
                continue
            lp = log_probs(self.model.lm_head(hidden[valid]), self.params)
            if self.cache is not None and int(self.valid.sum()) * lp.shape[-1] <= self.CACHE_ELEMENTS:
                self.cache.append(lp)
            else:
                self.cache = None
            yield lp, valid


def _divergence(model, full: _FullLogProbs, skipped_hidden: torch.Tensor, params: SamplingParams) -> dict[str, float]:
    """Both KLs (exact sums over the vocabulary at each position) and greedy agreement between the full and the
    skipped model's next-token distributions at the valid completion positions, chunk by chunk."""
    kl_sum, kl_reverse_sum, agree, n = 0.0, 0.0, 0, int(full.valid.sum())
    for (lf, valid), hs in zip(full.chunks(), skipped_hidden.split(full.CHUNK)):
        ls = log_probs(model.lm_head(hs[valid]), params)
        kl_sum += (lf.exp() * (lf - ls)).sum().item()
        kl_reverse_sum += (ls.exp() * (ls - lf)).sum().item()
        agree += (lf.argmax(-1) == ls.argmax(-1)).sum().item()
    return {"kl": kl_sum / n, "kl_mu_pi": kl_reverse_sum / n, "greedy_agreement": agree / n}


def probe_layer_costs(model, rollout: Rollout, rows: list[int], eligible: list[int],
                      params: SamplingParams) -> LayerCosts:
    """Per-layer skip costs KL(skipped || full) measured on `rows` of a full-model rollout.

    The quick probe a run makes on its first batch when the strategy needs costs and no calibration file was
    given: about half a no-grad forward over a few sequences per eligible layer.
    """
    ids, attention, mask, width = _sequences(rollout)
    mask = mask[rows]
    length = max(1, int(mask.sum(1).max()))  # drop padding columns that no selected row reaches
    sequences = (ids[rows, : width + length], attention[rows, : width + length], mask[:, :length], width)
    divergences = single_layer_divergences(model, sequences, eligible, params)
    return LayerCosts({i: d["kl_mu_pi"] for i, d in divergences.items()}, len(decoder_layers(model)))


@torch.no_grad()
def block_influence(model, rollout: Rollout) -> list[float]:
    """1 - cos(h_in, h_out) of every decoder layer, averaged over the completion positions.

    Only the decoder runs: the LM head's [B, T, V] logits (5 GB at 8 x 1024 tokens of a 152k vocabulary) have
    nothing to say about what a layer does to the residual stream, and no KV cache is kept either.
    """
    ids, attention, mask, width = _sequences(rollout)
    positions = torch.zeros_like(attention, dtype=torch.bool)
    positions[:, width - 1 : -1] = mask  # hidden states that predict completion tokens
    scores: list[float] = []

    def hook(_module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        h_out = output[0] if isinstance(output, tuple) else output
        cos = torch.nn.functional.cosine_similarity(h_in[positions].float(), h_out[positions].float(), dim=-1)
        scores.append((1 - cos).mean().item())

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in decoder_layers(model)]
    try:
        completion_hidden_states(model, ids, attention, width)
    finally:
        for handle in handles:
            handle.remove()
    return scores


def calibrate(recipe: Recipe, ratios: list[float], num_prompts: int, progress: Progress = lambda _: None) -> dict[str, Any]:
    """Measure per-layer and per-ratio skipping costs on `num_prompts` training prompts; returns the report."""
    if not ratios or any(not 0.0 < r < 1.0 for r in ratios):
        raise UserError(f"--ratios: expected values in (0, 1), found {ratios}")
    source = resolve_model_path(recipe.model.name_or_path)
    recipe, _ = resolve_runtime(recipe)
    model, tokenizer = load_model(source, dtype=recipe.model.dtype, device=recipe.model.device,
                                  mixed_precision=recipe.model.mixed_precision, head_dtype=recipe.model.head_dtype)
    num_layers = len(decoder_layers(model))
    skipping = recipe.skipping
    eligible = list(range(skipping.keep_first, num_layers - skipping.keep_last))
    if not eligible:
        raise UserError(f"skipping.keep_first/keep_last: no eligible layer among {num_layers}")
    examples = load_examples(recipe.data.train, split=recipe.data.train_split, limit=num_prompts, seed=recipe.run.seed)
    prompts = encode_prompts(tokenizer, [e.question for e in examples[:num_prompts]], recipe.data)
    params = SamplingParams(recipe.rollout.temperature, recipe.rollout.top_k, recipe.rollout.top_p)
    length = recipe.rollout.max_completion_length

    def sample(skip: tuple[int, ...] = (), fixed_length: bool = False) -> Rollout:
        return generate(model, prompts, max_new_tokens=length, params=params, pad_token_id=tokenizer.pad_token_id,
                        eos_token_ids=eos_token_ids(tokenizer, model.generation_config), skip=skip,
                        seed=recipe.run.seed, min_new_tokens=length if fixed_length else 0,
                        kv_cache=recipe.rollout.kv_cache, cuda_graphs=recipe.rollout.cuda_graphs,
                        compile_layers=recipe.rollout.compile == "on")

    progress("sampling with the full model")
    reference = sample()
    sequences = _sequences(reference)
    ids, attention, _, width = sequences
    with torch.no_grad():
        full_hidden = completion_hidden_states(model, ids, attention, width)
    influence = block_influence(model, reference)

    progress("skipping each layer alone")
    divergences = single_layer_divergences(model, sequences, eligible, params)
    layers = [{"layer": i, **divergences[i], "block_influence": influence[i]} for i in eligible]
    costs = LayerCosts({e["layer"]: e["kl_mu_pi"] for e in layers}, num_layers)

    rows = []
    for ratio in ratios:
        progress(f"ratio {ratio}")
        sampler = SkipSampler(num_layers, ratio=ratio, keep_first=skipping.keep_first, keep_last=skipping.keep_last)
        skip = costs.cheapest(len(sampler.sample()[1]))
        divergence = compare_to_full(model, full_hidden, sequences, skip, params)
        behavior = sample(skip)
        b_ids, b_attention, b_mask, b_width = _sequences(behavior)
        with torch.no_grad():
            lp_full = completion_log_probs(model, b_ids, b_attention, b_width, params)
        rho = torch.exp(lp_full - behavior.behavior_log_probs)[b_mask]
        # The weights of the `is` correction are rho itself: its ESS is the one training would see.
        stats = correction_stats(rho, lp_full[b_mask], behavior.behavior_log_probs[b_mask],
                                 torch.ones_like(rho, dtype=torch.bool))
        full_tps, skip_tps = sample((), True).tokens_per_second, sample(skip, True).tokens_per_second
        rows.append({"ratio": ratio, "num_skipped": len(skip), "skipped_layers": list(skip), **divergence,
                     "rho_mean": rho.mean().item(),
                     "rho_p95": torch.quantile(rho.double(), 0.95).item(), "rho_max": rho.max().item(),
                     "ess": stats["ess"], "tokens_per_sec": skip_tps, "full_tokens_per_sec": full_tps,
                     "speedup": skip_tps / full_tps, "ideal_speedup": num_layers / (num_layers - len(skip))})
    return {"model": source, "num_layers": num_layers, "eligible_layers": eligible, "num_prompts": len(prompts),
            "max_completion_length": length, "sampling": asdict(params),
            "mixed_precision": recipe.model.mixed_precision, "layers": layers, "ratios": rows}
