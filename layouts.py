"""Data as it is published -> our examples (the schema at the top of tasks.py), each layout
recognised by its fields.

  layout          fields that identify it                          published as (examples)
  prorl           task, prompt                                     this project's JSONL
  verl            data_source, prompt (chat), reward_model         verl / OpenRLHF RL parquet:
                                                                   Eurus-2-RL-Data
  nemotron-if     input (chat), args                               Llama-Nemotron RL instruction
                                                                   following
  ifeval          prompt, instruction_id_list, kwargs              IFEval, IFBench
  livecodebench   question_content, public_test_cases              LiveCodeBench code_generation
  codeforces      official_tests                                   open-r1/codeforces
  apps            question, input_output                           APPS, TACO
  gpqa            Question, Correct Answer, Incorrect Answer 1..3  GPQA (CSV)
  mmlu-pro        question, options, answer                        MMLU-Pro
  reasoning-gym   question, answer, metadata                       reasoning-gym dataset dumps
  math            problem, answer                                  MATH-500, AIME, AMC, DeepScaleR

A file is .jsonl, .json (an array, or one object a line), .csv or .parquet; field names match in any
case. Data files are hostile input: a record that cannot be scored is skipped and the reason
counted, never guessed at, and nothing in one is ever executed or unpickled here. (LiveCodeBench's
private tests are pickles: they are read by record_fields.PlainUnpickler, which builds lists,
dicts and strings and refuses everything else.)
"""

import csv
import io
import json
import pickle
import random
import zlib
from collections import Counter
from pathlib import Path

from prorl_verifiers import ifeval
from record_fields import (
    Skip,
    answer_text,
    code_tests,
    json_field,
    limits,
    plain,
    private_tests,
    prompt_fields,
    text,
)

ANSWER_IN_TAGS = "\n\nGive only your final answer, inside <answer></answer> tags."
IN_BOXED = "\n\nPut your final answer in \\boxed{}."
PICK_A_LETTER = '\n\nAnswer with the letter of the correct option, as in "The answer is (B)".'
WRITE_A_PROGRAM = ("\n\nWrite a complete Python program that reads standard input, in a "
                   "```python code block.")
WRITE_A_FUNCTION = ("\n\nWrite the function `{}` in a ```python code block; it is called directly, "
                    "so read no input.")
LETTERS = "ABCDEFGHIJ"  # MCQ options, in the order the dataset lists them


def read_records(path: Path) -> list:
    """The records of a .jsonl, .json, .csv or .parquet file, as plain Python values."""
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet  # imported only for a parquet file: nothing else needs pyarrow

        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except (OSError, ValueError, pyarrow.ArrowException) as error:
            raise ValueError(f"{path}: cannot read it as parquet "
                             f"({str(error).splitlines()[0][:200]})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{path}: cannot read it as UTF-8 text "
                         f"({error.__class__.__name__})") from None
    if path.suffix.lower() == ".csv":
        try:
            return list(csv.DictReader(io.StringIO(text, newline="")))
        except csv.Error as error:
            raise ValueError(f"{path}: not valid CSV ({error})") from None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{path}: not a valid JSON array "
                             f"({getattr(error, 'msg', 'nested too deep')})") from None
    # "\n" only: splitlines() would also cut at U+2028, which JSON strings may hold raw
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        try:
            records += [json.loads(line)] if line.strip() else []
        except (json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{path}:{number}: not valid JSON "
                             f"({getattr(error, 'msg', 'too deep')})") from None
    return records


def detect(record, path: Path) -> str:
    """The name of the layout whose fields `record` has (the first in LAYOUTS), or a one-line
    error."""
    fields = {str(key).lower() for key in record} if isinstance(record, dict) else set()
    for name, (required, _) in LAYOUTS.items():
        if required <= fields:
            return name
    raise ValueError(f"{path}: a layout not recognised, with the fields {sorted(fields)[:20]}; "
                     f"read are {', '.join(LAYOUTS)} (see layouts.py)")


def convert(records: list, layout: str) -> tuple[list[dict], Counter, Counter]:
    """(examples, skipped reasons, notes) for the records of a file of a published layout."""
    required, to_example = LAYOUTS[layout]
    examples, skipped, notes = [], Counter(), Counter()
    for record in records:
        fields = ({str(key).lower(): value for key, value in record.items()}
                  if isinstance(record, dict) else {})
        try:
            if not required <= set(fields):
                raise Skip(f"not a {layout} record (missing "
                           f"{', '.join(sorted(required - set(fields)))})")
            examples.append(to_example(fields, notes))
        except Skip as reason:
            skipped[str(reason)] += 1
        except (ValueError, TypeError, KeyError, AttributeError, IndexError,
                RecursionError) as error:
            skipped[f"malformed ({error.__class__.__name__})"] += 1
    return examples, skipped, notes


def summary(path: Path, layout: str, examples: list[dict], skipped: Counter, notes: Counter) -> str:
    """The one start-up line that says what a file gave: layout, examples per task, what was skipped
    and why."""
    per_task = Counter(example["task"] for example in examples)
    line = (f"{path}: {layout} layout, {len(examples)} examples "
            f"({', '.join(f'{t} {n}' for t, n in per_task.items())})")
    if skipped:
        line += f"; skipped {sum(skipped.values())}: " + ", ".join(
            f"{why} {n}" for why, n in skipped.most_common())
    if notes:
        line += "; " + ", ".join(f"{what} {n}" for what, n in notes.most_common())
    return line


# ------------------------------------------------------------------------- one converter per layout

def from_verl(r: dict, notes: Counter) -> dict:
    """verl's RL parquet: the chat prompt as it is; math answers and code tests from
    reward_model.ground_truth."""
    ability, truth = (str(r.get("ability") or "").lower(),
                      (r["reward_model"] or {}).get("ground_truth"))
    if ability == "math":
        example = {"task": "math", "answer": answer_text(truth)}
    elif ability in ("code", "coding"):
        example = {"task": "code", **code_tests(json_field(truth))}
    else:
        raise Skip(f"ability {ability!r}, which has no verifier here")
    return {**example, **prompt_fields(r["prompt"]), "source": str(r["data_source"])}


def instruction_constraints(ids, kwargs) -> list[dict]:
    """IFEval's aligned instruction_id_list and kwargs as constraints; null kwargs dropped (HF's
    IFEval fills every kwarg of every instruction, mostly with nulls); an id we cannot check skips
    the whole example."""
    if not (isinstance(ids, list) and ids and isinstance(kwargs, list) and len(kwargs) == len(ids)):
        raise Skip("instruction ids and kwargs that do not align")
    constraints = []
    for kind, params in zip(ids, kwargs):
        if kind not in ifeval.CHECKS or ":" not in str(kind):
            raise Skip(f"an instruction we cannot check ({kind})")
        params = {k: int(v) if isinstance(v, float) and v.is_integer() else v
                  for k, v in (json_field(params) or {}).items() if v is not None}
        constraint = {"kind": kind, **params}
        try:
            ifeval.check_constraint(constraint)
        except ValueError as error:
            raise Skip(f"bad kwargs for {kind}") from error
        constraints.append(constraint)
    return constraints


def from_ifeval(r: dict, notes: Counter) -> dict:
    return {"task": "ifeval", "prompt": text(r["prompt"]),
            "constraints": instruction_constraints(r["instruction_id_list"], r["kwargs"])}


def from_nemotron(r: dict, notes: Counter) -> dict:
    # {"instruction_id_list", "instruction_kwargs"}: IFEval's two lists
    args = json_field(r["args"]) or {}
    return {"task": "ifeval", **prompt_fields(r["input"]),
            "constraints": instruction_constraints(args.get("instruction_id_list"),
                                                   args.get("instruction_kwargs"))}


def from_apps(r: dict, notes: Counter) -> dict:
    """APPS / TACO: input_output is JSON text {"inputs", "outputs"[, "fn_name"]}; TACO gives limits
    as text."""
    if not r["input_output"]:
        raise Skip("no tests")
    starter = r.get("starter_code") or ""
    tests = code_tests(json_field(r["input_output"]), in_class="class Solution" in starter)
    prompt = text(r["question"]) + (f"\n\nStart from:\n```python\n{starter}\n```"
                                    if starter else "")
    ask = (WRITE_A_FUNCTION.format(tests["entry_point"]) if "entry_point" in tests
           else WRITE_A_PROGRAM)
    return {"task": "code", "prompt": prompt + ask, **tests, **limits(r)}


def from_livecodebench(r: dict, notes: Counter) -> dict:
    """Public tests as JSON; private ones through private_tests (a pickle it refuses is counted, not
    run). Functional tests give one JSON argument a line and call Solution().func_name, as
    LiveCodeBench does."""
    cases = json_field(r["public_test_cases"])
    if r.get("private_test_cases"):
        try:
            cases = cases + private_tests(r["private_test_cases"])
        except (pickle.UnpicklingError, ValueError, TypeError, EOFError, zlib.error,
                IndexError, KeyError) as error:
            reason = ("refused: names code" if isinstance(error, pickle.UnpicklingError)
                      else "unreadable")
            notes[f"private tests {reason}, public ones kept"] += 1
    metadata = json_field(r.get("metadata") or "{}")
    name = metadata.get("func_name") if isinstance(metadata, dict) else None
    tests = []
    for case in cases:
        case = plain(case)
        if case.get("testtype") == "functional":
            args = [json.loads(line) for line in text(case["input"]).split("\n") if line.strip()]
            spec = {"inputs": [args], "outputs": [json.loads(text(case["output"]))],
                    "fn_name": name}
            tests += code_tests(spec, in_class=True)["tests"]
        else:
            tests.append({"input": text(case["input"]), "output": text(case["output"])})
    if not tests:
        raise Skip("no tests")
    starter = r.get("starter_code") or ""
    ask = (f"\n\nStart from:\n```python\n{starter}\n```" + WRITE_A_FUNCTION.format(name) if name
           else WRITE_A_PROGRAM)
    return {"task": "code", "prompt": text(r["question_content"]) + ask, "tests": tests,
            **({"entry_point": name} if name else {})}


def from_codeforces(r: dict, notes: Counter) -> dict:
    """open-r1/codeforces: official tests compared line by line, so a problem that needs its own
    checker (several right outputs) or talks to an interactor is skipped; limits from the record."""
    if r.get("interaction_format"):
        raise Skip("an interactive problem")
    if r.get("generated_checker"):
        raise Skip("a problem that needs its own output checker")
    if r.get("input_mode", "stdio") != "stdio":
        raise Skip("a problem that reads a file, not stdin")
    tests = [{"input": text(t["input"]), "output": text(t["output"])}
             for t in (r["official_tests"] or [])]
    if not tests:
        raise Skip("no tests")
    parts = [r.get("title"), r.get("description"),
             r.get("input_format") and "Input\n" + r["input_format"],
             r.get("output_format") and "Output\n" + r["output_format"]]
    for example in (r.get("examples") or [])[:3]:
        parts.append(f"Example input\n{text(example['input'])}\nExample "
                     f"output\n{text(example['output'])}")
    return {"task": "code", "prompt": "\n\n".join(text(p) for p in parts if p) + WRITE_A_PROGRAM,
            "tests": tests, **limits(r)}


def mcq(question: str, options: list, answer: str) -> dict:
    lines = "\n".join(f"({letter}) {text(option).strip()}"
                      for letter, option in zip(LETTERS, options))
    return {"task": "mcq", "prompt": f"{text(question).strip()}\n{lines}{PICK_A_LETTER}",
            "answer": answer}


def from_mmlu_pro(r: dict, notes: Counter) -> dict:
    options, answer, index = r["options"], r["answer"], r.get("answer_index")
    if not (isinstance(options, list) and 2 <= len(options) <= len(LETTERS)):
        raise Skip("not 2 to 10 options")
    if not (isinstance(answer, str) and answer in LETTERS[:len(options)]):
        raise Skip("no answer")
    if index is not None and index != LETTERS.index(answer):
        raise Skip("answer and answer_index that disagree")
    return mcq(r["question"], options, answer)


def from_gpqa(r: dict, notes: Counter) -> dict:
    """GPQA lists the right answer first: shuffle the four seeded by the question's own text (Random
    seeds a str by its SHA-512), so every run and machine gives each question the same order and the
    same right letter."""
    options = [text(r["correct answer"])] + [text(r[f"incorrect answer {i}"]) for i in (1, 2, 3)]
    order = list(range(4))
    random.Random(text(r["question"])).shuffle(order)
    return mcq(r["question"], [options[i] for i in order], LETTERS[order.index(0)])


def from_reasoning_gym(r: dict, notes: Counter) -> dict:
    metadata = r["metadata"] if isinstance(r["metadata"], dict) else {}
    if not isinstance(metadata.get("source_dataset"), str):
        raise Skip("no metadata.source_dataset")
    entry = {"question": text(r["question"]), "answer": r["answer"], "metadata": metadata}
    return {"task": "logic", "prompt": entry["question"] + ANSWER_IN_TAGS,
            "dataset": metadata["source_dataset"], "entry": entry}


def from_math(r: dict, notes: Counter) -> dict:
    return {"task": "math", "prompt": text(r["problem"]) + IN_BOXED,
            "answer": answer_text(r["answer"])}


# name -> (fields that identify it, lower case; converter). Order matters: the first whose fields a
# record has wins.
LAYOUTS = {
    "prorl": ({"task", "prompt"}, None),
    "verl": ({"data_source", "prompt", "reward_model"}, from_verl),
    "nemotron-if": ({"input", "args"}, from_nemotron),
    "ifeval": ({"prompt", "instruction_id_list", "kwargs"}, from_ifeval),
    "livecodebench": ({"question_content", "public_test_cases"}, from_livecodebench),
    "codeforces": ({"official_tests"}, from_codeforces),
    "apps": ({"question", "input_output"}, from_apps),
    "gpqa": ({"question", "correct answer"}
             | {f"incorrect answer {i}" for i in (1, 2, 3)}, from_gpqa),
    "mmlu-pro": ({"question", "options", "answer"}, from_mmlu_pro),
    "reasoning-gym": ({"question", "answer", "metadata"}, from_reasoning_gym),
    "math": ({"problem", "answer"}, from_math),
}
