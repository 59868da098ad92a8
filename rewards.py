"""Verifiers: rewards.score(example, completion) -> float in [0, 1], and the scheduled length penalty.

A verifier never raises on model output: anything malformed scores 0.
"""

import ast
import math


def score(example: dict, completion: str) -> float:
    """Reward of one completion for one example, dispatched on example["task"]."""
    verifier = VERIFIERS.get(example.get("task"))
    if verifier is None:
        raise ValueError(f"no verifier for task '{example.get('task')}'; known: {', '.join(VERIFIERS)}")
    try:
        return float(verifier(example, completion))
    except Exception:  # a verifier that crashes on odd model output must not end a long run
        return 0.0


# ----------------------------------------------------------------------------- built-in tasks

def score_exact(example: dict, completion: str) -> float:
    """add, sort: the completion (stripped) is exactly the answer."""
    return float(completion.strip() == example["answer"])


def score_countdown(example: dict, completion: str) -> float:
    """The completion is an expression that uses each given number exactly once and equals the target."""
    expression = completion.strip()
    used = sorted(int(node.value) for node in ast.walk(ast.parse(expression, mode="eval"))
                  if isinstance(node, ast.Constant))
    if used != sorted(example["numbers"]):
        return 0.0
    return float(evaluate_arithmetic(expression) == example["target"])


def evaluate_arithmetic(expression: str) -> int:
    """Value of an integer expression with + - * and parentheses; anything else raises ValueError.

    Walks the syntax tree instead of calling eval(), so model output can never run code.
    """
    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
            left, right = walk(node.left), walk(node.right)
            if max(abs(left), abs(right)) > 10**12:
                raise ValueError("number too large")
            return {ast.Add: left + right, ast.Sub: left - right, ast.Mult: left * right}[type(node.op)]
        raise ValueError(f"not allowed in an arithmetic answer: {ast.dump(node)[:40]}")

    return walk(ast.parse(expression, mode="eval"))


VERIFIERS = {"add": score_exact, "sort": score_exact, "countdown": score_countdown}


# ----------------------------------------------------------------------------- length penalty

def length_penalty_coef(step: int, eta_min: float, eta_max: float, period: int, off_steps: int = 0) -> float:
    """ProRL v2's scheduled cosine length penalty coefficient η(t), switched on and off in cycles.

    Each cycle is `period` steps with the penalty on, then `off_steps` steps with it off (η = 0).
    Inside the on-phase, at t steps into it:  η(t) = η_min + ½(η_max − η_min)(1 + cos(π t / period)),
    so it starts at η_max and decays to η_min.
    """
    if eta_max == 0 and eta_min == 0:
        return 0.0
    t = step % (period + off_steps)
    if t >= period:
        return 0.0
    return eta_min + 0.5 * (eta_max - eta_min) * (1 + math.cos(math.pi * t / period))


def apply_length_penalty(rewards: list[float], lengths: list[int], max_len: int, eta: float) -> list[float]:
    """r − η · len/max_len: shorter answers are preferred by up to η per response (ProRL v2)."""
    return [r - eta * n / max_len for r, n in zip(rewards, lengths)]
