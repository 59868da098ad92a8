"""The RL math of one step: advantages, dynamic sampling, the clipped loss + KL, and what each token
weighs.

Shapes: P prompts, N samples per prompt (a "group"), B = P·N rows, T token positions. Sampling
the groups lives in sampling.py; this file holds only math, and imports nothing of ours but kl.
"""

import dataclasses
import math

import torch

import kl

EPS = 1e-6


def group_advantages(rewards: torch.Tensor, estimator: str = "grpo", k: int = 1) -> torch.Tensor:
    """Advantages [P, N] from rewards [P, N]; every token of a response gets its response's
    advantage.

    grpo          (DeepSeekMath / ProRL):  A = (r − mean_group) / (std_group + ε)
    reinforce_pp  (REINFORCE++-baseline, ProRL v2):  r̃ = r − mean_group,
                  A = (r̃ − mean_batch r̃) / (std_batch r̃ + ε)
                  — the group mean is the baseline; normalising by the whole batch, not the group,
                  does not blow up the advantage of a group that is nearly all right or all wrong.
    rloo          (REINFORCE leave-one-out):
                  A_i = r_i − mean_{j≠i} r_j = N/(N−1) · (r_i − mean_group)
    passk         (Pass@k training, arXiv 2508.10751): the analytic advantage of pass@k as the
                  reward, for 0/1 rewards and k ≤ N (passk_advantages below); k = 1 is grpo
    A group whose rewards are all equal gets exactly 0 (its float32 mean may miss the value by a
    rounding step, and for grpo that ±6e-8 divided by a std of 0 would be a sizeable advantage of
    one sign).
    """
    check_estimator(estimator)
    rewards = rewards.float()
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [P, 1]
    centred = (rewards - rewards.mean(dim=1, keepdim=True)).masked_fill(constant, 0.0)  # [P, N]
    if estimator == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + EPS)
    if estimator == "reinforce_pp":
        return ((centred - centred.mean()) / (centred.std(unbiased=False) + EPS)).masked_fill(
            constant, 0.0)
    if estimator == "rloo":
        group_size = rewards.shape[1]
        return centred * group_size / max(group_size - 1, 1)
    return passk_advantages(rewards, k)


ESTIMATORS = ("grpo", "reinforce_pp", "rloo", "passk")


def check_estimator(name: str) -> None:
    if name not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator '{name}' ({', '.join(ESTIMATORS)})")


def passk_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Pass@k training's analytic advantage (Chen et al., arXiv 2508.10751, "analytical derivation";
    their code: github.com/RUCAIBox/Passk_Training, code/passk_adv.py). rewards [P, N] of 0/1 →
    advantages [P, N].

    The reward of a k-subset of the group is 1 if any of its samples is right. With N_neg wrong
    samples of N:
        R̄ = 1 − C(N_neg, k) / C(N, k)                          mean reward over all k-subsets
        σ = √(R̄ (1 − R̄))
        A₊ = (1 − R̄) / σ                                         each right sample
        A₋ = (1 − R̄ − C(N_neg − 1, k − 1) / C(N − 1, k − 1)) / σ  each wrong sample
    A wrong sample is blamed only as far as the other k − 1 of its subsets are all wrong too, so
    a group with a rare right answer pushes its wrong samples down less than GRPO would: the
    policy keeps exploring. k = 1 is GRPO's advantage; for any k the group's advantages sum to 0;
    σ = 0 (all right, all wrong, or N_neg < k so every subset passes) gives 0.
    """
    if not ((rewards == 0) | (rewards == 1)).all():
        raise ValueError("--advantage passk needs rewards of exactly 0 or 1 (no length penalty, "
                         "no unlikeliness)")
    group_size = rewards.shape[1]
    if not 1 <= k <= group_size:
        raise ValueError(f"--passk-k must be between 1 and the group size {group_size}, not {k}")
    adv = torch.zeros_like(rewards)  # [P, N]
    for row, wrong in enumerate((rewards == 0).sum(dim=1).tolist()):
        mean = 1 - math.comb(wrong, k) / math.comb(group_size, k)  # math.comb(a, b) = 0 when b > a
        std = math.sqrt(mean * (1 - mean))
        if std == 0:
            continue
        adv_right = (1 - mean) / (std + EPS)
        adv_wrong = (1 - mean - math.comb(wrong - 1, k - 1) / math.comb(group_size - 1, k - 1)
                     ) / (std + EPS)
        adv[row] = torch.where(rewards[row] == 1, adv_right, adv_wrong)
    return adv


# ----------------------------------------------------------------------------- reward shaping
# The verifier's scores are shaped here, and only here, before the advantages are computed.

def shape_rewards(scores: torch.Tensor, mask: torch.Tensor, sampler_logp: torch.Tensor,
                  ref_logp: torch.Tensor | None, step: int, c) -> tuple[torch.Tensor, float]:
    """Scores [P, N] → (shaped rewards [P, N], this step's length-penalty coefficient η), in order:

    1. length penalty (ProRL v2)   r − η(step) · len / max_new_tokens
    2. KL in the reward            r − β · Σ_t KL_t, with the sampler's log-probs as π (no extra
                                   forward); only with c.kl_in_reward (ref_logp: the
                                   reference's, [B, T−1])
    3. unlikeliness                right answers ranked by their mean log-prob under the sampler
    mask, sampler_logp: the rollout's [B, T], B = P·N; c: the run's settings.Config. step counts
    from 0.
    """
    eta = length_penalty_coef(step, c.length_eta_min, c.length_eta_max, c.length_period,
                              c.length_off_steps)
    lengths = mask.sum(dim=1).view_as(scores)
    shaped = apply_length_penalty(scores, lengths, c.max_new_tokens, eta)
    if c.kl_in_reward:
        token_kl = kl.kl_estimate(sampler_logp[:, 1:], ref_logp, c.kl_kind)
        shaped = shaped - c.kl_coef * (token_kl * mask[:, 1:]).sum(dim=1).view_as(shaped)
    if c.unlikeliness:
        seq_logp = (sampler_logp * mask).sum(1) / mask.sum(1).clamp(min=1)
        shaped = unlikeliness_rewards(shaped, seq_logp.view_as(shaped), c.unlikeliness)
    return shaped, eta


def length_penalty_coef(step: int, eta_min: float, eta_max: float, period: int,
                        off_steps: int = 0) -> float:
    """ProRL v2's scheduled cosine length penalty coefficient η(t), switched on and off in cycles.

    Each cycle is `period` steps with the penalty on, then `off_steps` steps with it off (η = 0).
    Inside the on-phase, at t steps into it:
        η(t) = η_min + ½(η_max − η_min)(1 + cos(π t / period)),
    so it starts at η_max and decays towards η_min, which it would reach at t = period, the first
    step after the on-phase (the formula as written; its last on-step is
    η_min + ½(η_max − η_min)(1 − cos(π / period))).
    """
    if eta_max == 0 and eta_min == 0:
        return 0.0
    t = step % (period + off_steps)
    if t >= period:
        return 0.0
    return eta_min + 0.5 * (eta_max - eta_min) * (1 + math.cos(math.pi * t / period))


def apply_length_penalty(rewards, lengths, max_len: int, eta: float):
    """r − η · len/max_len (elementwise; tensors or floats): shorter answers are preferred by up to
    η per response (ProRL v2)."""
    return rewards - eta * lengths / max_len


def unlikeliness_rewards(rewards: torch.Tensor, seq_logp: torch.Tensor,
                         beta: float = 0.25) -> torch.Tensor:
    """The unlikeliness reward (He, Fried & Welleck, arXiv 2506.02355; their release
    github.com/AndreHe02/rewarding-unlikely-release, RayLeanTrainer._compute_advantages). [P, N]
    → [P, N].

    GRPO's rank bias: it raises right samples that are already likely and neglects rare right
    ones. So rank a group's N samples by likelihood under the policy that sampled them, rank 0
    the least likely, and scale
        r_i ← r_i · (1 − β_rank · rank_i / N)
    the least likely keeps its whole reward, the most likely loses β(N − 1)/N of it; wrong
    samples (r = 0) stay 0. seq_logp: each completion's mean token log-prob (what the release
    ranks by); ties rank in order. The paper uses β_rank = 0.25 with G = 32 samples per problem;
    apply before group_advantages.
    """
    group_size = rewards.shape[1]
    # [P, N]: 0 = least likely
    rank = seq_logp.argsort(dim=1, stable=True).argsort(dim=1, stable=True)
    return rewards.float() * (1 - beta * rank.float() / group_size)


def dynamic_sampling_mask(rewards: torch.Tensor) -> torch.Tensor:
    """bool [P]: False where a group's rewards are all equal (DAPO / ProRL dynamic sampling).

    Such a group has zero advantage for every sample, so it would add no gradient, only noise in the
    token count; dropping it keeps every step's batch informative.
    """
    return (rewards != rewards[:, :1]).any(dim=1)


AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor,
                      mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28):
    """PPO's clipped surrogate with decoupled bounds (DAPO "clip-higher", ProRL) → (pg_loss, ratio,
    clipped).

    logp, old_logp, mask: [B, T]; adv: [B] or [B, T].   Per token, ratio = exp(logp − old_logp):
        pg_loss1 = −A · ratio
        pg_loss2 = −A · clip(ratio, 1 − clip_low, 1 + clip_high)
        pg_loss  = max(pg_loss1, pg_loss2)      (= −min(ratio·A, clip(ratio)·A))
    A larger upper bound lets unlikely tokens with A > 0 grow further, which keeps entropy up.
    `clipped` marks the tokens where the clipped branch is the max: they pass no gradient.
    """
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # [B, 1]: the response's advantage on each of its tokens
    # Outside the mask (prompt, pads) the ratio is set to exactly 1 before exp: those tokens get
    # no gradient anyway, but exp of a huge log-ratio there would turn that zero gradient into
    # 0·inf = NaN.
    logp, old_logp = (torch.where(mask.bool(), logp, 0.0),
                      torch.where(mask.bool(), old_logp.to(logp.dtype), 0.0))
    ratio = torch.exp(logp - old_logp)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return torch.maximum(pg_loss1, pg_loss2), ratio, pg_loss2 > pg_loss1  # [B, T] each


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.28, agg: str = "token-mean"):
    """The clipped surrogate reduced by `agg` → (loss, stats), for one batch on its own."""
    pg_loss, ratio, clipped = clipped_surrogate(logp, old_logp, adv, mask, clip_low, clip_high)
    return aggregate(pg_loss, mask, agg), surrogate_stats(logp, old_logp, ratio, clipped, mask)


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The numbers the per-token loss reads besides tensors, checked once when made (train builds
    one from the config; the fused kernel, its reference and `token_loss` all take it)."""

    clip_low: float = 0.2  # ε_low: ρ may fall to 1 − ε_low before its gradient stops
    clip_high: float = 0.28  # ε_high: ρ may rise to 1 + ε_high (clip-higher: ProRL 0.4, v2 0.28)
    kl_coef: float = 0.0  # β of β·KL(π‖π_ref); 0 logs the KL (given a reference) without using it
    kl_kind: str = "k3"  # which estimator (kl.KINDS)
    kl_clamp: float | None = None  # bound on each token's KL term; None: unbounded
    temperature: float = 1.0  # the sampler's: log-probs are those of softmax(logits / temperature)
    agg: str = "token-mean"  # what each token weighs (AGGREGATIONS, loss_weights)

    def __post_init__(self):
        if self.kl_kind not in kl.KINDS:
            raise ValueError(kl.unknown_kind(self.kl_kind))
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"unknown loss aggregation '{self.agg}' ({', '.join(AGGREGATIONS)})")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}.")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"clip bounds need 0 ≤ clip_low < 1 and clip_high ≥ 0, got "
                             f"{self.clip_low}, {self.clip_high}.")


# what a loss function uses when it is given no spec
DEFAULT_SPEC = LossSpec()


@dataclasses.dataclass(frozen=True)
class LossTerms:
    """The per-row tensors the loss reads besides the policy's log-probs, [B, T] unless said."""

    old_logp: torch.Tensor | None  # the policy before this update; None: on-policy (ρ = 1)
    ref_logp: torch.Tensor | None  # the reference's; None: no reference model
    adv: torch.Tensor  # [B] (one per response) or [B, T]
    mask: torch.Tensor  # the tokens the loss covers
    weights: torch.Tensor  # what each token weighs (loss_weights)

    def rows(self, index: torch.Tensor) -> "LossTerms":
        """The same terms for the rows `index` (a micro-batch)."""
        values = (getattr(self, field.name) for field in dataclasses.fields(self))
        return LossTerms(*(None if value is None else value[index] for value in values))


def token_loss(logp: torch.Tensor, terms: LossTerms, spec: LossSpec = DEFAULT_SPEC):
    """Σ_t w_t · (pg_loss + β·KL(π‖π_ref))_t (ProRL), a scalar, and its statistics.

    The KL is computed (and logged) whenever a reference is given; it enters the loss only when β
    > 0, since 0 · an overflowed KL would be NaN (with --kl-in-reward the KL is in the reward
    instead).
    """
    old_logp = logp.detach() if terms.old_logp is None else terms.old_logp
    pg_loss, ratio, clipped = clipped_surrogate(logp, old_logp, terms.adv, terms.mask,
                                                spec.clip_low, spec.clip_high)
    stats = surrogate_stats(logp, old_logp, ratio, clipped, terms.mask)
    per_token = pg_loss
    if terms.ref_logp is not None:
        kl_per_token = kl.kl_penalty(logp, terms.ref_logp, spec.kl_kind, spec.kl_clamp, terms.mask)
        stats["kl"] = masked_mean(kl_per_token.detach(), terms.mask)
        if spec.kl_coef:
            per_token = pg_loss + spec.kl_coef * kl_per_token
    return (per_token * terms.weights).sum(), stats


@torch.no_grad()
def surrogate_stats(logp, old_logp, ratio, clipped, mask) -> dict[str, torch.Tensor]:
    """CleanRL's diagnostics of the clipped surrogate, as means over the masked tokens."""
    # log ρ = logp − old_logp, the importance ratio's log
    # (kl.py's log_r is another ratio: π_ref / π)
    log_rho = torch.where(mask.bool(), logp - old_logp.to(logp.dtype), 0.0)
    return {"clipfrac": masked_mean(clipped.float(), mask),
            "approx_kl": masked_mean(0.5 * log_rho**2, mask),
            "ratio_mean": masked_mean(ratio, mask)}


# ----------------------------------------------------------------------- what each token weighs
# A mini-batch's loss is Σ_t w_t · loss_t. Its rows are split over ranks and, on each rank, over
# micro-batches (gradient accumulation); the weights make the sum of all those backward passes the
# gradient of the loss aggregated over the whole mini-batch, as if it had run in one piece. The one
# home of that idea:
#   token-mean           w_t = 1 / (tokens in the mini-batch): every token weighs the same, so
#                        long responses are not down-weighted (DAPO, ProRL v2)
#   seq-mean-token-mean  w_t = 1 / (tokens of t's response) / (responses): mean per response,
#                        then over responses (original GRPO)
#   seq-mean-token-sum   w_t = 1 / (responses): sum per response, then mean over responses
#                        (Dr. GRPO-like)

def loss_count(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """What `agg` averages over, counted in mask [B, T]: tokens, or responses that have a token."""
    LossSpec(agg=agg)  # checks the name
    return mask.sum() if agg == "token-mean" else (mask.sum(dim=1) > 0).sum()


def loss_weights(mask: torch.Tensor, agg: str, count: float) -> torch.Tensor:
    """w [B, T] of these rows, where `count` is loss_count of the whole mini-batch (over every rank;
    see dist.loss_denominator). Zero outside the mask."""
    weights = mask.float()
    if agg == "seq-mean-token-mean":
        weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
    return weights / max(float(count), 1.0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Σ w·loss over one batch on its own: the scalar `agg` makes of a per-token loss [B, T]."""
    # not per_token · mask: a NaN at a pad would stay NaN
    per_token = torch.where(mask.bool(), per_token, 0.0)
    return (per_token * loss_weights(mask, agg, loss_count(mask, agg))).sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return torch.where(mask > 0, values, 0.0).sum() / mask.sum().clamp(min=1)
