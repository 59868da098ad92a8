"""Fused kernels for the RL loss: Triton on CUDA, a plain PyTorch reference elsewhere.

At a 152k-entry vocabulary the logits [tokens, V] dominate memory and time. The Triton kernels
read them once per pass and never make an fp32 copy; `reference.py` states the same math in eager
PyTorch.

Dispatch: Triton when the logits are on a GPU, or anywhere when TRITON_INTERPRET=1 (Triton's CPU
interpreter: how the tests run the kernels without a GPU); the reference otherwise. A machine
without Triton runs the references.
"""

import os

import torch

import grpo
from prorl_kernels import linear_logprobs
from prorl_kernels.reference import policy_loss_ref, token_logprobs_ref

try:  # Triton ships with CUDA PyTorch on Linux; elsewhere (macOS, Windows) the references run
    from prorl_kernels import logprobs, policy_loss
except ImportError:
    logprobs = policy_loss = None

__all__ = ["backend", "fused_policy_loss", "linear_token_logprobs", "token_logprobs"]


def backend(logits: torch.Tensor) -> str:
    """Which implementation the functions below run for these logits (or hidden states): "triton" or
    "reference"."""
    if logprobs is None:
        return "reference"
    return "triton" if logits.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" else "reference"


def token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log softmax(logits / temperature)[label] as float32, differentiable w.r.t. the logits.

    logits [..., V] (any float dtype; a slice like `logits[:, :-1]` is read in place), labels
    [...] in [0, V) → logp [...], always ≤ 0. With `return_entropy=True` returns (logp, entropy),
    the entropy of the temperature-scaled distribution from the same pass over the logits; it is
    detached.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if backend(logits) == "triton":
        return logprobs.token_logprobs_triton(logits, labels, temperature, return_entropy)
    return token_logprobs_ref(logits, labels, temperature, return_entropy)


def fused_policy_loss(
    logits: torch.Tensor, labels: torch.Tensor, terms: grpo.LossTerms,
    spec: grpo.LossSpec = grpo.DEFAULT_SPEC
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Σ_t w_t · (clipped surrogate + β·KL)_t straight from the logits → (loss, stats).

    logits [B, T, V]; labels [B, T]; terms (grpo.LossTerms): old_logp [B, T] or None (on-policy:
    ρ = 1 with logp's gradient), ref_logp [B, T] or None (no reference model), adv [B] or [B, T],
    mask and weights (grpo.loss_weights) [B, T]. The math is `reference.policy_loss_ref`; the
    gradient flows to the logits only. stats: detached scalars "clipfrac", "approx_kl",
    "ratio_mean", "entropy" and, with a reference, "kl" (means over the masked tokens). A clamped
    KL (--kl-clamp) runs the reference: the kernel has no clamp. (Training reads log-probs from
    the hidden state instead: linear_token_logprobs below.)
    """
    if backend(logits) == "triton" and not spec.kl_clamp:
        return policy_loss.fused_policy_loss_triton(logits, labels, terms, spec)
    return policy_loss_ref(logits, labels, terms, spec)


def linear_token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    compute_dtype: torch.dtype | None = None, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy) of labels under softmax(hidden @ weight^T / temperature), chunk by chunk.

    hidden [N, H] (the last hidden state at the positions the loss reads), weight [V, H] (the LM
    head), labels [N] → logp [N] fp32, differentiable w.r.t. hidden and weight (backward recomputes
    each chunk's logits), and entropy [N] fp32, detached. The matmuls run in `compute_dtype`
    (default: hidden's), the log-softmax in fp32; at most `chunk` × V logits exist at a time
    (default: linear_logprobs.CHUNK_TOKENS).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    use_triton = backend(hidden) == "triton"
    return linear_logprobs.linear_token_logprobs(hidden, weight, labels, temperature,
                                                 compute_dtype or hidden.dtype, use_triton,
                                                 chunk or linear_logprobs.CHUNK_TOKENS)
