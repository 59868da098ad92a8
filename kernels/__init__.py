"""Fused kernels for the RL loss: Triton on CUDA, a plain PyTorch reference elsewhere.

At a 152k-entry vocabulary the logits [tokens, V] dominate memory and time. The Triton kernels read
them once per pass and never make an fp32 copy; `reference.py` states the same math in eager PyTorch.

Dispatch: Triton when the logits are on a GPU, or anywhere when TRITON_INTERPRET=1 (Triton's CPU
interpreter: how the tests run the kernels without a GPU); the reference otherwise. Triton is imported
only when chosen, so a CPU machine without it works.
"""

import os

import torch

from kernels.reference import policy_loss_ref, token_logprobs_ref

__all__ = ["backend", "fused_policy_loss", "token_logprobs"]


def backend(logits: torch.Tensor) -> str:
    """Which implementation the functions below run for these logits: "triton" or "reference"."""
    return "triton" if logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else "reference"


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[label] as float32, differentiable w.r.t. the logits.

    logits [..., V] (any float dtype; a slice like `logits[:, :-1]` is read in place), labels [...] in
    [0, V) → logp [...], always ≤ 0. With `return_entropy=True` returns (logp, entropy), the entropy of
    the temperature-scaled distribution from the same pass over the logits; it is detached.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if backend(logits) == "triton":
        from kernels.logprobs import token_logprobs_triton

        return token_logprobs_triton(logits, labels, temperature, return_entropy)
    return token_logprobs_ref(logits, labels, temperature, return_entropy)


def fused_policy_loss(
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
    """Clipped policy-gradient loss + kl_coef·KL straight from the logits → (loss, stats).

    logits [B, T, V]; labels, old_logp, ref_logp, mask [B, T]; adv [B] or [B, T]. The math is written
    out in `reference.policy_loss_ref`; the gradient flows to the logits only. stats: detached scalars
    "clipfrac", "kl", "entropy", "ratio_mean", "approx_kl" (masked means over the batch's tokens).
    """
    args = (logits, labels, old_logp, ref_logp, adv, mask, clip_low, clip_high, kl_kind, kl_coef, temperature, agg)
    if backend(logits) == "triton":
        from kernels.policy_loss import fused_policy_loss_triton

        return fused_policy_loss_triton(*args)
    return policy_loss_ref(*args)
