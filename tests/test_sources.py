"""Reports per source (issue 29): a row per source as the user named it (a file's stem, rg:NAME, a
built-in, a verl file's data_source), its family beside it, then a mean per family, then the overall
mean, which is the mean over sources. Hand-worked values for the aggregation; real files and runs
for the plumbing (evaluation.py's table and JSON, train.py's result.md, metrics.jsonl and W&B)."""

import importlib.util
import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import evaluation
import rewards
import tasks
import train


def math(prompt: str, answer: str = "1", **fields) -> dict:
    return {"task": "math", "prompt": prompt, "answer": answer, **fields}


def flat(rows: dict[str, dict[int, float]]) -> dict[tuple[str, int], float]:
    """{(row, k): value}: pytest.approx compares flat mappings only."""
    return {(row, k): value for row, values in rows.items() for k, value in values.items()}


# ----------------------------------------------------------------------------- naming the sources

def test_each_source_is_named_as_the_user_named_it():
    labelled = tasks.label_sources({
        "sort": [{"task": "sort", "prompt": "2 1=", "answer": "1 2"}],
        "rg:basic_arithmetic": [{"task": "logic", "prompt": "1+1?"}],
        "math": [math("domain")],  # the sample file data/math.jsonl, named as its domain
        "benchmarks/aime_2024.parquet": [math("aime")],  # a file: its stem
    })
    assert [ex["source"] for ex in labelled] == ["sort", "rg:basic_arithmetic", "math", "aime_2024"]
    assert labelled[0]["prompt"] == "2 1=" and labelled[0]["answer"] == "1 2"  # the rest as it was


def test_two_sources_of_one_stem_get_distinct_names():
    labelled = tasks.label_sources({"2024/test.jsonl": [math("a")], "2025/test.jsonl": [math("b")],
                                    "sort": [{"task": "sort", "prompt": "1="}],
                                    "mine/sort.jsonl": [{"task": "sort", "prompt": "2="}]})
    # Stems that coincide (with each other or a built-in's name) give way to the names as given.
    assert [ex["source"] for ex in labelled] == [
        "2024/test.jsonl", "2025/test.jsonl", "sort", "mine/sort.jsonl"]


def test_a_data_source_names_the_row_and_two_files_that_give_one_are_told_apart():
    mcq = {"task": "mcq", "prompt": "u", "answer": "A"}
    labelled = tasks.label_sources({
        "eval.parquet": [math("p", source="aime_2024"), math("q", source="math500"),
                         math("r", source="")],  # an empty data_source: the file's own name
        "dev/aime.parquet": [math("s", source="aime_2024")],
        "mixed.jsonl": [math("t"), mcq],  # two families in one file: a row for each
    })
    assert [ex["source"] for ex in labelled] == [
        "eval/aime_2024", "math500", "eval", "aime/aime_2024", "mixed/math", "mixed/mcq"]


# ----------------------------------------------------------------------------- the rows, by hand

# Three math sources and one code source, n = 4 samples per problem, c right:
#   aime     c = 0, 4   pass@1 (0 + 1)/2 = 1/2     pass@2 (0 + 1)/2 = 1/2
#   amc      c = 2      pass@1 1/2                 pass@2 1 − C(2,2)/C(4,2) = 5/6
#   math500  c = 1      pass@1 1/4                 pass@2 1 − C(3,2)/C(4,2) = 1/2
#   apps     c = 0      0                          0
APPS = {"task": "code", "prompt": "d", "tests": [{"input": "", "output": "1"}]}
FOUR_SOURCES = {"data/aime.jsonl": [math("a1"), math("a2")], "amc.parquet": [math("b")],
                "math500.jsonl": [math("c")], "apps.jsonl": [APPS]}
COUNTS = [0, 4, 2, 1, 0]


def test_three_sources_of_one_family_and_one_of_another_give_seven_rows():
    examples = tasks.label_sources(FOUR_SOURCES)
    report = evaluation.pass_at_k_by_source(COUNTS, examples, n=4, ks=[1, 2])
    assert report["family_of"] == {"aime": "math", "amc": "math", "math500": "math", "apps": "code"}
    assert flat(report["sources"]) == pytest.approx(flat({
        "aime": {1: 0.5, 2: 0.5}, "amc": {1: 0.5, 2: 5 / 6}, "math500": {1: 0.25, 2: 0.5},
        "apps": {1: 0, 2: 0}}))
    # A family's mean is over its sources: (1/2 + 1/2 + 1/4)/3 at k=1, (1/2 + 5/6 + 1/2)/3 at k=2.
    families = {"math": {1: 5 / 12, 2: 11 / 18}, "code": {1: 0, 2: 0}}
    assert flat(report["families"]) == pytest.approx(flat(families))
    # Overall is the mean over the four sources, 1.25/4 at k=1: not over the families (5/24) nor
    # over the five problems (1.75/5 = 0.35).
    assert report["overall"] == pytest.approx({1: 0.3125, 2: (0.5 + 5 / 6 + 0.5) / 4})
    assert [(source, family) for source, family, _ in evaluation.rows(report)] == [
        ("aime", "math"), ("amc", "math"), ("math500", "math"), ("apps", "code"),
        ("mean", "math"), ("mean", "code"), ("overall", "all")]


def test_every_table_lists_sources_then_family_means_then_overall(tmp_path):
    examples = tasks.label_sources(FOUR_SOURCES)
    trained = [1, 4, 2, 1, 0]
    counts = {"base": COUNTS, "trained": trained}
    lines = evaluation.write_boundary(tmp_path, counts, examples, n=4).splitlines()
    assert lines[0] == "| source | task | model | pass@1 | pass@2 | pass@4 |"
    assert [line.split(" | ")[:3] for line in lines[2::2]] == [
        ["| aime", "math", "base"], ["| amc", "math", "base"], ["| math500", "math", "base"],
        ["| apps", "code", "base"], ["| mean", "math", "base"], ["| mean", "code", "base"],
        ["| overall", "all", "base"]]
    assert lines[3] == ("| aime | math | trained | 0.625 (+0.125) | 0.750 (+0.250) | "
                        "1.000 (+0.500) |")
    markdown = (tmp_path / "boundary.md").read_text()
    assert "held-out problems: aime 2, amc 1, math500 1, apps 1" in markdown
    saved = json.loads((tmp_path / "boundary.json").read_text())
    assert [p["source"] for p in saved["problems"]] == ["aime", "aime", "amc", "math500", "apps"]
    math_mean = saved["pass_at_k"]["trained"]["families"]["math"]["1"]
    assert math_mean == pytest.approx((0.625 + 0.5 + 0.25) / 3)
    base, after = (evaluation.pass_at_k_by_source(c, examples, 4, [1]) for c in (COUNTS, trained))
    result = evaluation.write_result(tmp_path, base, after, "test").splitlines()
    assert result[1] == "| source | task | base pass@1 | trained pass@1 | gain |"
    assert result[3] == "| aime | math | 0.500 | 0.625 | +0.125 |"
    assert result[-1] == "| average | all | 0.312 | 0.344 | +0.031 |"  # 1.25/4 → 1.375/4
    assert len(result) == 3 + 7
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["base"]["sources"]["amc"] == 0.5
    assert saved["trained"]["average"] == pytest.approx(1.375 / 4)


def test_validation_metrics_keep_todays_key_for_the_overall():
    report = evaluation.pass_at_k_by_source(COUNTS, tasks.label_sources(FOUR_SOURCES), 4, [1])
    assert evaluation.validation_metrics(report) == pytest.approx({
        "val_pass1": 0.3125, "val_pass1/aime": 0.5, "val_pass1/amc": 0.5, "val_pass1/math500": 0.25,
        "val_pass1/apps": 0.0, "val_pass1_family/math": 5 / 12, "val_pass1_family/code": 0.0})


# ------------------------------------------------------------------- a verl parquet, end to end

def verl_record(question: str, answer: str, data_source: str) -> dict:
    return {"data_source": data_source, "prompt": [{"role": "user", "content": question}],
            "ability": "math", "reward_model": {"style": "rule", "ground_truth": answer}}


def test_a_verl_parquet_with_two_data_sources_gives_two_rows(tmp_path, tiny_model_dir):
    path = tmp_path / "eval.parquet"
    records = [verl_record(f"What is {i} + {i}?", str(2 * i), "aime_2024") for i in range(3)]
    records += [verl_record(f"What is {i} * 3?", str(3 * i), "math500") for i in range(2)]
    pq.write_table(pa.Table.from_pylist(records), path)
    out = tmp_path / "report"
    evaluation.main(["--model", tiny_model_dir, "--tasks", str(path), "--whole-file", "--problems",
                     "10", "--n", "2", "--max-new-tokens", "4", "--out", str(out)])
    saved = json.loads((out / "boundary.json").read_text())
    assert saved["pass_at_k"]["base"]["family_of"] == {"aime_2024": "math", "math500": "math"}
    assert [p["source"] for p in saved["problems"]] == ["aime_2024"] * 3 + ["math500"] * 2
    markdown = (out / "boundary.md").read_text().splitlines()
    rows = [line.split(" | ")[0] for line in markdown if line.startswith("| ")]
    assert rows == ["| source", "| aime_2024", "| math500", "| mean", "| overall"]


# ----------------------------------------------------------------------------- train.py, end to end

def test_train_reports_and_logs_each_source(tmp_path, monkeypatch, tiny_model_dir):
    """Two sort sources (the built-in and a file of sort problems) and reverse: three source rows,
    two family means and the overall, in result.md, boundary.md, metrics.jsonl and W&B."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    problems = tasks.heldout("sort", 3, level=2)  # held out: the file has problems to evaluate
    (tmp_path / "mine" / "sort.jsonl").write_text("".join(json.dumps(ex) + "\n" for ex in problems))
    # The random model never sorts: a completion is right when its length is even, so pass@1 varies.
    for family in ("sort", "reverse"):
        monkeypatch.setitem(rewards.VERIFIERS, family, lambda ex, text: float(len(text) % 2 == 0))
    logged = []  # what a stand-in wandb module receives, step by step
    run = types.SimpleNamespace(log=lambda metrics, step: logged.append((step, metrics)))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "wandb" else real_find_spec(name, *a))
    with pytest.warns(UserWarning, match="held-out split"):  # the file trains on its problems too
        train.main(["--model", tiny_model_dir, "--run", "src",
                    "--tasks", "sort,mine/sort.jsonl,reverse", "--steps", "2",
                    "--prompts-per-step", "4", "--n", "2", "--max-new-tokens", "6",
                    "--eval-every", "1", "--val-problems", "3", "--eval-problems", "3",
                    "--eval-samples", "4", "--boundary-problems", "2", "--boundary-n", "4",
                    "--dynamic-sampling", "false", "--log", "wandb"])
    run_dir = tmp_path / "runs" / "src"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        per_source = [m[f"val_pass1/{s}"] for s in ("sort", "mine/sort.jsonl", "reverse")]
        assert m["val_pass1"] == pytest.approx(sum(per_source) / 3)  # the mean over sources
        assert m["val_pass1_family/sort"] == pytest.approx(sum(per_source[:2]) / 2)
        assert m["val_pass1_family/reverse"] == m["val_pass1/reverse"]
    assert len({m[f"val_pass1/{s}"] for m in metrics for s in ("sort", "reverse")}) > 1

    def validation(record: dict) -> dict:
        return {k: v for k, v in record.items() if k.startswith("val_pass1")}

    expected = [(m["step"], validation(m)) for m in metrics]
    assert [(step, validation(m)) for step, m in logged] == expected
    result = (run_dir / "result.md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in result[3:]] == [
        ["| sort", "sort"], ["| mine/sort.jsonl", "sort"], ["| reverse", "reverse"],
        ["| mean", "sort"], ["| mean", "reverse"], ["| average", "all"]]
    assert "held-out problems: sort 3, mine/sort.jsonl 3, reverse 3" in result[0]
    boundary = (run_dir / "boundary.md").read_text()
    assert boundary.count("| mine/sort.jsonl | sort |") == 2 and "mine/sort.jsonl 2" in boundary


# --------------------------------------------------------------------- README's two benchmark files

def test_the_benchmark_like_files_read_as_published_and_their_answers_score():
    """data/benchmarks/: an AIME-like file in AIME 2024's fields (ID, Problem, Solution, Answer) and
    a MATH-500-like one in MATH-500's; README's table evaluates the two together."""
    labelled = tasks.label_sources({f"data/benchmarks/{name}.jsonl": tasks.load_source(
        str(tasks.DATA_DIR / "benchmarks" / f"{name}.jsonl"))
                                    for name in ("aime_like", "math500_like")})
    assert [ex["source"] for ex in labelled] == ["aime_like"] * 12 + ["math500_like"] * 12
    for example in labelled:
        assert example["task"] == "math" and example["prompt"].endswith("\\boxed{}.")
        assert rewards.score(example, f"So the answer is \\boxed{{{example['answer']}}}.") == 1.0
        assert rewards.score(example, "So the answer is \\boxed{7919}.") == 0.0
