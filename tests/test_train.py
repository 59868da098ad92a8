"""train.py: configuration errors, and real steps of the loop: every paper preset end to end, the
rewards it shapes (length penalty, KL in the reward), and its reference resets, on a tiny random
model.

The tiny model answers at random, so it never solves a task: where a test needs groups with unequal
rewards it turns on a small length penalty (completions of different lengths then score
differently).
"""

import importlib.util
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import checkpoint
import curriculum
import grpo
import learner
import models
import sampling
import settings
import train

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- configuration errors

def config_error(capsys, argv: list[str]) -> str:
    """train.checked_config must refuse argv with one sentence: a SystemExit with one line on
    stderr, or a ValueError (which train.py's __main__ prints as "error: <message>"); settings'
    range checks and the modules' own checks alike. Returns that line."""
    try:
        train.checked_config(argv)
    except ValueError as error:
        message = str(error)
    except SystemExit as exit_info:
        assert exit_info.code not in (0, None)
        message = ((exit_info.code if isinstance(exit_info.code, str) else "")
                   + capsys.readouterr().err)
    else:
        pytest.fail(f"checked_config accepted {argv}")
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1, ("a config error should be one sentence, not a usage dump:\n"
                             + "\n".join(lines))
    return lines[0]


def test_cli_n_1_exits_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--n", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--n must be at least 2" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["--n", "1"], "--n must be at least 2"),
    (["--preset", "prorl-v3"], "unknown preset 'prorl-v3'"),
    (["--model", "/no/such/dir"], "--model /no/such/dir: no such model directory"),
    # before a model is loaded or runs/ is written
    (["--tasks", "add,nope"], "unknown task 'nope'"),
    (["--advantage", "ppo"], "unknown advantage estimator 'ppo'"),
    (["--kl-kind", "k4"], "unknown KL estimator 'k4'"),
    (["--loss-agg", "sum"], "unknown loss aggregation 'sum'"),
    # each of these five ends in a
    (["--length-eta-max", "0.1", "--length-period", "0"], "--length-period"),
    (["--max-sampling-rounds", "0"], "--max-sampling-rounds"),                 # traceback later on
    # seeds step·10 + round
    (["--max-sampling-rounds", "11"], "--max-sampling-rounds must be in 1..10"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--grad-clip", "nan"], "must be finite"), (["--grad-clip", "-1"], "--grad-clip must be > 0"),
    (["--length-eta-max", "inf"], "must be finite"), (["--reset-kl", "-1"], "--reset-kl"),
    (["--overlong-filter", "on"], "argument --overlong-filter: expected true or false, got 'on'"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--device", "tpu"], "--device must be cpu, cuda or auto"),
    (["--micro-batch-rows", "0"], "--micro-batch-rows"),
    (["--eval-problems", "0"], "--eval-problems"),
    (["--lr-scale-from-batch", "-5"], "--lr-scale-from-batch"),
])
def test_bad_config_is_one_line(capsys, argv, message):
    assert message in config_error(capsys, argv)


def test_device_cuda_without_one_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert "--device cuda: this machine has no CUDA device" in config_error(capsys,
                                                                            ["--device", "cuda"])


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    fast = ["--model", tiny_model_dir, "--steps", "1", "--prompts-per-step", "2", "--n", "2",
            "--max-new-tokens", "4", "--eval-problems", "1", "--val-problems", "1",
            "--eval-samples", "1", "--boundary-problems", "0"]
    train.main(fast)  # the default name: runs/tiny-s0
    first = (tmp_path / "runs" / "tiny-s0" / "checkpoint.pt").read_bytes()
    train.main(fast)  # again: a run of its own beside the first
    assert (tmp_path / "runs" / "tiny-s0-2" / "checkpoint.pt").is_file()
    assert (tmp_path / "runs" / "tiny-s0" / "checkpoint.pt").read_bytes() == first
    assert "run directory: runs/tiny-s0-2" in capsys.readouterr().out
    assert "runs/tiny-s0 already holds a run: --resume runs/tiny-s0 continues it" in config_error(
        capsys, fast + ["--run", "tiny-s0"])
    assert "is at step 1 already: give --steps beyond it" in str(
        pytest.raises(ValueError, train.main, ["--resume", "runs/tiny-s0"]).value)


def test_a_model_the_sampler_cannot_run_is_one_line_and_leaves_the_run_name_free(tmp_path,
                                                                                 monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = models.build_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1,
                               n_head=2)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="supports Llama and Qwen2 models, not 'gpt2'"):
        train.main(["--model", str(tmp_path / "gpt2"), "--run", "x"])
    assert not checkpoint.is_run(tmp_path / "runs" / "x")
    assert checkpoint.new_run_dir("x", explicit=True) == Path("runs/x")  # the name is still free


def test_flags_override_the_preset():
    c = settings.parse_config(["--preset", "prorl", "--n", "8", "--clip-high", "0.3"])
    assert (c.n, c.clip_high, c.advantage, c.temperature) == (8, 0.3, "grpo", 1.2)


# --------------------------------------------------------------------------- end to end, per preset

# A random model never answers right, so dynamic sampling (which filters on correctness) would drop
# every group; with it off, a small length penalty makes completions of different lengths score
# differently, so the update runs. (prorl-v2 has a length penalty of its own.)
PRESET_RUNS = {
    "prorl": (["--n", "4", "--length-eta-max", "0.05", "--dynamic-sampling", "false"],
              {"advantage": "grpo", "clip_low": 0.2, "clip_high": 0.4, "temperature": 1.2,
               "kl_kind": "k3",
               "kl_coef": 1e-4, "reset_patience": 3, "reset_optimizer": True, "minibatches": 4}),
    "prorl-v2": (["--n", "4", "--dynamic-sampling", "false"],
                 {"advantage": "reinforce_pp", "clip_high": 0.28, "kl_kind": "k2",
                  "reset_every": 300, "reset_optimizer": False, "length_eta_max": 0.1,
                  "length_period": 200, "length_off_steps": 100}),
    "brorl": (["--n", "16", "--length-eta-max", "0.05", "--dynamic-sampling", "false"],
              {"advantage": "reinforce_pp", "n": 16, "lr_scale_from_batch": 256 * 16,
               "kl_kind": "k2"}),
}
STEP_KEYS = {"step", "reward", "pass_rate", "kept_frac", "response_len", "clipfrac", "approx_kl",
             "ratio_mean", "kl", "entropy", "val_pass1", "resets", "gen_s", "ref_s", "update_s",
             "step_s", "tokens_per_s"}


def run_train(tmp_path, monkeypatch, model_dir: str,
              argv: list[str]) -> tuple[dict, list[dict], list[float]]:
    """train.main in tmp_path → (config.json, metrics.jsonl records, the learning rate AdamW was
    built with)."""
    monkeypatch.chdir(tmp_path)
    learning_rates = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, lr, **kwargs):
            learning_rates.append(lr)
            super().__init__(params, lr=lr, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    train.main(["--model", model_dir, "--run", "e2e", "--max-new-tokens", "8",
                "--eval-problems", "5", "--val-problems", "5", "--eval-samples", "2",
                "--boundary-problems", "2", "--boundary-n", "4"] + argv)
    run_dir = tmp_path / "runs" / "e2e"
    config = json.loads((run_dir / "config.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (run_dir / "result.md").is_file() and (run_dir / "final" / "config.json").is_file()
    assert {"base", "trained"} == set(json.loads((run_dir / "result.json").read_text()))
    assert (run_dir / "boundary.md").is_file() and (run_dir / "training.png").is_file()
    return config, metrics, learning_rates


@pytest.mark.parametrize("preset", list(PRESET_RUNS))
def test_preset_trains_end_to_end(tmp_path, monkeypatch, tiny_model_dir, preset):
    extra, expected_settings = PRESET_RUNS[preset]
    config, metrics, learning_rates = run_train(
        tmp_path, monkeypatch, tiny_model_dir,
        ["--preset", preset, "--steps", "2", "--prompts-per-step", "4", "--eval-every", "1"]
        + extra)
    assert {k: config[k] for k in expected_settings} == expected_settings
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert STEP_KEYS <= set(m), STEP_KEYS - set(m)
        assert all(math.isfinite(m[k]) for k in STEP_KEYS)
        # the time split is part of the step
        assert 0 < m["gen_s"] + m["ref_s"] + m["update_s"] <= m["step_s"]
        assert 0 < m["kept_frac"] <= 1
    # BroRL: lr · sqrt(B_new / B_old) = 2e-6 · sqrt(4·16 / (256·16)) = 2e-6 / 8; the others use the
    # preset's lr
    expected_lr = 2e-6 / 8 if preset == "brorl" else 2e-6
    assert learning_rates == [pytest.approx(expected_lr)]
    result = (tmp_path / "runs" / "e2e" / "result.md").read_text()
    assert all(f"| {family} |" in result for family in ("sort", "reverse", "countdown", "average"))


def test_scheduled_reset_makes_the_next_steps_kl_exactly_zero(tmp_path, monkeypatch,
                                                               tiny_model_dir):
    # One mini-batch per step, so a step's KL is measured before its own update: step 1 starts at π
    # = π_ref (0), step 2 after one update (> 0), reset after step 2, step 3 back at π = π_ref
    # (exactly 0).
    _, metrics, _ = run_train(tmp_path, monkeypatch, tiny_model_dir,
                              ["--steps", "3", "--prompts-per-step", "8", "--n", "4",
                               "--eval-every", "0", "--minibatches", "1",
                               "--lr", "1e-2", "--reset-every", "2", "--length-eta-max", "0.1",
                               "--dynamic-sampling", "false"])
    assert metrics[0]["kl"] == 0.0 and metrics[1]["kl"] > 0 and metrics[2]["kl"] == 0.0
    # step 1 opens the first on-phase of the length penalty at η_max
    assert metrics[0]["length_eta"] == 0.1
    assert [m.get("reset") for m in metrics] == [None, "schedule", None]
    assert [m["resets"] for m in metrics] == [0, 1, 1]


def capture_shaped_rewards(monkeypatch) -> list[dict]:
    """Record, at each step of train.main, the sampled batch, its scores, the reference's log-probs
    and the rewards handed to the advantage estimator."""
    steps = []
    real_sample, real_logprobs, real_advantages = (sampling.sample_groups, learner.batch_logprobs,
                                                   grpo.group_advantages)

    def sample(*args, **kwargs):
        batch, scores, stats = real_sample(*args, **kwargs)
        steps.append({"batch": batch, "scores": scores})
        return batch, scores, stats

    def logprobs(model, batch, c):
        out = real_logprobs(model, batch, c)
        if steps:
            steps[-1].setdefault("ref_logp", out)  # the first call of a step is the reference's
        return out

    def advantages(shaped, estimator, k=1):
        if steps:  # (validate() calls it too, before any step, to check the estimator's name)
            steps[-1]["shaped"] = shaped.clone()
        return real_advantages(shaped, estimator, k)

    monkeypatch.setattr(sampling, "sample_groups", sample)
    monkeypatch.setattr(learner, "batch_logprobs", logprobs)
    monkeypatch.setattr(grpo, "group_advantages", advantages)
    return steps


def test_the_loop_shapes_rewards_with_the_length_penalty_of_its_step(tmp_path, monkeypatch,
                                                                     tiny_model_dir):
    steps = capture_shaped_rewards(monkeypatch)
    run_train(tmp_path, monkeypatch, tiny_model_dir,
              ["--steps", "2", "--prompts-per-step", "4", "--n", "4", "--eval-every", "0",
               "--dynamic-sampling", "false", "--length-eta-max", "0.3", "--length-eta-min", "0.1",
               "--length-period", "2", "--kl-coef", "0"])
    # η(step 1) = η_max = 0.3; η(step 2) = 0.1 + ½·0.2·(1 + cos(π/2)) = 0.2; shaped = score −
    # η·len/max_new_tokens
    for step, eta in zip(steps, (0.3, 0.2), strict=True):
        lengths = step["batch"].mask.sum(dim=1).float().view_as(step["scores"])
        torch.testing.assert_close(step["shaped"], step["scores"] - eta * lengths / 8)


def test_kl_in_reward_subtracts_beta_times_the_summed_kl_of_each_response(tmp_path, monkeypatch,
                                                                          tiny_model_dir):
    steps = capture_shaped_rewards(monkeypatch)
    run_train(tmp_path, monkeypatch, tiny_model_dir,
              ["--steps", "2", "--prompts-per-step", "4", "--n", "4", "--eval-every", "0",
               "--dynamic-sampling", "false", "--length-eta-max", "0.05", "--kl-in-reward", "true",
               "--kl-coef", "0.5", "--kl-kind", "k3", "--minibatches", "1", "--lr", "5e-2"])
    step = steps[1]  # after one update π ≠ π_ref, so the KL is not 0
    # the sampler's log-probs stand for π
    log_ratio = step["ref_logp"] - step["batch"].logprobs[:, 1:]
    k3 = (torch.exp(log_ratio) - log_ratio - 1) * step["batch"].mask[:, 1:]
    lengths = step["batch"].mask.sum(dim=1).float()
    eta = grpo.length_penalty_coef(1, 0.0, 0.05, 100)
    expected = step["scores"].flatten() - eta * lengths / 8 - 0.5 * k3.sum(dim=1)
    assert k3.sum() > 1e-4
    torch.testing.assert_close(step["shaped"].flatten(), expected)


def test_a_kl_spike_resets_the_reference(tmp_path, monkeypatch, tiny_model_dir):
    _, metrics, _ = run_train(tmp_path, monkeypatch, tiny_model_dir,
                              ["--steps", "3", "--prompts-per-step", "4", "--n", "4",
                               "--eval-every", "0",
                               "--dynamic-sampling", "false", "--length-eta-max", "0.1",
                               "--minibatches", "1", "--lr", "5e-2", "--reset-kl", "1e-9"])
    assert metrics[0]["kl"] == 0.0 and metrics[0].get("reset") is None  # π = π_ref at step 1
    assert metrics[1]["kl"] > 1e-9 and metrics[1]["reset"] == "kl"
    assert metrics[2]["kl"] == 0.0  # measured right after the reset, before step 3's update


def test_stalled_validation_resets_right_after_the_evaluation_that_shows_it(tmp_path, monkeypatch,
                                                                            tiny_model_dir):
    # The random model scores 0 on every validation: step 1 sets the best (0), step 2 does not beat
    # it, which with patience 1 is a stall, so π_ref is reset at the end of step 2, not one step
    # later.
    _, metrics, _ = run_train(tmp_path, monkeypatch, tiny_model_dir,
                              ["--steps", "2", "--prompts-per-step", "2", "--n", "2",
                               "--eval-every", "1", "--reset-patience", "1"])
    assert [m["val_pass1"] for m in metrics] == [0.0, 0.0]
    assert [m.get("reset") for m in metrics] == [None, "stalled"]


# -------------------------------------------------------------------------- --log tensorboard|wandb

def test_log_to_an_uninstalled_package_is_one_line(capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    assert config_error(capsys, ["--log", "wandb"]) == ("--log wandb needs the wandb package, "
                                                        "which is not installed: pip install wandb")
    assert "--log must be tensorboard or wandb" in config_error(capsys, ["--log", "mlflow"])


def test_log_tensorboard_gets_every_numeric_metric_of_every_step(tmp_path, monkeypatch,
                                                                 tiny_model_dir):
    """TensorBoard receives the numbers metrics.jsonl holds, step by step (a stand-in SummaryWriter
    records them, so the test needs no tensorboard install)."""
    scalars = []

    class RecordingWriter:
        def __init__(self, log_dir):
            assert log_dir.endswith("tensorboard")

        def add_scalar(self, name, value, step):
            scalars.append((step, name, value))

        def flush(self):
            pass

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorboard"
                        else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=RecordingWriter))
    _, metrics, _ = run_train(tmp_path, monkeypatch, tiny_model_dir,
                              ["--steps", "2", "--prompts-per-step", "4",
                               "--n", "4", "--log", "tensorboard"])
    expected = [(m["step"], k, v) for m in metrics for k, v in m.items()
                if k != "step" and isinstance(v, (int, float))]
    assert scalars == expected and {step for step, _, _ in scalars} == {1, 2}


# ------------------------------------------------------------------- issue 15's options in the loop

def test_curriculum_passk_and_unlikeliness_run_in_the_loop(tmp_path, monkeypatch, tiny_model_dir):
    """The edge curriculum sees every sampled group (before dynamic sampling drops any) and logs its
    level; the pass@k advantage and the unlikeliness reward reach the update."""
    observed, advantages = [], []
    real_observe, real_advantages = curriculum.EdgeCurriculum.observe, grpo.group_advantages

    def observing(self, examples, scores):
        observed.append((len(examples), scores.shape))
        return real_observe(self, examples, scores)

    def recording(rewards, estimator="grpo", k=1):
        advantages.append((estimator, k))
        return real_advantages(rewards, estimator, k)

    monkeypatch.setattr(curriculum.EdgeCurriculum, "observe", observing)
    monkeypatch.setattr(grpo, "group_advantages", recording)
    _, metrics, _ = run_train(tmp_path, monkeypatch, tiny_model_dir, [
        "--tasks", "chains", "--level", "2", "--curriculum", "true", "--steps", "2",
        "--prompts-per-step", "4",
        "--n", "4", "--dynamic-sampling", "false", "--advantage", "passk", "--passk-k", "2"])
    assert observed == [(4, (4, 4)), (4, (4, 4))]  # every group of each step
    # a random model never reaches the threshold
    assert [m["curriculum_level"] for m in metrics] == [2, 2]
    # each step's (train.main checks the name first)
    assert advantages[-2:] == [("passk", 2), ("passk", 2)]
    with pytest.raises(ValueError, match="passk needs rewards of 0 or 1"):
        settings.parse_config(["--advantage", "passk", "--length-eta-max", "0.1"])
    with pytest.raises(ValueError, match="--level must be 1..3"):
        curriculum.prompt_stream(settings.parse_config(["--level", "4"]))
    chains_level_5 = settings.parse_config(["--tasks", "chains", "--level", "5"])
    assert curriculum.prompt_stream(chains_level_5).weights


def test_unlikeliness_ranks_each_group_by_the_sampler_logprobs(tmp_path, monkeypatch,
                                                               tiny_model_dir):
    calls = []
    real = grpo.unlikeliness_rewards

    def recording(rewards, seq_logp, beta):
        calls.append((rewards.shape, seq_logp.shape, beta, bool(torch.isfinite(seq_logp).all())))
        return real(rewards, seq_logp, beta)

    monkeypatch.setattr(grpo, "unlikeliness_rewards", recording)
    run_train(tmp_path, monkeypatch, tiny_model_dir,
              ["--steps", "1", "--prompts-per-step", "4", "--n", "4",
               "--dynamic-sampling", "false", "--unlikeliness", "0.25"])
    assert calls == [((4, 4), (4, 4), 0.25, True)]
