"""Prompt sources: the built-in procedural tasks, JSONL files, mixing, and a fixed held-out split.

An example is a plain dict: {"task": ..., "prompt": ..., plus what the
verifier in rewards.py needs}. Built-in examples also carry "solution", one correct completion, used
only by the supervised warm-start of the tiny base model (models.py), never by RL.

Built-in families (each with difficulty levels 1..3):
  add        "47+38="         -> "85"                  one right answer
  sort       "52 7 31 88 4="  -> "4 7 31 52 88"          one right answer
  reverse    "52 7 31 88<"    -> "88 31 7 52"            one right answer
  countdown  "3 7 9>30:"      -> "3*9+7" (or "9*3+7")  many right answers: the tiny model's pass@8 is far
                                                       above its pass@1, the regime where RL gains most
  chains     "31415:rev inc="  -> "51413 62524"        a written step per list operation; levels 1..5 are
                                                       chain depths (chains.py, with its held-out chains)

Sources, as named in `--tasks` (comma-separated SOURCE[:WEIGHT], weights normalised, default 1):
  add, sort, reverse, countdown, chains  the built-in families above
  math, code, logic, mcq, ifeval       ProRL's domains: the small sample files data/<domain>.jsonl
  rg:NAME                              any reasoning-gym dataset, generated on the fly (offline), as "logic"
  path/to/file.jsonl                   your own examples
  path/to/file.{jsonl,json,csv,parquet}  a dataset as published (verl parquet, IFEval, APPS, AIME, ...): its layout
                                       is recognised by its fields and converted (layouts.py); one line says how
  e.g.  --tasks math:0.3,code:0.2,rg:basic_arithmetic:0.2,mcq:0.1,ifeval:0.2

JSONL schema: one example per line, a JSON object with "task" and "prompt", and per task:
  math    "answer": the final answer, LaTeX or plain ("\\frac{1}{2}", "1/2")
  code    "tests": [{"input": stdin, "output": stdout}, ...] or [{"call": "f(1, 2)", "output": "3"}, ...];
          optional "entry_point" (the function's name), "time_limit" (seconds per test) and "memory_limit_mb"
  logic   "dataset": a reasoning-gym dataset name, "entry": one of its entries (question, answer, metadata)
  mcq     "answer": the right option's letter, A to J
  ifeval  "constraints": [{"kind": "max_words", "n": 50}, ...] (ifeval.CHECKS); optional "topic": [words]
  add, sort, reverse, countdown, chains: as the built-in generators make them
Any example may carry "solution", one completion that scores 1 (every shipped one is tested to),
and "source", the name of its row in reports (verl's data_source; label_sources names the rest).
A line that breaks the schema is an error naming the file and the line.
"""

import functools
import json
import math
import random
import warnings
import zlib
from collections import defaultdict
from pathlib import Path

import chains
import layouts
import rewards
from verifiers import ifeval

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


def make_reverse(rng: random.Random, level: int) -> dict:
    count = {1: 4, 2: 6, 3: 8}[level]
    numbers = [rng.randrange(100) for _ in range(count)]
    answer = " ".join(map(str, reversed(numbers)))
    return {"task": "reverse", "prompt": " ".join(map(str, numbers)) + "<", "answer": answer, "solution": answer}


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

DATA_DIR = Path(__file__).resolve().parent / "data"
DOMAINS = {domain: DATA_DIR / f"{domain}.jsonl" for domain in ["math", "code", "logic", "mcq", "ifeval"]}
REASONING_GYM = "rg:"  # prefix of a source generated by reasoning-gym: rg:basic_arithmetic
ANSWER_IN_TAGS = layouts.ANSWER_IN_TAGS  # one wording for generated problems and reasoning-gym dumps read from files


def make_reasoning_gym(dataset: str, rng: random.Random) -> dict:
    """A fresh problem from a reasoning-gym dataset, as a "logic" example (its difficulty is the dataset's own)."""
    entry = reasoning_gym_dataset(dataset, rng.randrange(2**31))[0]
    return {"task": "logic", "prompt": entry["question"] + ANSWER_IN_TAGS, "dataset": dataset, "entry": entry}


def reasoning_gym_dataset(dataset: str, seed: int):
    """A one-problem reasoning-gym dataset: a fresh seed per problem (a huge `size` would make some datasets
    precompute for minutes)."""
    import reasoning_gym

    check_reasoning_gym_name(dataset)
    return reasoning_gym.create_dataset(dataset, size=1, seed=seed)


def check_reasoning_gym_name(dataset: str) -> None:
    import reasoning_gym  # imported only when asked for: it takes seconds to load

    if dataset not in reasoning_gym.factory.DATASETS:
        raise ValueError(f"unknown reasoning-gym dataset '{dataset}'; known: "
                         f"{', '.join(sorted(reasoning_gym.factory.DATASETS))}")


def generate(name: str, rng: random.Random, level: int) -> dict:
    """One fresh problem of a procedural source: a built-in family or rg:NAME."""
    if name.startswith(REASONING_GYM):
        return make_reasoning_gym(name[len(REASONING_GYM):], rng)
    return BUILTIN[name](rng, level)


def max_level(spec: str) -> int:
    """The highest --level every family of a task mix has: chains go 5 deep, the other built-ins have 3 levels."""
    names = [name.split(":")[0] for name in spec.split(",") if name.strip()]
    return chains.MAX_DEPTH if names and all(name.strip() == "chains" for name in names) else 3


def is_procedural(name: str) -> bool:
    return name in BUILTIN or name.startswith(REASONING_GYM)


def is_heldout(example: dict) -> bool:
    return zlib.crc32(example["prompt"].encode()) % 100 < HELDOUT_PERCENT


def parse_mix(spec: str) -> dict[str, float]:
    """'add:1,countdown:2', 'add,countdown' or 'math:3,rg:basic_arithmetic:1' -> normalised weights {name: weight}."""
    weights = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        prefix = REASONING_GYM if part.startswith(REASONING_GYM) else ""  # rg:NAME has a colon of its own
        name, _, weight = part[len(prefix):].partition(":")
        name = prefix + name
        if name in weights:
            raise ValueError(f"task '{name}' is named twice in '{spec}': give it once, with its weight")
        try:
            weights[name] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"task weight in '{part}' is not a number") from None
        if not 0 < weights[name] < math.inf:
            raise ValueError(f"task weight in '{part}' must be a positive, finite number")
    if not weights:
        raise ValueError("no tasks given")
    total = sum(weights.values())
    return {name: w / total for name, w in weights.items()}


class TaskMix:
    """An endless stream of training examples drawn from several sources by weight.

    A source is a built-in family, a domain, rg:NAME or a JSONL path (see the top of this file).
    Problems that fall in the held-out split are skipped, so training never sees an evaluation problem.
    """

    def __init__(self, spec: str, level: int = 1, seed: int = 0):
        self.weights = parse_mix(spec)
        self.level = level
        self.rng = random.Random(seed)
        self.files = {}  # the training problems of each file source
        for name in self.weights:
            if not is_procedural(name):
                examples = load_source(name)
                self.files[name] = [ex for ex in examples if not is_heldout(ex)]
                if not self.files[name]:  # e.g. a file of a handful of problems: better than no training at all
                    warnings.warn(f"{name}: all {len(examples)} problems fall in the held-out split, so training "
                                  "uses them too and their held-out scores are not held out", stacklevel=2)
                    self.files[name] = examples
        for name in self.weights:
            if name.startswith(REASONING_GYM):
                check_reasoning_gym_name(name[len(REASONING_GYM):])  # an unknown name fails now, not mid-run
        kinds = {ex.get("task") for examples in self.files.values() for ex in examples}
        if "logic" in kinds or any(name.startswith(REASONING_GYM) for name in self.weights):
            rewards.check_logic_sandbox()  # its scorers may run answer text: the sandbox must run them, or no run
        if "code" in kinds:
            rewards.check_code_sandbox()  # programs run only in the sandbox: a missing wall stops us now
        self.drawn = 0  # position in the stream, saved by checkpoints

    def sample(self) -> dict:
        name = self.rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        self.drawn += 1
        if name in self.files:
            return self.rng.choice(self.files[name])
        while True:
            example = generate(name, self.rng, self.level)
            if not is_heldout(example):
                return example

    def observe(self, examples: list[dict], scores) -> None:
        """A fixed mix does not adapt to the scores (curriculum.EdgeCurriculum does)."""

    def stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.drawn = state["drawn"]


def no_heldout_error(source: str) -> ValueError:
    """What to tell a user whose tasks have nothing to evaluate on."""
    return ValueError(f"--tasks {source}: none of its problems falls in the held-out split (a fixed "
                      f"{HELDOUT_PERCENT}%, chosen by a hash of each prompt), so there is nothing to evaluate on: "
                      "add problems (of 50, ~5 are)")


def label_sources(problems: dict[str, list[dict]]) -> list[dict]:
    """{name in --tasks: examples} -> the examples, each with "source", the row that reports it: a
    built-in, rg:NAME or domain as named, a file by its stem (by its name where stems coincide) or
    by its examples' own "source" (verl's data_source), prefixed by the file where two give one,
    and suffixed by the task family where one name holds several."""
    stems = {name: name if is_procedural(name) or name in DOMAINS else Path(name).stem
             for name in problems}
    given = {name: stem if list(stems.values()).count(stem) == 1 else name
             for name, stem in stems.items()}
    rows, givers = [], defaultdict(set)  # a name -> the names in --tasks that give it
    for name, examples in problems.items():
        givers[given[name]].add(name)
        for example in examples:
            own = example.get("source") if isinstance(example.get("source"), str) else None
            rows.append((example, name, own or None))
            givers[own or None].add(name)
    families, named = defaultdict(set), []
    for example, name, own in rows:
        source = given[name]
        if own:  # a data_source that two files give is told apart by the file
            source = own if len(givers[own]) == 1 else f"{given[name]}/{own}"
        families[source].add(example["task"])
        named.append((example, source))
    return [{**ex, "source": f"{source}/{ex['task']}" if len(families[source]) > 1 else source}
            for ex, source in named]


def heldout(name: str, count: int, level: int = 1) -> list[dict]:
    """The first `count` distinct held-out problems of a source (the same on every run)."""
    if not is_procedural(name):
        first = {}  # by prompt: a problem repeated in the file counts once
        for example in load_source(name):
            if is_heldout(example):
                first.setdefault(example["prompt"], example)
        return list(first.values())[:count]
    rng, seen, out = random.Random(1234), set(), []
    for _ in range(1000 * count):
        example = generate(name, rng, level)
        if is_heldout(example) and example["prompt"] not in seen:
            seen.add(example["prompt"])
            out.append(example)
            if len(out) == count:
                break
    return out


def load_source(name: str) -> list[dict]:
    """The examples of a domain's sample file or of a file: our JSONL schema, or a published layout (layouts.py)."""
    path = DOMAINS.get(name, Path(name))
    if not path.is_file():
        raise ValueError(f"unknown task '{name}': not a built-in task ({', '.join(BUILTIN)}), a domain "
                         f"({', '.join(DOMAINS)}), {REASONING_GYM}NAME, nor a .jsonl, .json, .csv or .parquet file")
    records = layouts.read_records(path)
    if not records:
        raise ValueError(f"{path}: no examples")
    layout = layouts.detect(records[0], path)
    if layout == "prorl":
        examples, skipped, notes = load_jsonl(path) if path.suffix == ".jsonl" else checked(records, path), {}, {}
    else:
        examples, skipped, notes = layouts.convert(records, layout)
        examples = [example for example in examples if schema_error(example, skipped) is None]
        if not examples:
            raise ValueError(layouts.summary(path, layout, examples, skipped, notes) + ": nothing to train or test on")
    say_once(layouts.summary(path, layout, examples, skipped, notes))
    return examples


@functools.cache  # a file is read for training, validation and tests alike: say what it gave once
def say_once(line: str) -> None:
    print(line, flush=True)


def schema_error(example: dict, skipped) -> str | None:
    """check_example's complaint about a converted example, counted among the skipped; None if it is fine."""
    try:
        check_example(example)
    except ValueError as error:
        skipped[str(error)[:80]] += 1
        return str(error)
    return None


def checked(records: list, path: Path) -> list[dict]:
    """Our schema from a .json file: each record checked, an error naming its position."""
    for number, example in enumerate(records, start=1):
        try:
            check_example(example)
        except ValueError as error:
            raise ValueError(f"{path}: record {number}: {error}") from None
    return records


def load_jsonl(path: str | Path) -> list[dict]:
    """One example per line (schema at the top of this file); a bad line is an error naming the file and line."""
    examples = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as error:
        raise ValueError(f"{path}: cannot read it as UTF-8 text ({error.__class__.__name__})") from None
    # "\n" only: splitlines() would also cut at U+2028, U+2029 or \x85, which JSON strings may hold raw
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        try:
            check_example(example)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}") from None
        examples.append(example)
    if not examples:
        raise ValueError(f"{path}: no examples")
    return examples


def check_example(example: dict) -> None:
    """Raise ValueError, in one sentence, unless `example` has what its task's verifier needs."""
    if not isinstance(example, dict) or not isinstance(example.get("prompt"), str) or "task" not in example:
        raise ValueError("an example needs at least 'task' and 'prompt' fields")
    try:
        example["prompt"].encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the prompt holds a lone surrogate (\\ud800-\\udfff), which is not text") from None
    if "messages" in example:  # a chat prompt, rendered by the model's chat template
        try:
            layouts.chat_messages(example["messages"])
        except layouts.Skip:
            raise ValueError("'messages' must be a non-empty list of {\"role\": str, \"content\": str}") from None
    if not all(isinstance(example.get(field, ""), str) for field in ("task", "dataset")):
        raise ValueError("'task' and 'dataset' must be strings")
    task = example["task"]
    if task not in rewards.VERIFIERS:
        raise ValueError(f"unknown task '{task}'; known: {', '.join(rewards.VERIFIERS)}")
    required = {"math": ["answer"], "code": ["tests"], "logic": ["dataset", "entry"], "mcq": ["answer"],
                "ifeval": ["constraints"], "add": ["answer"], "sort": ["answer"], "reverse": ["answer"],
                "countdown": ["numbers", "target"], "chains": ["digits", "ops"]}
    missing = [field for field in required[task] if field not in example]
    if missing:
        raise ValueError(f"a '{task}' example needs the field(s) {', '.join(missing)}")
    if task == "math" and not isinstance(example["answer"], str):
        raise ValueError("a math answer must be a string, e.g. \"\\\\frac{1}{2}\" or \"0.5\"")
    if task in ("add", "sort", "reverse") and not isinstance(example["answer"], str):
        raise ValueError(f"an '{task}' answer must be a string (the completion is compared with it as text)")
    if task == "countdown" and not (isinstance(example["numbers"], list) and example["numbers"]
                                    and all(type(x) is int for x in example["numbers"] + [example["target"]])):
        raise ValueError("a countdown example needs 'numbers', a non-empty list of integers, and an integer 'target'")
    if task == "mcq" and not (isinstance(example["answer"], str) and len(example["answer"]) == 1
                              and "A" <= example["answer"] <= "J"):
        raise ValueError(f"an mcq answer must be one letter from A to J, not {example['answer']!r}")
    if task == "code":
        tests = example["tests"]
        if not (isinstance(tests, list) and tests):
            raise ValueError("'tests' must be a non-empty list")
        for test in tests:
            if not (isinstance(test, dict) and isinstance(test.get("output"), str)
                    and (isinstance(test.get("input"), str)) != (isinstance(test.get("call"), str))):
                raise ValueError(f"a code test needs 'output' and either 'input' or 'call', all strings: {test!r}")
        if not isinstance(example.get("entry_point", ""), str):
            raise ValueError("'entry_point' must be the name of a function, a string")
        limit = example.get("time_limit", 1)
        if not (isinstance(limit, (int, float)) and not isinstance(limit, bool) and 0 < limit <= 60):
            raise ValueError(f"'time_limit' must be a number of seconds in (0, 60], not {limit!r}")
        memory = example.get("memory_limit_mb", 64)
        if not (isinstance(memory, (int, float)) and not isinstance(memory, bool) and memory >= 16):
            raise ValueError(f"'memory_limit_mb' must be a number of megabytes ≥ 16, not {memory!r}")
    if task == "logic":
        if not (isinstance(example["entry"], dict) and {"question", "answer", "metadata"} <= set(example["entry"])):
            raise ValueError("'entry' must be a reasoning-gym entry, with its 'question', 'answer' and 'metadata'")
        check_reasoning_gym_name(example["dataset"])
    if task == "ifeval":
        if not (isinstance(example["constraints"], list) and example["constraints"]):
            raise ValueError("'constraints' must be a non-empty list")
        ifeval.check_example(example)
