"""Published layouts -> our examples: a few records written in each layout (parquet with pyarrow,
here), the examples tasks.load_source makes of them, and that a right completion scores 1 and a
wrong one 0."""

import base64
import csv
import json
import os
import pickle
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import evaluation
import models
import rewards
import tasks


def write(path, records):
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def code(program: str) -> str:
    return f"```python\n{program}\n```"


def test_verl_parquet_keeps_chat_messages_and_reads_math_and_code(tmp_path, capsys):
    system = {"role": "system", "content": "Think step by step."}
    path = write(tmp_path / "eurus.parquet", [
        {"data_source": "numina_olympiads",
         "prompt": [system, {"role": "user", "content": "What is 6 * 7?"}], "ability": "math",
         "reward_model": {"style": "rule", "ground_truth": "42"}, "extra_info": {"index": 0}},
        {"data_source": "taco", "prompt": [{"role": "user", "content": "Print a+b."}],
         "ability": "code",
         "reward_model": {"style": "rule",
                          "ground_truth": json.dumps({"inputs": ["1 2\n", "5 5\n"],
                                                      "outputs": ["3\n", "10\n"]})},
         "extra_info": {"index": 1}},
        {"data_source": "chem", "prompt": [{"role": "user", "content": "?"}],
         "ability": "chemistry",
         "reward_model": {"style": "rule", "ground_truth": "H2O"}, "extra_info": {"index": 2}},
    ])
    math, program = tasks.load_source(path)
    assert math == {"task": "math", "answer": "42",
                    "prompt": "Think step by step.\n\nWhat is 6 * 7?",
                    "messages": [system, {"role": "user", "content": "What is 6 * 7?"}],
                    "source": "numina_olympiads"}
    assert program["tests"] == [{"input": "1 2\n", "output": "3\n"},
                                {"input": "5 5\n", "output": "10\n"}]
    assert capsys.readouterr().out.strip() == (f"{path}: verl layout, 2 examples (math 1, code 1); "
                                               "skipped 1: ability 'chemistry', which has no "
                                               "verifier here 1")
    assert (rewards.score(math, "So \\boxed{42}.") == 1.0
            and rewards.score(math, "So \\boxed{41}.") == 0.0)
    assert rewards.score(program, code("a, b = map(int, input().split())\nprint(a + b)")) == 1.0
    # ProRL's code reward: the fraction of tests passed
    assert rewards.score(program, code("print(3)")) == 0.5


def test_chat_messages_go_through_the_models_chat_template():
    tokenizer = models.build_tokenizer()
    messages = [{"role": "system", "content": "1"}, {"role": "user", "content": "2+3="}]
    plain = models.encode_prompt(tokenizer, messages)  # no template: BOS, then the contents joined
    assert plain == ([tokenizer.bos_token_id]
                     + tokenizer("1\n\n2+3=", add_special_tokens=False)["input_ids"])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}:{% endfor %}"
    assert models.encode_prompt(tokenizer, messages) == tokenizer("1:2+3=:",
                                                                  add_special_tokens=False)["input_ids"]
    assert (models.encode_prompt(tokenizer, "2+3=")
            == tokenizer("2+3=:", add_special_tokens=False)["input_ids"])


def test_ifeval_and_ifbench_rows(tmp_path, capsys):
    # HF's IFEval fills every kwarg, mostly null
    nulls = {"num_words": None, "relation": None, "keywords": None}
    path = write(tmp_path / "ifeval.jsonl", [
        {"key": 1, "prompt": "Describe tea in under 5 words, no commas.",
         "instruction_id_list": ["length_constraints:number_words", "punctuation:no_comma"],
         "kwargs": [{**nulls, "num_words": 5, "relation": "less than"}, nulls]},
        {"key": 2, "prompt": "Réponds en français.",
         "instruction_id_list": ["language:response_language"], "kwargs": [{"language": "fr"}]},
        {"key": 3, "prompt": "Use 3 emojis.",
         "instruction_id_list": ["count:emoji", "punctuation:no_comma"],
         "kwargs": [{"n": 3}, None]},
    ])
    [example] = tasks.load_source(path)
    assert example["constraints"] == [{"kind": "length_constraints:number_words", "num_words": 5,
                                       "relation": "less than"}, {"kind": "punctuation:no_comma"}]
    line = capsys.readouterr().out
    assert "ifeval layout, 1 examples (ifeval 1); skipped 2:" in line
    assert "an instruction we cannot check (language:response_language) 1" in line
    # IFBench's: skipped, never scored as passed
    assert "an instruction we cannot check (count:emoji) 1" in line
    assert rewards.score(example, "Hot leaves in water.") == 1.0
    # a comma, and 5 words is not under 5
    assert rewards.score(example, "Tea, hot leaves in water.") == 0.0


def test_nemotron_instruction_following(tmp_path):
    path = write(tmp_path / "nemotron.jsonl", [{
        "input": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Say hi in capitals."}],
        "args": {"instruction_id_list": ["change_case:english_capital"],
                 "instruction_kwargs": [{}]}}])
    [example] = tasks.load_source(path)
    assert example["messages"][0] == {"role": "system", "content": "Be brief."}
    assert example["constraints"] == [{"kind": "change_case:english_capital"}]
    assert rewards.score(example, "HI!") == 1.0 and rewards.score(example, "Hi!") == 0.0


def test_apps_and_taco_stdin_and_call_based(tmp_path):
    path = write(tmp_path / "taco.jsonl", [
        {"question": "Double n.",
         "input_output": json.dumps({"inputs": ["2\n"], "outputs": [["4"]]}),
         "starter_code": "", "time_limit": "2 seconds", "memory_limit": "256 megabytes"},
        {"question": "Add.",
         "input_output": json.dumps({"fn_name": "add", "inputs": [[1, 2], ["a", "b"]],
                                    "outputs": [[3], ["ab"]]}), "starter_code": "def add(a, b):"},
        {"question": "Area.",
         "input_output": json.dumps({"fn_name": "area", "inputs": [[[1, 2]]], "outputs": [2]}),
         "starter_code": "class Solution:\n    def area(self, h):"},
        {"question": "Broken.", "input_output": "", "starter_code": ""},
    ])
    double, add, area = tasks.load_source(path)
    assert double["tests"] == [{"input": "2\n", "output": "4\n"}]
    assert (double["time_limit"], double["memory_limit_mb"]) == (2.0, 256)
    assert add["tests"] == [{"call": "add(1, 2)", "output": "3"},
                            {"call": "add('a', 'b')", "output": "'ab'"}]
    assert add["entry_point"] == "add" and "`add`" in add["prompt"]
    assert area["tests"] == [{"call": "Solution().area([1, 2])", "output": "2"}]
    assert rewards.score(double, code("print(2 * int(input()))")) == 1.0
    assert rewards.score(double, code("print(int(input()) + 1)")) == 0.0  # 3, not 4
    assert rewards.score(add, code("def add(a, b):\n    return a + b")) == 1.0
    assert rewards.score(add, code("def add(a, b):\n    return b + a")) == 0.5  # 'ba' != 'ab'
    assert rewards.score(area, code("class Solution:\n    def area(self, h):\n"
                                    "        return min(h)")) == 0.0
    assert rewards.score(area, code("class Solution:\n    def area(self, h):\n"
                                    "        return h[1]")) == 1.0


class RunsCode:
    """What a hostile dataset pickles: unpickling it calls os.system, which would create the marker
    file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickled(value) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(value))).decode()


def test_livecodebench_private_tests_are_read_as_data_and_a_hostile_pickle_runs_nothing(
        tmp_path, capsys):
    marker = tmp_path / "ran"
    public = json.dumps([{"input": "3\n", "output": "9\n", "testtype": "stdin"}])
    private = json.dumps([{"input": "4\n", "output": "16\n", "testtype": "stdin"}])
    functional = json.dumps([{"input": "[1, 2]\n3", "output": "6", "testtype": "functional"}])
    path = write(tmp_path / "lcb.json", [
        {"question_content": "Square n.", "public_test_cases": public,
         "private_test_cases": pickled(private), "metadata": "{}", "starter_code": ""},
        {"question_content": "Square.", "public_test_cases": public,
         "private_test_cases": pickled(RunsCode(marker)), "metadata": "{}", "starter_code": ""},
        {"question_content": "Sum all.", "public_test_cases": functional, "private_test_cases": "",
         "metadata": json.dumps({"func_name": "total"}), 
         "starter_code": "class Solution:\n    def total(self, xs, y):"},
    ])
    good, hostile, called = tasks.load_source(path)
    assert not marker.exists()  # loading ran nothing
    assert good["tests"] == [{"input": "3\n", "output": "9\n"}, {"input": "4\n", "output": "16\n"}]
    assert hostile["tests"] == [{"input": "3\n", "output": "9\n"}]  # the public tests only
    assert "private tests refused: names code, public ones kept 1" in capsys.readouterr().out
    assert called["tests"] == [{"call": "Solution().total([1, 2], 3)", "output": "6"}]
    assert rewards.score(good, code("print(int(input()) ** 2)")) == 1.0
    assert rewards.score(good, code("print(int(input()) * 3)")) == 0.5  # 9 right, 12 != 16
    method = "class Solution:\n    def total(self, xs, y):\n        return "
    assert rewards.score(called, code(method + "sum(xs) + y")) == 1.0
    assert rewards.score(called, code(method + "y")) == 0.0
    assert not marker.exists()


def test_codeforces_limits_and_what_is_skipped(tmp_path, capsys):
    base = {"title": "Echo", "description": "Print n.", "input_format": "n", "output_format": "n",
            "examples": [{"input": "5\n", "output": "5\n"}],
            "official_tests": [{"input": "7\n", "output": "7\n"}], "time_limit": 2.0,
            "memory_limit": 256, "interaction_format": None, "generated_checker": None}
    path = write(tmp_path / "cf.parquet", [base, {**base, "interaction_format": "Ask queries."},
                                           {**base, "generated_checker": "def check(): ..."}])
    [example] = tasks.load_source(path)
    assert (example["time_limit"], example["memory_limit_mb"]) == (2.0, 256)
    assert example["prompt"].startswith("Echo\n\nPrint n.\n\nInput\nn\n\nOutput\nn\n\nExample "
                                        "input\n5\n")
    assert "an interactive problem 1" in capsys.readouterr().out
    assert (rewards.score(example, code("print(input())")) == 1.0
            and rewards.score(example, code("print(8)")) == 0.0)


def test_mmlu_pro_options_in_letter_order(tmp_path):
    path = write(tmp_path / "mmlu_pro.parquet", [
        {"question": "2+2?", "options": ["3", "5", "4", "22"], "answer": "C", "answer_index": 2,
         "category": "math"},
        {"question": "Bad", "options": ["x", "y"], "answer": "A", "answer_index": 1,
         "category": "math"}])
    [example] = tasks.load_source(path)
    assert example["prompt"].startswith("2+2?\n(A) 3\n(B) 5\n(C) 4\n(D) 22\n\n"
                                        "Answer with the letter")
    assert example["answer"] == "C"
    assert (rewards.score(example, "The answer is (C).") == 1.0
            and rewards.score(example, "The answer is (D).") == 0.0)


def test_gpqa_csv_shuffles_the_four_answers_with_a_fixed_seed_per_question(tmp_path):
    path = tmp_path / "gpqa_diamond.csv"
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file,
                                ["Question", "Correct Answer", "Incorrect Answer 1",
                                 "Incorrect Answer 2", "Incorrect Answer 3", "Subdomain"])
        writer.writeheader()
        for q in range(6):
            writer.writerow({"Question": f"Question {q}?", "Correct Answer": f" right{q}\n",
                             "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2",
                             "Incorrect Answer 3": "w3", "Subdomain": "x"})
    examples = tasks.load_source(str(path))
    # the same letters on every load, run and machine
    assert examples == tasks.load_source(str(path))
    for q, example in enumerate(examples):  # the right answer sits at the letter the example names
        assert f"({example['answer']}) right{q}\n" in example["prompt"]
        options = sorted(line[4:] for line in example["prompt"].split("\n")[1:5])
        assert options == sorted([f"right{q}", "w1", "w2", "w3"])
    # seeded by each question's text: worked out once, pinned so that a change of seeding shows
    assert [example["answer"] for example in examples] == ["A", "C", "D", "C", "D", "D"]
    assert rewards.score(examples[1], "The answer is (C).") == 1.0
    assert rewards.score(examples[1], "The answer is (A).") == 0.0


def test_math_layouts_answers_as_string_int_or_float(tmp_path):
    aime = write(tmp_path / "aime_2024.parquet",
                 [{"id": 1, "problem": "Find 200+4.", "answer": 204},
                  {"id": 2, "problem": "Find 33.", "answer": 33.0},
                  {"id": 3, "problem": "Find x.", "answer": None}])
    deepscaler = write(tmp_path / "deepscaler.json",
                       [{"problem": "Half of 1?", "answer": "\\frac{1}{2}",
                        "solution": "..."}])
    math500 = write(tmp_path / "math500.jsonl",
                    [{"Problem": "1+1?", "Answer": "2", "subject": "x", "level": 1}])
    first, second = tasks.load_source(aime)
    assert (first["answer"], second["answer"]) == ("204", "33")
    assert first["prompt"] == "Find 200+4.\n\nPut your final answer in \\boxed{}."
    [half] = tasks.load_source(deepscaler)
    [two] = tasks.load_source(math500)
    assert (rewards.score(first, "\\boxed{204}") == 1.0
            and rewards.score(first, "\\boxed{240}") == 0.0)
    assert rewards.score(half, "\\boxed{0.5}") == 1.0 and rewards.score(half, "\\boxed{2}") == 0.0
    assert rewards.score(two, "\\boxed{2}") == 1.0 and rewards.score(two, "\\boxed{3}") == 0.0


def test_reasoning_gym_dump(tmp_path):
    entry = json.loads((tasks.DATA_DIR / "logic.jsonl").read_text().split("\n")[0])["entry"]
    [example] = tasks.load_source(write(tmp_path / "rg.jsonl", [entry]))
    assert (example["task"], example["dataset"], example["entry"]) == ("logic",
                                                                       "basic_arithmetic", entry)
    assert rewards.score(example, "<answer>37773127</answer>") == 1.0
    assert rewards.score(example, "<answer>37773128</answer>") == 0.0


def test_our_schema_as_json_array_and_errors(tmp_path):
    ours = [{"task": "mcq", "prompt": "?", "answer": "C"}]
    assert tasks.load_source(write(tmp_path / "ours.json", ours)) == ours
    with pytest.raises(ValueError, match=r"ours2.json: record 1: an mcq answer must be one letter"):
        tasks.load_source(write(tmp_path / "ours2.json",
                                [{"task": "mcq", "prompt": "?", "answer": "K"}]))
    with pytest.raises(ValueError,
                       match=r"odd.jsonl: a layout not recognised, with the fields \['colour', "
                             r"'text'\]"):
        tasks.load_source(write(tmp_path / "odd.jsonl", [{"text": "hi", "colour": "red"}]))
    with pytest.raises(ValueError, match="nothing to train or test on"):
        tasks.load_source(write(tmp_path / "empty_answers.jsonl", [{"problem": "?", "answer": ""}]))


def test_evaluation_reads_a_whole_benchmark_file(tmp_path):
    aime = write(tmp_path / "aime.parquet",
                 [{"problem": f"Find {i}.", "answer": str(i)} for i in range(30)])
    whole = evaluation.eval_problems(aime, 100, level=1, whole_file=True)
    assert [example["answer"] for example in whole] == [str(i) for i in range(30)]
    assert (evaluation.eval_problems(aime, 100, level=1, whole_file=False)
            == tasks.heldout(aime, 100))
