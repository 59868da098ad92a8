"""Log-probs from the last hidden state, chunk by chunk, on completion positions only
(learner.completion_logprobs, prorl_kernels.linear_token_logprobs) against the full computation: the
model's own logits at every position, then log_softmax. The Triton per-chunk path is checked in
tests/test_kernels.py (interpreted)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import grpo
import learner
import llama_forward
import prefix_forward
import prorl_kernels
import rollout
import settings
import train
from prorl_kernels import linear_logprobs
from prorl_kernels.reference import token_logprobs_ref

VOCAB = 3000  # wide enough that the logits dominate the saved activations, as at V = 49k-152k
SHAPE = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
BF16_BOUND = (
    0.1  # |logp_bf16 − logp_fp32| on these random models (measured up to ~0.03); fp32: 1e-5
)


def tiny(family: str, tied: bool):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=tied, **SHAPE)).eval()
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=tied, **SHAPE)).eval()


def left_padded_batch() -> rollout.Rollout:
    """6 rows of 14 positions: left pads, prompts of 3-5 tokens, completions of 2-9, right pads."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, VOCAB, (6, 14), generator=generator)
    pads, prompts, completions = [2, 0, 1, 0, 2, 1], [3, 5, 4, 3, 5, 4], [9, 2, 6, 9, 4, 7]
    attention = torch.zeros(6, 14, dtype=torch.bool)
    mask = torch.zeros(6, 14, dtype=torch.bool)
    for row, (pad, prompt, completion) in enumerate(zip(pads, prompts, completions)):
        attention[row, pad : pad + prompt + completion] = True
        mask[row, pad + prompt : pad + prompt + completion] = True
    tokens[~attention] = 0
    return rollout.Rollout(
        tokens, attention, mask, torch.zeros(6, 14), torch.zeros(6, dtype=torch.bool), 5
    )


def full_logprobs(
    model, batch: rollout.Rollout, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The computation the chunked path replaces: logits at every position, then log_softmax."""
    logits = model(
        input_ids=batch.tokens,
        attention_mask=batch.attention_mask.long(),
        position_ids=llama_forward.position_ids(batch.attention_mask),
    ).logits[:, :-1]
    return token_logprobs_ref(logits, batch.tokens[:, 1:], temperature, return_entropy=True)


def grads(model, logp: torch.Tensor, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    (logp * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,tied", [("llama", True), ("llama", False), ("qwen2", True)])
def test_chunked_logprobs_and_gradients_equal_the_full_computation(family, tied, monkeypatch):
    model, batch = tiny(family, tied), left_padded_batch()
    monkeypatch.setattr(
        linear_logprobs, "CHUNK_TOKENS", 4
    )  # 37 completion tokens: 10 chunks, the last of 1
    c = settings.Config(temperature=1.3, dtype="fp32")
    targets = batch.mask[:, 1:]
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(2)) * targets
    logp, entropy = learner.completion_logprobs(model, batch, c)
    chunked = grads(model, logp, weights)
    full_logp, full_entropy = full_logprobs(model, batch, c.temperature)
    full = grads(model, full_logp, weights)
    assert torch.allclose(logp[targets], full_logp[targets], atol=1e-5, rtol=0)
    assert torch.allclose(entropy[targets], full_entropy[targets], atol=1e-5, rtol=0)
    assert torch.all(logp[~targets] == 0) and torch.all(
        entropy[~targets] == 0
    )  # prompt and pads: nothing
    assert chunked.keys() == full.keys()
    for name, grad in full.items():
        scale = grad.abs().max().clamp(min=1e-3)
        assert (chunked[name] - grad).abs().max() / scale < 1e-5, name


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_only_completion_positions_reach_the_head(shared_prefix, monkeypatch):
    """The head and log-softmax see one row per completion token, never a prompt or pad position,
    on both forwards (prefix_forward's, and HF's as under FSDP2)."""
    model, batch = tiny("llama", True), left_padded_batch()
    monkeypatch.setattr(prefix_forward, "shares_prefix", lambda model: shared_prefix)
    rows, real = [], prorl_kernels.linear_token_logprobs

    def recording(hidden, weight, labels, *args, **kwargs):
        rows.append((len(hidden), labels.tolist()))
        return real(hidden, weight, labels, *args, **kwargs)

    monkeypatch.setattr(prorl_kernels, "linear_token_logprobs", recording)
    head_inputs = []
    model.lm_head.register_forward_hook(lambda module, args, out: head_inputs.append(args[0].shape))
    learner.completion_logprobs(model, batch, settings.Config())
    completion_tokens = batch.tokens[batch.mask].tolist()  # row-major, as the labels are gathered
    assert rows == [(37, completion_tokens)]
    # the model's own head computes no logits at all: not called, or called on 0 positions
    assert head_inputs == ([] if shared_prefix else [torch.Size([6, 0, 32])])


def test_bf16_logprobs_stay_within_the_stated_bound_of_fp32():
    model, batch = tiny("qwen2", True), left_padded_batch()
    targets = batch.mask[:, 1:]
    fp32, _ = learner.completion_logprobs(model, batch, settings.Config(dtype="fp32"))
    bf16, _ = learner.completion_logprobs(model, batch, settings.Config(dtype="bf16"))
    assert (
        fp32.dtype == bf16.dtype == torch.float32
    )  # the log-softmax is fp32 whatever the matmuls ran in
    difference = (bf16 - fp32)[targets].abs().max().item()
    assert 0 < difference < BF16_BOUND  # 0 would mean bf16 never ran
    weights = targets.float()
    g32, g16 = grads(model, fp32, weights), grads(model, bf16, weights)
    for name in g32:  # same direction: the cosine of each parameter's gradient
        cosine = torch.nn.functional.cosine_similarity(
            g32[name].flatten(), g16[name].flatten(), dim=0
        )
        assert cosine > 0.99, name
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def saved_bytes(model, compute_loss) -> tuple[int, int]:
    """(total, largest) bytes autograd keeps for backward while `compute_loss` runs, the weights
    (which exist anyway) left out."""
    sizes, weights = [], {p.data_ptr() for p in model.parameters()}

    def pack(tensor):
        if tensor.data_ptr() not in weights:
            sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        compute_loss()
    return sum(sizes), max(sizes)


def test_one_update_keeps_far_less_for_backward_than_full_logits(monkeypatch):
    """What a micro-batch keeps for backward bounds the update's peak memory: with the full logits
    it holds [B, T, V] fp32 (logits and log_softmax); chunked, hidden states, never [·, V]."""
    model, batch = tiny("llama", True), left_padded_batch()
    c = settings.Config(kl_coef=0.0)
    targets = batch.mask[:, 1:]
    adv, weights = torch.ones(6), targets.float() / targets.sum()

    def chunked():
        terms = grpo.LossTerms(None, None, adv, targets, weights)
        learner.policy_loss(model, batch, terms, grpo.LossSpec(), c)[0]

    def full():
        logits = model(
            input_ids=batch.tokens,
            attention_mask=batch.attention_mask.long(),
            position_ids=llama_forward.position_ids(batch.attention_mask),
        ).logits[:, :-1]
        terms = grpo.LossTerms(None, None, adv, targets, weights)
        prorl_kernels.fused_policy_loss(logits, batch.tokens[:, 1:], terms)

    new_total, new_largest = saved_bytes(model, chunked)
    old_total, old_largest = saved_bytes(model, full)
    logits_bytes = 6 * 13 * VOCAB * 4
    assert old_largest >= logits_bytes  # the old path keeps the whole logits
    assert new_largest <= 6 * 14 * 64 * 4  # the MLP activation [B, T, 64]; nothing [·, V]
    assert new_total < old_total / 3, (new_total, old_total)


def test_a_bad_dtype_is_one_line_error():
    with pytest.raises(ValueError, match="--dtype must be auto, fp32 or bf16"):
        train.checked_config(["--dtype", "fp16"])
