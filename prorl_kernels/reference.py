"""Plain PyTorch references: what the Triton kernels are tested against, and what CPU training runs.

They are eager and readable, and pay for it in memory: `log_softmax(logits.float())` makes an
fp32 copy of the [tokens, V] logits (V = 151936 for Qwen: 16k tokens → 10 GB) and reads it
several times. The kernels in `logprobs.py` and `policy_loss.py` compute the same numbers reading
the logits once per pass.
"""

import torch

import grpo


def token_logprobs_ref(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(label) under softmax(logits / temperature), in float32 (float64 for float64 logits).

    logits [..., V], labels [...] → logp [...]. With `return_entropy`, also the entropy of the same
    distribution, H = −Σ_v p_v log p_v, [...], detached (it is logged, never optimised).
    """
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    # [..., V], the fp32 copy
    logp_all = torch.log_softmax(logits.to(compute_dtype) / temperature, dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # [...]
    if not return_entropy:
        return logp
    with torch.no_grad():
        probs = logp_all.exp()
        # p·log p → 0 as p → 0; where() keeps a −inf logit (p = 0) from making 0·(−inf) = nan.
        entropy = -torch.where(probs > 0, probs * logp_all, 0.0).sum(-1)  # [...]
    return logp, entropy


def policy_loss_ref(
    logits: torch.Tensor, labels: torch.Tensor, terms: grpo.LossTerms,
    spec: grpo.LossSpec = grpo.DEFAULT_SPEC
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_t w_t · (pg_loss_t + β·kl_t) from the logits: log-probs, then grpo.token_loss (the clipped
    surrogate and the KL, written once there). What `fused_policy_loss` fuses.

    logits [B, T, V]; labels [B, T]; terms: old and reference log-probs, advantages, mask and
    weights (grpo.LossTerms). Gradient flows to the logits only.
    """
    # [B, T]
    logp, entropy = token_logprobs_ref(logits, labels, spec.temperature, return_entropy=True)
    loss, stats = grpo.token_loss(logp, terms, spec)
    stats["entropy"] = grpo.masked_mean(entropy, terms.mask)
    return loss, stats


def linear_token_logprobs_ref(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unchunked computation `linear_token_logprobs` splits: all logits [N, V] at once, then
    `token_logprobs_ref` → (logp [N], entropy [N])."""
    return token_logprobs_ref(hidden @ weight.T, labels, temperature, return_entropy=True)
