"""Benchmark the verifiers: completions scored per second, for code (10 tests each), math and logic.

    python bench/rewards.py            # about a minute on two cores

Code: the 12 problems of data/code.jsonl (10 tests each), 8 completions per problem: their reference
solution 6 times, a program that fails every test, one that crashes at once. Each completion gets
its own sandbox; rewards.score_batch runs one per core side by side, and once with a single worker
for comparison. (A program that times out costs its time limit per test on top, in waiting, not
CPU.)
Math: data/math.jsonl's 24 problems, 20 completions each (boxed, plain, equivalent and wrong
answers), scored by math-verify in the calling thread.
Logic: data/logic.jsonl's problems, 24 completions each (right, wrong, no tag), scored by
reasoning-gym in the sandbox: one run per 64 distinct answers (up to one per core; each starts by
importing reasoning-gym, a second or two), then a fresh process per distinct answer. Again with 24
distinct answers per problem (1 right, 23 wrong), where nothing is scored once for many.
Prints the machine's core count and load: on a shared machine other work slows every figure alike.
"""

import argparse
import os
import sys
import time

# the repository, not bench/
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import rewards
import tasks
from prorl_verifiers import sandbox_probe


def scored_batch(domain: str, completions_of) -> tuple[list[dict], list[str]]:
    """Every example of a domain's sample file, paired with each of completions_of(example)."""
    examples, completions = [], []
    for example in tasks.load_source(domain):
        for completion in completions_of(example):
            examples.append(example)
            completions.append(completion)
    return examples, completions


def code_completions(example: dict) -> list[str]:
    wrong = "```python\nprint('no')\n```"
    crash = "```python\nraise SystemExit(input())\n```"
    return [example["solution"]] * 6 + [wrong, crash]


def math_completions(example: dict) -> list[str]:
    answer = example["answer"]
    return [f"The answer is $\\boxed{{{answer}}}$.", f"Therefore the answer is ${answer}$.",
            (f"Lots of reasoning first. {'So on and so forth. ' * 40}"
             f"Final answer: \\boxed{{{answer}}}"),
            "\\boxed{12345}", "I am not sure."] * 4


def logic_completions(example: dict) -> list[str]:
    return [f"<answer>{example['entry']['answer']}</answer>", "<answer>wrong</answer>",
            "no tag"] * 8


def distinct_logic_completions(example: dict) -> list[str]:
    return [f"<answer>{example['entry']['answer']}</answer>"] + [f"<answer>wrong {k}</answer>"
                                                               for k in range(23)]


def throughput(examples: list[dict], completions: list[str],
               workers: int) -> tuple[float, list[float]]:
    start = time.perf_counter()
    scores = rewards.score_batch(examples, completions, workers=workers)
    return len(completions) / (time.perf_counter() - start), scores


def main() -> None:
    cores = os.cpu_count()
    print(f"machine: {cores} cores, load average {os.getloadavg()[0]:.1f}; sandbox protections: "
          f"{', '.join(name for name, on in sandbox_probe.protections().items() if on)}")
    examples, completions = scored_batch("code", code_completions)
    # warm up: the sandbox's mode is worked out once
    rewards.score_batch(examples[:cores], completions[:cores])
    per_second, scores = throughput(examples, completions, workers=cores)
    one_worker, _ = throughput(examples, completions, workers=1)
    print(f"code: {per_second:6.1f} completions/s with {cores} workers, {one_worker:6.1f} with 1 "
          f"({len(completions)} completions x 10 tests; "
          f"mean reward {sum(scores) / len(scores):.2f})")
    examples, completions = scored_batch("math", math_completions)
    rewards.score_batch(examples[:5], completions[:5])  # warm up: imports math-verify and sympy
    per_second, scores = throughput(examples, completions, workers=cores)
    print(f"math: {per_second:6.1f} completions/s ({len(completions)} completions; mean reward "
          f"{sum(scores) / len(scores):.2f})")
    examples, completions = scored_batch("logic", logic_completions)
    per_second, scores = throughput(examples, completions, workers=cores)
    print(f"logic: {per_second:5.1f} completions/s ({len(completions)} completions in one batch; "
          f"mean reward "
          f"{sum(scores) / len(scores):.2f})")
    examples, completions = scored_batch("logic", distinct_logic_completions)
    per_second, scores = throughput(examples, completions, workers=cores)
    print(f"logic: {per_second:5.1f} completions/s ({len(completions)} distinct answers in one "
          f"batch; mean reward "
          f"{sum(scores) / len(scores):.2f})")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
