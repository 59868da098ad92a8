"""The exploration options of issue 15 (grpo.py): the analytic pass@k advantage and the unlikeliness
reward."""

import math

import pytest
import torch

import grpo


def test_passk_advantage_on_hand_worked_groups():
    """N = 4, k = 2.
    1 right (N_neg = 3): R̄ = 1 − C(3,2)/C(4,2) = 1/2, σ = 1/2; A₊ = (1/2)/(1/2) = 1,
                         A₋ = (1/2 − C(2,1)/C(3,1)) / (1/2) = (1/2 − 2/3)·2 = −1/3.
    2 right (N_neg = 2): R̄ = 1 − 1/6 = 5/6, σ = √5/6; A₊ = (1/6)/(√5/6) = 1/√5,
                         A₋ = (1/6 − C(1,1)/C(3,1)) / (√5/6) = −1/√5.
    3 right (N_neg = 1 < k): every pair holds a right sample, R̄ = 1, σ = 0 → all 0; so do all right
    and all wrong."""
    rewards = torch.tensor([[0.0, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    adv = grpo.group_advantages(rewards, "passk", k=2)
    s5 = 1 / math.sqrt(5)
    expected = torch.tensor([[-1 / 3, 1, -1 / 3, -1 / 3], [s5, -s5, s5, -s5], [0.0] * 4,
                             [0.0] * 4, [0.0] * 4])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=1e-5)


def test_passk_with_k_1_is_grpo_and_every_group_sums_to_zero():
    """k = 1: R̄ = c/N, A₊ = (1 − R̄)/σ and A₋ = −R̄/σ, GRPO's advantages for 0/1 rewards. For any
    k, c·A₊ + N_neg·A₋ = 0, since N_neg·C(N_neg−1, k−1)/C(N−1, k−1) = N·C(N_neg, k)/C(N, k)."""
    rewards = (torch.rand(64, 16, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    torch.testing.assert_close(grpo.group_advantages(rewards, "passk", k=1),
                               grpo.group_advantages(rewards, "grpo"), atol=1e-4, rtol=1e-4)
    for k in (2, 4, 8, 16):
        assert grpo.group_advantages(rewards, "passk", k=k).sum(dim=1).abs().max() < 1e-4


def test_passk_spends_the_update_on_groups_not_yet_solved_at_k():
    """N = 8, k = 4. 6 right (N_neg = 2 < k): every 4-subset passes, so the group is solved at
    pass@4 and gets 0, where GRPO (k = 1) still sharpens it. 1 right: R̄ = 1 − C(7,4)/C(8,4) = 1/2,
    σ = 1/2, A₊ = 1, A₋ = (1/2 − C(6,3)/C(7,3)) / (1/2) = (1/2 − 4/7)·2 = −1/7."""
    rewards = torch.tensor([[1.0, 1, 1, 1, 1, 1, 0, 0], [1.0, 0, 0, 0, 0, 0, 0, 0]])
    adv = grpo.group_advantages(rewards, "passk", k=4)
    torch.testing.assert_close(adv[0], torch.zeros(8))
    torch.testing.assert_close(adv[1], torch.tensor([1.0] + [-1 / 7] * 7), atol=1e-5, rtol=1e-5)
    assert grpo.group_advantages(rewards, "passk", k=1)[0].abs().min() > 0.5


def test_passk_needs_binary_rewards_and_k_within_the_group():
    with pytest.raises(ValueError, match="exactly 0 or 1"):
        grpo.group_advantages(torch.tensor([[1.0, 0.9]]), "passk", k=1)
    with pytest.raises(ValueError, match="--passk-k"):
        grpo.group_advantages(torch.tensor([[1.0, 0.0]]), "passk", k=3)


def test_unlikeliness_reward_on_a_hand_worked_group():
    """N = 4, β = 0.25, mean token log-probs [−1, −3, −0.5, −2]: ranks from least likely
    [2, 0, 3, 1]; rewards [1, 1, 0, 1] → [1·(1 − 0.25·2/4), 1·(1 − 0), 0, 1·(1 − 0.25·1/4)]
    = [0.875, 1, 0, 0.9375]."""
    rewards = torch.tensor([[1.0, 1, 0, 1]])
    seq_logp = torch.tensor([[-1.0, -3, -0.5, -2]])
    torch.testing.assert_close(grpo.unlikeliness_rewards(rewards, seq_logp, beta=0.25),
                               torch.tensor([[0.875, 1, 0, 0.9375]]))
    torch.testing.assert_close(grpo.unlikeliness_rewards(rewards, seq_logp, beta=0.0), rewards)


def test_unlikeliness_gives_the_rarest_right_sample_the_largest_advantage():
    """All four right: GRPO gives them 0; with the unlikeliness reward the least likely gets the
    most."""
    rewards, seq_logp = torch.ones(1, 4), torch.tensor([[-0.1, -2.0, -0.5, -1.0]])
    adv = grpo.group_advantages(grpo.unlikeliness_rewards(rewards, seq_logp), "grpo")[0]
    assert adv.argsort().tolist() == [0, 2, 3, 1]  # ascending advantage = descending likelihood
    assert adv[1] > 0 > adv[0]


def test_unlikeliness_ties_rank_in_order():
    ranked = grpo.unlikeliness_rewards(torch.ones(1, 3), torch.zeros(1, 3), beta=0.3)
    torch.testing.assert_close(ranked, torch.tensor([[1.0, 0.9, 0.8]]))
