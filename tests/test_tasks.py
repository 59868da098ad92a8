"""Built-in tasks: every generated solution verifies, wrong answers don't, and the held-out split
holds."""

import random

import pytest

import rewards
import tasks


@pytest.mark.parametrize("family", sorted(tasks.BUILTIN))
@pytest.mark.parametrize("level", [1, 2, 3])
def test_every_generated_solution_scores_one(family, level):
    rng = random.Random(0)
    for _ in range(200):
        example = tasks.BUILTIN[family](rng, level)
        assert rewards.score(example, example["solution"]) == 1.0
        assert rewards.score(example, example["solution"] + "1") == 0.0


def test_add_sort_and_reverse_by_hand():
    add = {"task": "add", "prompt": "47+38=", "answer": "85"}
    assert rewards.score(add, "85") == 1.0
    assert rewards.score(add, " 85 ") == 1.0  # surrounding whitespace is not an error
    assert rewards.score(add, "86") == 0.0
    assert rewards.score(add, "") == 0.0
    sort = {"task": "sort", "prompt": "52 7 31=", "answer": "7 31 52"}
    assert rewards.score(sort, "7 31 52") == 1.0
    assert rewards.score(sort, "7 52 31") == 0.0
    reverse = {"task": "reverse", "prompt": "52 7 31<", "answer": "31 7 52"}
    assert rewards.score(reverse, "31 7 52") == 1.0
    assert rewards.score(reverse, "7 31 52") == 0.0  # sorted is not reversed
    # a reasoning model's thoughts come first: only what follows the last </think> is the answer
    assert rewards.score(add, "<think>47+38: 7+8=15, carry 1</think>85") == 1.0
    assert rewards.score(add, "<think>85</think>86") == 0.0
    countdown = {"task": "countdown", "prompt": "?", "numbers": [3, 4], "target": 12}
    assert rewards.score(countdown, "<think>3*4 or 4*3</think> 4*3") == 1.0


def test_countdown_accepts_every_valid_expression_and_nothing_else():
    example = {"task": "countdown", "prompt": "3 7 9>34:", "numbers": [3, 7, 9], "target": 34}
    for right in ["3*9+7", "9*3+7", "7+9*3", "(9*3)+7", "7+3*9"]:
        assert rewards.score(example, right) == 1.0, right
    for wrong in ["3*9+8",      # wrong number
                  "9*3+7+0",    # a number that was not given
                  "34",         # the target itself
                  "3*9+7*1",    # an extra number
                  "(3+7)*9",    # right numbers, wrong value (90)
                  "3*9+7)",     # does not parse
                  "",           # empty
                  "__import__('os').system('true')",  # code is never run
                  "3**9"]:      # only + - * are allowed
        assert rewards.score(example, wrong) == 0.0, wrong


def test_evaluate_arithmetic_follows_precedence_and_rejects_the_rest():
    assert rewards.evaluate_arithmetic("2+3*4") == 14
    assert rewards.evaluate_arithmetic("(2+3)*4") == 20
    assert rewards.evaluate_arithmetic("7-10") == -3
    for bad in ["2/3", "2**3", "x+1", "-3", "2.5+1"]:
        with pytest.raises(ValueError):
            rewards.evaluate_arithmetic(bad)


def test_heldout_split_is_fixed_disjoint_and_large():
    for family in tasks.BUILTIN:
        problems = tasks.heldout(family, 500)
        assert len(problems) == 500
        assert len({p["prompt"] for p in problems}) == 500
        assert all(tasks.is_heldout(p) for p in problems)
        assert problems == tasks.heldout(family, 500)  # the same on every call, whatever the seed
    stream = tasks.TaskMix("add,sort,countdown", seed=3)
    drawn = [stream.sample() for _ in range(3000)]
    assert not any(tasks.is_heldout(example) for example in drawn)
    assert {example["task"] for example in drawn} == {"add", "sort", "countdown"}


def test_a_tenth_of_each_problem_space_is_held_out():
    rng = random.Random(0)
    for family in ("sort", "countdown"):
        prompts = {tasks.generate(family, rng, 1)["prompt"] for _ in range(20000)}
        share = sum(tasks.is_heldout({"prompt": p}) for p in prompts) / len(prompts)
        assert len(prompts) > 5000 and 0.09 < share < 0.11, (family, len(prompts), share)


def test_mix_weights():
    assert tasks.parse_mix("add:1,countdown:3") == {"add": 0.25, "countdown": 0.75}
    stream = tasks.TaskMix("add:1,countdown:3", seed=0)
    drawn = [stream.sample()["task"] for _ in range(4000)]
    assert 0.72 < drawn.count("countdown") / 4000 < 0.78
    for bad, message in [("add:x", "not a number"), ("add:-1", "positive, finite"),
                         ("", "no tasks"),
                         ("add:nan", "positive, finite"), ("add:inf", "positive, finite"),
                         ("add:1e309", "positive, finite"), ("sort,sort:3", "named twice")]:
        with pytest.raises(ValueError, match=message):
            tasks.parse_mix(bad)
    with pytest.raises(ValueError, match="unknown task 'nosuchtask'"):
        tasks.TaskMix("nosuchtask")
