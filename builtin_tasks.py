"""The procedural task families: built-in arithmetic and list tasks with difficulty levels 1..3
(chains, the composition family, lives in chains.py), and fresh reasoning-gym problems. tasks.py
mixes them with data files; the schema of the examples they make is at the top of tasks.py."""

import random

import chains
import layouts
import rewards


def make_add(rng: random.Random, level: int) -> dict:
    digits = {1: 2, 2: 3, 3: 4}[level]
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    return {"task": "add", "prompt": f"{a}+{b}=", "answer": str(a + b), "solution": str(a + b)}


def make_sort(rng: random.Random, level: int) -> dict:
    count = {1: 5, 2: 7, 3: 9}[level]
    numbers = [rng.randrange(100) for _ in range(count)]
    answer = " ".join(map(str, sorted(numbers)))
    return {"task": "sort", "prompt": " ".join(map(str, numbers)) + "=", "answer": answer,
            "solution": answer}


def make_reverse(rng: random.Random, level: int) -> dict:
    count = {1: 4, 2: 6, 3: 8}[level]
    numbers = [rng.randrange(100) for _ in range(count)]
    answer = " ".join(map(str, reversed(numbers)))
    return {"task": "reverse", "prompt": " ".join(map(str, numbers)) + "<", "answer": answer,
            "solution": answer}


def make_countdown(rng: random.Random, level: int) -> dict:
    """Pick numbers and operators at random; the target is what that expression evaluates to."""
    count, high = {1: (3, 20), 2: (4, 20), 3: (5, 30)}[level]
    while True:
        numbers = [rng.randint(1, high) for _ in range(count)]
        ops = [rng.choice("+-*") for _ in range(count - 1)]
        solution = str(numbers[0]) + "".join(op + str(x) for op, x in zip(ops, numbers[1:]))
        target = rewards.evaluate_arithmetic(solution)
        if 0 < target < 1000:
            break
    prompt = " ".join(map(str, sorted(numbers))) + f">{target}:"
    return {"task": "countdown", "prompt": prompt, "numbers": sorted(numbers), "target": target,
            "solution": solution}


BUILTIN = {"add": make_add, "sort": make_sort, "reverse": make_reverse, "countdown": make_countdown,
           "chains": chains.make_chains}


# one wording for generated problems and reasoning-gym dumps read from files
ANSWER_IN_TAGS = layouts.ANSWER_IN_TAGS


def make_reasoning_gym(dataset: str, rng: random.Random) -> dict:
    """A fresh problem from a reasoning-gym dataset, as a "logic" example (its difficulty is the
    dataset's own)."""
    entry = reasoning_gym_dataset(dataset, rng.randrange(2**31))[0]
    return {"task": "logic", "prompt": entry["question"] + ANSWER_IN_TAGS, "dataset": dataset,
            "entry": entry}


def reasoning_gym_dataset(dataset: str, seed: int):
    """A one-problem reasoning-gym dataset: a fresh seed per problem (a huge `size` would make some
    datasets precompute for minutes)."""
    import reasoning_gym

    check_reasoning_gym_name(dataset)
    return reasoning_gym.create_dataset(dataset, size=1, seed=seed)


def check_reasoning_gym_name(dataset: str) -> None:
    import reasoning_gym  # imported only when asked for: it takes seconds to load

    if dataset not in reasoning_gym.factory.DATASETS:
        raise ValueError(f"unknown reasoning-gym dataset '{dataset}'; known: "
                         f"{', '.join(sorted(reasoning_gym.factory.DATASETS))}")
