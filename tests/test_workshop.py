"""The workshop (docs/workshop.md) and its bug hunt (bugs.py): every command in the guide parses
with the flags the scripts have today, each figure it shows exists, each deliberately broken variant
breaks what it says, and none of them is switched on unless --bug names it."""

import contextlib
import dataclasses
import importlib.util
import io
import re
import shlex

import pytest
import torch
from conftest import REPO
from test_commands_start import code_block_commands

import bugs
import checkpoint
import evaluation
import grpo
import kl
import models
import prorl_kernels
import settings
import train

GUIDE = REPO / "docs" / "workshop.md"


def guide_commands() -> list[list[str]]:
    """Every `python ...` command of the guide's code blocks, as argv lists."""
    return [shlex.split(command, comments=True)
            for command in code_block_commands(GUIDE.read_text())]


def help_flags(parse_args) -> set[str]:
    """The exact option strings a script's --help lists (argparse would accept an abbreviation of a
    renamed flag; the guide must use the real names)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.getvalue()))


def script_parser(path: str):
    """parse_args of experiments/boundary.py (a script, not a module on the path)."""
    spec = importlib.util.spec_from_file_location("boundary_experiment", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parse_args


def test_the_guide_has_six_to_eight_exercises_with_their_figures():
    text = GUIDE.read_text()
    exercises = re.findall(r"^## Exercise \d+", text, flags=re.MULTILINE)
    assert 6 <= len(exercises) <= 8
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert figures, "the guide shows no figure"
    for figure in figures:
        assert (GUIDE.parent / figure).is_file(), (f"{figure} is shown in the guide but not "
                                                   "committed")


def test_every_command_in_the_guide_parses_with_todays_flags(monkeypatch):
    commands = guide_commands()
    assert len(commands) >= 6
    # The runs the guide's commands make may exist in this checkout, and DIR is a placeholder:
    # parse, don't run.
    monkeypatch.setattr(checkpoint, "is_run", lambda path: False)
    monkeypatch.setattr(models, "check_model_spec", lambda spec: None)  # DIR, $GGUF: placeholders
    train_flags = {"--" + f.name.replace("_", "-") for f in dataclasses.fields(settings.Config)}
    others = {"evaluation.py": evaluation.parse_args,
              "experiments/boundary.py": script_parser("experiments/boundary.py")}
    for argv in commands:
        script, args = argv[1], argv[2:]
        used = {arg for arg in args if arg.startswith("--")}
        if script == "train.py":
            assert used <= train_flags, f"{' '.join(argv)}: no such flag {used - train_flags}"
            train.checked_config(args)  # values too: a bad task, bug or preset name fails here
        else:
            assert script in others, (f"{script}: the guide runs a script this test does not "
                                      "know how to check")
            known = help_flags(others[script])
            assert used <= known, f"{' '.join(argv)}: no such flag {used - known}"
            others[script](args)


# ----------------------------------------------------------------------------- bugs.py


@pytest.fixture
def bug():
    """Switch a bug on for one test, and every original back afterwards."""
    yield bugs.switch_on
    bugs.switch_off()


def test_no_bug_is_on_by_default():
    assert settings.Config().bug == ""
    assert settings.parse_config([]).bug == ""
    bugs.switch_on("")
    for module, name in [(kl, "kl_penalty"), (grpo, "group_advantages"),
                         (grpo, "clipped_surrogate")]:
        function = getattr(module, name)
        # the original, not a copy
        assert function.__module__ == module.__name__ and function.__name__ == name


def test_an_unknown_bug_is_a_one_line_error():
    with pytest.raises(ValueError, match="--bug must be one of"):
        train.checked_config(["--bug", "kl-sing"])


def test_train_switches_the_configured_bug_on():
    assert "bugs.switch_on(c.bug)" in (REPO / "train.py").read_text()


def loss_gradient(logits, old_logp, ref_logp, adv, kl_coef):
    """The gradient of learner.policy_loss's loss w.r.t. the logits, and its stats: token log-probs,
    then grpo.token_loss weighed per token (old_logp None: on-policy, as learner.policy_loss does
    it)."""
    logits = logits.clone().requires_grad_(True)
    labels, mask = torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=torch.bool)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels[..., None])[..., 0]
    terms = grpo.LossTerms(old_logp, ref_logp, adv, mask, mask.float() / 3)
    loss, stats = grpo.token_loss(logp, terms, grpo.LossSpec(0.2, 0.28, kl_coef, "k3"))
    loss.backward()
    return logits.grad, stats


def test_kl_sign_pushes_the_policy_away_from_the_reference(bug):
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]])  # [B=1, T=3, V=3]
    # the reference finds the sampled tokens less likely than π does
    ref_logp = torch.full((1, 3), -1.5)
    # the KL term alone
    right, right_stats = loss_gradient(logits, None, ref_logp, torch.zeros(1), kl_coef=1.0)
    bug("kl-sign")
    wrong, wrong_stats = loss_gradient(logits, None, ref_logp, torch.zeros(1), kl_coef=1.0)
    assert right.abs().sum() > 0
    torch.testing.assert_close(wrong, -right)  # gradient descent now climbs the KL
    # and the logged KL reads negative
    assert right_stats["kl"] > 0 and wrong_stats["kl"] == -right_stats["kl"]


def test_no_adv_norm_leaves_advantages_uncentred_and_not_unit_std(bug):
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # [P=2, N=4]
    right = grpo.group_advantages(rewards)
    torch.testing.assert_close(right.mean(dim=1), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(right.std(dim=1, unbiased=False), torch.ones(2), atol=1e-4, rtol=0)
    bug("no-adv-norm")
    wrong = grpo.group_advantages(rewards)
    torch.testing.assert_close(wrong, rewards)  # A = r: the wrong answers get 0, never a push down
    assert not torch.allclose(wrong.std(dim=1, unbiased=False), torch.ones(2))


def test_no_clip_lets_a_token_past_the_clip_range_keep_its_gradient(bug):
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]]])
    logp = prorl_kernels.token_logprobs(logits, torch.tensor([[0, 1, 2]]))
    # token 1: ratio e ≈ 2.7 > 1 + ε_high, with A > 0
    old_logp = logp - torch.tensor([[0.0, 1.0, 0.0]])
    right, right_stats = loss_gradient(logits, old_logp, None, torch.ones(1), kl_coef=0.0)
    bug("no-clip")
    wrong, wrong_stats = loss_gradient(logits, old_logp, None, torch.ones(1), kl_coef=0.0)
    assert right[0, 1].abs().sum() == 0 and right_stats["clipfrac"] == pytest.approx(1 / 3)
    assert wrong[0, 1].abs().sum() > 0 and wrong_stats["clipfrac"] == 0
    # the unclipped tokens are as before
    torch.testing.assert_close(wrong[0, [0, 2]], right[0, [0, 2]])
