"""evaluation.py against independent computations: pass@k by hand and by enumerating every k-subset,
the boundary report by hand, and the sampling pipeline against a model whose next-token distribution
is known exactly (uniform), so the chance that a sample is right can be worked out on paper.
"""

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import curves
import evaluation
import models
import rewards
import tasks
from sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- pass@k

def test_pass_at_k_hand_values():
    assert evaluation.pass_at_k(4, 1, 1) == 0.25  # one right sample in four, draw one
    assert evaluation.pass_at_k(4, 1, 2) == 0.5  # 1 − C(3,2)/C(4,2) = 1 − 3/6
    assert evaluation.pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 − C(3,2)/C(5,2) = 1 − 3/10
    assert evaluation.pass_at_k(10, 3, 4) == pytest.approx(5 / 6)  # 1 − C(7,4)/C(10,4) = 1 − 35/210


def test_pass_at_k_equals_brute_force_enumeration():
    """pass@k is the fraction of k-subsets of the n samples that hold a right one: count them
    all."""
    for n in range(1, 8):
        for c in range(n + 1):
            right = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                hits = sum(any(right[i] for i in subset) for subset in subsets)
                # Exactly equal, not approximately: the estimator is rounded once from exact
                # integers.
                assert evaluation.pass_at_k(n, c, k) == float(Fraction(hits, len(subsets))), (
                    n, c, k)


def test_pass_at_k_edge_cases():
    n = 16
    # nothing right: never
    assert all(evaluation.pass_at_k(n, 0, k) == 0.0 for k in range(1, n + 1))
    assert all(evaluation.pass_at_k(n, n, k) == 1.0 for k in range(1, n + 1))  # all right: always
    # k > n − c = 11: every 12-subset holds a right one
    assert evaluation.pass_at_k(n, 5, 12) == 1.0
    # k = n − c: one subset misses
    assert evaluation.pass_at_k(n, 5, 11) == 1 - 1 / math.comb(16, 11)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            evaluation.pass_at_k(*bad)


def test_pass_at_k_exact_and_monotone_at_n_1024():
    n = 1024
    assert evaluation.pass_at_k(n, 1, 1) == 1 / 1024
    for c, k in [(1, 1), (1, 512), (3, 256), (100, 7), (512, 512), (1000, 2), (1, 1023)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert evaluation.pass_at_k(n, c, k) == float(exact), (c, k)
    for c in [0, 1, 2, 10, 500, 1023]:  # rises with k, in [0, 1], and pass@1 is c/n
        curve = [evaluation.pass_at_k(n, c, k) for k in evaluation.ks_up_to(n)]
        assert curve == sorted(curve) and 0 <= curve[0] and curve[-1] <= 1
        assert curve[0] == c / n
    for k in [1, 8, 256]:  # rises with c
        column = [evaluation.pass_at_k(n, c, k) for c in range(0, n + 1, 31)]
        assert column == sorted(column)


def test_ks_up_to():
    assert evaluation.ks_up_to(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert evaluation.ks_up_to(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert evaluation.ks_up_to(1) == [1]


# ----------------------------------------------------------------------------- the boundary report

EXAMPLES = [{"task": "add", "prompt": "1+1="}, {"task": "add", "prompt": "2+2="},
            {"task": "sort", "prompt": "2 1="}]
COUNTS = {"base": [0, 4, 2], "trained": [1, 4, 4]}  # n = 4


def test_boundary_by_hand():
    report = evaluation.boundary(COUNTS, EXAMPLES, n=4)
    base, trained = report["base"], report["trained"]
    # Examples without "source" are reported under their family's name: one source per family.
    assert base["family_of"] == {"add": "add", "sort": "sort"}
    assert base["families"] == base["sources"]
    assert base["sources"]["add"] == {1: 0.5, 2: 0.5, 4: 0.5}  # one never solved, one always
    # 2 of 4 right: 1 − C(2,2)/C(4,2) = 5/6 at k=2
    assert base["sources"]["sort"] == pytest.approx({1: 0.5, 2: 5 / 6, 4: 1.0})
    # overall is the mean over sources: (0.5 + 5/6)/2 at k=2, not over problems (0 + 1 + 5/6)/3.
    assert base["overall"] == pytest.approx({1: 0.5, 2: 2 / 3, 4: 0.75})
    # (1/4 + 1)/2, (1/2 + 1)/2, 1
    assert trained["sources"]["add"] == pytest.approx({1: 0.625, 2: 0.75, 4: 1.0})
    assert trained["overall"] == pytest.approx({1: 0.8125, 2: 0.875, 4: 1.0})


def test_boundary_table_shows_gains_against_the_first_model():
    table = evaluation.boundary_table(evaluation.boundary(COUNTS, EXAMPLES, n=4)).splitlines()
    assert table[0] == "| source | task | model | pass@1 | pass@2 | pass@4 |"
    # header, rule, (add, sort, the mean of each family, overall) × (base, trained)
    assert len(table) == 2 + 5 * 2
    assert table[2] == "| add | add | base | 0.500 | 0.500 | 0.500 |"
    assert table[3] == "| add | add | trained | 0.625 (+0.125) | 0.750 (+0.250) | 1.000 (+0.500) |"
    assert table[5] == ("| sort | sort | trained | 1.000 (+0.500) | 1.000 (+0.167) | "
                        "1.000 (+0.000) |")
    assert table[6:8] == [row.replace("| add | add |", "| mean | add |") for row in table[2:4]]
    assert table[10] == "| overall | all | base | 0.500 | 0.667 | 0.750 |"


def test_write_boundary_writes_markdown_json_and_png(tmp_path):
    table = evaluation.write_boundary(tmp_path / "out", COUNTS, EXAMPLES, 4,
                                      settings={"temperature": 0.6})
    markdown = (tmp_path / "out" / "boundary.md").read_text()
    assert table in markdown and "add 2, sort 1" in markdown and "temperature 0.6" in markdown
    saved = json.loads((tmp_path / "out" / "boundary.json").read_text())
    assert saved["n"] == 4 and saved["ks"] == [1, 2, 4] and saved["correct"] == COUNTS
    assert [p["prompt"] for p in saved["problems"]] == [ex["prompt"] for ex in EXAMPLES]
    sort = saved["pass_at_k"]["base"]["sources"]["sort"]
    assert sort["2"] == pytest.approx(5 / 6)  # JSON keys are strings
    png = (tmp_path / "out" / "boundary.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


# ----------------------------------------------------------------------------- training curves

def write_metrics(run_dir: Path, extra_line: str = "") -> None:
    records = [{"step": s, "reward": 0.1 * s, "kl": 0.01 * s, "resets": int(s >= 4)}
               for s in range(1, 7)]
    for record in records:
        if record["step"] in (3, 6):
            record["val_pass1"] = 0.2
        if record["step"] == 4:
            record["reset"] = "stalled"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records)
                                           + extra_line)


def test_training_series_plots_what_is_present_and_marks_resets(tmp_path):
    write_metrics(tmp_path, extra_line='{"step": 7, "rew')  # a run still writing its last line
    panels, resets = curves.training_series(curves.read_metrics(tmp_path))
    assert ({title: set(series) for title, series in panels.items()}
            == {"reward": {"reward", "val_pass1"}, "KL": {"kl"}})
    assert panels["reward"]["val_pass1"] == ([3, 6], [0.2, 0.2])
    assert panels["KL"]["kl"][0] == [1, 2, 3, 4, 5, 6]
    assert resets == [(4, "stalled")]
    path = curves.plot_training(tmp_path)
    assert path == tmp_path / "training.png" and path.read_bytes().startswith(PNG_MAGIC)


def test_read_metrics_errors_are_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        curves.read_metrics(tmp_path)
    write_metrics(tmp_path, extra_line="oops\n{}\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:7: not valid JSON"):
        curves.read_metrics(tmp_path)


# ----------------------------------------------------------------------------- sampling

def test_correct_counts_counts_full_rewards_in_chunks(monkeypatch):
    """Plumbing: chunks of `chunk` problems, seed + first index each, partial credit is not a
    pass."""
    calls = []

    def fake_rollout_and_score(policy, tokenizer, examples, params):
        calls.append((len(examples), params.seed))
        return None, torch.tensor([[1.0, 0.5, 1.0, 0.0]] * len(examples))  # 2 passes per problem

    monkeypatch.setattr(evaluation.sampling, "rollout_and_score", fake_rollout_and_score)
    params = SamplingParams(4, 16, seed=100)
    counts = evaluation.correct_counts(None, None, [{}] * 7, params, chunk=3)
    assert counts == [2] * 7
    assert calls == [(3, 100), (3, 103), (1, 106)]
    calls.clear()
    # by default 4096 // n problems at a time
    evaluation.correct_counts(None, None, [{}] * 300, SamplingParams(16, 16, seed=0))
    assert [size for size, _ in calls] == [256, 44]


@pytest.fixture(scope="module")
def uniform_model_dir(tmp_path_factory) -> str:
    """The built-in tiny architecture with its final norm zeroed: every logit is 0, so each next
    token is uniform over the V-token vocabulary whatever the prompt, and rightness has a closed
    form."""
    tokenizer = models.build_tokenizer()
    model = models.build_tiny_model(tokenizer, seed=0)
    torch.nn.init.zeros_(model.model.norm.weight)
    directory = tmp_path_factory.mktemp("uniform")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def test_correct_counts_match_the_closed_form_rate(uniform_model_dir):
    """Asked for the empty answer, a sample is right iff it emits only 'silent' tokens (pad, bos,
    unk are skipped when decoding, a space is stripped: 4 of V) and then EOS (1 of V), within T
    tokens:
        P(right) = Σ_{j<T} (4/V)^j · (1/V)."""
    policy, tokenizer = models.load(uniform_model_dir)
    max_new_tokens, n = 3, 64
    examples = [{"task": "add", "prompt": f"{i}+{i}=", "answer": ""} for i in range(32)]
    params = SamplingParams(n, max_new_tokens, temperature=1.0, top_p=1.0)
    counts = evaluation.correct_counts(policy, tokenizer, examples, params)
    vocab = policy.config.vocab_size
    assert (vocab == len(tokenizer)
            and {" ", "<pad>", "<bos>", "<unk>", "<eos>"} <= set(tokenizer.get_vocab()))
    p_right = sum((4 / vocab) ** j * (1 / vocab) for j in range(max_new_tokens))
    samples = len(examples) * n
    expected, sigma = samples * p_right, math.sqrt(samples * p_right * (1 - p_right))
    assert abs(sum(counts) - expected) < 4 * sigma, (sum(counts), expected, sigma)
    # evaluate() (train.py's validation) draws the same samples with the same seed: pass@1 = mean
    # of c/n.
    report = evaluation.evaluate(policy, tokenizer, examples, params, ks=(1, 4))
    assert report["sources"]["add"][1] == pytest.approx(sum(counts) / samples)
    assert report["overall"] == report["families"]["add"] == report["sources"]["add"]


# ----------------------------------------------------------------------------- command line

def test_cli_same_model_twice_gives_identical_counts(uniform_model_dir, tmp_path, capsys):
    out = tmp_path / "report"
    evaluation.main(["--model", uniform_model_dir, "--model", uniform_model_dir,
                     "--tasks", "add,sort", "--problems", "3", "--n", "8", "--max-new-tokens", "4",
                     "--out", str(out)])
    saved = json.loads((out / "boundary.json").read_text())
    assert saved["ks"] == [1, 2, 4, 8] and saved["settings"]["temperature"] == 0.6
    # held-out problems, per family
    assert [p["task"] for p in saved["problems"]] == ["add"] * 3 + ["sort"] * 3
    # same weights, same seed: same samples
    assert saved["correct"]["base"] == saved["correct"]["trained"]
    assert all(0 <= c <= 8 for c in saved["correct"]["base"])
    assert "(+0.000)" in (out / "boundary.md").read_text() and (out / "boundary.png").is_file()
    assert "trained: 100%" in capsys.readouterr().err  # the progress bar


def test_cli_samples_each_model_given(uniform_model_dir, tiny_model_dir, tmp_path, monkeypatch):
    """Two different models: each one's counts are those of sampling that model directly, same
    settings."""
    # Neither model sorts; call a completion right when its length is even, so counts follow the
    # samples.
    monkeypatch.setitem(rewards.VERIFIERS, "sort",
                        lambda example, completion: float(len(completion) % 2 == 0))
    out = tmp_path / "report"
    evaluation.main(["--model", uniform_model_dir, "--model", tiny_model_dir, "--tasks", "sort",
                     "--problems", "4", "--n", "8", "--max-new-tokens", "12", "--out", str(out)])
    saved = json.loads((out / "boundary.json").read_text())
    examples = tasks.heldout("sort", 4)
    for name, path in (("base", uniform_model_dir), ("trained", tiny_model_dir)):
        policy, tokenizer = models.load(path)
        params = SamplingParams(8, 12, evaluation.EVAL_TEMPERATURE, evaluation.EVAL_TOP_P)
        counts = evaluation.correct_counts(policy.eval(), tokenizer, examples, params)
        assert saved["correct"][name] == counts
    assert saved["correct"]["base"] != saved["correct"]["trained"]


def test_cli_user_errors(uniform_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no such model directory"):
        evaluation.main(["--model", uniform_model_dir, "--model", str(tmp_path / "missing")])
    with pytest.raises(ValueError, match="unknown task 'nosuch'"):
        evaluation.main(["--model", uniform_model_dir, "--tasks", "add,nosuch"])
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        evaluation.main(["--plot", str(tmp_path)])
    # From the shell: one line on stderr, no traceback.
    missing = tmp_path / "missing"
    result = subprocess.run([sys.executable, "evaluation.py", "--model", str(missing)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    expected = f"error: --model {missing}: no such model directory (expected a config.json inside)"
    assert result.stderr.strip().splitlines() == [expected]


def test_gains_are_signed_and_never_minus_zero():
    assert [evaluation.signed(g) for g in (0.1234, -0.05, -0.0002, 0.0)] == ["+0.123", "-0.050",
                                                                             "+0.000", "+0.000"]
