"""Triton: the clipped policy loss + KL, fused with the log-prob pass over the logits.

Per token, from one read of its row of logits (reference: `reference.policy_loss_ref`):
    logp = log softmax(logits / T)[label]                            (logprobs.row_logsumexp)
    ρ = exp(logp − old_logp)
    pg_loss1 = −A·ρ,  pg_loss2 = −A·clip(ρ, 1 − ε_low, 1 + ε_high)    (PPO; DAPO's decoupled ε)
    pg = max(pg_loss1, pg_loss2),  clipped = pg_loss2 > pg_loss1
    kl = k1 | k2 | k3 (logp, ref_logp)                               (Schulman 2020; ProRL uses k3)
    loss_t = pg + β·kl
    dloss_t/dlogp = (clipped ? 0 : −A·ρ) + β·dkl/dlogp
                    dk1 = 1,  dk2 = logp − ref,  dk3 = 1 − exp(ref − logp)
The aggregation is linear, loss = Σ_t w_t·loss_t (w: `grpo.loss_weights`), so the backward is
    d loss/d logits_v = w_t · dloss_t/dlogp · (1[v = label] − p_v) / T
one more read of the logits and one write of the gradient (`logprobs.logits_backward`). Masked
tokens are never read; in the backward, neither is any row whose gradient is zero (clipped, with
β = 0).
"""

import torch
import triton
import triton.language as tl

import grpo
from prorl_kernels.logprobs import (
    as_rows,
    device_guard,
    grad_buffer,
    launch_config,
    logits_backward,
    row_logsumexp,
    row_offset,
)

KL_KIND_IDS = {"k1": 1, "k2": 2, "k3": 3}  # the kernel's constexpr for each of kl.KINDS


@triton.jit
def _policy_loss_fwd_kernel(
    logits_ptr, inner, stride_outer, stride_inner,  # logits [outer, inner, V], last dim contiguous
    labels_ptr, old_logp_ptr, ref_logp_ptr, adv_ptr, mask_ptr,  # [N] inputs
    logp_ptr, lse_ptr, entropy_ptr, loss_ptr, kl_ptr, clipped_ptr, dloss_dlogp_ptr,  # [N] fp32 out
    V, inv_temperature, ratio_low, ratio_high, kl_coef,
    KL_KIND: tl.constexpr, USE_KL: tl.constexpr, ON_POLICY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logp = tl.full([], 0.0, tl.float32)
    lse = tl.full([], 0.0, tl.float32)
    entropy = tl.full([], 0.0, tl.float32)
    loss = tl.full([], 0.0, tl.float32)
    kl = tl.full([], 0.0, tl.float32)
    clipped = tl.full([], 0.0, tl.float32)
    dloss_dlogp = tl.full([], 0.0, tl.float32)
    if tl.load(mask_ptr + row) != 0:  # padding tokens are not read: every output stays 0
        row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
        lse, entropy = row_logsumexp(row_ptr, V, inv_temperature, True, BLOCK_V)
        label = tl.load(labels_ptr + row).to(tl.int64)
        z_label = tl.load(row_ptr + label).to(tl.float32) * inv_temperature
        logp = tl.minimum(z_label - lse, 0.0)  # see logprobs._token_logprobs_fwd_kernel
        # on-policy (one update per batch):
        # old_logp is logp itself, so ρ = 1 with the gradient of logp
        old_logp = logp if ON_POLICY else tl.load(old_logp_ptr + row)
        ref_logp = tl.load(ref_logp_ptr + row)
        adv = tl.load(adv_ptr + row)

        ratio = tl.exp(logp - old_logp)
        pg_loss1 = -adv * ratio
        pg_loss2 = -adv * tl.minimum(tl.maximum(ratio, ratio_low), ratio_high)
        is_clipped = pg_loss2 > pg_loss1
        loss = tl.maximum(pg_loss1, pg_loss2)
        # dρ/dlogp = ρ; a clipped ratio is constant
        dloss_dlogp = tl.where(is_clipped, 0.0, -adv * ratio)
        clipped = is_clipped.to(tl.float32)

        # kl.py's notation: r = π_ref / π, so d log_r / d logp = −1
        log_r = ref_logp - logp
        if KL_KIND == 1:
            kl = -log_r
            dkl_dlogp = tl.full([], 1.0, tl.float32)
        elif KL_KIND == 2:
            kl = 0.5 * log_r * log_r
            dkl_dlogp = -log_r
        else:
            kl = tl.exp(log_r) - log_r - 1.0
            dkl_dlogp = 1.0 - tl.exp(log_r)
        if USE_KL:  # β = 0: kl is only logged (an overflowing k3 must not turn the loss into 0·inf)
            loss += kl_coef * kl
            dloss_dlogp += kl_coef * dkl_dlogp
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    tl.store(entropy_ptr + row, entropy)
    tl.store(loss_ptr + row, loss)
    tl.store(kl_ptr + row, kl)
    tl.store(clipped_ptr + row, clipped)
    tl.store(dloss_dlogp_ptr + row, dloss_dlogp)


class FusedPolicyLoss(torch.autograd.Function):
    """Scalar loss (differentiable w.r.t. the logits only) and per-token logp, entropy, kl, clipped
    [N]."""

    @staticmethod
    def forward(ctx, logits, labels, old_logp, ref_logp, adv, mask, weight, ratio_low, ratio_high,
                kl_kind, kl_coef, inv_temperature, on_policy):
        vocab_size = logits.shape[-1]
        rows, inner, stride_outer, stride_inner, copied = as_rows(logits)
        num_rows = labels.numel()
        logp, lse, entropy, loss_t, kl, clipped, dloss_dlogp = (
            torch.empty(num_rows, dtype=torch.float32, device=logits.device) for _ in range(7)
        )
        if num_rows > 0:
            with device_guard(logits):
                _policy_loss_fwd_kernel[(num_rows,)](
                    rows, inner, stride_outer, stride_inner,
                    labels, old_logp, ref_logp, adv, mask,
                    logp, lse, entropy, loss_t, kl, clipped, dloss_dlogp,
                    vocab_size, inv_temperature, ratio_low, ratio_high, kl_coef,
                    KL_KIND=KL_KIND_IDS[kl_kind], USE_KL=kl_coef != 0, ON_POLICY=on_policy,
                    **launch_config(vocab_size),
                )
        loss = (weight * loss_t).sum()
        ctx.save_for_backward(rows, labels, lse, weight * dloss_dlogp)
        ctx.layout, ctx.copied, ctx.inv_temperature = ((inner, stride_outer, stride_inner), copied,
                                                       inv_temperature)
        ctx.logits_shape = logits.shape
        ctx.mark_non_differentiable(logp, entropy, kl, clipped)
        return loss, logp, entropy, kl, clipped

    @staticmethod
    def backward(ctx, grad_loss, *_):
        rows, labels, lse, dloss_dlogp = ctx.saved_tensors
        grad = grad_buffer(rows, ctx.copied)
        logits_backward(rows, ctx.layout, labels, lse, dloss_dlogp * grad_loss, grad,
                        ctx.inv_temperature)
        return (grad.view(ctx.logits_shape),) + (None,) * 12


def fused_policy_loss_triton(
    logits: torch.Tensor, labels: torch.Tensor, terms: grpo.LossTerms,
    spec: grpo.LossSpec = grpo.DEFAULT_SPEC
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Triton `fused_policy_loss`; see `prorl_kernels.fused_policy_loss`."""
    old_logp, ref_logp, adv, mask = terms.old_logp, terms.ref_logp, terms.adv, terms.mask
    batch, seq_len = mask.shape
    adv = adv.unsqueeze(-1).expand(batch, seq_len) if adv.dim() == 1 else adv  # [B, T]
    zeros = torch.zeros(batch, seq_len, device=mask.device)
    on_policy, use_kl = old_logp is None, ref_logp is not None

    def flat(x: torch.Tensor) -> torch.Tensor:  # [B, T] → [N] fp32 for the kernel
        return x.reshape(-1).float().contiguous()

    loss, logp, entropy, kl, clipped = FusedPolicyLoss.apply(
        logits, labels.reshape(-1).contiguous(), flat(zeros if on_policy else old_logp),
        flat(ref_logp if use_kl else zeros), flat(adv), flat(mask), flat(terms.weights),
        1 - spec.clip_low, 1 + spec.clip_high, spec.kl_kind,
        float(spec.kl_coef) if use_kl else 0.0, 1.0 / spec.temperature, on_policy,
    )
    logp, kl, clipped, entropy = (x.view(batch, seq_len) for x in (logp, kl, clipped, entropy))
    old_logp = logp if on_policy else old_logp
    ratio = torch.exp(torch.where(mask.bool(), logp - old_logp.float(), 0.0))
    stats = grpo.surrogate_stats(logp, old_logp, ratio, clipped.bool(), mask)
    stats["entropy"] = grpo.masked_mean(entropy, mask)
    if use_kl:
        stats["kl"] = grpo.masked_mean(kl, mask)
    return loss, stats
