"""Token log-probs (and entropy) straight from the last hidden state, chunk by chunk: the
full-vocabulary logits never exist whole.

Math, for the hidden states h [N, H] of the positions the loss reads and the head W [V, H]:
    z      = h W^T / T                      [chunk, V], one chunk of positions at a time
    logp   = z_label − logsumexp(z)         fp32, whatever the matmul's dtype
    H      = logsumexp(z) − Σ_v p_v z_v     the entropy, logged only (no gradient)
Backward (recomputes z per chunk instead of keeping it, as Liger's FusedLinearCrossEntropy does):
    g_z    = dL/dlogp · (onehot(label) − softmax(z)) / T     [chunk, V]
    dL/dh  = g_z W,   dL/dW += g_z^T h
Memory: one chunk of logits (and its gradient) at a time, chunk × V, instead of N × V twice in
fp32; at Qwen's V = 151936, 16k positions of fp32 logits are 10 GB, a 1024-position chunk 0.6 GB.

The per-chunk log-softmax and its backward are `reference.token_logprobs_ref` in PyTorch, or the
Triton kernels of `logprobs.py` (on CUDA, or under TRITON_INTERPRET=1); the matmuls are PyTorch's.
"""

import torch

from prorl_kernels.reference import token_logprobs_ref

try:  # no Triton (macOS, Windows): the reference runs
    from prorl_kernels import logprobs as triton_logprobs
except ImportError:
    triton_logprobs = None

CHUNK_TOKENS = (
    1024  # positions per chunk: big enough for an efficient matmul, small enough for memory
)


def chunk_forward(logits: torch.Tensor, labels: torch.Tensor, temperature: float, use_triton: bool):
    """(logp, lse, entropy), each [chunk] fp32, of one chunk of logits [chunk, V]."""
    if use_triton:
        rows = len(labels)
        logp, lse, entropy = (torch.empty(rows, device=logits.device) for _ in range(3))
        with triton_logprobs.device_guard(logits):
            triton_logprobs._token_logprobs_fwd_kernel[(rows,)](
                logits,
                rows,
                0,
                logits.shape[1],
                labels,
                logp,
                lse,
                entropy,
                logits.shape[1],
                1.0 / temperature,
                WITH_ENTROPY=True,
                **triton_logprobs.launch_config(logits.shape[1]),
            )
        return logp, lse, entropy
    logp, entropy = token_logprobs_ref(logits, labels, temperature, return_entropy=True)
    lse = torch.logsumexp(logits.to(logp.dtype) / temperature, dim=-1)
    return logp, lse, entropy


def chunk_logits_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_logp: torch.Tensor,
    temperature: float,
    use_triton: bool,
) -> torch.Tensor:
    """dL/dlogits [chunk, V] in the logits' dtype: g · (onehot(label) − softmax(logits / T)) / T.
    Written over the recomputed logits, which are not needed after this."""
    if use_triton:
        layout = (len(labels), 0, logits.shape[1])
        return triton_logprobs.logits_backward(
            logits, layout, labels, lse, grad_logp, logits, 1.0 / temperature
        )
    probs = torch.exp(logits.to(lse.dtype) / temperature - lse[:, None])  # [chunk, V] fp32
    grad = probs.mul_(-grad_logp[:, None] / temperature)
    grad[torch.arange(len(labels), device=labels.device), labels] += grad_logp / temperature
    return logits.copy_(grad)


def chunks(length: int, chunk: int) -> list[slice]:
    """Consecutive slices of at most `chunk` positions covering range(length)."""
    return [slice(start, min(start + chunk, length)) for start in range(0, length, chunk)]


class LinearLogprobs(torch.autograd.Function):
    """logp [N] (differentiable w.r.t. hidden and weight), entropy [N] (not) from hidden [N, H]."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, compute_dtype, chunk, use_triton):
        head = weight.to(compute_dtype)  # one cast per pass (fp32 master weights → bf16 compute)
        out_dtype = torch.promote_types(
            compute_dtype, torch.float32
        )  # fp64 for gradcheck, else fp32
        logp, lse, entropy = (hidden.new_empty(len(labels), dtype=out_dtype) for _ in range(3))
        for part in chunks(len(labels), chunk):
            logits = hidden[part].to(compute_dtype) @ head.T  # [chunk, V]: the only logits alive
            logp[part], lse[part], entropy[part] = chunk_forward(
                logits, labels[part], temperature, use_triton
            )
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.settings = (temperature, compute_dtype, chunk, use_triton)
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, labels, lse = ctx.saved_tensors
        temperature, compute_dtype, chunk, use_triton = ctx.settings
        head = weight.to(compute_dtype)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        for part in chunks(len(labels), chunk):
            if not grad_logp[
                part
            ].any():  # masked or clipped positions (β = 0): nothing to recompute
                continue
            hidden_part = hidden[part].to(compute_dtype)
            logits = hidden_part @ head.T  # recomputed, not kept from forward
            grad_logits = chunk_logits_grad(
                logits,
                labels[part],
                lse[part],
                grad_logp[part].to(lse.dtype).contiguous(),
                temperature,
                use_triton,
            )
            if grad_hidden is not None:
                grad_hidden[part] = (grad_logits @ head).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.T @ hidden_part  # summed over chunks in fp32
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    compute_dtype: torch.dtype,
    use_triton: bool,
    chunk: int = CHUNK_TOKENS,
):
    """(logp [N], entropy [N]) of labels [N] under softmax(hidden [N, H] @ weight [V, H]^T / T);
    see the module docstring. Matmuls run in `compute_dtype` (autocast off), the softmax in fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        return LinearLogprobs.apply(
            hidden,
            weight,
            labels.contiguous(),
            float(temperature),
            compute_dtype,
            chunk,
            use_triton,
        )
