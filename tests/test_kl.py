"""kl.py: the k1, k2, k3 estimators of KL(π ‖ π_ref) and the (optionally clamped) penalty.

The estimators see only the log-probs of the sampled tokens. On a 3-token vocabulary the expectation
over x ~ π can be taken exactly, which shows which estimators are unbiased.
"""

import math

import pytest
import torch

import kl

LN2 = math.log(2)


@pytest.mark.parametrize("kind, expected", [
    ("k1", LN2),                    # logp − ref_logp = log 0.5 − log 0.25
    ("k2", 0.5 * LN2**2),           # ½ (log 0.5)²
    ("k3", 0.5 + LN2 - 1),          # e^{log 0.5} − log 0.5 − 1
])
def test_estimators_by_hand_when_the_policy_is_more_likely(kind, expected):
    logp, ref_logp = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl.kl_estimate(logp, ref_logp, kind).item() == pytest.approx(expected)


@pytest.mark.parametrize("kind, expected", [
    ("k1", -LN2),                   # k1 goes negative on a token the reference likes more
    ("k2", 0.5 * LN2**2),
    ("k3", 2 - LN2 - 1),            # e^{log 2} − log 2 − 1
])
def test_estimators_by_hand_when_the_reference_is_more_likely(kind, expected):
    logp, ref_logp = torch.tensor([math.log(0.25)]), torch.tensor([math.log(0.5)])
    assert kl.kl_estimate(logp, ref_logp, kind).item() == pytest.approx(expected)


def test_expectations_over_the_policy_k1_and_k3_are_unbiased_k2_is_not():
    # π = [½, ¼, ¼], π_ref = [¼, ¼, ½]:  KL(π‖π_ref) = ½ ln 2 + 0 + ¼ ln ½ = ¼ ln 2
    #                                   E_π[k2] = ½ (½ + ¼)(ln 2)² = (3/8)(ln 2)²
    policy, reference = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.25, 0.25, 0.5])
    def expectation(kind):
        return (policy * kl.kl_estimate(policy.log(), reference.log(), kind)).sum().item()
    assert expectation("k1") == pytest.approx(LN2 / 4)
    assert expectation("k3") == pytest.approx(LN2 / 4)
    assert expectation("k2") == pytest.approx(3 / 8 * LN2**2)


@pytest.mark.parametrize("kind", ["k2", "k3"])
def test_k2_and_k3_are_never_negative(kind):
    torch.manual_seed(0)
    logp, ref_logp = -torch.rand(10_000) * 10, -torch.rand(10_000) * 10
    assert kl.kl_estimate(logp, ref_logp, kind).min() >= 0


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_every_estimator_is_exactly_zero_when_the_policies_agree(kind):
    logp = -torch.rand(4, 7) * 5
    assert torch.equal(kl.kl_estimate(logp, logp.clone(), kind), torch.zeros(4, 7))


def test_k3_gradient_pulls_the_policy_towards_the_reference():
    # d k3 / d logp = 1 − π_ref/π: positive where π > π_ref, so a descent step lowers logp there.
    logp = torch.tensor([math.log(0.5), math.log(0.25)], requires_grad=True)
    ref_logp = torch.tensor([math.log(0.25), math.log(0.5)])
    kl.kl_estimate(logp, ref_logp, "k3").sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([1 - 0.5, 1 - 2.0]))


def test_penalty_clamp_bounds_each_token_and_none_leaves_it_alone():
    logp = torch.tensor([0.0, -6.0, -1.0])
    ref_logp = torch.tensor([-6.0, 0.0, -1.1])
    raw = kl.kl_penalty(logp, ref_logp, "k1")
    torch.testing.assert_close(raw, torch.tensor([6.0, -6.0, 0.1]))
    torch.testing.assert_close(kl.kl_penalty(logp, ref_logp, "k1", clamp=1.0),
                               torch.tensor([1.0, -1.0, 0.1]))
    k3 = kl.kl_penalty(logp, ref_logp, "k3", clamp=10.0)
    assert k3[1].item() == 10.0  # e^6 − 6 − 1 ≈ 396 clamped to 10
    assert k3[0].item() == pytest.approx(math.exp(-6) + 6 - 1)  # ≈ 5.0, left alone


def test_unknown_estimator_is_a_one_line_error():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl.kl_estimate(torch.zeros(1), torch.zeros(1), "k4")
