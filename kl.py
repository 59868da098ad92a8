"""KL(π ‖ π_ref) estimators from per-token log-probs of the sampled tokens (Schulman, "Approximating
KL").

With x ~ π and r = π_ref(x) / π(x), so log_r = ref_logp − logp (Schulman's notation):
    k1 = −log_r                        unbiased, but negative on some tokens and high variance
    k2 = ½ · log_r²                    biased, low variance, ≥ 0; its gradient is that of KL
                                       (ProRL v2)
    k3 = r − 1 − log_r                 unbiased and ≥ 0 (GRPO, ProRL)
"Unbiased" is about the value. As a loss term what matters is the gradient: k1's is ∇log π, whose
expectation under π is 0, so k1 regularises only when folded into the reward (--kl-in-reward); k2's
expected gradient is that of KL(π‖π_ref); k3's is that of the reverse KL(π_ref‖π), which also pulls
π towards π_ref.
"""

import torch

KINDS = ("k1", "k2", "k3")


def unknown_kind(kind: str) -> str:
    return f"unknown KL estimator '{kind}' ({', '.join(KINDS)})"


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL estimate, same shape as logp."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.exp(log_r) - log_r - 1
    raise ValueError(unknown_kind(kind))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3",
               clamp: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The per-token KL term of the loss; `clamp` bounds it (as verl does) so one wild token can't
    dominate.

    Outside `mask` (prompt, pads) it is exactly 0 and passes no gradient: both log-probs are set to
    0 first, so that exp of a huge log-ratio there cannot turn the zero gradient into
    0·inf = NaN."""
    if mask is not None:
        logp, ref_logp = (torch.where(mask.bool(), logp, 0.0),
                          torch.where(mask.bool(), ref_logp, 0.0))
    kl = kl_estimate(logp, ref_logp, kind)
    return kl.clamp(min=-clamp, max=clamp) if clamp else kl
