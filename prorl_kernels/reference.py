"""Plain PyTorch references: what the Triton kernels are tested against, and what CPU training runs.

They are eager and readable, and pay for it in memory: `log_softmax(logits.float())` makes an fp32 copy of
the [tokens, V] logits (V = 151936 for Qwen: 16k tokens → 10 GB) and reads it several times. The kernels in
`logprobs.py` and `policy_loss.py` compute the same numbers reading the logits once per pass.
"""

import torch

import grpo

KL_KINDS = ("k1", "k2", "k3")


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


def check_policy_loss_args(kl_kind: str, temperature: float) -> None:
    """One clear sentence for the mistakes a config can make."""
    if kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind must be one of {KL_KINDS}, got {kl_kind!r}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")


def policy_loss_ref(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    adv: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    kl_kind: str = "k3",
    kl_coef: float = 0.0,
    kl_clamp: float | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_t w_t · (pg_loss_t + β·kl_t) from the logits: log-probs, then grpo.token_loss (the clipped surrogate
    and the KL, written once there), weighed by grpo.loss_weights. What `fused_policy_loss` fuses.

    logits [B, T, V]; labels, mask, weights [B, T]; old_logp, ref_logp [B, T] or None (None: on-policy,
    old_logp = logp; no reference model); adv [B] or [B, T]. Gradient flows to the logits only.
    """
    check_policy_loss_args(kl_kind, temperature)
    logp, entropy = token_logprobs_ref(logits, labels, temperature, return_entropy=True)  # [B, T]
    old_logp = logp.detach() if old_logp is None else old_logp
    per_token, stats = grpo.token_loss(logp, old_logp, ref_logp, adv, mask, clip_low, clip_high, kl_coef, kl_kind,
                                       kl_clamp)
    stats["entropy"] = grpo.masked_mean(entropy, mask)
    return (per_token * weights).sum(), stats


def linear_token_logprobs_ref(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unchunked computation `linear_token_logprobs` splits: all logits [N, V] at once, then
    `token_logprobs_ref` → (logp [N], entropy [N])."""
    return token_logprobs_ref(hidden @ weight.T, labels, temperature, return_entropy=True)
