"""The Triton kernels against their PyTorch references, run by Triton's CPU interpreter
(TRITON_INTERPRET=1).

Every test but the CPU-dispatch one runs the Triton code (asserted through `prorl_kernels.backend`);
the references themselves are checked by hand values and by fp64 gradcheck.
"""

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import grpo
import prorl_kernels
from kl import kl_estimate as kl_estimate_ref
from prorl_kernels.reference import linear_token_logprobs_ref, policy_loss_ref, token_logprobs_ref

REPO = Path(__file__).resolve().parents[1]
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
# (vocab size, rows): the big vocabularies on a few rows keep the interpreter fast. 50257 and 151936
# are not multiples of the 8192-wide block, 17 is smaller than one.
VOCAB_ROWS = [(17, 48), (32000, 4), (50257, 3), (151936, 2)]


def interpreter_usable() -> bool:
    """Triton's interpreter needs TRITON_INTERPRET=1 set before `triton.language` is first imported:
    its standard library (tl.max, tl.sum, ...) is decorated at import time."""
    language = sys.modules.get("triton.language")
    return language is None or type(language.standard.max).__name__ == "InterpretedFunction"


@pytest.fixture
def triton_interpreter(monkeypatch):
    """Run the kernels with Triton's CPU interpreter. If this process imported triton.language
    before the variable was set (conftest's transformers import does), skip:
    `test_triton_tests_in_a_fresh_process` runs these tests again in a process that sets it
    first."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not interpreter_usable():
        pytest.skip("triton.language was imported without TRITON_INTERPRET=1 (run in a fresh "
                    "process instead)")
    import prorl_kernels.logprobs
    import prorl_kernels.policy_loss

    if type(prorl_kernels.logprobs._token_logprobs_fwd_kernel).__name__ != "InterpretedFunction":
        # imported earlier without the interpreter: decorate again
        importlib.reload(prorl_kernels.logprobs)
        importlib.reload(prorl_kernels.policy_loss)


@pytest.fixture(params=[True, False], ids=["triton", "reference"])
def use_triton(request, monkeypatch):
    """Run a test on both backends: Triton (interpreted) and the CPU reference."""
    if request.param:
        request.getfixturevalue("triton_interpreter")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """A gradient in the logits' dtype against the fp64 reference: fp32 to fp32 rounding; bf16 to
    the last of its 8 significant bits (2^-7 relative: Triton's interpreter truncates fp32 → bf16
    where a GPU rounds to nearest, 2^-8)."""
    tolerance = {torch.float32: (1e-5, 1e-7), torch.bfloat16: (2**-7, 1e-7)}[actual.dtype]
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance[0], atol=tolerance[1])


def logprobs_and_grad(fn, logits, labels, temperature, grad_out, dtype=None):
    """(logp, entropy, d(Σ grad_out·logp)/d logits) from `fn` on a fresh leaf copy of `logits`, in
    `dtype`. The reference runs in fp64 on the same values: the kernel's blockwise sums are more
    accurate than an fp32 log_softmax over 152k entries, so fp64 is the fair yardstick."""
    logits = logits.detach().to(dtype or logits.dtype).requires_grad_()
    logp, entropy = fn(logits, labels, temperature, return_entropy=True)
    (logp * grad_out.to(logp.dtype)).sum().backward()
    return logp, entropy, logits.grad


def reference_logprobs_and_grad(logits, labels, temperature, grad_out):
    return logprobs_and_grad(token_logprobs_ref, logits, labels, temperature, grad_out,
                             torch.float64)


def assert_close_to_fp64(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- token_logprobs


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_size,rows", VOCAB_ROWS)
def test_token_logprobs_matches_reference(vocab_size, rows, dtype):
    gen = torch.Generator().manual_seed(vocab_size)
    logits = (3 * torch.randn(rows, vocab_size, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab_size, (rows,), generator=gen)
    grad_out = torch.randn(rows, generator=gen)
    grad_out[0] = 0.0  # a masked token: its row's gradient must come out exactly zero
    assert prorl_kernels.backend(logits) == "triton"

    logp, entropy, grad = logprobs_and_grad(prorl_kernels.token_logprobs, logits, labels,
                                            0.7, grad_out)
    logp_ref, entropy_ref, grad_ref = reference_logprobs_and_grad(logits, labels, 0.7, grad_out)

    # the Triton autograd Function ran
    assert type(logp.grad_fn).__name__ == "TokenLogprobsBackward"
    assert logp.dtype == torch.float32 and grad.dtype == dtype
    assert_close_to_fp64(logp, logp_ref)
    assert_close_to_fp64(entropy, entropy_ref)
    assert_grads_close(grad, grad_ref)
    assert (logp <= 0).all()
    assert (entropy >= 0).all() and (entropy <= math.log(vocab_size) + 1e-4).all()
    assert not entropy.requires_grad
    assert (grad[0] == 0).all()


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("temperature", [1.0, 0.5, 1.3])
def test_token_logprobs_temperatures(temperature):
    logits = torch.randn(6, 17, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(6)
    grad_out = torch.ones(6)
    logp, entropy, grad = logprobs_and_grad(prorl_kernels.token_logprobs, logits, labels,
                                            temperature, grad_out)
    logp_ref, entropy_ref, grad_ref = reference_logprobs_and_grad(logits, labels,
                                                                  temperature, grad_out)
    assert_close_to_fp64(logp, logp_ref)
    assert_close_to_fp64(entropy, entropy_ref)
    assert_grads_close(grad, grad_ref)
    # By hand: d logp/d logits = (onehot − softmax(logits / T)) / T.
    hand = (torch.eye(17)[:6] - torch.softmax(logits / temperature, -1)) / temperature
    torch.testing.assert_close(grad, hand)


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_size", [1000, 151936])
def test_token_logprobs_extreme_logits(vocab_size, dtype):
    inf = float("inf")
    logits = torch.zeros(6, vocab_size)  # row 0: all tied
    logits[1] = -1e4
    logits[1, 3] = 1e4  # one huge margin
    # ±1e4
    logits[2] = 1e4 * torch.sign(torch.randn(vocab_size,
                                             generator=torch.Generator().manual_seed(2)))
    logits[3] = -1e30  # very negative, with some −inf, and the label at 0
    logits[3, 10:20] = -inf
    logits[3, 5] = 0.0
    logits[4] = -inf  # two tied maxima, everything else impossible
    logits[4, 7] = logits[4, 8] = 5.0
    logits[5] = -50.0  # the label is the max by a margin that makes logp round to 0 from below
    logits[5, 9] = 50.0
    logits = logits.to(dtype)
    labels = torch.tensor([11, 3, 4, 5, 7, 9])
    temperature = 0.9
    grad_out = torch.ones(6)

    logp, entropy, grad = logprobs_and_grad(prorl_kernels.token_logprobs, logits, labels,
                                            temperature, grad_out)
    logp_ref, entropy_ref, grad_ref = reference_logprobs_and_grad(logits, labels,
                                                                  temperature, grad_out)

    assert (torch.isfinite(logp).all() and torch.isfinite(entropy).all()
            and torch.isfinite(grad).all())
    assert (logp <= 0).all()
    assert_close_to_fp64(logp, logp_ref)
    assert_close_to_fp64(entropy, entropy_ref)
    assert_grads_close(grad, grad_ref)
    # Hand values: uniform row → logp = −log V, H = log V; one huge margin → logp = 0, H = 0;
    # two tied maxima → logp = −log 2, H = log 2, gradient ±½/T on the pair and 0 elsewhere.
    torch.testing.assert_close(logp[[0, 1, 3, 4, 5]],
                               torch.tensor([-math.log(vocab_size), 0, 0, -math.log(2), 0]))
    torch.testing.assert_close(entropy[[0, 1, 3, 4]],
                               torch.tensor([math.log(vocab_size), 0, 0, math.log(2)]))
    expected_row4 = torch.zeros(vocab_size)
    expected_row4[7], expected_row4[8] = 0.5 / temperature, -0.5 / temperature
    assert_grads_close(grad[4], expected_row4.double())


@pytest.mark.usefixtures("triton_interpreter")
def test_token_logprobs_leading_shapes_and_slices():
    gen = torch.Generator().manual_seed(3)
    full = torch.randn(2, 6, 50257, generator=gen, dtype=torch.bfloat16)  # [B, T+1, V]
    labels = torch.randint(0, 50257, (2, 5), generator=gen)
    grad_out = torch.randn(2, 5, generator=gen)

    sliced = full[:, :-1]  # what train.py passes: not contiguous, but each row is
    assert not sliced.is_contiguous()
    assert prorl_kernels.logprobs.as_rows(sliced)[-1] is False  # read in place, no copy
    logp, entropy, grad = logprobs_and_grad(prorl_kernels.token_logprobs, sliced, labels,
                                            1.0, grad_out)
    logp_ref, entropy_ref, grad_ref = reference_logprobs_and_grad(sliced, labels, 1.0, grad_out)
    assert logp.shape == (2, 5) and entropy.shape == (2, 5) and grad.shape == (2, 5, 50257)
    assert_close_to_fp64(logp, logp_ref)
    assert_close_to_fp64(entropy, entropy_ref)
    assert_grads_close(grad, grad_ref)

    # A 1-D row and a row-major-free layout (V not the fastest dim): the latter is copied once and
    # that copy becomes the gradient buffer.
    row = torch.randn(17, generator=gen)
    torch.testing.assert_close(prorl_kernels.token_logprobs(row, torch.tensor(4)),
                               token_logprobs_ref(row, torch.tensor(4)))
    transposed = torch.randn(17, 8, generator=gen).t().requires_grad_()  # [8, 17], stride (1, 8)
    assert prorl_kernels.logprobs.as_rows(transposed)[-1] is True
    logp = prorl_kernels.token_logprobs(transposed, torch.arange(8))
    logp.sum().backward(retain_graph=True)
    grad_ref = torch.autograd.grad(token_logprobs_ref(transposed, torch.arange(8)).sum(),
                                   transposed)[0]
    torch.testing.assert_close(transposed.grad, grad_ref)
    with pytest.raises(RuntimeError, match="inplace"):  # the copy now holds the gradient
        logp.sum().backward()


@pytest.mark.usefixtures("triton_interpreter")
def test_token_logprobs_without_entropy_and_empty():
    logits = torch.randn(4, 17, requires_grad=True)
    logp = prorl_kernels.token_logprobs(logits, torch.arange(4))
    assert isinstance(logp, torch.Tensor) and logp.shape == (4,)
    torch.testing.assert_close(logp, token_logprobs_ref(logits, torch.arange(4)))
    empty = prorl_kernels.token_logprobs(torch.randn(0, 17), torch.zeros(0, dtype=torch.long))
    assert empty.shape == (0,)
    with pytest.raises(ValueError, match="temperature"):
        prorl_kernels.token_logprobs(logits, torch.arange(4), temperature=0.0)


# ----------------------------------------------------------------------------- fused policy loss


def policy_batch(batch, seq_len, vocab_size, dtype, seed, adv_per_token=False):
    """Logits [B, T+1, V] (the loss gets the [:, :-1] slice) and the [B, T] tensors around them.
    old_logp and ref_logp are the true log-probs plus noise, so ratios land on both sides of the
    clip range."""
    gen = torch.Generator().manual_seed(seed)
    full = (2 * torch.randn(batch, seq_len + 1, vocab_size, generator=gen)).to(dtype)
    labels = torch.randint(0, vocab_size, (batch, seq_len), generator=gen)
    with torch.no_grad():
        logp = token_logprobs_ref(full[:, :-1], labels, 0.8)
    old_logp = logp + 0.4 * torch.randn(batch, seq_len, generator=gen)
    ref_logp = logp + 0.3 * torch.randn(batch, seq_len, generator=gen)
    adv = torch.randn((batch, seq_len) if adv_per_token else (batch,), generator=gen)
    mask = torch.rand(batch, seq_len, generator=gen) > 0.25
    mask[:, 0] = True
    if batch >= 3:
        mask[1] = False  # a sequence with no tokens at all
    return full, labels, old_logp, ref_logp, adv, mask


def loss_taking_arguments(fn):
    """fn(logits, labels, grpo.LossTerms, grpo.LossSpec) called with the tensors and the spec's
    fields as arguments, as the tests below write them."""
    def call(logits, labels, old_logp, ref_logp, adv, mask, weights, **spec):
        return fn(logits, labels, grpo.LossTerms(old_logp, ref_logp, adv, mask, weights),
                  grpo.LossSpec(**spec))
    return call


fused_loss = loss_taking_arguments(prorl_kernels.fused_policy_loss)
ref_loss = loss_taking_arguments(policy_loss_ref)


def weights_of(mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """The loss weights learner.update passes for a batch taken in one piece."""
    return grpo.loss_weights(mask, agg, grpo.loss_count(mask, agg))


def loss_and_grad(fn, full, *args, dtype=None, **kwargs):
    """(loss, stats, d loss / d full) with the loss computed on the slice full[:, :-1], in
    `dtype`."""
    full = full.detach().to(dtype or full.dtype).requires_grad_()
    loss, stats = fn(full[:, :-1], *args, **kwargs)
    if fn is fused_loss and prorl_kernels.backend(full) == "triton":
        assert type(loss.grad_fn).__name__ == "FusedPolicyLossBackward"  # the fused kernel ran
    loss.backward()
    return loss, stats, full.grad


def assert_policy_loss_matches(full, labels, old_logp, ref_logp, adv, mask,
                               agg="token-mean", **kwargs):
    """The fused kernel against `policy_loss_ref` run in fp64 on the same values."""
    args = (labels, old_logp, ref_logp, adv, mask, weights_of(mask, agg))
    assert prorl_kernels.backend(full) == "triton"
    loss, stats, grad = loss_and_grad(fused_loss, full, *args, **kwargs)
    loss_ref, stats_ref, grad_ref = loss_and_grad(ref_loss, full, *args,
                                                  dtype=torch.float64, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == full.dtype
    assert_close_to_fp64(loss, loss_ref)
    expected = ({"clipfrac", "entropy", "ratio_mean", "approx_kl"}
                | ({"kl"} if ref_logp is not None else set()))
    assert stats.keys() == stats_ref.keys() == expected
    for name in stats:
        assert not stats[name].requires_grad
        assert_close_to_fp64(stats[name], stats_ref[name])
    assert_grads_close(grad, grad_ref)
    assert (grad[:, -1] == 0).all() and (grad[:, :-1][~mask] == 0).all()  # no gradient off the mask
    return stats


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
def test_policy_loss_matches_reference_small_vocab(kl_kind, agg, dtype):
    batch = policy_batch(4, 12, 17, dtype, seed=5, adv_per_token=kl_kind == "k2")
    stats = assert_policy_loss_matches(*batch, kl_kind=kl_kind, kl_coef=0.05,
                                       temperature=0.8, agg=agg)
    assert 0 < stats["clipfrac"] < 1  # both branches of the clipped surrogate were exercised


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_size,batch,seq_len", [(32000, 2, 2), (50257, 1, 3), (151936, 1, 2)])
def test_policy_loss_matches_reference_large_vocab(vocab_size, batch, seq_len, dtype):
    data = policy_batch(batch, seq_len, vocab_size, dtype, seed=vocab_size)
    assert_policy_loss_matches(*data, kl_kind="k3", kl_coef=0.1, temperature=0.8,
                               agg="seq-mean-token-mean")


@pytest.mark.usefixtures("triton_interpreter")
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_policy_loss_on_policy_and_without_reference_matches_reference(agg):
    """learner.update's two shortcuts: old_logp None (one update per batch: ρ = 1 with logp's
    gradient) and ref_logp None (no reference model: no KL, none logged)."""
    full, labels, _, ref_logp, adv, mask = policy_batch(4, 10, 17, torch.float32, seed=11)
    assert_policy_loss_matches(full, labels, None, ref_logp, adv, mask, agg,
                               kl_kind="k2", kl_coef=0.1)
    stats = assert_policy_loss_matches(full, labels, None, None, adv, mask, agg, kl_coef=0.1)
    assert stats["clipfrac"] == 0 and stats["ratio_mean"] == pytest.approx(1.0)
    # on-policy is the same loss as passing the log-probs themselves as old_logp
    with torch.no_grad():
        logp = token_logprobs_ref(full[:, :-1], labels, 1.0)
    loss_given, _, grad_given = loss_and_grad(ref_loss, full, labels, logp, None, adv, mask,
                                              weights_of(mask, agg))
    loss_none, _, grad_none = loss_and_grad(ref_loss, full, labels, None, None, adv, mask,
                                            weights_of(mask, agg))
    torch.testing.assert_close(loss_none, loss_given)
    torch.testing.assert_close(grad_none, grad_given)


def test_a_clamped_kl_runs_the_reference(use_triton):
    """The kernel has no clamp: --kl-clamp takes the reference path, whatever the backend."""
    full, labels, old_logp, ref_logp, adv, mask = policy_batch(2, 6, 17, torch.float32, seed=12)
    args = (full[:, :-1], labels, old_logp, ref_logp, adv, mask, weights_of(mask))
    clamped, stats = fused_loss(*args, kl_kind="k3", kl_coef=1.0, kl_clamp=1e-3)
    assert stats["kl"] <= 1e-3
    assert clamped.grad_fn is None or type(clamped.grad_fn).__name__ != "FusedPolicyLossBackward"


def test_policy_loss_hand_values(use_triton):
    # Uniform logits over V = 2: logp = −log 2 for any label. Ratios 2, ½, 1 with A = 1, −1, 1:
    #   ρ = 2, A = 1:  pg_loss1 = −2,   pg_loss2 = −1.28 → −1.28 (clipped, no gradient)
    #   ρ = ½, A = −1: pg_loss1 = 0.5,  pg_loss2 = 0.8   →  0.8  (clipped, no gradient)
    #   ρ = 1, A = 1:  pg_loss1 = −1 =  pg_loss2         → −1    (d loss_t/d logp = −A·ρ = −1)
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    labels = torch.tensor([[0, 1, 0]])
    logp = torch.full((1, 3), -math.log(2))
    old_logp = logp - torch.log(torch.tensor([[2.0, 0.5, 1.0]]))
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert prorl_kernels.backend(logits) == ("triton" if use_triton else "reference")

    loss, stats = fused_loss(logits, labels, old_logp, logp, adv, mask, weights_of(mask),
                                                  kl_kind="k3", kl_coef=0.5)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor((-1.28 + 0.8 - 1) / 3))
    torch.testing.assert_close(stats["clipfrac"], torch.tensor(2 / 3))
    torch.testing.assert_close(stats["ratio_mean"], torch.tensor(3.5 / 3))
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(math.log(2) ** 2 / 3))
    torch.testing.assert_close(stats["kl"], torch.tensor(0.0))  # ref_logp = logp
    torch.testing.assert_close(stats["entropy"], torch.tensor(math.log(2)))
    # Only token 2 has a gradient: (1/3)·(−1)·(onehot − ½) → −1/6 on its label, +1/6 on the other.
    expected = torch.zeros(1, 3, 2)
    expected[0, 2] = torch.tensor([-1 / 6, 1 / 6])
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("kl_kind,expected_kl", [("k1", 1.0), ("k2", 0.5), ("k3", math.exp(-1))])
def test_policy_loss_kl_hand_values(kl_kind, expected_kl, use_triton):
    # A = 0 leaves only β·kl. log π/π_ref = 1: k1 = 1, k2 = ½, k3 = e^(−1) + 1 − 1 = e^(−1).
    logits = torch.zeros(1, 1, 2, requires_grad=True)
    logp = torch.full((1, 1), -math.log(2))
    ones = torch.ones(1, 1)
    loss, stats = fused_loss(
        logits, torch.zeros(1, 1, dtype=torch.long), logp, logp - 1, 0 * ones, ones.bool(),
        weights_of(ones.bool()), kl_kind=kl_kind, kl_coef=0.1)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.1 * expected_kl))
    torch.testing.assert_close(stats["kl"], torch.tensor(expected_kl))
    torch.testing.assert_close(kl_estimate_ref(logp, logp - 1, kl_kind),
                               torch.full((1, 1), expected_kl))
    # d kl/d logp at log-ratio 1: k1 → 1, k2 → 1, k3 → 1 − e^(−1); times d logp/d logits = ±½.
    dkl = {"k1": 1.0, "k2": 1.0, "k3": 1 - math.exp(-1)}[kl_kind]
    torch.testing.assert_close(logits.grad, 0.1 * dkl * torch.tensor([[[0.5, -0.5]]]))


def test_policy_loss_ignores_masked_tokens(use_triton):
    full, labels, old_logp, ref_logp, adv, mask = policy_batch(3, 8, 17, torch.float32, seed=7)
    kwargs = {"kl_kind": "k3", "kl_coef": 0.1, "temperature": 0.8}
    weights = weights_of(mask)
    loss, _, grad = loss_and_grad(fused_loss, full, labels, old_logp, ref_logp, adv, mask, weights,
                                  **kwargs)
    # Garbage where mask is False: huge logits and old/ref log-probs that overflow exp() if used.
    padded = full.clone()
    padded[:, :-1][~mask] = 1e4
    old_logp, ref_logp = old_logp.masked_fill(~mask, -1e4), ref_logp.masked_fill(~mask, 1e4)
    loss2, _, grad2 = loss_and_grad(fused_loss, padded, labels, old_logp, ref_logp, adv, mask,
                                    weights, **kwargs)
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(grad2, grad)
    assert (grad2[:, :-1][~mask] == 0).all()
    # the kernel never reads a masked row: even nan logits there leave everything finite
    if use_triton:
        padded[:, :-1][~mask] = float("nan")
        args = (labels, old_logp, ref_logp, adv, mask, weights)
        loss3, _, grad3 = loss_and_grad(fused_loss, padded, *args, **kwargs)
        torch.testing.assert_close(loss3, loss)
        torch.testing.assert_close(grad3, grad)


def test_aggregation_hand_values():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]]).bool()  # the last sequence is empty
    expected = {"token-mean": 10 / 4, "seq-mean-token-mean": (2 + 4) / 2,
                "seq-mean-token-sum": (6 + 4) / 2}
    for agg, value in expected.items():
        torch.testing.assert_close(grpo.aggregate(per_token, mask, agg), torch.tensor(value))
        torch.testing.assert_close((weights_of(mask, agg) * per_token).sum(), torch.tensor(value))


def test_policy_loss_rejects_bad_config(use_triton):
    full, labels, old_logp, ref_logp, adv, mask = policy_batch(2, 3, 17, torch.float32, seed=8)
    args = (full[:, :-1], labels, old_logp, ref_logp, adv, mask, weights_of(mask))
    with pytest.raises(ValueError, match="unknown KL estimator"):
        fused_loss(*args, kl_kind="k4")
    with pytest.raises(ValueError, match="aggregation"):
        weights_of(mask, "mean")
    with pytest.raises(ValueError, match="temperature"):
        fused_loss(*args, temperature=0.0)


# -------------------------------------------------------------------------- references and dispatch


def test_references_pass_gradcheck_in_fp64():
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 4, 7, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, 7, (3, 4), generator=gen)
    assert torch.autograd.gradcheck(lambda x: token_logprobs_ref(x, labels, 0.7), (logits,))
    with torch.no_grad():
        logp = token_logprobs_ref(logits, labels, 0.7)
    old_logp = logp + 0.4 * torch.randn(3, 4, dtype=torch.float64, generator=gen)
    ref_logp = logp + 0.3 * torch.randn(3, 4, dtype=torch.float64, generator=gen)
    adv = torch.randn(3, dtype=torch.float64, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1]]).bool()
    for kl_kind in ("k1", "k2", "k3"):
        for agg in AGGREGATIONS:

            def loss(x, kl_kind=kl_kind, agg=agg):
                return ref_loss(x, labels, old_logp, ref_logp, adv, mask, weights_of(mask, agg),
                                       kl_kind=kl_kind, kl_coef=0.1, temperature=0.7)[0]

            assert torch.autograd.gradcheck(loss, (logits,))


# ------------------------------------------------------------------------- linear_token_logprobs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_size,rows", [(17, 11), (50257, 5)])
def test_linear_token_logprobs_matches_the_unchunked_computation(vocab_size, rows, dtype,
                                                                 use_triton):
    """Chunks of 2 positions (the last one partial), on Triton (interpreted) and on the reference,
    against all the logits at once in fp64: logp, entropy, the gradients of hidden states and
    head."""
    gen = torch.Generator().manual_seed(vocab_size)
    hidden = torch.randn(rows, 24, generator=gen)
    weight = torch.randn(vocab_size, 24, generator=gen) / 3
    labels = torch.randint(0, vocab_size, (rows,), generator=gen)
    grad_out = torch.randn(rows, generator=gen)
    grad_out[:2] = 0.0  # a whole chunk of masked tokens: skipped in backward, its gradient 0
    assert prorl_kernels.backend(hidden) == ("triton" if use_triton else "reference")

    def run(fn, cast):
        h, w = (x.detach().to(cast).requires_grad_() for x in (hidden, weight))
        logp, entropy = fn(h, w)
        (logp * grad_out.to(logp.dtype)).sum().backward()
        return logp, entropy, h.grad, w.grad

    def chunked(h, w):
        return prorl_kernels.linear_token_logprobs(h, w, labels, 0.7, dtype, chunk=2)

    logp, entropy, grad_h, grad_w = run(chunked, torch.float32)
    expected = run(lambda h, w: linear_token_logprobs_ref(h, w, labels, 0.7), torch.float64)
    # fp32 against fp64: the rounding of an fp32 matmul and of exp() over 50k entries (against the
    # fp32 full computation it is within 1e-5: test_chunked_logprobs.py); bf16: 8 significant bits
    tol = 1e-4 if dtype == torch.float32 else 0.1
    for actual, reference in zip((logp, entropy, grad_h, grad_w), expected):
        assert actual.dtype == torch.float32
        scale = reference.abs().max().item()
        assert (actual.double() - reference).abs().max().item() <= tol * max(scale, 1.0)
    assert (grad_h[:2] == 0).all() and not entropy.requires_grad


def test_cpu_without_interpreter_runs_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits = torch.randn(5, 17)
    labels = torch.arange(5)
    assert prorl_kernels.backend(logits) == "reference"
    logp, entropy = prorl_kernels.token_logprobs(logits, labels, 0.7, return_entropy=True)
    logp_ref, entropy_ref = token_logprobs_ref(logits, labels, 0.7, return_entropy=True)
    assert torch.equal(logp, logp_ref) and torch.equal(entropy, entropy_ref)
    assert logp.grad_fn is None or "TokenLogprobs" not in type(logp.grad_fn).__name__


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from prorl_kernels import logprobs, policy_loss

layout = {"inner": "i32", "stride_outer": "i64", "stride_inner": "i64"}
row_io = {"labels_ptr": "*i64", "lse_ptr": "*fp32", "V": "i32", "inv_temperature": "fp32"}
kernels = [
    (logprobs._token_logprobs_fwd_kernel, {"logp_ptr": "*fp32", "entropy_ptr": "*fp32"},
     {"WITH_ENTROPY": True}),
    (logprobs._token_logprobs_bwd_kernel, {"row_grad_ptr": "*fp32", "grad_ptr": "*bf16"}, {}),
    (policy_loss._policy_loss_fwd_kernel,
     {name + "_ptr": "*fp32"
      for name in "old_logp ref_logp adv mask logp entropy loss kl clipped dloss_dlogp".split()}
     | {"ratio_low": "fp32", "ratio_high": "fp32", "kl_coef": "fp32"},
     {"KL_KIND": 3, "USE_KL": True, "ON_POLICY": False}),
]
for fn, extra, constexprs in kernels:
    constexprs = constexprs | {"BLOCK_V": 8192}
    types = ({"logits_ptr": "*bf16"} | layout | row_io | extra
             | {name: "constexpr" for name in constexprs})
    signature = {name: types[name] for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 16})
    assert compiled.asm["cubin"], fn.__name__
"""


def test_cuda_kernels_compile_for_h100():
    """The interpreter skips Triton's type checks and code generation; compile the CUDA path for
    sm_90 (no GPU needed, only Triton's bundled ptxas) so a kernel that cannot build on a GPU fails
    here."""
    pytest.importorskip("triton.backends.nvidia")
    env = ({k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
           | {"TRITON_DEFAULT_FP_FUSION": "1"})
    command = [sys.executable, "-c", COMPILE_FOR_H100]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_triton_tests_in_a_fresh_process():
    """When this process could not interpret Triton (see `triton_interpreter`), run the Triton tests
    in a child that sets TRITON_INTERPRET=1 before anything imports triton."""
    if interpreter_usable():
        pytest.skip("the Triton tests run in this process")
    env = os.environ | {"TRITON_INTERPRET": "1"}
    skip_here = "not fresh_process and not compile_for_h100"  # those two need no interpreter
    # addopts reset: a known summary
    options = ["-o", "addopts=", "-q", "-p", "no:cacheprovider", "-k", skip_here]
    command = [sys.executable, "-m", "pytest", __file__, *options]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            check=False, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
