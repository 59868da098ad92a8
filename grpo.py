"""Advantages, dynamic sampling, and the clipped policy-gradient loss.

Shapes: P prompts, N samples per prompt (a "group"), B = P·N rows, T token positions.
"""

import torch

import rollout

EPS = 1e-6


def group_advantages(rewards: torch.Tensor, estimator: str = "grpo") -> torch.Tensor:
    """Advantages [P, N] from rewards [P, N]; every token of a response gets its response's advantage.

    grpo          (DeepSeekMath / ProRL):  A = (r − mean_group) / (std_group + ε)
    reinforce_pp  (REINFORCE++-baseline, ProRL v2):  r̃ = r − mean_group,  A = (r̃ − mean_batch r̃) / (std_batch r̃ + ε)
                  — the group mean is the baseline; normalising by the whole batch, not the group,
                  does not blow up the advantage of a group that is nearly all right or all wrong.
    rloo          (REINFORCE leave-one-out):  A_i = r_i − mean_{j≠i} r_j = N/(N−1) · (r_i − mean_group)
    A group whose rewards are all equal gets exactly 0 (its float32 mean may miss the value by a rounding
    step, and for grpo that ±6e-8 divided by a std of 0 would be a sizeable advantage of one sign).
    """
    rewards = rewards.float()
    constant = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)  # [P, 1]
    centred = (rewards - rewards.mean(dim=1, keepdim=True)).masked_fill(constant, 0.0)  # [P, N]
    if estimator == "grpo":
        return centred / (rewards.std(dim=1, keepdim=True, unbiased=False) + EPS)
    if estimator == "reinforce_pp":
        return ((centred - centred.mean()) / (centred.std(unbiased=False) + EPS)).masked_fill(constant, 0.0)
    if estimator == "rloo":
        group_size = rewards.shape[1]
        return centred * group_size / max(group_size - 1, 1)
    raise ValueError(f"unknown advantage estimator '{estimator}' (grpo, reinforce_pp, rloo)")


def dynamic_sampling_mask(rewards: torch.Tensor) -> torch.Tensor:
    """bool [P]: False where a group's rewards are all equal (DAPO / ProRL dynamic sampling).

    Such a group has zero advantage for every sample, so it would add no gradient, only noise in the
    token count; dropping it keeps every step's batch informative.
    """
    return (rewards != rewards[:, :1]).any(dim=1)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip_low: float = 0.2, clip_high: float = 0.28, agg: str = "token-mean"):
    """Clipped surrogate with decoupled bounds (DAPO "clip-higher", ProRL); returns (loss, stats).

    logp, old_logp, mask: [B, T]; adv: [B] or [B, T].   Per token, ratio = exp(logp − old_logp):
        pg_loss1 = −A · ratio
        pg_loss2 = −A · clip(ratio, 1 − clip_low, 1 + clip_high)
        pg_loss  = max(pg_loss1, pg_loss2)      (= −min(ratio·A, clip(ratio)·A))
    A larger upper bound lets unlikely tokens with A > 0 grow further, which keeps entropy up.
    """
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)  # [B, 1]: the response's advantage on each of its tokens
    # Outside the mask (prompt, pads) the ratio is set to exactly 1 before exp: those tokens get no
    # gradient anyway, but exp of a huge log-ratio there would turn that zero gradient into 0·inf = NaN.
    logp, old_logp = torch.where(mask.bool(), logp, 0.0), torch.where(mask.bool(), old_logp, 0.0)
    ratio = torch.exp(logp - old_logp)
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)  # [B, T]
    loss = aggregate(pg_loss, mask, agg)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_loss2 > pg_loss1).float(), mask),
            "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, stats


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce a per-token loss [B, T] to a scalar.

    token-mean           Σ loss / Σ tokens over the whole batch: every token weighs the same, so long
                         responses are not down-weighted (DAPO, ProRL v2)
    seq-mean-token-mean  mean over each response's tokens, then over responses (original GRPO)
    seq-mean-token-sum   sum over each response's tokens, then mean over responses (Dr. GRPO-like)
    """
    mask = mask.float()
    per_token = torch.where(mask > 0, per_token, 0.0)  # not per_token · mask: a NaN at a pad would stay NaN
    if agg == "token-mean":
        return per_token.sum() / mask.sum().clamp(min=1)
    per_seq_sum = per_token.sum(dim=1)  # [B]
    has_tokens = mask.sum(dim=1) > 0
    if agg == "seq-mean-token-mean":
        per_seq = per_seq_sum / mask.sum(dim=1).clamp(min=1)
    elif agg == "seq-mean-token-sum":
        per_seq = per_seq_sum
    else:
        raise ValueError(f"unknown loss aggregation '{agg}' (token-mean, seq-mean-token-mean, seq-mean-token-sum)")
    return per_seq[has_tokens].sum() / has_tokens.sum().clamp(min=1)


def aggregate_weight(mask: torch.Tensor, total_mask: torch.Tensor, agg: str) -> float:
    """Share of a micro-batch in its mini-batch's aggregate, so that summing
    weight · aggregate(micro-batch) over micro-batches equals aggregate(whole mini-batch)."""
    if agg == "token-mean":
        return mask.sum().item() / max(total_mask.sum().item(), 1)
    return (mask.sum(dim=1) > 0).sum().item() / max((total_mask.sum(dim=1) > 0).sum().item(), 1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.float()
    return torch.where(mask > 0, values, 0.0).sum() / mask.sum().clamp(min=1)


def sample_groups(policy, tokenizer, stream, groups: int, n: int, max_new_tokens: int, temperature: float,
                  top_p: float, rounds: int = 1, dynamic_sampling: bool = True, seed: int = 0):
    """Dynamic sampling with refill (DAPO; ProRL): sample `groups` fresh prompts × n completions, keep the
    informative groups, and sample again until `groups` groups are kept or `rounds` rounds are spent.

    Filtering looks at the verifier's scores (correctness), not at shaped rewards. Returns the kept rows
    (a Rollout of G·N rows, G ≤ groups), their scores [G, N], and the statistics of *all* sampled groups
    (reward and pass rate before filtering, and the kept fraction).
    """
    import eval as evaluation  # here, not at the top: kernels.reference imports this module, and eval's
    # import of transformers probes for a package named `kernels` (ours) while that is still importing
    kept_batches, kept_scores, all_scores, lengths = [], [], [], []
    for round_ in range(rounds):
        examples = [stream.sample() for _ in range(groups)]
        batch, scores = evaluation.rollout_and_score(policy, tokenizer, examples, n, max_new_tokens, temperature,
                                                     top_p, seed=seed + round_)
        keep = dynamic_sampling_mask(scores) if dynamic_sampling else torch.ones_like(scores[:, 0], dtype=torch.bool)
        kept_batches.append(rollout.select_rows(batch, keep.repeat_interleave(n)))
        kept_scores.append(scores[keep])
        all_scores.append(scores)
        lengths.append(batch.mask.sum(dim=1).float())
        if sum(len(s) for s in kept_scores) >= groups:
            break
    scores, all_scores = torch.cat(kept_scores)[:groups], torch.cat(all_scores)  # [G, N], [groups·rounds, N]
    batch = rollout.select_rows(rollout.concat_rows(kept_batches, tokenizer.pad_token_id), slice(0, len(scores) * n))
    stats = {"reward": all_scores.mean().item(), "pass_rate": (all_scores >= 1).float().mean().item(),
             "kept_frac": sum(len(s) for s in kept_scores) / len(all_scores),
             "response_len": torch.cat(lengths).mean().item(), "sampling_rounds": round_ + 1}
    return batch, scores, stats
