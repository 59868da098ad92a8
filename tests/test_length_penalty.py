"""rewards.py: ProRL v2's scheduled cosine length penalty, η(t) = η_min + ½(η_max − η_min)(1 + cos(π
t / T)), switched on for T steps and off for `off_steps` steps, in cycles."""

import itertools
import math

import pytest
import torch

import grpo

# ProRL v2 preset's schedule: η from 0.1 down to 0 over 200 steps, then 100 steps off.
V2 = {"eta_min": 0.0, "eta_max": 0.1, "period": 200, "off_steps": 100}


@pytest.mark.parametrize("step, expected", [
    (0, 0.1),                                          # start of the on-phase: η_max
    (50, 0.05 * (1 + math.cos(math.pi / 4))),          # ½ · 0.1 · (1 + cos(π/4)) = 0.0854
    (100, 0.05),                                       # halfway: the mean of η_max and η_min
    (199, 0.05 * (1 + math.cos(math.pi * 199 / 200))),  # last on step: almost η_min
    (200, 0.0), (299, 0.0),                            # the off-phase
    (300, 0.1), (400, 0.05), (500, 0.0),               # the next cycle repeats the first
])
def test_schedule_by_hand(step, expected):
    assert grpo.length_penalty_coef(step, **V2) == pytest.approx(expected, abs=1e-12)


def test_eta_min_is_the_floor_of_the_on_phase():
    # η_min = 0.02, η_max = 0.1: halfway 0.02 + ½ · 0.08 · 1 = 0.06; the on-phase never goes below
    # 0.02
    assert (grpo.length_penalty_coef(50, eta_min=0.02, eta_max=0.1, period=100)
            == pytest.approx(0.06))
    coefs = [grpo.length_penalty_coef(t, eta_min=0.02, eta_max=0.1, period=100)
             for t in range(300)]
    assert min(coefs) >= 0.02 and max(coefs) == pytest.approx(0.1)


def test_without_off_steps_the_cosine_restarts_right_away():
    coefs = [grpo.length_penalty_coef(t, eta_min=0.0, eta_max=1.0, period=4) for t in range(8)]
    assert coefs == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5,
                                   0.5 * (1 - math.cos(math.pi / 4))] * 2)


def test_decays_monotonically_within_an_on_phase():
    coefs = [grpo.length_penalty_coef(t, **V2) for t in range(200)]
    assert all(a > b for a, b in itertools.pairwise(coefs))


def test_off_by_default():
    assert all(grpo.length_penalty_coef(t, eta_min=0.0, eta_max=0.0, period=100) == 0.0
               for t in range(250))


def test_apply_length_penalty_by_hand():
    # r − η · len / max_len with η = 0.1, max_len = 8
    penalised = grpo.apply_length_penalty(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([4, 8, 2]),
                                             max_len=8, eta=0.1)
    assert penalised.tolist() == pytest.approx([0.95, 0.9, -0.025])
