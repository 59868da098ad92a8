"""prefix_forward: each prompt run once for its N rows, padding trimmed. Its log-probs and their
parameter gradients equal the model's own forward (`model(...)` logits at every position, then
log_softmax) and HF's hidden-state path (what FSDP2 runs), on real rollouts of a tiny Llama and a
tiny Qwen2: left-padded prompts of different lengths, completions of different lengths, two
rollouts of different prompt widths stacked, rows shuffled."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import learner
import llama_forward
import prefix_forward
import rollout
import settings
from prorl_kernels.reference import token_logprobs_ref

SHAPE = {"vocab_size": 50, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def tiny(family: str):
    torch.manual_seed(0)
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **SHAPE)).train()
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, **SHAPE)).train()  # q/k/v biases


def stacked_rollout(model) -> rollout.Rollout:
    """3 samples of each of 5 prompts (3-9 tokens), sampled in two rollouts of different prompt
    widths (9 and 6: stacked, the wider one's last prompt columns sit past prompt_len), stopping on
    any of 5 tokens so completions differ in length; rows shuffled so groups are not adjacent."""
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22], [30, 31, 32, 33],
               [40, 41, 42, 43, 44, 45], [7, 8, 9]]
    parts = [rollout.generate(model, prompts[:3], 3, 8, stop_ids=(1, 2, 3, 4, 5), seed=1),
             rollout.generate(model, prompts[3:], 3, 10, stop_ids=(1, 2, 3, 4, 5), seed=2)]
    batch = rollout.concat_rows(parts, pad_id=0)
    lengths = batch.mask.sum(1)
    assert batch.prompt_len == 6 and lengths.min() < lengths.max()  # the cases this file is about
    return rollout.select_rows(batch, torch.randperm(len(batch.tokens),
                                                     generator=torch.Generator().manual_seed(0)))


def model_logprobs(model, batch: rollout.Rollout, temperature: float) -> torch.Tensor:
    """The independent computation: the model's own logits at every position, then log_softmax."""
    logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask.long(),
                   position_ids=llama_forward.position_ids(batch.attention_mask)).logits[:, :-1]
    return token_logprobs_ref(logits, batch.tokens[:, 1:], temperature)


def logprobs_and_grads(model, compute, weights):
    """(log-probs [B, T−1], every parameter's gradient of Σ weights · log-probs)."""
    model.zero_grad(set_to_none=True)
    logp = compute()
    (logp * weights).sum().backward()
    return logp.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prefix_logprobs_and_gradients_equal_the_full_forward(family, monkeypatch):
    model = tiny(family)
    batch = stacked_rollout(model)
    c = settings.Config(temperature=1.2, dtype="fp32")
    targets = batch.mask[:, 1:]
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(3)) * targets
    embedded = []  # the embedding's inputs: which rows and columns each pass runs
    embedding = model.get_input_embeddings()
    embedding.register_forward_hook(lambda module, args, out: embedded.append(args[0].shape))
    shared, shared_grads = logprobs_and_grads(
        model, lambda: learner.completion_logprobs(model, batch, c)[0], weights)
    full, full_grads = logprobs_and_grads(
        model, lambda: model_logprobs(model, batch, c.temperature) * targets, weights)
    monkeypatch.setattr(prefix_forward, "shares_prefix", lambda model: False)  # as under FSDP2
    hf, hf_grads = logprobs_and_grads(
        model, lambda: learner.completion_logprobs(model, batch, c)[0], weights)

    # 5 distinct prompts over columns < 6 ran once each; 15 rows ran the columns from 6 up to the
    # last real one (trimmed), and the last column (whose hidden scores no token) not at all
    last_real = int(batch.attention_mask.any(0).nonzero().max())
    assert embedded[0] == (5, 6) and embedded[1] == (15, last_real - 6)
    assert embedded[-1] == (15, last_real + 1)  # HF's path: every row, every column, trimmed
    assert shared.shape == full.shape == targets.shape and (shared[~targets] == 0).all()
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(hf, full, atol=1e-5, rtol=0)
    for name, grad in full_grads.items():
        scale = grad.abs().max()
        assert scale > 0, name  # every parameter is reached (embeddings, both passes' layers, head)
        assert (shared_grads[name] - grad).abs().max() / scale < 1e-5, name
        assert (hf_grads[name] - grad).abs().max() / scale < 1e-5, name


def test_padding_columns_past_the_longest_row_are_never_run():
    """Ten more all-pad columns (as in a wider stacked batch) change neither log-probs nor work."""
    model = tiny("llama").eval()
    batch = stacked_rollout(model)
    pad = torch.nn.functional.pad
    wider = rollout.Rollout(pad(batch.tokens, (0, 10)), pad(batch.attention_mask, (0, 10)),
                            pad(batch.mask, (0, 10)), pad(batch.logprobs, (0, 10)), batch.truncated,
                            batch.prompt_len)
    widths = []
    embedding = model.get_input_embeddings()
    embedding.register_forward_hook(lambda module, args, out: widths.append(args[0].shape))
    c = settings.Config(dtype="fp32")
    with torch.no_grad():
        narrow_logp, wide_logp = (learner.completion_logprobs(model, b, c)[0]
                                  for b in (batch, wider))
    assert widths[:2] == widths[2:]  # the same passes, of the same sizes
    assert wide_logp.shape[1] == narrow_logp.shape[1] + 10 and (wide_logp[:, -10:] == 0).all()
    torch.testing.assert_close(wide_logp[:, :-10], narrow_logp, atol=1e-6, rtol=0)


def test_unsupported_or_sharded_models_take_hf_forward():
    model = tiny("llama")
    assert prefix_forward.shares_prefix(model)
    model.config.attention_dropout = 0.1  # HF draws dropout in training; this forward has none
    assert not prefix_forward.shares_prefix(model) and prefix_forward.shares_prefix(model.eval())
    model.config.hidden_act = "gelu"  # check_supported's models only
    assert not prefix_forward.shares_prefix(model)


def test_update_gives_each_micro_batch_whole_groups():
    """update sorts a mini-batch's rows: a micro-batch of 6 rows, groups of 3, runs 2 prompts."""
    model = tiny("llama")
    batch = rollout.generate(model, [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]], 3, 6, seed=0)
    prompt_rows = []
    model.get_input_embeddings().register_forward_hook(
        lambda m, args, out: prompt_rows.append(args[0].shape[0]))
    c = settings.Config(kl_coef=0.0, micro_batch_rows=6, minibatches=1, dtype="fp32")
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    learner.update(model, optimizer, batch, torch.randn(12), None, c)
    assert prompt_rows == [2, 6, 2, 6]  # per micro-batch: its 2 prompts, then its 6 rows
