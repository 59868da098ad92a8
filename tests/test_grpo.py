"""grpo.py: advantages, dynamic sampling, the clipped policy loss and its aggregations.

Each test states a small case worked out by hand, then the property that must hold in general.
"""

import math

import pytest
import torch

import grpo
import kl

ESTIMATORS = ("grpo", "reinforce_pp", "rloo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# ----------------------------------------------------------------------------- advantages

def test_grpo_advantage_by_hand():
    # Group 1: mean 0.5, population std 0.5              → A = ±0.5 / 0.5 = ±1
    # Group 2: mean 0.25, std sqrt((0.75² + 3·0.25²)/4) = sqrt(3)/4 → A = 0.75/(√3/4) = √3,
    # −0.25/(√3/4) = −1/√3
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0],
                             [math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3),
                              -1 / math.sqrt(3)]])
    torch.testing.assert_close(grpo.group_advantages(rewards, "grpo"), expected, atol=1e-5, rtol=0)


def test_reinforce_pp_advantage_by_hand():
    # r̃ = r − group mean: [.5, −.5, −.5, .5] and [.75, −.25, −.25, −.25]; the batch mean of r̃ is 0
    # and its population std is sqrt((4·0.25 + 0.5625 + 3·0.0625)/8) = sqrt(7/32). Unlike GRPO, the
    # second group's right answer gets 0.75/sqrt(7/32) = 1.604, not √3 = 1.732: one batch-wide scale
    # for every group.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    scale = math.sqrt(7 / 32)
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.75, -0.25, -0.25, -0.25]]) / scale
    torch.testing.assert_close(grpo.group_advantages(rewards, "reinforce_pp"), expected,
                               atol=1e-5, rtol=0)


def test_reinforce_pp_is_whitened_over_the_batch():
    rewards = torch.rand(8, 16)
    adv = grpo.group_advantages(rewards, "reinforce_pp")
    assert abs(adv.mean().item()) < 1e-5
    assert abs(adv.std(unbiased=False).item() - 1) < 1e-4


def test_rloo_advantage_by_hand():
    # Leave-one-out baseline: A_0 = 1 − mean(0, 0, 1) = 2/3,  A_1 = 0 − mean(1, 0, 1) = −2/3.
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1.0, -1 / 3, -1 / 3, -1 / 3]])
    torch.testing.assert_close(grpo.group_advantages(rewards, "rloo"), expected)


def test_rloo_equals_the_leave_one_out_definition():
    rewards = torch.rand(5, 6)
    total = rewards.sum(dim=1, keepdim=True)
    leave_one_out_mean = (total - rewards) / (rewards.shape[1] - 1)
    torch.testing.assert_close(grpo.group_advantages(rewards, "rloo"), rewards - leave_one_out_mean)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_an_all_equal_group_has_zero_advantage(estimator):
    # All right, all wrong, or all equally penalised: nothing to prefer, whatever the other groups
    # hold.
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.3, 0.3, 0.3, 0.3],
                            [1.0, 0.0, 1.0, 0.0]])
    adv = grpo.group_advantages(rewards, estimator)
    torch.testing.assert_close(adv[:3], torch.zeros(3, 4), atol=1e-6, rtol=0)
    assert adv[3].abs().min() > 0.5
    # every other group all right, among random ones whose centred batch mean is a rounding error
    # off 0: still exactly 0 (REINFORCE++ subtracts that batch mean from every response)
    mixed = torch.rand(64, 16, generator=torch.Generator().manual_seed(0))
    mixed[::2] = 1.0
    assert torch.equal(grpo.group_advantages(mixed, estimator)[::2], torch.zeros(32, 16))
    # a batch made only of such groups: zero, not NaN
    assert torch.equal(grpo.group_advantages(torch.ones(2, 4), estimator), torch.zeros(2, 4))
    # 16 equal shaped rewards whose float32 mean is one rounding step off the value (std exactly 0):
    # still 0
    shaped = torch.full((1, 16), 0.9885262)
    assert shaped.mean() != shaped[0, 0]
    assert torch.equal(grpo.group_advantages(shaped, estimator), torch.zeros(1, 16))


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_advantages_sum_to_zero_in_each_group_and_rank_like_rewards(estimator):
    rewards = torch.rand(6, 8)
    adv = grpo.group_advantages(rewards, estimator)
    torch.testing.assert_close(adv.sum(dim=1), torch.zeros(6), atol=1e-5, rtol=0)
    assert torch.equal(adv.argsort(dim=1), rewards.argsort(dim=1))


def test_unknown_estimator_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        grpo.group_advantages(torch.zeros(1, 2), "ppo")


# ----------------------------------------------------------------------------- dynamic sampling

def test_dynamic_sampling_drops_groups_whose_rewards_are_all_equal():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.9, 0.95, 0.9]])
    assert grpo.dynamic_sampling_mask(rewards).tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------- clipped policy loss

def ratios_case(ratios, adv, clip_low=0.2, clip_high=0.28):
    """policy_loss for one response whose tokens have the given ratios π/π_old, all unmasked."""
    ratio = torch.tensor([ratios])
    old_logp = torch.full_like(ratio, -1.0)
    return grpo.policy_loss(old_logp + ratio.log(), old_logp, torch.tensor([adv]),
                            torch.ones_like(ratio, dtype=torch.bool), clip_low, clip_high)


def test_policy_loss_positive_advantage_by_hand():
    # A = +1, ε_low = 0.2, ε_high = 0.28: per token max(−ρ, −clip(ρ, 0.8, 1.28))
    #   ρ = 1.0 → −1;  ρ = 1.5 → −1.28 (clipped);
    #   ρ = 0.5 → −0.5 (the lower bound never binds for A > 0);  ρ = 1.1 → −1.1
    loss, stats = ratios_case([1.0, 1.5, 0.5, 1.1], adv=1.0)
    assert loss.item() == pytest.approx(-(1.0 + 1.28 + 0.5 + 1.1) / 4)
    assert stats["clipfrac"].item() == pytest.approx(1 / 4)
    assert stats["ratio_mean"].item() == pytest.approx((1.0 + 1.5 + 0.5 + 1.1) / 4)
    log_ratios = torch.tensor([1.0, 1.5, 0.5, 1.1]).log()
    assert stats["approx_kl"].item() == pytest.approx((0.5 * log_ratios**2).mean().item())


def test_policy_loss_negative_advantage_by_hand():
    # A = −1: per token max(ρ, clip(ρ, 0.8, 1.28))
    #   ρ = 1.0 → 1;  ρ = 1.5 → 1.5 (the upper bound never binds for A < 0);
    #   ρ = 0.5 → 0.8 (clipped);  ρ = 1.1 → 1.1
    loss, stats = ratios_case([1.0, 1.5, 0.5, 1.1], adv=-1.0)
    assert loss.item() == pytest.approx((1.0 + 1.5 + 0.8 + 1.1) / 4)
    assert stats["clipfrac"].item() == pytest.approx(1 / 4)


def test_clip_higher_is_asymmetric():
    # ρ = 1.25 with A = +1: inside 1 + ε_high = 1.28, so not clipped; with symmetric bounds (0.2,
    # 0.2) it is.
    assert ratios_case([1.25], adv=1.0)[0].item() == pytest.approx(-1.25)
    assert ratios_case([1.25], adv=1.0, clip_high=0.2)[0].item() == pytest.approx(-1.2)
    # ρ = 0.75 with A = −1: below 1 − ε_low = 0.8, clipped whatever ε_high is.
    assert ratios_case([0.75], adv=-1.0)[0].item() == pytest.approx(0.8)
    assert ratios_case([0.75], adv=-1.0, clip_high=10.0)[1]["clipfrac"].item() == 1.0


def test_clipped_tokens_get_no_gradient_and_the_others_get_minus_a_times_ratio():
    # d(−A·ρ)/d logp = −A·ρ (ρ = exp(logp − old_logp)); token-mean over 4 tokens divides by 4.
    ratio = torch.tensor([[1.0, 1.5, 0.5, 1.1]])
    old_logp = torch.zeros_like(ratio)
    logp = ratio.log().requires_grad_()
    loss, _ = grpo.policy_loss(logp, old_logp, torch.tensor([1.0]),
                               torch.ones_like(ratio, dtype=torch.bool))
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, 0.0, -0.5, -1.1]]) / 4)


def test_at_ratio_one_the_loss_is_minus_the_mean_advantage():
    # The first mini-batch of an update: logp == old_logp, nothing is clipped, loss = −mean(A) per
    # token.
    logp = torch.randn(3, 5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0, 4.0])
    loss, stats = grpo.policy_loss(logp, logp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-1.0)
    assert stats["clipfrac"].item() == 0.0 and stats["ratio_mean"].item() == 1.0


def test_per_token_advantages_are_used_token_by_token():
    # One row, ratio e^0.1 = 1.105 on every token (inside the clip range), advantages that differ
    # along T: pg = −A·ρ per token, token-mean over the 3 tokens = −ρ·(1 − 2 + 3)/3 = −2ρ/3.
    old_logp = torch.zeros(1, 3)
    logp = torch.full((1, 3), 0.1)
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    loss = grpo.policy_loss(logp, old_logp, adv, torch.ones(1, 3, dtype=torch.bool))[0]
    assert loss.item() == pytest.approx(-2 * math.exp(0.1) / 3)
    # [B] advantages are the same as that value on every token of the row
    by_row = grpo.policy_loss(logp, old_logp, torch.tensor([2.0]),
                              torch.ones(1, 3, dtype=torch.bool))[0]
    assert by_row.item() == pytest.approx(-2 * math.exp(0.1))


# ----------------------------------------------------------------------------- aggregation

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0], [9.0, 9.0, 9.0, 9.0]])
# 9s are padding; row 3 is empty
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("agg, expected", [
    ("token-mean", (1 + 2 + 3 + 4) / 4),           # every token weighs the same
    # each response weighs the same; the empty one is skipped
    ("seq-mean-token-mean", ((1 + 2 + 3) / 3 + 4) / 2),
    ("seq-mean-token-sum", ((1 + 2 + 3) + 4) / 2),
])
def test_aggregations_by_hand(agg, expected):
    assert grpo.aggregate(PER_TOKEN, MASK, agg).item() == pytest.approx(expected)


def test_unknown_aggregation_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown loss aggregation 'sum'"):
        grpo.aggregate(PER_TOKEN, MASK, "sum")


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_masked_tokens_get_zero_gradient_from_the_policy_loss_and_the_kl(agg):
    torch.manual_seed(0)
    logp = (torch.randn(4, 6) * 0.1 - 1).requires_grad_()
    old_logp = logp.detach() + torch.randn(4, 6) * 0.3  # some tokens clipped, some not
    mask = torch.rand(4, 6) > 0.4
    mask[0] = False  # and one response with no tokens at all
    ref_logp = logp.detach() + torch.randn(4, 6)
    loss, _ = grpo.policy_loss(logp, old_logp, torch.randn(4), mask, agg=agg)
    # the whole training loss
    loss = loss + 0.1 * grpo.aggregate(kl.kl_penalty(logp, ref_logp, "k3"), mask, agg)
    loss.backward()
    assert torch.all(logp.grad[~mask] == 0)
    assert torch.any(logp.grad[mask] != 0)


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_a_huge_log_ratio_outside_the_mask_cannot_make_the_gradient_nan(agg):
    """At prompt and pad positions the log-probs are whatever the forward gave (the sampler wrote 0
    there): exp(100) or exp(−(−200)) overflows, and 0 · inf in the backward of exp would be NaN."""
    logp = torch.tensor([[-1.0, -0.5, -300.0], [-0.7, -2.0, -1.0]], requires_grad=True)
    old_logp = torch.tensor([[-1.2, -100.0, 0.0], [-0.6, -2.1, 100.0]])
    ref_logp = torch.tensor([[-1.1, 200.0, 0.0], [-0.9, -1.5, -400.0]])
    mask = torch.tensor([[True, False, False], [True, True, False]])
    loss, stats = grpo.policy_loss(logp, old_logp, torch.tensor([1.0, -1.0]), mask, agg=agg)
    loss = loss + 0.1 * grpo.aggregate(kl.kl_penalty(logp, ref_logp, "k3", mask=mask), mask, agg)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all()
    assert torch.all(logp.grad[~mask] == 0) and torch.all(logp.grad[mask] != 0)
    assert all(torch.isfinite(v) for v in stats.values())
    assert torch.equal(kl.kl_penalty(logp, ref_logp, "k3", mask=mask)[~mask], torch.zeros(3))


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_micro_batch_weights_recover_the_mini_batch_aggregate(agg):
    # learner.update sums Σ w·loss over micro-batches, w from the whole mini-batch's count: the sum
    # must equal the aggregate of the mini-batch in one piece (computed here from its definition,
    # not from the weights).
    torch.manual_seed(0)
    per_token = torch.randn(7, 5)
    mask = torch.rand(7, 5) > 0.5
    mask[2] = False
    count = grpo.loss_count(mask, agg)
    accumulated = sum((per_token[rows] * grpo.loss_weights(mask[rows], agg, count)).sum()
                      for rows in torch.arange(7).split(3))
    per_seq_sum, seq_tokens = (per_token * mask).sum(1), mask.sum(1)
    whole = {"token-mean": per_seq_sum.sum() / mask.sum(),
             "seq-mean-token-mean": (per_seq_sum / seq_tokens.clamp(min=1)).sum()
             / (seq_tokens > 0).sum(),
             "seq-mean-token-sum": per_seq_sum.sum() / (seq_tokens > 0).sum()}[agg]
    assert accumulated.item() == pytest.approx(whole.item(), abs=1e-6)
    assert grpo.aggregate(per_token, mask, agg).item() == pytest.approx(whole.item(), abs=1e-6)
    assert torch.all(grpo.loss_weights(mask, agg, count)[~mask] == 0)
