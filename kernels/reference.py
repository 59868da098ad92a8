"""Plain PyTorch references: what the Triton kernels are tested against, and what CPU training runs.

They are eager and readable, and pay for it in memory: `log_softmax(logits.float())` makes an fp32 copy of
the [tokens, V] logits (V = 151936 for Qwen: 16k tokens → 10 GB) and reads it several times. The kernels in
`logprobs.py` and `policy_loss.py` compute the same numbers reading the logits once per pass.
"""

import torch

from grpo import aggregate, masked_mean  # the same reductions the unfused loss uses (NaN-safe at pads)
from kl import kl_estimate as kl_estimate_ref  # the same k1/k2/k3 the unfused loss uses

KL_KINDS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


def token_logprobs_ref(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(label) under softmax(logits / temperature), in float32 (float64 for float64 logits).

    logits [..., V], labels [...] → logp [...]. With `return_entropy`, also the entropy of the same
    distribution, H = −Σ_v p_v log p_v, [...], detached (it is logged, never optimised).
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    logp_all = torch.log_softmax(logits.to(compute_dtype) / temperature, dim=-1)  # [..., V], the fp32 copy
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [...]
    if not return_entropy:
        return logp
    with torch.no_grad():
        probs = logp_all.exp()
        # p·log p → 0 as p → 0; where() keeps a −inf logit (p = 0) from making 0·(−inf) = nan.
        entropy = -torch.where(probs > 0, probs * logp_all, 0.0).sum(-1)  # [...]
    return logp, entropy


def aggregation_weights(mask: torch.Tensor, agg: str) -> torch.Tensor:
    """Weights w [B, T] with aggregate(x, mask, agg) = Σ w·x. The loss is linear in the per-token
    losses, so the fused kernel only needs these to turn dloss_t/dlogp into dloss/dlogp."""
    mask = mask.float()
    if agg == "token-mean":
        return mask / mask.sum().clamp(min=1)
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}.")
    seq_tokens = mask.sum(-1, keepdim=True)  # [B, 1]
    num_seqs = (seq_tokens > 0).float().sum().clamp(min=1)
    if agg == "seq-mean-token-mean":
        return mask / seq_tokens.clamp(min=1) / num_seqs
    return mask / num_seqs  # seq-mean-token-sum


def policy_stats(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    kl: torch.Tensor,
    clipped: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """What train.py logs, as masked means over the batch's tokens (CleanRL's names), all detached."""
    logp, old_logp = logp.detach().float(), old_logp.float()
    return {
        "clipfrac": masked_mean(clipped.float(), mask),
        "kl": masked_mean(kl.detach().float(), mask),
        "entropy": masked_mean(entropy.float(), mask),
        "ratio_mean": masked_mean(torch.exp(logp - old_logp), mask),
        "approx_kl": masked_mean(0.5 * (logp - old_logp) ** 2, mask),
    }


def check_policy_loss_args(kl_kind: str, agg: str, temperature: float) -> None:
    """One clear sentence for the mistakes a config can make."""
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}, got {kl_kind!r}.")
    if agg not in AGGREGATIONS:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def policy_loss_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    kl_kind: str = "k3",
    kl_coef: float = 0.0,
    temperature: float = 1.0,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy-gradient loss + β·KL from the logits; the math `fused_policy_loss` fuses.

    logits [B, T, V]; labels, old_logp, ref_logp, mask [B, T]; adv [B] or [B, T]. Per token
    (PPO, Schulman 2017, with DAPO's decoupled clip ε_low, ε_high; ProRL adds the KL term):
        ρ = exp(logp − old_logp)
        pg_loss1 = −A·ρ,  pg_loss2 = −A·clip(ρ, 1 − ε_low, 1 + ε_high),  pg = max(pg_loss1, pg_loss2)
        loss_t = pg + β·kl(logp, ref_logp)
    reduced by `aggregate`. Gradient flows to the logits only.
    """
    check_policy_loss_args(kl_kind, agg, temperature)
    mask = mask.bool()
    logp, entropy = token_logprobs_ref(logits, labels, temperature, return_entropy=True)  # [B, T]
    dtype = logp.dtype
    # Padding tokens may hold anything (a pad label with logp −1e4, old_logp 0): zero them before the
    # math so no exp() overflows there, since inf · (zero gradient) would still be nan in the backward.
    logp = torch.where(mask, logp, 0.0)
    old_logp = torch.where(mask, old_logp.to(dtype), 0.0)
    ref_logp = torch.where(mask, ref_logp.to(dtype), 0.0)
    adv = adv.to(dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 else adv  # [B, 1] or [B, T]

    ratio = torch.exp(logp - old_logp)  # [B, T]
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg_loss = torch.maximum(pg_loss1, pg_loss2)
    kl = kl_estimate_ref(logp, ref_logp, kl_kind)
    # β = 0 leaves kl out of the loss entirely (an overflowing k3 would otherwise give 0·inf = nan).
    per_token_loss = pg_loss + kl_coef * kl if kl_coef != 0 else pg_loss

    loss = aggregate(per_token_loss, mask, agg)
    clipped = pg_loss2 > pg_loss1  # the clipped branch is the max: no gradient from this token
    stats = policy_stats(logp, old_logp, kl, clipped, entropy, mask)
    return loss, stats
