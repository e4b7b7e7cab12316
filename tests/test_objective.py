"""The GRPO / Nested-ReFT objective against hand-computed numbers and an unchunked reference forward."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from nested_reft.errors import UserError
from nested_reft.objective import (
    CorrectionConfig,
    CorrectionKind,
    LossConfig,
    LossType,
    completion_log_probs,
    correction_stats,
    correction_weights,
    group_advantages,
    policy_loss,
)
from nested_reft.sampling import SamplingParams, log_probs

# --- off-policy corrections ------------------------------------------------------------------------------

# Two sequences; the second has one padding token whose ratio (8) must never leak into a sequence quantity.
RHO = torch.tensor([[2.0, 0.5, 4.0], [1.0, 0.125, 8.0]])
MASK = torch.tensor([[True, True, True], [True, True, False]])
LP_OLD = torch.tensor([[-0.5, -1.25, -2.0], [-0.75, -3.0, -0.25]])
LP_B = LP_OLD - RHO.log()  # so that exp(lp_old - lp_b) == RHO

# Worked by hand from BRIEF §1 with C = 2, [lo, hi] = [0.5, 2]:
#   seq ratios: 2 * 0.5 * 4 = 4 -> min(4, 2) = 2;  1 * 0.125 = 0.125.
#   geometric means: 4 ** (1/3) = 1.587 (kept);  0.125 ** (1/2) = 0.354 (sequence dropped).
#   retrace, lambda = 0.5: c_s = 0.5 * min(1, rho_s) = [0.5, 0.25, .] and [0.5, 0.0625];
#     w = [1, 0.5 * 0.5, 1 * 0.5 * 0.25] and [1, 0.125 * 0.5].
EXPECTED_WEIGHTS = {
    "none": [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]],
    "is": [[2.0, 0.5, 4.0], [1.0, 0.125, 0.0]],
    "token_tis": [[2.0, 0.5, 2.0], [1.0, 0.125, 0.0]],
    "seq_tis": [[2.0, 2.0, 2.0], [0.125, 0.125, 0.0]],
    "token_mask": [[2.0, 0.5, 0.0], [1.0, 0.0, 0.0]],  # both bounds inclusive; 4 and 0.125 masked
    "seq_mask": [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]],
    "retrace": [[1.0, 0.25, 0.125], [1.0, 0.0625, 0.0]],
}


@pytest.mark.parametrize("kind", list(EXPECTED_WEIGHTS))
def test_correction_weights_match_hand_computation(kind: str) -> None:
    cfg = CorrectionConfig(kind=kind, threshold=2.0, mask_low=0.5, mask_high=2.0, retrace_lambda=0.5)
    w = correction_weights(LP_OLD, LP_B, MASK, cfg)
    assert w.dtype == torch.float32 and not w.requires_grad
    torch.testing.assert_close(w, torch.tensor(EXPECTED_WEIGHTS[kind]), rtol=1e-6, atol=0.0)


def test_retrace_with_lambda_one_is_the_running_product_of_truncated_ratios() -> None:
    w = correction_weights(LP_OLD, LP_B, MASK, CorrectionConfig(kind="retrace", retrace_lambda=1.0))
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5, 0.5], [1.0, 0.125, 0.0]]), rtol=1e-6, atol=0.0)


def test_retrace_with_lambda_zero_keeps_only_the_first_token() -> None:
    w = correction_weights(LP_OLD, LP_B, MASK, CorrectionConfig(kind="retrace", retrace_lambda=0.0))
    assert torch.equal(w, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


def test_sequence_corrections_do_not_overflow_on_long_sequences() -> None:
    lp_old = torch.zeros(1, 4000)
    lp_b = torch.full((1, 4000), -0.5)  # rho_seq = exp(2000): inf if computed as a product
    mask = torch.ones(1, 4000, dtype=torch.bool)
    seq_tis = correction_weights(lp_old, lp_b, mask, CorrectionConfig(kind="seq_tis", threshold=3.0))
    torch.testing.assert_close(seq_tis, torch.full((1, 4000), 3.0))
    retrace = correction_weights(lp_b, lp_old, mask, CorrectionConfig(kind="retrace"))  # rho = exp(-0.5)
    assert torch.isfinite(retrace).all() and retrace[0, -1] == 0.0


def _random_batch(batch: int, width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (batch,), generator=g)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    lp_old = -torch.rand(batch, width, generator=g) * 3
    return {
        "lp": (lp_old + 0.3 * torch.randn(batch, width, generator=g)).requires_grad_(),
        "lp_old": lp_old,
        "advantages": torch.randn(batch, generator=g),
        "weights": torch.rand(batch, width, generator=g) * 2,
        "mask": mask,
    }


@pytest.mark.parametrize("loss_type", get_args(LossType))
def test_every_correction_is_exactly_on_policy_grpo_with_the_empty_skip_set(loss_type: str) -> None:
    batch = _random_batch(5, 7, seed=0)
    lp_b = batch["lp_old"].clone()  # empty skip set: the behavior policy is the full model
    cfg = LossConfig(loss_type=loss_type)
    ones = torch.ones_like(batch["lp_old"])
    on_policy_loss, _ = policy_loss(batch["lp"], batch["lp_old"], batch["advantages"], ones, batch["mask"], cfg)
    (on_policy_grad,) = torch.autograd.grad(on_policy_loss, batch["lp"])
    for kind in get_args(CorrectionKind):
        w = correction_weights(batch["lp_old"], lp_b, batch["mask"], CorrectionConfig(kind=kind))
        assert torch.equal(w, batch["mask"].float()), kind
        loss, _ = policy_loss(batch["lp"], batch["lp_old"], batch["advantages"], w, batch["mask"], cfg)
        (grad,) = torch.autograd.grad(loss, batch["lp"])
        assert torch.equal(loss, on_policy_loss) and torch.equal(grad, on_policy_grad), kind


def test_correction_stats_match_hand_computation() -> None:
    w = torch.tensor([[2.0, 0.5, 0.0], [1.0, 0.0, 7.0]])  # 7.0 sits on padding and must be ignored
    stats = correction_stats(w, LP_OLD, LP_B, MASK)
    # Valid weights [2, 0.5, 0, 1, 0]: sum 3.5, sum of squares 5.25, n 5 -> ESS 12.25 / 26.25.
    assert stats["ess"] == pytest.approx(12.25 / 26.25)
    assert stats["weight_mean"] == pytest.approx(0.7)
    assert (stats["weight_min"], stats["weight_max"]) == (0.0, 2.0)
    assert stats["frac_masked"] == pytest.approx(0.4)
    # kl_mu_pi = mean(lp_b - lp_old) over valid tokens: minus the mean log-ratio.
    assert stats["kl_mu_pi"] == pytest.approx(-(math.log(2) + math.log(0.5) + math.log(4) + 0 + math.log(0.125)) / 5)


def test_correction_stats_ess_extremes() -> None:
    mask = torch.ones(1, 4, dtype=torch.bool)
    lp = torch.zeros(1, 4)
    assert correction_stats(torch.full((1, 4), 0.3), lp, lp, mask)["ess"] == pytest.approx(1.0)
    assert correction_stats(torch.zeros(1, 4), lp, lp, mask)["ess"] == 0.0


# --- loss aggregation ------------------------------------------------------------------------------------

# q = exp(lp - lp_old); eps = 0.2; A = [1, -2]; w = [[1, 0.5, 2], [1, 1, .]].
# Row 0 (A = 1):  q = 1 -> -1;  q = 1.5 clipped to 1.2 -> -1.2 * 0.5 = -0.6 (no grad);  q = 0.5 -> -0.5 * 2 = -1.
# Row 1 (A = -2): q = 1.1 -> 2.2;  q = 0.7: min(-1.4, 0.8 * -2) = -1.6 -> 1.6 (clipped, no grad);  padding.
# Per-token d l / d lp = -q * A * w where unclipped: [[-1, 0, -1], [2.2, 0, 0]].
Q = torch.tensor([[1.0, 1.5, 0.5], [1.1, 0.7, 3.0]])
ADV = torch.tensor([1.0, -2.0])
W = torch.tensor([[1.0, 0.5, 2.0], [1.0, 1.0, 5.0]])
TOKEN_GRAD = torch.tensor([[-1.0, 0.0, -1.0], [2.2, 0.0, 0.0]])
HAND_LOSSES = {  # (loss type, max_completion_length) -> (loss, divisor of the token gradients)
    ("grpo", None): ((-2.6 / 3 + 3.8 / 2) / 2, torch.tensor([[6.0], [4.0]])),
    ("dapo", None): (1.2 / 5, torch.tensor(5.0)),
    ("dr_grpo", None): (1.2 / (2 * 3), torch.tensor(6.0)),
    ("dr_grpo", 4): (1.2 / (2 * 4), torch.tensor(8.0)),
}


@pytest.mark.parametrize(("loss_type", "max_len"), list(HAND_LOSSES))
def test_aggregations_match_hand_computed_loss_and_gradient(loss_type: str, max_len: int | None) -> None:
    lp = (LP_OLD + Q.log()).requires_grad_()
    cfg = LossConfig(loss_type=loss_type, epsilon=0.2, max_completion_length=max_len)
    loss, stats = policy_loss(lp, LP_OLD, ADV, W, MASK, cfg)
    loss.backward()
    expected_loss, divisor = HAND_LOSSES[(loss_type, max_len)]
    assert loss.item() == pytest.approx(expected_loss, rel=1e-6)
    torch.testing.assert_close(lp.grad, TOKEN_GRAD / divisor, rtol=1e-6, atol=1e-7)
    assert stats["clipped_tokens"].item() == 2 and stats["kl_sum"].item() == 0  # of 5 valid tokens


def test_asymmetric_clip_uses_epsilon_high_above_one() -> None:
    lp = (LP_OLD + Q.log()).requires_grad_()
    cfg = LossConfig(loss_type="dapo", epsilon=0.2, epsilon_high=0.6)  # q = 1.5 is now inside [0.8, 1.6]
    loss, stats = policy_loss(lp, LP_OLD, ADV, W, MASK, cfg)
    assert loss.item() == pytest.approx((-1 - 0.75 - 1 + 2.2 + 1.6) / 5, rel=1e-6)
    assert stats["clipped_tokens"].item() == 1


def test_k3_kl_term_is_added_and_reported() -> None:
    lp = torch.zeros(1, 2, requires_grad=True)
    lp_ref = torch.tensor([[math.log(2.0), 0.0]])  # k3 = 2 - log 2 - 1 on token 0, 0 on token 1
    mask = torch.ones(1, 2, dtype=torch.bool)
    cfg = LossConfig(loss_type="grpo", beta=0.1)
    loss, stats = policy_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 2), mask, cfg, lp_ref=lp_ref)
    loss.backward()
    k3 = 1 - math.log(2.0)
    assert loss.item() == pytest.approx(0.1 * k3 / 2)
    assert stats["kl_sum"].item() == pytest.approx(k3)
    # d k3 / d lp = 1 - exp(lp_ref - lp): -1 on token 0; times beta / 2 tokens.
    torch.testing.assert_close(lp.grad, torch.tensor([[-0.05, 0.0]]))
    with pytest.raises(ValueError, match="lp_ref"):
        policy_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 2), mask, cfg)


@pytest.mark.parametrize(("loss_type", "max_len"), [("grpo", None), ("dapo", None), ("dr_grpo", None), ("dr_grpo", 9)])
def test_micro_batches_with_global_counts_sum_to_the_full_batch(loss_type: str, max_len: int | None) -> None:
    batch = _random_batch(6, 5, seed=1)
    cfg = LossConfig(loss_type=loss_type, max_completion_length=max_len, beta=0.05)
    lp_ref = batch["lp_old"] - 0.1
    full, _ = policy_loss(**batch, cfg=cfg, lp_ref=lp_ref)
    (full_grad,) = torch.autograd.grad(full, batch["lp"])
    total = torch.zeros(())
    for rows in (slice(0, 2), slice(2, 5), slice(5, 6)):
        micro = {name: value[rows] for name, value in batch.items()}
        loss, _ = policy_loss(
            **micro, cfg=cfg, lp_ref=lp_ref[rows], num_sequences=6, num_tokens=int(batch["mask"].sum())
        )
        total = total + loss
    (micro_grad,) = torch.autograd.grad(total, batch["lp"])
    torch.testing.assert_close(total, full, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(micro_grad, full_grad, rtol=1e-6, atol=1e-8)


def test_padding_with_garbage_log_probs_stays_finite() -> None:
    lp = torch.tensor([[-1.0, 500.0]], requires_grad=True)  # exp(500 - lp_old) would be inf
    lp_old, mask = torch.tensor([[-1.0, -80.0]]), torch.tensor([[True, False]])
    loss, _ = policy_loss(lp, lp_old, torch.ones(1), torch.ones(1, 2), mask, LossConfig())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and lp.grad[0, 1] == 0.0


# --- advantages ------------------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])  # G = 4
CENTERED = [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0, 0.0, -0.25, -0.25, -0.25, 0.75]


def test_group_scale_divides_by_the_unbiased_group_std() -> None:
    eps = 1e-4
    std0, std2 = math.sqrt(4 * 0.25 / 3), math.sqrt((3 * 0.0625 + 0.5625) / 3)
    expected = [c / (std0 + eps) for c in CENTERED[:4]] + [0.0] * 4 + [c / (std2 + eps) for c in CENTERED[8:]]
    torch.testing.assert_close(group_advantages(REWARDS, 4, "group", eps=eps), torch.tensor(expected))


def test_batch_scale_divides_by_the_unbiased_batch_std() -> None:
    # 7 ones and 5 zeros: squared deviations 7 * (5/12)^2 + 5 * (7/12)^2 = 420/144, over 11.
    std = math.sqrt(420 / 144 / 11)
    expected = torch.tensor([c / (std + 1e-4) for c in CENTERED])
    torch.testing.assert_close(group_advantages(REWARDS, 4, "batch"), expected)


def test_none_scale_only_centers() -> None:
    assert torch.equal(group_advantages(REWARDS, 4, "none"), torch.tensor(CENTERED))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_constant_groups_get_exactly_zero_advantage(scale: str) -> None:
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.7, 0.7, 0.7])  # 0.3 * 3 / 3 != 0.3 in floating point
    assert torch.equal(group_advantages(rewards, 3, scale), torch.zeros(6))


# --- log-probs of completions ----------------------------------------------------------------------------

P, T = 5, 4
PROMPT_LENGTHS, COMPLETION_LENGTHS = [5, 3, 1], [4, 2, 3]
PARAMS = [SamplingParams(), SamplingParams(temperature=0.7, top_k=8, top_p=0.9)]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def sequences() -> tuple[torch.Tensor, torch.Tensor]:
    """[left-padded prompt | right-padded completion] rows, pad id 0, real tokens in [1, 64)."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 64, (3, P + T), generator=g)
    prompt_mask = torch.arange(P)[None, :] >= P - torch.tensor(PROMPT_LENGTHS)[:, None]
    completion_mask = torch.arange(T)[None, :] < torch.tensor(COMPLETION_LENGTHS)[:, None]
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1).long()
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def _reference_log_probs(model, input_ids, attention_mask, params) -> torch.Tensor:
    """Unchunked: full forward with the same positions, [B, T, V] logits, then gather."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    lp = log_probs(logits[:, P - 1 : -1], params)
    return lp.gather(-1, input_ids[:, P:, None]).squeeze(-1)


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_completion_log_probs_match_the_unchunked_forward(model, sequences, params, chunk_size) -> None:
    input_ids, attention_mask = sequences
    with torch.no_grad():
        expected = _reference_log_probs(model, input_ids, attention_mask, params)
        got = completion_log_probs(model, input_ids, attention_mask, P, params, chunk_size=chunk_size)
    assert got.shape == (3, T) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("params", PARAMS)
def test_completion_log_probs_gradients_match_the_unchunked_forward(model, sequences, params) -> None:
    input_ids, attention_mask = sequences
    coeffs = torch.randn(3, T, generator=torch.Generator().manual_seed(1)) * attention_mask[:, P:]

    def param_grads(lp: torch.Tensor) -> list[torch.Tensor]:
        return torch.autograd.grad((lp * coeffs).sum(), list(model.parameters()))

    expected = param_grads(_reference_log_probs(model, input_ids, attention_mask, params))
    got = param_grads(completion_log_probs(model, input_ids, attention_mask, P, params, chunk_size=3))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_lm_head_never_sees_more_than_chunk_size_rows(model, sequences) -> None:
    input_ids, attention_mask = sequences
    rows: list[int] = []
    hook = model.lm_head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        completion_log_probs(model, input_ids, attention_mask, P, SamplingParams(), chunk_size=5).sum().backward()
    finally:
        hook.remove()
        model.zero_grad()
    # 12 token rows in chunks of 5, 5, 2; backward recomputes each chunk once (checkpointing), never all 12.
    assert rows[:3] == [5, 5, 2] and sorted(rows[3:]) == [2, 5, 5]


def test_left_padding_does_not_change_a_rows_log_probs(model, sequences) -> None:
    input_ids, attention_mask = sequences
    prompt_len, completion_len = PROMPT_LENGTHS[1], COMPLETION_LENGTHS[1]
    alone = input_ids[1:2, P - prompt_len : P + completion_len]
    with torch.no_grad():
        batched = completion_log_probs(model, input_ids, attention_mask, P, SamplingParams())
        single = completion_log_probs(model, alone, torch.ones_like(alone), prompt_len, SamplingParams())
    torch.testing.assert_close(single[0], batched[1, :completion_len], rtol=1e-5, atol=1e-5)


def test_completion_log_probs_refuses_a_transformed_lm_head(sequences) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
        final_logit_softcapping=30.0,
    )
    input_ids, attention_mask = sequences
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        completion_log_probs(LlamaForCausalLM(config), input_ids, attention_mask, P, SamplingParams())


# --- configuration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: CorrectionConfig(kind="tis"),
        lambda: CorrectionConfig(threshold=0.0),
        lambda: CorrectionConfig(mask_low=2.0, mask_high=0.5),
        lambda: CorrectionConfig(retrace_lambda=1.5),
        lambda: LossConfig(loss_type="bnpo"),
        lambda: LossConfig(epsilon=0.0),
        lambda: LossConfig(beta=-1.0),
        lambda: LossConfig(max_completion_length=0),
    ],
)
def test_invalid_configs_are_user_errors(make) -> None:
    with pytest.raises(UserError):
        make()
