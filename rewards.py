r"""Verifiers: rewards.score(example, completion) -> float in [0, 1], one entry for every task.

A verifier never raises on model output: anything malformed scores 0. One per task (ProRL's five
domains plus the built-in toy tasks):

  task    reward                                  how
  math    1 if the final answer equals "answer"   math-verify: \boxed{} first, else the last
                                                  answer-like expression; equal as
                                                  numbers/sets/expressions
  code    fraction of "tests" passed (ProRL)      the last ```python block, run in the sandbox
  logic   the dataset's own score, continuous     reasoning-gym's scorer on the last
                                                  <answer>...</answer>, run in the sandbox (some
                                                  scorers eval() the answer)
  mcq     1 if the chosen letter is "answer"      "answer is (C)", "Answer: C", \boxed{C}, or "C"
  ifeval  fraction of "constraints" satisfied     prorl_verifiers/ifeval.py: IFEval's checks
                                                  (Zhou et al., 2023)

Reasoning before a closing </think> is never read as the answer, nor (for math, logic, mcq) anything
inside a fenced code block: code is not an answer.
"""

import ast
import base64
import functools
import math
import os
import pickle
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import chains
from prorl_verifiers import ifeval, logic_scorer, sandbox_host

# seconds math-verify may spend parsing or comparing one answer (\boxed{9^{9^{9^9}}} ...)
MATH_TIME_LIMIT = 5
# seconds of CPU time one reasoning-gym score may take (sympy stallers: 9**9**9**9) ...
LOGIC_TIME_LIMIT = 0.5
# at least this many answers share one sandbox run (its start imports reasoning-gym)
LOGIC_ANSWERS_PER_RUN = 64


def score(example: dict, completion: str) -> float:
    """Reward of one completion for one example, dispatched on example["task"]."""
    verifier = VERIFIERS.get(example.get("task"))
    if verifier is None:
        raise ValueError(f"no verifier for task '{example.get('task')}'; "
                         f"known: {', '.join(VERIFIERS)}")
    try:
        return float(verifier(example, completion))
    except VerifierUnavailable:  # the machine's fault, not the completion's: never a silent 0
        raise
    # a verifier that crashes on odd model output must not end a run
    except (Exception, SystemExit):  # noqa: BLE001
        return 0.0


class VerifierUnavailable(RuntimeError):
    """This machine cannot run a verifier as it must (logic scorers outside the sandbox, say)."""


def score_batch(examples: list[dict], completions: list[str],
                workers: int | None = None) -> list[float]:
    """score() for many completions at once: code in up to `workers` sandboxes side by side
    (default: one per core), all logic answers in one more sandbox, everything else meanwhile in
    this thread (math-verify's time limits need the main thread).
    """
    if len(examples) != len(completions):
        raise ValueError(f"score_batch got {len(examples)} examples but "
                         f"{len(completions)} completions")
    rewards = [0.0] * len(completions)
    logic = [i for i, example in enumerate(examples) if example.get("task") == "logic"]
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        code = {i: pool.submit(score, example, completion)
                for i, (example, completion) in enumerate(zip(examples, completions))
                if example.get("task") == "code"}
        logic_scores = pool.submit(score_logic_batch, [examples[i] for i in logic],
                                   [completions[i] for i in logic])
        for i, (example, completion) in enumerate(zip(examples, completions)):
            if i not in code and example.get("task") != "logic":
                rewards[i] = score(example, completion)
        for i, future in code.items():
            rewards[i] = future.result()
        for i, reward in zip(logic, logic_scores.result(), strict=True):
            rewards[i] = reward
    return rewards


def final_text(completion: str) -> str:
    """What a math/logic/mcq answer is read from: the text after the last </think>, code blocks
    removed."""
    return FENCED_BLOCK.sub(" ", after_thinking(completion))


def after_thinking(completion: str) -> str:
    return completion.rpartition("</think>")[2]


FENCED_BLOCK = re.compile(r"```.*?(?:```|\Z)", re.DOTALL)  # an unclosed fence runs to the end


# ----------------------------------------------------------------------------- math

def score_math(example: dict, completion: str) -> float:
    r"""1 if math-verify finds the completion's final answer equal to example["answer"], else 0.

    math-verify's parse() looks for \boxed{} first and falls back to the last LaTeX or plain
    expression ("... so the answer is 7.78."); verify() compares numbers, fractions, sets, intervals
    and symbolic expressions (so \boxed{1/2}, \boxed{0.5} and \frac{1}{2} all match "1/2"). Two
    different boxed answers parse as the set of both and match neither: hedging scores 0.
    """
    from math_verify import parse, verify  # imported here: sympy takes a second to load

    # math-verify enforces its time limits with SIGALRM, which only the main thread may set.
    seconds = MATH_TIME_LIMIT if threading.current_thread() is threading.main_thread() else None
    predicted = parse(final_text(completion), parsing_timeout=seconds)
    gold = parse_gold_answer(example["answer"], seconds)
    return float(bool(predicted) and verify(gold, predicted, timeout_seconds=seconds))


@functools.lru_cache(maxsize=4096)  # the N completions of a prompt share its answer
def parse_gold_answer(answer: str, seconds: int | None) -> list:
    r"""A dataset's answer ("\frac{1}{2}", "1/2", "$x^2+1$") as math-verify objects; bare LaTeX gets
    $...$."""
    from math_verify import parse

    return parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$",
                 parsing_timeout=seconds)


# ----------------------------------------------------------------------------- code

PYTHON_FENCE = re.compile(r"(?:python3?|py)[ \t]*\n")  # the language line of a Python block


def extract_program(completion: str) -> str | None:
    """The last closed ```python fenced block (```py and ```python3 too), or None.

    Fences open and close in turn, as in Markdown; split on them instead of a lazy regex, which
    rescans the rest of the text from every unclosed fence (quadratic on output that repeats
    ```python)."""
    pieces = after_thinking(completion).split("```")
    for block in reversed(pieces[1:-1:2]):  # what lies between an opening fence and its closing one
        language = PYTHON_FENCE.match(block)
        if language:
            return block[language.end():]
    return None


def score_code(example: dict, completion: str) -> float:
    """Fraction of example["tests"] the program passes (ProRL's continuous code reward).

    A test passes when the program exits cleanly within its limits and prints the expected output:
    stdin tests {"input", "output"} compare stdout line by line, trailing whitespace ignored; call
    tests {"call", "output"} compare the call's value with the Python literal "output". A test that
    errors, times out or is killed fails; no program, or a sandbox that fails as a whole, scores 0.
    """
    program = extract_program(completion)
    if program is None:
        return 0.0
    tests = example["tests"]
    try:
        inputs = [{"call": t["call"]} if "call" in t else {"input": t["input"]} for t in tests]
        time_limit = example.get("time_limit", sandbox_host.DEFAULT_TIME_LIMIT)
        # the problem's own memory limit, if any
        results = sandbox_host.run_tests(program, inputs, time_limit=time_limit,
                                         memory_mb=example.get("memory_limit_mb"))
    # the machine cannot sandbox (no libseccomp, say): never a silent 0
    except RuntimeError as error:
        raise VerifierUnavailable(f"code cannot be scored: {error}") from None
    if results is None:
        return 0.0
    return sum(r["status"] == "ok" and output_matches(r["output"], t)
               for r, t in zip(results, tests)) / len(tests)


def output_matches(output: str, test: dict) -> bool:
    # the sandbox prints repr(value) on the last line, after anything the program printed
    if "call" in test:
        lines = output.rstrip("\n").split("\n")
        return same_value(lines[-1], test["output"])
    return _lines(output) == _lines(test["output"])


def _lines(text: str) -> list[str]:
    return [line.rstrip() for line in text.rstrip().split("\n")]


def same_value(printed: str, expected: str) -> bool:
    """Equal as Python literals ("[1, 2]" == "[1,2]", "3" != "'3'"); as stripped text if either is
    not one."""
    try:
        return ast.literal_eval(printed.strip()) == ast.literal_eval(expected.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return printed.strip() == expected.strip()


# ------------------------------------------------------------------------- logic (reasoning-gym)

def tagged_answer(text: str) -> str | None:
    """What the last complete <answer>...</answer> holds, stripped, or None. (Found with rfind, not
    a regex: a lazy regex rescans the rest of the text from every unclosed tag, which is
    quadratic.)"""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, max(end, 0))
    return text[start + len("<answer>") : end].strip() if end >= 0 and start >= 0 else None


def score_logic(example: dict, completion: str) -> float:
    """reasoning-gym's own score for the last <answer>...</answer>, clipped to [0, 1]; no tag scores
    0."""
    return score_logic_batch([example], [completion])[0]


def score_logic_batch(examples: list[dict], completions: list[str]) -> list[float]:
    """score_logic for many completions: one sandbox run for the batch, a fresh process for each
    answer.

    Threat model. Some reasoning-gym scorers eval() the answer (spiral_matrix, n_queens,
    binary_matrix, string_insertion) or hand it to sympy's parse_expr, which evaluates too. Two
    walls, either enough alone:
      1. answer text is never run: in the sandbox those eval()s parse Python literals only, and
         sympy gets an answer only when its tokens are numbers, operators and math names (no
         strings, dots, dunders, builtins);
      2. each answer is scored in a process of its own (sandbox_host.run_tests: one test per
         answer), with only its own entry on its stdin, under a CPU-time limit the driver
         enforces; the driver, another uid, writes the results. So an answer that got past 1
         could set its own score (clipped to [0, 1], what a right answer gets) but never read,
         raise or lower another's, nor stall the batch. Nothing leaves the sandbox.
    Nothing is scored outside the sandbox: where it cannot import reasoning-gym, this is an error.
    """
    # one job per distinct (answer, problem): a group's samples often agree, and score alike
    answers = {}
    for i, (example, completion) in enumerate(zip(examples, completions)):
        if answer := tagged_answer(final_text(completion)):
            job = pickle.dumps((answer, example["dataset"], example["entry"]))
            answers.setdefault(job, []).append(i)
    jobs = list(answers)
    # side by side: a fork each answer is CPU-bound
    runs = max(1, min(os.cpu_count() or 1, len(jobs) // LOGIC_ANSWERS_PER_RUN))
    with ThreadPoolExecutor(max_workers=runs) as pool:
        chunks = (list(pool.map(score_in_sandbox, [jobs[k::runs] for k in range(runs)]))
                  if jobs else [])
    rewards = [0.0] * len(completions)
    for k, scores in enumerate(chunks):
        for job, reward in zip(jobs[k::runs], scores, strict=True):
            for i in answers[job]:
                rewards[i] = reward
    return rewards


def score_in_sandbox(jobs: list[bytes]) -> list[float]:
    """Scores of pickled (answer, dataset, entry) jobs: one sandbox run, one process per answer."""
    tests = [{"input": base64.b64encode(job).decode()} for job in jobs]
    preload = logic_scorer.logic_preload({pickle.loads(job)[1] for job in jobs})
    try:
        results = sandbox_host.run_tests(logic_scorer.LOGIC_SCORER, tests,
                                         time_limit=LOGIC_TIME_LIMIT, preload=preload)
    except RuntimeError as error:
        raise VerifierUnavailable(
            f"logic answers cannot be scored: {LOGIC_SANDBOX_HELP} ({error})") from None
    # the driver is out of every answer's reach: this is the machine, not the model
    if results is None:
        raise VerifierUnavailable("logic answers cannot be scored: the sandbox failed as a whole")
    return [logic_score(result) for result in results]


def logic_score(result: dict) -> float:
    """The score an answer's process printed, clipped to [0, 1]; a crash, a timeout, NaN or garbage
    scores 0."""
    try:
        score = float(result["output"]) if result["status"] == "ok" else 0.0
    except ValueError:
        return 0.0
    return 0.0 if math.isnan(score) else min(1.0, max(0.0, score))


LOGIC_SANDBOX_HELP = ("the sandbox cannot run reasoning-gym's scorers on this machine, and some of "
                      "them execute model-written text; install reasoning-gym in this Python "
                      "(pip install -r requirements.txt) where the sandbox can read it, or train "
                      "without logic and rg: sources")


@functools.cache  # once per process: a success is remembered, a failure raises again
def check_code_sandbox() -> None:
    """Raise ValueError (one line: why, what to do) unless the sandbox scores a right program 1."""
    example = {"task": "code", "tests": [{"input": "1 2\n", "output": "3\n"}]}
    try:
        score = score_code(example,
                           "```python\na, b = map(int, input().split())\nprint(a + b)\n```")
    except VerifierUnavailable as error:
        raise ValueError(str(error)) from None
    if score != 1.0:
        raise ValueError(f"code cannot be scored: a right program scored {score} in the sandbox")


@functools.cache  # once per process: a success is remembered, a failure raises again
def check_logic_sandbox() -> None:
    """Raise ValueError (one line: why, and what to do) unless the sandbox scores a right logic
    answer 1."""
    entry = {"question": "1 + 1", "answer": "2", "metadata": {}}
    try:
        example = {"task": "logic", "dataset": "basic_arithmetic", "entry": entry}
        scores = score_logic_batch([example], ["<answer>2</answer>"])
    except VerifierUnavailable as error:
        raise ValueError(str(error)) from None
    if scores != [1.0]:
        raise ValueError("logic answers cannot be scored: a right answer scored "
                         f"{scores[0]} in the sandbox")


# ---------------------------------------------------------------------- multiple choice (STEM)

# C, (C), ( C ): a letter that is not the start of a word; a parenthesis opened before it closes
# after it
_LETTER = r"(?:\(\s*([A-J])\s*\)|([A-J])(?![A-Za-z0-9]))"
MCQ_STATED = re.compile(r"(?:\\boxed\{\s*(?:\\text(?:bf)?\{\s*)?"
                        r"|(?i:answer|correct option|correct choice)(?:\s+(?i:is))?"
                        r"\s*[:=—-]?\s*(?i:option\s+|choice\s+)?\$?)" + _LETTER)
# just the letter: "C", "(C)", "C) Paris"
MCQ_ALONE = re.compile(r"^\s*\(?\s*([A-J])\s*(?:[).:]?\s*$|[).:]\s)")
MCQ_HEDGE = re.compile(r"\s*(?:,|/|&|\bor\b|\band\b)\s*\(?\s*[A-J](?![A-Za-z0-9])")


def choose_letter(completion: str) -> str | None:
    """The option letter a completion commits to, or None (no answer, or a hedge like "A or B")."""
    # **Answer:** C and **C** lose their stars; runs of whitespace become one space, which keeps the
    # patterns' adjacent \s* from backtracking through long runs (cubic time on "answer is" + 3000
    # newlines).
    text = re.sub(r"\s+", " ", final_text(completion).replace("*", ""))
    stated = list(MCQ_STATED.finditer(text)) or list(MCQ_ALONE.finditer(text))
    if not stated or MCQ_HEDGE.match(text, stated[-1].end()):
        return None
    return stated[-1].group(1) or stated[-1].group(2)


def score_mcq(example: dict, completion: str) -> float:
    return float(choose_letter(completion) == example["answer"].strip().upper())


# -------------------------------------------------------- instruction following (IFEval)

def score_ifeval(example: dict, completion: str) -> float:
    """ifeval.py's fraction of constraints satisfied, read from the response after any </think>. A
    response with nothing but the prompt copied back (or nothing at all) scores 0: it meets keyword
    and length checks for nothing."""
    response = after_thinking(completion)
    prompt = example["prompt"].strip()
    if not any(c.isalnum() for c in (response.replace(prompt, " ") if prompt else response)):
        return 0.0
    return ifeval.score(example, response)


check_constraint = ifeval.check_constraint  # the schema check of a constraint, where the checks are


# ----------------------------------------------------------------------------- built-in tasks

def score_exact(example: dict, completion: str) -> float:
    """add, sort, reverse: the completion (stripped, after any </think>) is exactly the answer."""
    return float(after_thinking(completion).strip() == example["answer"])


def score_countdown(example: dict, completion: str) -> float:
    """The completion (after any </think>) is an expression that uses each given number exactly once
    and equals the target."""
    expression = after_thinking(completion).strip()
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
            return {ast.Add: left + right, ast.Sub: left - right,
                    ast.Mult: left * right}[type(node.op)]
        raise ValueError(f"not allowed in an arithmetic answer: {ast.dump(node)[:40]}")

    return walk(ast.parse(expression, mode="eval"))


VERIFIERS = {"math": score_math, "code": score_code, "logic": score_logic, "mcq": score_mcq,
             "ifeval": score_ifeval, "add": score_exact, "sort": score_exact,
             "reverse": score_exact, "countdown": score_countdown, "chains": chains.score_chains}


