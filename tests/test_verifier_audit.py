"""The verifier audit (issue 23): every verifier the project ships or reaches, given degenerate and
adversarial answers. RL finds a verifier's holes; each probe must score 0 where the right answer
scores 1.

Probes, each put where the verifier reads an answer (the <answer> tags, \\boxed{}, a ```python
block, ...):
  empty       nothing in the answer's place
  prompt      the prompt copied back as the answer
  other       the right answer to another problem of the same source
  hedge       every candidate at once: the right answer among wrong ones
  numbers     numbers not from the problem (where the answer is built from the problem's numbers)
  overlong    the right answer followed by 50,000 more characters in the answer's place
`python tests/test_verifier_audit.py` prints the audit's table (README's "Rewards, sandbox and task
data").
"""

import argparse
import os
import random
import sys

import pytest
import reasoning_gym

if __name__ == "__main__":
    # the repository, not tests/
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import rewards
import tasks

BUILTINS = ["add", "sort", "reverse", "countdown", "chains"]
DOMAINS = ["math", "code", "mcq", "ifeval"]
# reasoning-gym datasets: data/logic.jsonl's, and those README names (puzzle24's scorer is wrapped)
DATASETS = sorted({"base_conversion", "basic_arithmetic", "chain_sum", "family_relationships",
                   "fraction_simplification", "gcd", "letter_counting", "number_sorting",
                   "simple_equations", "spell_backward", "syllogism", "word_sorting",
                   "spiral_matrix", "n_queens", "products", "countdown", "puzzle24",
                   "polynomial_multiplication"})
FILLER = " 9" * 25_000  # 50,000 characters
# answers that reach the target from numbers the problem did not give
NUMBER_PUZZLES = {"puzzle24": lambda entry: "6*4*1*1",
                  "countdown": lambda entry: f"{entry['metadata']['target']} + 0 * 1",
                  "products": lambda entry: f"{entry['answer']} * 1"}


def two_problems(source: str) -> tuple[dict, dict]:
    """Two problems of a source, with the right completion of each in "solution"."""
    if source.startswith("rg:"):
        return reasoning_gym_problems(source[3:])
    if source in BUILTINS:
        rng = random.Random(7)
        first = tasks.generate(source, rng, 2)
        while (second := tasks.generate(source, rng, 2))["solution"] == first["solution"]:
            pass
        return first, second
    if source in DOMAINS:
        examples = tasks.load_source(source)
        return examples[0], examples[1]
    raise ValueError(source)


def reasoning_gym_problems(source: str) -> tuple[dict, dict]:
    entries = list(reasoning_gym.create_dataset(source, size=8, seed=11))
    first = entries[0]
    # else "other" is right too
    second = next(entry for entry in entries if entry["answer"] != first["answer"])
    return tuple({"task": "logic", "prompt": entry["question"], "dataset": source, "entry": entry,
                  "solution": f"<answer>{entry['answer']}</answer>"} for entry in (first, second))


def answer_of(example: dict) -> str:
    """The answer text a right completion puts in the answer's place."""
    task = example["task"]
    if task == "logic":
        return example["entry"]["answer"]
    if task == "math":
        return example["answer"]
    if task == "mcq":
        return example["answer"]
    if task == "code":
        return rewards.extract_program(example["solution"])
    return example["solution"]


def wrap(example: dict, text: str) -> str:
    """A completion holding `text` where this verifier reads the answer."""
    return {"logic": f"<answer>{text}</answer>", "math": f"The answer is $\\boxed{{{text}}}$.",
            "mcq": f"The answer is ({text}).",
            "code": f"```python\n{text}\n```"}.get(example["task"], text)


def probes(example: dict, other: dict) -> dict[str, str]:
    right, task = answer_of(example), example["task"]
    found = {"empty": wrap(example, ""), "prompt": wrap(example, example["prompt"]),
             "other": other["solution"], "overlong": wrap(example, right + FILLER)}
    if task == "mcq":
        found["hedge"] = wrap(example, "A, B, C or D")
    elif task == "code":
        found["hedge"] = wrap(example,
                              right + "\nprint(" + repr(str(other["tests"][0]["output"])) + ")")
    elif task != "ifeval":
        wrong = answer_of(other)
        found["hedge"] = wrap(example, f"{right} or {wrong}") if task != "math" else (
            f"$\\boxed{{{right}}}$ or $\\boxed{{{wrong}}}$")
    if task == "countdown":
        found["numbers"] = f"{example['target']} + 0"
    if example.get("dataset") in NUMBER_PUZZLES:
        found["numbers"] = wrap(example, NUMBER_PUZZLES[example["dataset"]](example["entry"]))
    return found


def audit() -> dict[str, tuple[float, dict[str, float]]]:
    """For each verifier: (the right answer's score, {probe: score})."""
    rows, examples, completions, slots = {}, [], [], []
    for name in BUILTINS + DOMAINS + [f"rg:{dataset}" for dataset in DATASETS]:
        example, other = two_problems(name)
        for probe, completion in {"right": example["solution"], **probes(example, other)}.items():
            examples.append(example)
            completions.append(completion)
            slots.append((name, probe))
    for (name, probe), score in zip(slots, rewards.score_batch(examples, completions)):
        rows.setdefault(name, (None, {}))
        if probe == "right":
            rows[name] = (score, rows[name][1])
        else:
            rows[name][1][probe] = score
    return rows


# Accepted probes by verifier: none since issue 23 (IFEval gained its topic and length checks).
KNOWN: dict[str, set[str]] = {}


@pytest.fixture(scope="module")
def audited():
    return audit()


@pytest.mark.parametrize("name", BUILTINS + DOMAINS + [f"rg:{d}" for d in DATASETS])
def test_a_right_answer_scores_1_and_no_probe_scores_above_0(audited, name):
    right, scores = audited[name]
    assert right == 1.0, (name, right)
    accepted = {probe for probe, score in scores.items() if score > 0}
    assert accepted == KNOWN.get(name, set()), (name, scores)


def table(rows: dict) -> str:
    lines = ["| verifier | probes | accepted (score > 0) |", "|---|---|---|"]
    for name, (right, scores) in rows.items():
        accepted = ", ".join(f"{p} {s:.2g}" for p, s in scores.items() if s > 0) or "none"
        lines.append(f"| {name} | {', '.join(scores)} | {accepted} (right answer: {right:g}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(table(audit()))
