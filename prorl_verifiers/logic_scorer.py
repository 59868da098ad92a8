"""The programs that score logic answers inside the sandbox (rewards.score_logic_batch runs them
with sandbox_host.py): reasoning-gym's scorers, built once in the driver, each answer scored in a
process of its own, and the wrappers that take away the credit those scorers give to what is not an
answer (the verifier audit)."""

import sysconfig


def logic_preload(datasets: set[str]) -> str:
    """LOGIC_PRELOAD for these datasets: their scorers are built once, before the answers' processes
    fork."""
    # lib64 on some systems
    sites = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    # the paths last: a directory named <DATASETS> must not be replaced in turn
    preload = LOGIC_PRELOAD.replace("<DATASETS>", repr(sorted(datasets)))
    return preload.replace("<SITES>", repr(sites))


# Runs once in the sandbox's driver, before any answer: imports reasoning-gym (a second or two),
# then takes away the scorers' ways of running answer text. eval() in reasoning-gym's modules
# becomes a literal parser; sympy's parse_expr (sympify and parse_expr alike go through it) first
# checks every token of a string.
LOGIC_PRELOAD = """
import ast, base64, builtins, gc, io, keyword, os, pickle, re, site, sys, tokenize
os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
for directory in <SITES>:
    site.addsitedir(directory)
from collections import Counter
import reasoning_gym
import sympy
from sympy.parsing import sympy_parser

MATH_NAMES = {"sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "acot", "atan2",
              "sinh", "cosh", "tanh", "asinh", "acosh", "atanh", "exp", "log", "ln", "sqrt", "root",
              "cbrt", "Abs", "abs", "sign", "pi", "E", "I", "oo", "Rational", "Integer", "Float",
              "factorial", "binomial", "floor", "ceiling", "Max", "Min", "max", "min", "Mod", "gcd",
              "lcm", "round", "int", "float", "pow", "erf", "True", "False"}
NAMESPACE = {}
exec("from sympy import *", NAMESPACE)
FORBIDDEN_NAMES = (set(NAMESPACE) | set(dir(builtins)) | set(keyword.kwlist)) - MATH_NAMES
OPERATORS = {"+", "-", "*", "/", "//", "**", "^", "%", "(", ")", "[", "]", ",", "<", ">", "<=",
             ">=", "==", "!=", "&", "|", "~", "!"}
SKIPPED = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
           tokenize.COMMENT, tokenize.NUMBER}


def literal_only(text, *namespaces):
    return ast.literal_eval(text)


def refuse(*args, **kwargs):
    raise ValueError("no code is run while scoring")


def checked_parse_expr(text, local_dict=None, *args, **kwargs):
    if isinstance(text, str):
        allowed = set(local_dict or ())
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            name_ok = token.type == tokenize.NAME and (token.string in allowed or not (
                token.string.startswith("_") or token.string in FORBIDDEN_NAMES))
            if not (name_ok or token.type in SKIPPED or token.string.strip() in OPERATORS):
                raise ValueError(f"not a math expression: {token.string!r}")
    return original_parse_expr(text, local_dict, *args, **kwargs)


original_parse_expr = sympy_parser.parse_expr
sympy_parser.parse_expr = sympy.parse_expr = checked_parse_expr
for name, module in list(sys.modules.items()):
    if name.startswith("reasoning_gym") and module is not None:
        module.eval, module.exec = literal_only, refuse
        for attribute, value in list(vars(module).items()):
            if value is original_parse_expr:
                setattr(module, attribute, checked_parse_expr)
# an unknown dataset has no scorer: it scores 0
scorers = {dataset: reasoning_gym.get_score_answer_fn(dataset) for dataset in <DATASETS>
           if dataset in reasoning_gym.factory.DATASETS}
devnull = os.open(os.devnull, os.O_WRONLY)
# the answers' processes, forks of this one, then share its objects without copying them
gc.freeze()

# what separates candidates
HEDGE = re.compile(r"[,;\\n|]|\\b(?:or|and)\\b")


def answer_like(answer, dataset, entry):
    # What reasoning-gym's scorers credit yet is no answer (tests/test_verifier_audit.py): overlong,
    # the question copied back, the right answer among other candidates, numbers that are not the
    # puzzle's.
    oracle = str(entry.get("answer", "")).strip()
    question = str(entry.get("question", "")).strip()
    if len(answer) > 2 * len(oracle) + 64 or (question and question in answer):
        return False
    rest = answer.replace(oracle, " ", 1) if oracle else ""
    if oracle in answer and any(c.isalnum() for c in rest) and HEDGE.search(rest):
        # hedging: the right answer and another candidate ("3/4 or 6/8", "a, b" for "a")
        return False
    # the puzzle's own numbers: all of them (puzzle24), or some of them (countdown)
    if dataset in ("puzzle24", "countdown"):
        used = Counter(map(int, re.findall(r"[0-9]+", answer)))
        given = Counter(entry["metadata"]["numbers"])
        return not (used != given if dataset == "puzzle24" else used - given)
    return True


# Their partial credit rewards a wrong answer (the audit: another problem's answer scores 0.33 and
# 0.05): all or none.
ALL_OR_NONE = {"spell_backward", "fraction_simplification"}


def score_answer(answer, dataset, entry):
    if not answer_like(answer, dataset, entry):
        return 0.0
    score = float(scorers[dataset](answer, entry))
    if dataset in ALL_OR_NONE:
        return float(score == 1)
    # No partial credit for holding the right answer among more ("x4" for "4": the base scorer gives
    # 0.5), nor reasoning-gym's 0.01 for any answer at all.
    holds_oracle = str(entry.get("answer", "")).strip() in answer
    return 0.0 if score < 1 and holds_oracle or score <= 0.01 else score
"""

# Runs in the sandbox, in an answer's own process: its (answer, dataset, entry) on stdin, its score
# out. What the scorer prints goes to /dev/null; the score goes out on a copy of stdout taken
# before.
LOGIC_SCORER = """
gc.disable()
answer, dataset, entry = pickle.loads(base64.b64decode(sys.stdin.read()))
results = os.fdopen(os.dup(1), "w")
os.dup2(devnull, 1)
score = score_answer(answer, dataset, entry)
results.write(repr(score))
"""
