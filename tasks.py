"""Prompt sources: the built-in procedural tasks, JSONL files, mixing, and a fixed held-out split.

An example is a plain dict (see ../shared/DESIGN.md): {"task": ..., "prompt": ..., plus what the
verifier in rewards.py needs}. Built-in examples also carry "solution", one correct completion, used
only by the supervised warm-start of the tiny base model (model.py), never by RL.

Built-in families (each with difficulty levels 1..3):
  add        "47+38="         -> "85"                  one right answer
  sort       "52 7 31 88 4="  -> "4 7 31 52 88"          one right answer
  countdown  "3 7 9>30:"      -> "3*9+7" (or "9*3+7")  many right answers: the tiny model's pass@8 is far
                                                       above its pass@1, the regime where RL gains most
"""

import json
import random
import zlib
from pathlib import Path

from rewards import evaluate_arithmetic

HELDOUT_PERCENT = 10  # a problem is held out iff crc32(its prompt) % 100 < 10: fixed for every run and seed


def make_add(rng: random.Random, level: int) -> dict:
    digits = {1: 2, 2: 3, 3: 4}[level]
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    return {"task": "add", "prompt": f"{a}+{b}=", "answer": str(a + b), "solution": str(a + b)}


def make_sort(rng: random.Random, level: int) -> dict:
    count = {1: 5, 2: 7, 3: 9}[level]
    numbers = [rng.randrange(100) for _ in range(count)]
    answer = " ".join(map(str, sorted(numbers)))
    return {"task": "sort", "prompt": " ".join(map(str, numbers)) + "=", "answer": answer, "solution": answer}


def make_countdown(rng: random.Random, level: int) -> dict:
    """Pick numbers and operators at random; the target is what that expression evaluates to."""
    count, high = {1: (3, 20), 2: (4, 20), 3: (5, 30)}[level]
    while True:
        numbers = [rng.randint(1, high) for _ in range(count)]
        ops = [rng.choice("+-*") for _ in range(count - 1)]
        solution = str(numbers[0]) + "".join(op + str(x) for op, x in zip(ops, numbers[1:]))
        target = evaluate_arithmetic(solution)
        if 0 < target < 1000:
            break
    prompt = " ".join(map(str, sorted(numbers))) + f">{target}:"
    return {"task": "countdown", "prompt": prompt, "numbers": sorted(numbers), "target": target,
            "solution": solution}


BUILTIN = {"add": make_add, "sort": make_sort, "countdown": make_countdown}


def is_heldout(example: dict) -> bool:
    return zlib.crc32(example["prompt"].encode()) % 100 < HELDOUT_PERCENT


def parse_mix(spec: str) -> dict[str, float]:
    """'add:1,countdown:2' or 'add,countdown' -> normalised weights {name: weight}."""
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, weight = part.partition(":")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"task weight in '{part}' is not a number") from None
        if weights[name] <= 0:
            raise ValueError(f"task weight in '{part}' must be positive")
    if not weights:
        raise ValueError("no tasks given")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


class TaskMix:
    """An endless stream of training examples drawn from several sources by weight.

    A source is a built-in family name or a path to a JSONL file. Built-in problems that fall in
    the held-out split are skipped, so training never sees an evaluation problem.
    """

    def __init__(self, spec: str, level: int = 1, seed: int = 0):
        self.weights = parse_mix(spec)
        self.level = level
        self.rng = random.Random(seed)
        self.files = {name: load_jsonl(name) for name in self.weights if name not in BUILTIN}
        self.drawn = 0  # position in the stream, saved by checkpoints

    def sample(self) -> dict:
        name = self.rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        self.drawn += 1
        if name in self.files:
            train = [ex for ex in self.files[name] if not is_heldout(ex)] or self.files[name]
            return self.rng.choice(train)
        while True:
            example = BUILTIN[name](self.rng, self.level)
            if not is_heldout(example):
                return example


def heldout(name: str, count: int, level: int = 1) -> list[dict]:
    """The first `count` distinct held-out problems of a built-in family (the same on every run)."""
    if name not in BUILTIN:
        return [ex for ex in load_jsonl(name) if is_heldout(ex)][:count]
    rng, seen, out = random.Random(1234), set(), []
    for _ in range(1000 * count):
        example = BUILTIN[name](rng, level)
        if is_heldout(example) and example["prompt"] not in seen:
            seen.add(example["prompt"])
            out.append(example)
            if len(out) == count:
                break
    return out


def load_jsonl(path: str) -> list[dict]:
    """One example per line; a bad line is an error that names the file and the line."""
    if not Path(path).is_file():
        raise ValueError(f"unknown task '{path}': not a built-in task ({', '.join(BUILTIN)}) nor a JSONL file")
    examples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(example, dict) or "task" not in example or "prompt" not in example:
            raise ValueError(f"{path}:{number}: an example needs at least 'task' and 'prompt' fields")
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples
