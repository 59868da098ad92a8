"""Triton: per-token log-probs (and entropy) reading the logits once, and their backward.

Math, for one row z = logits / T of length V (reference: `reference.token_logprobs_ref`):
    lse     = log Σ_v exp(z_v)              online over vocabulary blocks
                                            (Milakov & Gimelshein 2018)
    logp    = z_label − lse                 ≤ 0
    entropy = lse − Σ_v p_v z_v = log s − Σ_v e_v (z_v − m) / s
              with m = max z, e_v = exp(z_v − m), s = Σ_v e_v
    ∂logp/∂logits_v = (1[v = label] − p_v) / T,   p_v = exp(z_v − lse)
The online pass keeps, per row, the running max m, s = Σ exp(z − m) and t = Σ exp(z − m)(z − m);
when m grows by δ = m_old − m_new < 0 both rescale: s ← e^δ s, t ← e^δ (t + δ s). Tracking t around
m (not Σ p z) keeps the entropy accurate when the logits are ±1e4 (lse and Σ p z would cancel).

Memory: forward reads the logits once and writes 2-3 floats per row; backward reads them once and
writes the gradient in the logits' dtype directly (no fp32 copy of [tokens, V] anywhere). Rows are
addressed with two strides, so `logits[:, :-1]` is read in place; only a layout that is not
row-major in V is copied, and then that private copy becomes the gradient buffer (written in place,
saving a second [tokens, V] buffer).
"""

import contextlib

import torch
import triton
import triton.language as tl

FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)  # a Triton global must be a constexpr


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def row_logsumexp(row_ptr, V, inv_temperature, WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    """One read of a row of logits → (lse, entropy) of softmax(row · inv_temperature), in fp32."""
    m = tl.full([], -FLOAT32_MAX, tl.float32)  # finite start: −inf − (−inf) would be nan
    s = tl.full([], 0.0, tl.float32)
    t = tl.full([], 0.0, tl.float32)
    for start in tl.range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V,
                    other=-float("inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        delta = m - m_new  # ≤ 0
        alpha = tl.exp(delta)
        e = tl.exp(z - m_new)  # [BLOCK_V], 0 for padding and −inf logits
        if WITH_ENTROPY:
            t = alpha * (t + delta * s) + tl.sum(e * tl.where(e > 0, z - m_new, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    lse = m + tl.log(s)
    entropy = tl.full([], 0.0, tl.float32)
    if WITH_ENTROPY:
        entropy = tl.maximum(tl.log(s) - t / s, 0.0)  # H ≥ 0; the max only removes rounding
    return lse, entropy


@triton.jit
def row_offset(row, inner, stride_outer, stride_inner):
    """Element offset of row `row` of a [outer, inner, V] view (int64: 16k rows × 152k overflows
    int32)."""
    return (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, inner, stride_outer, stride_inner,  # logits [outer, inner, V], last dim contiguous
    labels_ptr, logp_ptr, lse_ptr, entropy_ptr,  # [N] each
    V, inv_temperature,
    WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
    lse, entropy = row_logsumexp(row_ptr, V, inv_temperature, WITH_ENTROPY, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)
    z_label = tl.load(row_ptr + label).to(tl.float32) * inv_temperature
    # z_label ≤ m ≤ lse exactly, but lse's log() is approximate on GPUs: keep log-probs ≤ 0 (verl
    # once shipped a fused kernel returning positive ones, which turns ratios and KL silently
    # wrong).
    tl.store(logp_ptr + row, tl.minimum(z_label - lse, 0.0))
    tl.store(lse_ptr + row, lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy)


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, inner, stride_outer, stride_inner,  # logits [outer, inner, V], last dim contiguous
    labels_ptr, lse_ptr, row_grad_ptr,  # [N]: label, saved lse, dloss/dlogp of the row
    # [N, V] contiguous, logits' dtype; may alias the logits (each block is read, then written)
    grad_ptr,
    V, inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    grad_row_ptr = grad_ptr + row * V
    # d loss/d logits_v = coef · (1[v = label] − p_v)
    coef = tl.load(row_grad_ptr + row) * inv_temperature
    if coef == 0.0:  # a zero gradient (masked token; clipped one with β = 0): don't read its logits
        zeros = tl.full([BLOCK_V], 0.0, tl.float32).to(grad_ptr.dtype.element_ty)
        for start in tl.range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(grad_row_ptr + cols, zeros, mask=cols < V)
    else:
        row_ptr = logits_ptr + row_offset(row, inner, stride_outer, stride_inner)
        lse = tl.load(lse_ptr + row)
        label = tl.load(labels_ptr + row).to(tl.int64)
        for start in tl.range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(row_ptr + cols, mask=cols < V,
                        other=-float("inf")).to(tl.float32) * inv_temperature
            probs = tl.exp(z - lse)
            grad = coef * (tl.where(cols == label, 1.0, 0.0) - probs)
            tl.store(grad_row_ptr + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)


# ----------------------------------------------------------------------------- launch helpers


def launch_config(vocab_size: int) -> dict[str, int]:
    """Block and warps for one program per row. 8192 bf16 = 16 KB in flight per program, enough to
    keep HBM busy with a few programs per SM. Untuned on hardware (no GPU was lent when this was
    written)."""
    block = min(8192, triton.next_power_of_2(vocab_size))
    return {"BLOCK_V": block, "num_warps": 16 if block >= 8192 else 8 if block >= 2048 else 4}


def as_rows(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int, bool]:
    """Address logits [..., V] as N rows without copying when possible.

    Returns (tensor, inner, stride_outer, stride_inner, copied): row r starts at element
    (r // inner)·stride_outer + (r % inner)·stride_inner of `tensor`. `logits[:, :-1]` of a
    [B, T, V] tensor fits as is; a layout whose last dim is not contiguous is copied (copied=True).
    """
    vocab_size = logits.shape[-1]
    if logits.stride(-1) == 1:
        try:
            rows = logits.view(-1, vocab_size)  # [N, V]
            return rows, max(rows.shape[0], 1), 0, rows.stride(0), False
        except RuntimeError:  # leading dims not collapsible, e.g. logits[:, :-1]
            pass
        if logits.dim() >= 3:
            try:
                rows = logits.view(-1, logits.shape[-2], vocab_size)  # [outer, inner, V]
                return rows, rows.shape[1], rows.stride(0), rows.stride(1), False
            except RuntimeError:
                pass
    rows = logits.contiguous().view(-1, vocab_size)
    return rows, max(rows.shape[0], 1), 0, vocab_size, True


def device_guard(tensor: torch.Tensor):
    """Launch on the tensor's GPU (the interpreter runs on CPU tensors)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def grad_buffer(rows: torch.Tensor, copied: bool) -> torch.Tensor:
    """Where the backward writes d loss/d logits [N, V]: a fresh buffer in the logits' dtype, or,
    when forward had to copy the logits, that copy itself. The copy is ours alone, so overwriting it
    is safe; its version is bumped so a second backward through the same graph fails loudly instead
    of reading gradients as logits."""
    if copied:
        torch.autograd.graph.increment_version(rows)
        return rows
    return torch.empty(rows.shape[:-1].numel(), rows.shape[-1], dtype=rows.dtype,
                       device=rows.device)


def logits_backward(
    rows: torch.Tensor, layout: tuple[int, int, int], labels: torch.Tensor, lse: torch.Tensor,
    row_grad: torch.Tensor, grad: torch.Tensor, inv_temperature: float,
) -> torch.Tensor:
    """grad [N, V] = row_grad[:, None] · (onehot(label) − softmax(z)) / T, in the logits' dtype."""
    num_rows, vocab_size = grad.shape
    if num_rows == 0:
        return grad
    inner, stride_outer, stride_inner = layout
    with device_guard(rows):
        _token_logprobs_bwd_kernel[(num_rows,)](
            rows, inner, stride_outer, stride_inner, labels, lse, row_grad.float().contiguous(),
            grad, vocab_size, inv_temperature, **launch_config(vocab_size),
        )
    return grad


# ----------------------------------------------------------------------------- autograd


class TokenLogprobs(torch.autograd.Function):
    """logp [...] (differentiable) and entropy [...] (not) from logits [..., V]."""

    @staticmethod
    def forward(ctx, logits, labels, temperature, return_entropy):
        vocab_size, lead_shape = logits.shape[-1], logits.shape[:-1]
        rows, inner, stride_outer, stride_inner, copied = as_rows(logits)
        labels = labels.reshape(-1).contiguous()  # [N]
        num_rows = labels.numel()
        logp = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(logp)
        # unused pointer when not asked for
        entropy = torch.empty_like(logp) if return_entropy else lse
        if num_rows > 0:
            with device_guard(logits):
                _token_logprobs_fwd_kernel[(num_rows,)](
                    rows, inner, stride_outer, stride_inner, labels, logp, lse, entropy,
                    vocab_size, 1.0 / temperature, WITH_ENTROPY=return_entropy,
                    **launch_config(vocab_size),
                )
        ctx.save_for_backward(rows, labels, lse)
        ctx.layout, ctx.copied, ctx.inv_temperature = ((inner, stride_outer, stride_inner), copied,
                                                       1.0 / temperature)
        ctx.logits_shape = logits.shape
        entropy = entropy.view(lead_shape) if return_entropy else None
        if return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp.view(lead_shape), entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        rows, labels, lse = ctx.saved_tensors
        grad = grad_buffer(rows, ctx.copied)
        logits_backward(rows, ctx.layout, labels, lse, grad_logp.reshape(-1), grad,
                        ctx.inv_temperature)
        return grad.view(ctx.logits_shape), None, None, None


def token_logprobs_triton(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
    return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton `token_logprobs`; see `prorl_kernels.token_logprobs`."""
    logp, entropy = TokenLogprobs.apply(logits, labels, float(temperature), return_entropy)
    return (logp, entropy) if return_entropy else logp
