"""checkpoint.py + train.py --resume: a run stopped and resumed is the run that never stopped, bit
for bit; a run killed in the middle of a save resumes from the checkpoint before it.

The runs use a small length penalty with dynamic sampling off (the random model never answers right,
so its groups differ only by length), two PPO mini-batches (the shuffle reads torch's global RNG),
validation every 2 steps and a reference reset every 3 steps (so the reset tracker's state matters
after a resume at step 2).
"""

import json
import os
import signal
from pathlib import Path

import pytest
import torch

import checkpoint
import learner
import models
import settings
import train

ARGS = ["--prompts-per-step", "4", "--n", "4", "--max-new-tokens", "6",
        "--dynamic-sampling", "false", "--length-eta-max", "0.05", "--minibatches", "2",
        "--lr", "1e-2", "--eval-every", "2", "--reset-every", "3", "--kl-coef", "1e-2",
        "--eval-problems", "2", "--val-problems", "2", "--eval-samples", "1",
        "--boundary-problems", "0"]
# wall-clock: the only values allowed to differ
TIMING = {"gen_s", "ref_s", "update_s", "step_s", "tokens_per_s"}


def train_run(cwd: Path, model_dir: str, argv: list[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        train.main(["--model", model_dir] + ARGS + argv)


def result(run_dir: Path) -> tuple[list[torch.Tensor], list[dict]]:
    """(final policy parameters, metrics.jsonl without its timings)"""
    params = [p.detach() for p in models.load(str(run_dir / "final"))[0].parameters()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return params, [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model_dir):
    """4 steps without stopping."""
    cwd = tmp_path_factory.mktemp("straight")
    train_run(cwd, tiny_model_dir, ["--run", "straight", "--steps", "4"])
    return result(cwd / "runs" / "straight")


def assert_same_run(resumed: tuple, straight: tuple) -> None:
    (params, metrics), (straight_params, straight_metrics) = resumed, straight
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics == straight_metrics
    # the tracker survived the stop
    assert [m.get("reset") for m in metrics] == [None, None, "schedule", None]
    assert all(torch.equal(p, q) for p, q in zip(params, straight_params))


def test_stop_and_resume_is_the_straight_run(tmp_path, tiny_model_dir, straight):
    train_run(tmp_path, tiny_model_dir, ["--run", "r", "--steps", "2"])
    run_dir = tmp_path / "runs" / "r"
    # saved at the end
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 2
    first_half = result(run_dir)
    # 2 steps ≠ 4 steps
    assert not all(torch.equal(p, q) for p, q in zip(first_half[0], straight[0]))
    train_run(tmp_path, tiny_model_dir, ["--resume", str(run_dir), "--steps", "4"])
    assert_same_run(result(run_dir), straight)


class Killed(BaseException):
    """The process dying: not an Exception, so nothing on the way up handles it."""


def test_killed_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, tiny_model_dir,
                                                                   straight, monkeypatch):
    saves, real_save = [], torch.save

    def dies_during_the_third_save(state, file):
        saves.append(state["step"])
        if state["step"] == 3:
            file.write(b"half a checkpoint")  # the bytes written before the kill
            raise Killed
        real_save(state, file)

    monkeypatch.setattr(torch, "save", dies_during_the_third_save)
    with pytest.raises(Killed):
        train_run(tmp_path, tiny_model_dir, ["--run", "k", "--steps", "4", "--save-every", "1"])
    monkeypatch.setattr(torch, "save", real_save)
    run_dir = tmp_path / "runs" / "k"
    assert saves == [1, 2, 3]
    # never renamed into place
    assert (run_dir / "checkpoint.pt.tmp").read_bytes() == b"half a checkpoint"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 2
    assert [json.loads(line)["step"]
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]

    # step 3 is redone, its old line dropped
    train_run(tmp_path, tiny_model_dir, ["--resume", str(run_dir)])
    assert_same_run(result(run_dir), straight)
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 4
    # the next save wrote over it and renamed it
    assert not (run_dir / "checkpoint.pt.tmp").exists()


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        settings.parse_config(["--resume", str(tmp_path)])
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object of settings"):
        settings.parse_config(["--resume", str(tmp_path)])


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_its_start(
        tmp_path, tiny_model_dir, straight, monkeypatch, capsys):
    real_sample = train.sampling.sample_groups

    def killed_at_step_3(*args, **kwargs):
        if args[4].seed // 10 % 10_000 == 3:  # seed = seed·100003 + step·10 + rank·1000003
            raise Killed
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(train.sampling, "sample_groups", killed_at_step_3)
    with pytest.raises(Killed):
        train_run(tmp_path, tiny_model_dir, ["--run", "early", "--steps", "4", "--save-every", "0"])
    monkeypatch.setattr(train.sampling, "sample_groups", real_sample)
    run_dir = tmp_path / "runs" / "early"
    assert (not checkpoint.has_checkpoint(run_dir)
            and len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2)
    with pytest.raises(ValueError, match="already holds a run: --resume runs/early continues it"):
        train_run(tmp_path, tiny_model_dir, ["--run", "early"])
    train_run(tmp_path, tiny_model_dir, ["--resume", str(run_dir)])
    assert ("stopped before its first checkpoint: starting it over from step 0"
            in capsys.readouterr().out)
    assert_same_run(result(run_dir), straight)


def test_sigterm_saves_the_step_and_stops_and_resume_is_the_straight_run(
        tmp_path, tiny_model_dir, straight, monkeypatch, capsys):
    real_sample = train.sampling.sample_groups

    def preempted_during_step_2(*args, **kwargs):
        if args[4].seed // 10 % 10_000 == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler notes it; the step goes on
        return real_sample(*args, **kwargs)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(train.sampling, "sample_groups", preempted_during_step_2)
    train_run(tmp_path, tiny_model_dir, ["--run", "p", "--steps", "4", "--save-every", "0"])
    monkeypatch.setattr(train.sampling, "sample_groups", real_sample)
    assert signal.getsignal(signal.SIGTERM) == handler  # restored when the run ends
    run_dir = tmp_path / "runs" / "p"
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 2
    assert not (run_dir / "final").exists()  # it stopped there: no final model, no report
    said = capsys.readouterr().out
    assert said.endswith("stopped by a signal after step 2, checkpoint saved: --resume runs/p "
                         "continues\n")
    train_run(tmp_path, tiny_model_dir, ["--resume", str(run_dir)])
    assert_same_run(result(run_dir), straight)


def test_a_failed_save_warns_and_training_goes_on_but_the_last_one_must_succeed(
        tmp_path, tiny_model_dir, monkeypatch, capsys):
    real_save = torch.save

    def disk_full_at_step_2_and_4(state, file):
        if state["step"] in (2, 4):
            file.write(b"some bytes")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 128 vs "
                               "64")
        real_save(state, file)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2_and_4)
    with pytest.raises(ValueError,
                       match=r"^step 4: .*checkpoint.pt not written \(\[enforce fail.*any earlier "
                             r"one is intact$"):
        train_run(tmp_path, tiny_model_dir, ["--run", "full", "--steps", "4", "--save-every", "1"])
    assert "warning: step 2: " in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "full"
    # step 3 was saved after all
    assert torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 3
    assert not (run_dir / "checkpoint.pt.tmp").exists()  # the half-written file was removed


def test_resumed_runs_take_new_lr_and_reset_flags_and_refuse_changes_that_break_the_run(
        tmp_path, tiny_model_dir, monkeypatch):
    train_run(tmp_path, tiny_model_dir, ["--run", "f", "--steps", "2"])
    run_dir = str(tmp_path / "runs" / "f")
    for flag, value in [("--tasks", "add"), ("--preset", "prorl"), ("--model", "elsewhere"),
                        ("--seed", "1"),
                        ("--eval-problems", "3"), ("--max-new-tokens", "8"), ("--kl-coef", "0")]:
        with pytest.raises(ValueError, match=f"--resume {run_dir}: {flag} cannot "):
            settings.parse_config(["--resume", run_dir, flag, value])
    assert settings.parse_config(["--resume", run_dir, "--kl-coef", "0.05", "--tasks",
                                  "sort,reverse,countdown"]).kl_coef == 0.05
    lrs = []

    def record(run_dir, step, state, **kwargs):
        lrs.append(state.optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(checkpoint, "save", record)
    train_run(tmp_path, tiny_model_dir,
              ["--resume", run_dir, "--steps", "4", "--lr", "5e-3", "--reset-every", "0"])
    assert lrs == [5e-3]
    metrics = [json.loads(line)
               for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    # the saved tracker's reset_every=3 is not used
    assert [m.get("reset") for m in metrics] == [None] * 4


def test_open_metrics_keeps_the_lines_up_to_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n"
                                                    for s in (1, 2, 3)))
    with checkpoint.open_metrics(tmp_path, 2) as file:
        file.write(json.dumps({"step": 3, "again": True}) + "\n")
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}',
                                                                     '{"step": 3, "again": true}']
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"st')  # killed mid-line
    with checkpoint.open_metrics(tmp_path, 2):
        pass
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[1]\n"text"\n{"no step": 1}\n{"step": '
                                            '2}\n')
    # lines that are not a step's record are dropped, not fatal
    with checkpoint.open_metrics(tmp_path, 2):
        pass
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == ['{"step": 1}', '{"step": 2}']
    with checkpoint.open_metrics(tmp_path, 0):  # a fresh run starts an empty file
        pass
    assert (tmp_path / "metrics.jsonl").read_text() == ""


# -------------------------------------------------------------- guards: a NaN loss skips one update

def test_a_nan_loss_skips_that_update_is_logged_and_training_goes_on(tmp_path, tiny_model_dir,
                                                                     monkeypatch):
    # One optimizer step per RL step (one mini-batch, one micro-batch), so loss call k is step k's
    # loss.
    calls, real_policy_loss = [], learner.policy_loss

    def nan_at_step_2(*args, **kwargs):
        loss, stats = real_policy_loss(*args, **kwargs)
        calls.append(len(calls) + 1)
        return (loss * float("nan"), stats) if len(calls) == 2 else (loss, stats)

    weights_after = {}  # step → the policy's weights when that step's checkpoint is written

    def record(run_dir, step, state, **kwargs):
        weights_after[step] = [p.detach().clone() for p in state.policy.parameters()]

    monkeypatch.setattr(learner, "policy_loss", nan_at_step_2)
    monkeypatch.setattr(checkpoint, "save", record)
    train_run(tmp_path, tiny_model_dir,
              ["--run", "nan", "--steps", "3", "--minibatches", "1", "--save-every", "1",
               "--eval-every", "0", "--reset-every", "0"])
    metrics = [json.loads(line)
               for line in (tmp_path / "runs" / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert calls == [1, 2, 3]
    assert [m["skipped_updates"] for m in metrics] == [0, 1, 0]
    # step 2 changed nothing
    assert all(torch.equal(p, q) for p, q in zip(weights_after[1], weights_after[2]))
    # step 3 trained
    assert not all(torch.equal(p, q) for p, q in zip(weights_after[2], weights_after[3]))
    assert all(torch.isfinite(p).all() for p in weights_after[3])


def test_stop_requests_catch_every_sigterm_and_leave_ignored_signals_ignored():
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)  # e.g. a background job
    try:
        with checkpoint.stop_requests() as requested:
            assert not requested() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher's copy ...
            os.kill(os.getpid(), signal.SIGTERM)  # ... and the scheduler's: the process lives on
            assert requested()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous_int)


# ------------------------------------------------------------------- the same command, the same run

def test_a_run_that_builds_the_base_equals_one_that_reuses_it(tmp_path, monkeypatch):
    """`python train.py` right after a clone builds the tiny base in its own process (drawing from
    torch's RNG); the same command again reuses it from disk. Both must be the same run: RL seeds
    its generators from the config alone. (Before the fix, KL, entropy and clip fraction differed
    from step 1 on.)"""
    # a quick base: the point is where it comes from
    monkeypatch.setitem(models.WARMSTART, "steps", 3)
    monkeypatch.chdir(tmp_path)
    argv = ARGS + ["--steps", "3", "--eval-every", "0"]
    train.main(argv + ["--run", "built"])
    assert (tmp_path / "runs" / "base" / "tiny-s0" / "config.json").is_file()
    torch.manual_seed(1234)  # whatever the process did before must not matter either
    torch.rand(100)
    train.main(argv + ["--run", "reused"])
    built, reused = result(tmp_path / "runs" / "built"), result(tmp_path / "runs" / "reused")
    assert reused[1] == built[1] and len(built[1]) == 3
    assert all(torch.equal(p, q) for p, q in zip(built[0], reused[0]))
