"""Verifiers for ProRL's five domains, and the data that feeds them.

Each verifier meets correct, wrong, malformed and adversarial completions with the reward written
beside each; math is also checked against 40 cases from Math-Verify's own tests, logic against
reasoning-gym's own scorer. The hostile side of code (the sandbox) is tests/test_sandbox.py.
"""

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import reasoning_gym

import rewards
import tasks

CASES = json.loads((Path(__file__).parent / "data" / "math_verify_cases.json").read_text())["cases"]


# ----------------------------------------------------------------------------- math

@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_math_reproduces_math_verify_own_cases(case):
    # Completions here are mostly plain answers or prose without \boxed{}: the fallback must find
    # them.
    example = {"task": "math", "prompt": "...", "answer": case["gold"]}
    assert rewards.score(example, case["completion"]) == float(case["expected"])


HALF = {"task": "math", "prompt": "...", "answer": "\\frac{1}{2}"}


@pytest.mark.parametrize("completion, reward", [
    ("So the answer is $\\boxed{\\frac{1}{2}}$.", 1.0),       # correct
    # the same number, written differently
    ("\\boxed{1/2}", 1.0),
    ("\\boxed{0.5}", 1.0),
    ("The probability is 0.5", 1.0),                          # no \boxed{}: the last expression
    ("\\boxed{1/3}", 0.0),                                    # wrong
    ("\\boxed{1/2", 0.0),                                     # malformed: unclosed
    ("\\boxed{}", 0.0),
    ("", 0.0),                                                # empty
    # two different answers: a hedge, not an answer
    ("\\boxed{1/2} or maybe \\boxed{1/3}", 0.0),
    ("\\boxed{1/2}, that is \\boxed{0.5}", 1.0),              # two boxes, one answer
    ("<think>it might be \\boxed{1/2}</think> No idea.", 0.0),  # reasoning is not the answer
    ("<think>\\boxed{3}?</think> Final: \\boxed{1/2}", 1.0),
    ("```python\nprint(1/2)  # \\boxed{1/2}\n```", 0.0),        # code is not an answer
])
def test_math_by_hand(completion, reward):
    assert rewards.score(HALF, completion) == reward


def test_math_gold_answers_may_be_bare_latex_or_plain():
    for answer in ["x^2+1", "$x^2+1$", "\\boxed{x^2+1}", "1+x^2"]:
        assert rewards.score({"task": "math", "answer": answer}, "\\boxed{x^2 + 1}") == 1.0, answer
    assert rewards.score({"task": "math", "answer": "x^2+1"}, "\\boxed{x^2 - 1}") == 0.0


def test_math_gives_up_on_a_pathological_answer_in_time(monkeypatch):
    monkeypatch.setattr(rewards, "MATH_TIME_LIMIT", 1)
    start = time.monotonic()
    assert rewards.score({"task": "math", "answer": "1"}, "\\boxed{9^{9^{9^{9}}}}") == 0.0
    assert time.monotonic() - start < 4  # parse and verify each get at most 1 s


def test_math_scores_the_same_outside_the_main_thread():
    # math-verify's time limits use SIGALRM, which raises in any other thread: there we run without
    # them.
    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(rewards.score, HALF, "\\boxed{0.5}").result() == 1.0
        assert pool.submit(rewards.score, HALF, "\\boxed{0.25}").result() == 0.0


# -------------------------------------------- code (verdicts; the sandbox's walls: test_sandbox.py)

ADD = {"task": "code", "prompt": "...", "entry_point": "add",
       "tests": [{"call": "add(1, 2)", "output": "3"}, {"call": "add(-1, 1)", "output": "0"},
                 {"call": "add(2, 2)", "output": "4"}, {"call": "add('a', 'b')", "output": "'ab'"}]}
ECHO = {"task": "code", "prompt": "...",
        "tests": [{"input": "hello\n", "output": "olleh\n"}, {"input": "ab\n", "output": "ba\n"}]}


def block(program: str, fence: str = "python") -> str:
    return f"```{fence}\n{program}\n```"


@pytest.mark.parametrize("completion, reward", [
    (block("def add(a, b):\n    return a + b"), 1.0),
    ("I'll write it.\n" + block("def add(a, b):\n    return a + b") + "\nDone.", 1.0),
    (block("def add(a, b):\n    return a + b", fence="py"), 1.0),
    # last wins
    (block("def add(a, b):\n    return a * b") + "\n"
     + block("def add(a, b):\n    return a + b"), 1.0),
    # 2*2 only
    (block("def add(a, b):\n    return a + b") + "\n"
     + block("def add(a, b):\n    return a * b"), 0.25),
    # fails the string test: a fraction (ProRL)
    (block("def add(a, b):\n    return int(a) + int(b)"), 0.75),
    (block("def add(a, b):\n    return str(a + b)"), 0.25),       # '3' is not 3 ('ab' is 'ab')
    (block("def add(a, b):\n    return a + b", fence=""), 0.0),   # not marked as Python
    ("def add(a, b):\n    return a + b", 0.0),                    # no code block at all
    ("```python\ndef add(a, b):\n    return a + b", 0.0),         # unclosed: cut off mid-program
    (block("def add(a, b)\n    return a + b"), 0.0),              # syntax error
    ("", 0.0),
])
def test_code_call_tests(completion, reward):
    assert rewards.score(ADD, completion) == reward


def test_code_stdin_tests_compare_lines_ignoring_trailing_whitespace():
    assert rewards.score(ECHO, block("print(input()[::-1])")) == 1.0
    # trailing blanks: fine
    assert rewards.score(ECHO, block("print(input()[::-1] + '   ')\nprint()")) == 1.0
    # a leading one: not
    assert rewards.score(ECHO, block("print(' ' + input()[::-1])")) == 0.0
    assert rewards.score(ECHO, block("print(input())")) == 0.0
    assert rewards.score(ECHO, block("s = input()\nprint(s[::-1] if s == 'ab' else s)")) == 0.5


def test_code_honours_each_examples_time_limit():
    # CPU time
    slow = block("import time\nwhile time.process_time() < 0.6:\n    pass\nprint(input()[::-1])")
    assert rewards.score({**ECHO, "time_limit": 0.3}, slow) == 0.0
    assert rewards.score({**ECHO, "time_limit": 3}, slow) == 1.0


def test_same_value_compares_python_literals():
    assert rewards.same_value("[1, 2]", "[1,2]")
    assert rewards.same_value("{'a': 1}", "{'a': 1}")
    assert not rewards.same_value("'3'", "3")
    assert not rewards.same_value("(1, 2)", "[1, 2]")
    assert rewards.same_value("<object>", "<object>")  # not literals: compared as text
    assert not rewards.same_value("[" * 10000, "[]")  # hostile output is just a mismatch


# ---------------------------------------------------------------------------- logic (reasoning-gym)

def logic_example(dataset: str, seed: int) -> dict:
    entry = reasoning_gym.create_dataset(dataset, size=1, seed=seed)[0]
    return {"task": "logic", "prompt": entry["question"], "dataset": dataset, "entry": entry}


def test_logic_uses_the_datasets_own_scorer():
    example = logic_example("letter_counting", 5)
    answer = example["entry"]["answer"]
    dataset_score = reasoning_gym.get_score_answer_fn("letter_counting")
    for given in [answer, "no idea"]:
        assert rewards.score(example, f"Counting... <answer>{given}</answer>") == dataset_score(
            given, example["entry"])
    assert rewards.score(example, f"<answer>{answer}</answer>") == 1.0
    # the base scorer's credit for containing the oracle ("x4": 0.5) rewards hedging: 0 here (the
    # verifier audit)
    assert dataset_score("x" + answer, example["entry"]) > 0
    assert rewards.score(example, f"<answer>x{answer}</answer>") == 0.0


def test_logic_by_hand():
    example = logic_example("basic_arithmetic", 3)
    answer = example["entry"]["answer"]
    cases = [
        (f"<answer>{answer}</answer>", 1.0),
        # whitespace inside the tags
        (f"<answer>  {answer}\n</answer>", 1.0),
        ("<answer>12345678</answer>", 0.0),                              # wrong
        (answer, 0.0),                                                   # no tags: no answer
        (f"<answer>{answer}", 0.0),                                      # unclosed tag
        ("", 0.0),
        ("<answer></answer>", 0.0),
        # a tag inside a code block is code
        (f"```\n<answer>{answer}</answer>\n```", 0.0),
        (f"<answer>0</answer> no wait <answer>{answer}</answer>", 1.0),  # the last tag counts
        (f"<answer>{answer}</answer> no wait <answer>0</answer>", 0.0),
        # reasoning is not the answer
        (f"<think><answer>{answer}</answer></think>", 0.0),
    ]
    for completion, reward in cases:
        assert rewards.score(example, completion) == reward, completion


# Hostile logic answers, the sandbox they are scored in, and the error where it cannot run:
# test_logic_sandbox.py


# ----------------------------------------------------------------------------- multiple choice

@pytest.mark.parametrize("completion, reward", [
    ("The answer is (C).", 1.0), ("Answer: C", 1.0), ("**Answer:** C", 1.0),
    ("answer is: **(C)**", 1.0),
    ("\\boxed{C}", 1.0), ("$\\boxed{\\text{C}}$", 1.0), ("C", 1.0), ("(C)", 1.0),
    ("C) Carbon dioxide", 1.0),
    ("Option A fails. The correct option is C because ...", 1.0),
    ("The answer is option C.", 1.0), ("Answer: $C$", 1.0), ("Answer — C", 1.0),
    ("\\boxed{\\textbf{C}}", 1.0),
    ("Answer: C\nWait, no. The answer is B.", 0.0),   # the last statement counts
    ("The answer is B", 0.0),                         # wrong
    ("answer is c", 0.0),                             # lower case: the article "a", not a choice
    ("I think C", 0.0),                               # no answer stated
    ("Answer: Carbon", 0.0),                          # a word, not a letter
    ("", 0.0),
    # hedges
    ("The answer is A or C", 0.0), ("The answer is (C) or (A)", 0.0), ("Answer: C/D", 0.0),
    ("A, B, C, D", 0.0), ("C and D", 0.0),
    ("<think>the answer is C</think>", 0.0),          # reasoning is not the answer
    ("```\nAnswer: C\n```", 0.0),                     # code is not an answer
])
def test_mcq_by_hand(completion, reward):
    assert rewards.score({"task": "mcq", "prompt": "...", "answer": "C"}, completion) == reward


# ---------------------------------------------------------------------------- instruction following

@pytest.mark.parametrize("constraint, passes, fails", [
    ({"kind": "max_words", "n": 3}, "one two three", "one two three four"),
    ({"kind": "min_words", "n": 3}, "one, two, three.", "one two"),
    ({"kind": "max_sentences", "n": 2}, "One. Two!", "One. Two. Three?"),
    ({"kind": "min_sentences", "n": 2}, "One. Two!", "Just one."),
    ({"kind": "paragraphs", "n": 2}, "First.\n***\nSecond.", "First.\n\nSecond."),
    ({"kind": "include_keywords", "keywords": ["cat", "Dog"]},
     "A dog and a CAT.", "A dog and a caterpillar."),
    ({"kind": "forbidden_words", "words": ["love"]}, "I adore it; lovely.", "I Love it."),
    ({"kind": "keyword_frequency", "keyword": "tea", "n": 2},
     "Tea, then more tea.", "Tea, then coffee."),
    ({"kind": "json_format"}, '```json\n{"a": [1, 2]}\n```', "{'a': 1}"),
    ({"kind": "lowercase"}, "all quiet here.", "All quiet here."),
    ({"kind": "uppercase"}, "ALL LOUD HERE.", "ALL LOUD HERe."),
    ({"kind": "no_comma"}, "No commas here.", "Well, one."),
    ({"kind": "ends_with", "phrase": "Is there anything else?"},
     "Done. Is there anything else?  ", "Is there anything else? Done."),
    ({"kind": "quotation"}, '"Quoted."', '"Half quoted.'),
    ({"kind": "title"}, "<<My Title>>\nText.", "My Title\nText."),
    ({"kind": "bullet_points", "n": 2}, "* one\n- two", "* one\n* two\n* three"),
    ({"kind": "highlighted_sections", "n": 2}, "*a* and *b*", "*a* only"),
    ({"kind": "placeholders", "n": 2}, "Dear [name] at [address]", "Dear [name]"),
    ({"kind": "postscript", "marker": "P.S."}, "Bye.\nP.S. See you.", "Bye. See you."),
])
def test_ifeval_each_check(constraint, passes, fails):
    example = {"task": "ifeval", "prompt": "...", "constraints": [constraint]}
    assert rewards.score(example, passes) == 1.0
    assert rewards.score(example, fails) == 0.0


def test_ifeval_reward_is_the_fraction_satisfied():
    example = {"task": "ifeval", "prompt": "...", "constraints": [
        {"kind": "max_words", "n": 5}, {"kind": "lowercase"}, {"kind": "no_comma"},
        {"kind": "include_keywords", "keywords": ["cat"]}]}
    assert rewards.score(example, "a cat sat") == 1.0
    assert rewards.score(example, "A Cat, sat on the mat today") == 0.25   # only the keyword
    assert rewards.score(example, "dogs only") == 0.75
    # the response only
    assert rewards.score(example, "<think>Long, Thoughtful Reasoning</think>a cat sat") == 1.0
    # empty: no comma, few words, lower case... yet it follows nothing
    assert rewards.score(example, "") == 0.0
    assert rewards.score(example, "  \n ") == 0.0


def test_ifeval_constraints_are_checked_before_scoring():
    with pytest.raises(ValueError, match="unknown constraint kind 'max_wrods'"):
        rewards.check_constraint({"kind": "max_wrods", "n": 5})
    with pytest.raises(ValueError, match="max_words"):
        rewards.check_constraint({"kind": "max_words", "count": 5})
    rewards.check_constraint({"kind": "postscript"})  # its marker has a default
    with pytest.raises(ValueError, match="n must be an integer, got '50'"):
        rewards.check_constraint({"kind": "max_words", "n": "50"})
    with pytest.raises(ValueError, match="keywords must be a list of strings, got 'cat'"):
        rewards.check_constraint({"kind": "include_keywords", "keywords": "cat"})
    with pytest.raises(ValueError, match="phrase must be a string"):
        rewards.check_constraint({"kind": "ends_with", "phrase": 3})
    rewards.check_constraint({"kind": "keyword_frequency", "keyword": "cat", "n": 2})


DEGENERATE = [  # what a collapsed policy can emit, 40-60k characters: none may make a verifier slow
    "The answer is" + "\n" * 50_000, "Answer:" + " " * 50_000, " " * 50_000, "\n" * 50_000,
    "<answer>" * 6_000, "```python\n" * 5_000, "```" * 15_000, "[" * 50_000, "<<" * 25_000,
    "\\boxed{" * 5_000,
    "(" * 50_000, "P.S." + "\n" * 50_000, "1 " * 25_000,
]


@pytest.mark.parametrize("example", [
    {"task": "mcq", "prompt": "?", "answer": "C"},
    {"task": "ifeval", "prompt": "?", "constraints": [{"kind": k, **p} for k, p in [
        ("bullet_points", {"n": 2}), ("placeholders", {"n": 1}), ("title", {}), ("json_format", {}),
        ("postscript", {}), ("highlighted_sections", {"n": 1}), ("max_sentences", {"n": 3}),
        ("keyword_frequency", {"keyword": "answer", "n": 2})]]},
    {"task": "code", "prompt": "?", "tests": [{"input": "", "output": "1"}]},
    {"task": "logic", "prompt": "?", "dataset": "basic_arithmetic",
     "entry": {"question": "?", "answer": "1"}},
    {"task": "math", "prompt": "?", "answer": "1"},
], ids=lambda example: example["task"])
def test_degenerate_output_is_scored_fast(example):
    start = time.monotonic()
    scores = rewards.score_batch([example] * len(DEGENERATE), DEGENERATE)
    elapsed = time.monotonic() - start
    assert all(0.0 <= s <= 1.0 for s in scores)
    # code and logic start a sandbox, math has a time limit of its own per answer
    assert elapsed < {"math": 3 * rewards.MATH_TIME_LIMIT * len(DEGENERATE), "code": 30,
                      "logic": 30}.get(example["task"], 2.0), (
        f"{example['task']}: {elapsed:.1f} s")


# ----------------------------------------------------------------------------- scoring many at once

def test_score_batch_equals_score_one_by_one_in_order():
    examples, completions = [], []
    for example in (tasks.load_source("code")[:3] + tasks.load_source("math")[:3]
                    + tasks.load_source("mcq")[:2]):
        for completion in [example["solution"], "", "The answer is (A). \\boxed{7}"]:
            examples.append(example)
            completions.append(completion)
    examples.append({"task": "add", "prompt": "47+38=", "answer": "85"})
    completions.append("85")
    expected = [rewards.score(example, completion)
                for example, completion in zip(examples, completions)]
    assert rewards.score_batch(examples, completions, workers=4) == expected
    assert rewards.score_batch(examples, completions, workers=1) == expected
    assert expected[0] == 1.0 and expected[1] == 0.0 and expected[-1] == 1.0
    with pytest.raises(ValueError, match="2 examples but 1 completions"):
        rewards.score_batch(examples[:2], completions[:1])


# ---------------------------------------------------------------- the shipped data and task sources

@pytest.mark.parametrize("domain", sorted(tasks.DOMAINS))
def test_every_shipped_example_is_solved_by_its_solution_and_not_by_nothing(domain):
    examples = tasks.load_source(domain)
    assert len(examples) >= 10
    assert {example["task"] for example in examples} == {domain}
    solutions = [example["solution"] for example in examples]
    assert rewards.score_batch(examples, solutions) == [1.0] * len(examples)
    assert rewards.score_batch(examples, [""] * len(examples)) == [0.0] * len(examples)


@pytest.mark.parametrize("line, message", [
    ('{"task": "math", "prompt": "1+1?"', "not valid JSON"),
    ('{"task": "math", "prompt": "1+1?"}', "needs the field(s) answer"),
    ('{"task": "math", "prompt": "1+1?", "answer": 2}', "a math answer must be a string"),
    ('{"task": "mcq", "prompt": "?", "answer": "E)"}', "one letter from A to J"),
    ('{"task": "code", "prompt": "?", "tests": []}', "non-empty list"),
    ('{"task": "code", "prompt": "?", "tests": [{"input": "1", "call": "f(1)", "output": "1"}]}',
     "either 'input' or 'call'"),
    (('{"task": "logic", "prompt": "?", "dataset": "no_such_set", '
      '"entry": {"question": "?", "answer": "1", "metadata": {}}}'),
     "unknown reasoning-gym dataset"),
    ('{"task": "ifeval", "prompt": "?", "constraints": [{"kind": "shout"}]}',
     "unknown constraint kind 'shout'"),
    ('{"task": "poetry", "prompt": "?"}', "unknown task 'poetry'"),
    ('["task", "prompt"]', "needs at least 'task' and 'prompt'"),
    ('{"task": ["math"], "prompt": "?"}', "'task' and 'dataset' must be strings"),
    ('{"task": "reverse", "prompt": "1 2<"}', "a 'reverse' example needs the field(s) answer"),
    (('{"task": "code", "prompt": "?", "tests": [{"input": "", "output": "1"}], '
      '"time_limit": "abc"}'), "'time_limit'"),
    ('{"task": "code", "prompt": "?", "tests": [{"call": "f()", "output": "1"}], "entry_point": 5}',
     "'entry_point'"),
    ('{"task": "add", "prompt": "40+45=", "answer": 85}', "an 'add' answer must be a string"),
    ('{"task": "countdown", "prompt": "?", "numbers": "12", "target": "3"}',
     "a non-empty list of integers"),
    ('{"task": "logic", "prompt": "?", "dataset": "basic_arithmetic", "entry": {"question": "?"}}',
     "'metadata'"),
    ('{"task": "math", "prompt": "\\ud800?", "answer": "1"}', "lone surrogate"),
])
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"task": "math", "prompt": "1+1?", "answer": "2"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:3: .*{re.escape(message)}"):
        tasks.load_jsonl(path)


def test_a_file_that_is_not_utf8_is_an_error_naming_it(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"task": "math", "prompt": "café?", "answer": "1"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.jsonl: cannot read it as UTF-8 text"):
        tasks.load_jsonl(path)


def test_tasks_syntax_names_domains_reasoning_gym_and_files(tmp_path):
    assert tasks.parse_mix("math:3,rg:basic_arithmetic:1") == {"math": 0.75,
                                                              "rg:basic_arithmetic": 0.25}
    assert tasks.parse_mix("rg:basic_arithmetic,code") == {"rg:basic_arithmetic": 0.5, "code": 0.5}
    with pytest.raises(ValueError, match="not a number"):
        tasks.parse_mix("rg:basic_arithmetic:lots")
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'no_such_set'"):
        tasks.TaskMix("rg:no_such_set")
    own = tmp_path / "mine.jsonl"
    own.write_text('{"task": "mcq", "prompt": "Pick C.", "answer": "C"}\n')
    stream = tasks.TaskMix("math:0.3,code:0.2,logic:0.1,mcq:0.1,ifeval:0.1,rg:chain_sum:0.1,"
                           f"{own}:0.1", seed=0)
    drawn = [stream.sample() for _ in range(2000)]
    share = {task: sum(example["task"] == task for example in drawn) / len(drawn)
             for task in tasks.DOMAINS}
    # mine is mcq
    assert (0.26 < share["math"] < 0.34 and 0.17 < share["code"] < 0.23
            and 0.17 < share["mcq"] < 0.23)
    assert 0.17 < share["logic"] < 0.23  # the logic file and rg:chain_sum
    assert sum(example.get("dataset") == "chain_sum" for example in drawn) > 100
    assert not any(tasks.is_heldout(example) for example in drawn)


def test_reasoning_gym_sources_have_a_fixed_heldout_split_the_stream_never_draws():
    heldout = tasks.heldout("rg:basic_arithmetic", 20)
    assert len({example["prompt"] for example in heldout}) == 20
    assert heldout == tasks.heldout("rg:basic_arithmetic", 20)  # the same on every call and run
    assert all(example["task"] == "logic" and example["dataset"] == "basic_arithmetic"
               for example in heldout)
    assert all(rewards.score(e, f"<answer>{e['entry']['answer']}</answer>") == 1.0 for e in heldout)
    stream = tasks.TaskMix("rg:basic_arithmetic", seed=1)
    drawn = [stream.sample() for _ in range(300)]
    assert not {example["prompt"] for example in drawn} & {example["prompt"] for example in heldout}
    assert not any(tasks.is_heldout(example) for example in drawn)


def test_a_file_whose_problems_are_all_held_out_is_trained_on_with_a_warning(tmp_path):
    held = next(f"q{i}" for i in range(1000) if tasks.is_heldout({"prompt": f"q{i}"}))
    path = tmp_path / "tiny.jsonl"
    path.write_text(json.dumps({"task": "mcq", "prompt": held, "answer": "A"}) + "\n")
    with pytest.warns(UserWarning, match="all 1 problems fall in the held-out split"):
        stream = tasks.TaskMix(str(path))
    assert stream.sample()["prompt"] == held


def test_jsonl_strings_may_hold_unicode_line_separators_and_repeated_heldout_prompts_count_once(
        tmp_path):
    """U+2028, U+2029 and \\x85 are legal raw inside JSON strings (json.dumps(ensure_ascii=False)
    writes them): only "\\n" ends a line. A held-out problem repeated in the file is one problem,
    not several."""
    examples = [{"task": "math", "prompt": f"What is {i}+{i}?\u2028Line two\u2029\x85",
                 "answer": str(2 * i)}
                for i in range(60)]
    held = next(ex for ex in examples if tasks.is_heldout(ex))
    path = tmp_path / "seps.jsonl"
    path.write_text("".join(json.dumps(ex, ensure_ascii=False) + "\n"
                            for ex in examples + [held, held]),
                    encoding="utf-8")
    assert tasks.load_jsonl(path) == examples + [held, held]
    prompts = [ex["prompt"] for ex in tasks.heldout(str(path), 100)]
    assert held["prompt"] in prompts and len(prompts) == len(set(prompts))
