"""Deliberately broken variants of the RL math, for the workshop's bug hunt (docs/workshop.md) — and
nothing else.

    python train.py --bug kl-sign        # one of BUGS; the default "" switches none on

`switch_on(name)` swaps one function of grpo.py or kl.py for a broken copy, for this process only;
train.py calls it once after reading the config. The correct functions are never edited: a run
without --bug uses them as they are (tests/test_workshop.py checks that, and that each bug breaks
what it says below). Each broken copy is its original with one line changed, marked `# BUG:`; the
exercise is to find it from the curves alone.
"""

import torch

import grpo
import kl


def kl_penalty_sign_flipped(logp, ref_logp, kind="k3", clamp=None, mask=None) -> torch.Tensor:
    """kl.kl_penalty with its sign flipped: the loss now *rewards* moving away from π_ref."""
    if mask is not None:
        logp, ref_logp = (torch.where(mask.bool(), logp, 0.0),
                          torch.where(mask.bool(), ref_logp, 0.0))
    kl_value = kl.kl_estimate(logp, ref_logp, kind)
    return -(kl_value.clamp(min=-clamp, max=clamp) if clamp else kl_value)  # BUG: the minus sign


def group_advantages_unnormalised(rewards: torch.Tensor, estimator: str = "grpo",
                                  k: int = 1) -> torch.Tensor:
    """grpo.group_advantages without the group baseline or the std: A = r. No answer is compared
    with the rest of its group, and a wrong answer (r = 0) is never pushed down."""
    return rewards.float()  # BUG: was (r − group mean) / (group std + ε)


def clipped_surrogate_unclipped(logp, old_logp, adv, mask, clip_low=0.2, clip_high=0.28):
    """grpo.clipped_surrogate without the clip: later mini-batches of a step keep pushing tokens
    that earlier ones already moved, however far the ratio went. clipfrac reads 0."""
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    logp, old_logp = (torch.where(mask.bool(), logp, 0.0),
                      torch.where(mask.bool(), old_logp.to(logp.dtype), 0.0))
    ratio = torch.exp(logp - old_logp)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * ratio  # BUG: was −A · clamp(ratio, 1 − clip_low, 1 + clip_high)
    return torch.maximum(pg_loss1, pg_loss2), ratio, pg_loss2 > pg_loss1


BUGS = {  # name → (module, function it replaces, broken copy, the symptom to look for)
    "kl-sign": (kl, "kl_penalty", kl_penalty_sign_flipped,
                "the logged kl is negative, though k3 ≥ 0"),
    "no-adv-norm": (grpo, "group_advantages", group_advantages_unnormalised,
                    "entropy and kept_frac fall faster, kl climbs faster"),
    "no-clip": (grpo, "clipped_surrogate", clipped_surrogate_unclipped, "clipfrac is exactly 0"),
}
ORIGINALS = {(module, name): getattr(module, name) for module, name, _, _ in BUGS.values()}


def check_name(name: str) -> None:
    if name not in ("", *BUGS):
        raise ValueError(f"--bug must be one of {', '.join(BUGS)}, not {name!r}")


def switch_on(name: str) -> None:
    """Swap in the broken copy `name` (one of BUGS) for this process; "" leaves everything as it
    is."""
    check_name(name)
    if not name:
        return
    module, function, broken, symptom = BUGS[name]
    setattr(module, function, broken)
    print(f"WORKSHOP BUG ON: {name} ({module.__name__}.{function} is broken; "
          f"look for: {symptom})", flush=True)


def switch_off() -> None:
    """Put every original function back (the tests switch bugs on and off in one process)."""
    for (module, function), original in ORIGINALS.items():
        setattr(module, function, original)
