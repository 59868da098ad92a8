"""rollout.generate against independent computations: HF `model.generate`, a teacher-forced HF
forward, and the model's own next-token distribution (chi-square bounds at fixed seeds).

Models are tiny random Llama / Qwen2 networks, built in a temp dir and loaded back with
AutoModelForCausalLM, as the trainer loads a real checkpoint.
"""

import copy
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import llama_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rollout

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [3, 4], [20, 21, 22, 23, 1], [9]]  # lengths 8, 2, 5, 1
SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "max_position_embeddings": 128}


def build(tmp_path_factory, config) -> torch.nn.Module:
    """A random model saved to disk and loaded back the way train.py loads one (fp32, eval mode)."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp(config.model_type)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    if request.param == "llama":  # GQA: 4 query heads share 2 kv heads
        config = LlamaConfig(vocab_size=48, num_attention_heads=4, num_key_value_heads=2, **SMALL)
    else:  # q/k/v biases, rope_theta of Qwen2.5
        config = Qwen2Config(vocab_size=48, num_attention_heads=4, num_key_value_heads=1,
                             rope_theta=1e6, **SMALL)
    return build(tmp_path_factory, config)


@pytest.fixture(scope="module")
def peaked_model(tmp_path_factory):
    """Vocabulary of 6 with a scaled-up lm_head, so next-token distributions are far from
    uniform."""
    config = LlamaConfig(vocab_size=6, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    model = build(tmp_path_factory, config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)
    return model


def left_pad(prompts, pad_id=0):
    """HF-style left padding: input_ids and attention_mask [P, L]."""
    length = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (length - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def teacher_forced_logits(model, out: rollout.Rollout) -> torch.Tensor:
    """logits [B, T, V] of the trainer's forward: the same tokens, mask and positions."""
    with torch.no_grad():
        return model(out.tokens, attention_mask=out.attention_mask.long(),
                     position_ids=llama_forward.position_ids(out.attention_mask)).logits.float()


def hf_greedy(model, max_new_tokens: int, stop_ids: tuple = ()) -> torch.Tensor:
    """model.generate(do_sample=False) on PROMPTS, left-padded with 0: the reference the sampler
    must match."""
    ids, mask = left_pad(PROMPTS)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                              max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids) or None,
                              pad_token_id=0)


def chi_square(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom, pooling cells expected fewer than 5 times."""
    small = expected < 5
    observed = torch.cat([observed[~small], observed[small].sum().view(1)])
    expected = torch.cat([expected[~small], expected[small].sum().view(1)])
    keep = expected > 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return stat, int(keep.sum()) - 1


def chi_square_bound(dof: int, z: float = 4.0) -> float:
    """Upper critical value of chi-square(dof) at one-sided normal quantile z (Wilson-Hilferty; z=4:
    p≈3e-5)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


# --------------------------------------------------------------------------------------------------


def test_position_ids_by_hand():
    attention_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert llama_forward.position_ids(attention_mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("stop", [False, True])
def test_greedy_equals_hf_generate(model, stop):
    """Token for token what model.generate(do_sample=False) returns, on left-padded prompts of 4
    lengths."""
    stop_ids = ()
    if stop:  # stop on a token that the greedy completions do emit, part-way through some rows
        free = rollout.generate(model, PROMPTS, 1, 12, temperature=0)
        stop_ids = (int(free.tokens[0, free.prompt_len + 3]),
                    int(free.tokens[2, free.prompt_len + 6]))
    expected = hf_greedy(model, 12, stop_ids)
    out = rollout.generate(model, PROMPTS, 1, 12, temperature=0, stop_ids=stop_ids)
    assert out.tokens.tolist() == expected.tolist()
    if stop:
        assert out.truncated.tolist() != [True] * len(PROMPTS), \
            "the stop tokens should end some rows early"


def test_llama_with_every_bias(tmp_path_factory):
    """Llama's optional attention_bias (q, k, v, o) and mlp_bias are applied too."""
    config = LlamaConfig(vocab_size=48, num_attention_heads=4, num_key_value_heads=4,
                         attention_bias=True, mlp_bias=True, **SMALL)
    model = build(tmp_path_factory, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)  # HF initialises biases to 0, which would test nothing
    assert rollout.generate(model, PROMPTS, 1, 8, temperature=0).tokens.tolist() \
        == hf_greedy(model, 8).tolist()


def test_llama3_rope_scaling(tmp_path_factory):
    """RoPE frequencies come from the model's rotary module, so Llama 3's rope scaling is
    honoured."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    config = LlamaConfig(vocab_size=48, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters=rope, **SMALL)
    model = build(tmp_path_factory, config)
    assert rollout.generate(model, PROMPTS, 1, 8, temperature=0).tokens.tolist() \
        == hf_greedy(model, 8).tolist()


def test_dynamic_rope_is_refused(tmp_path_factory):
    """Dynamic NTK RoPE changes its frequencies with each forward's length: the sampler says it
    can't follow."""
    rope = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    config = LlamaConfig(vocab_size=48, num_attention_heads=4, num_key_value_heads=2,
                         rope_parameters=rope, **SMALL)
    with pytest.raises(ValueError, match="dynamic NTK RoPE"):
        rollout.generate(build(tmp_path_factory, config), PROMPTS, 1, 4)


def test_an_explicit_max_rows_is_capped_by_the_kv_cache_budget(model, monkeypatch):
    """evaluation.py asks for up to 4096 rows at once; the KV-cache budget still bounds what is
    decoded together."""
    rows = []
    real_cache = llama_forward.KVCache

    def recording_cache(weights, prompts, prompt_len, num_rows, max_new_tokens):
        rows.append(num_rows)
        return real_cache(weights, prompts, prompt_len, num_rows, max_new_tokens)

    longest, new_tokens = max(len(p) for p in PROMPTS), 6
    per_row = (llama_forward.Weights(model, longest + new_tokens).kv_bytes_per_token
               * (longest + new_tokens))
    monkeypatch.setattr(llama_forward, "KVCache", recording_cache)
    # 5 rows fit: one prompt's 3 samples at a time
    monkeypatch.setattr(rollout, "KV_CACHE_BYTES", 5 * per_row)
    capped = rollout.generate(model, PROMPTS, 3, new_tokens, temperature=0, max_rows=4096)
    assert rows == [3]
    monkeypatch.undo()
    assert torch.equal(capped.tokens,
                       rollout.generate(model, PROMPTS, 3, new_tokens, temperature=0).tokens)


def test_greedy_rows_equal_across_samples_and_chunks(model, monkeypatch):
    """n rows of one prompt are identical under greedy decoding, however the rows are chunked."""
    reference = rollout.generate(model, PROMPTS, 1, 10, temperature=0)
    for max_rows in (1, 2, 3, 256):  # 2: a prompt's rows split across chunks
        out = rollout.generate(model, PROMPTS, 3, 10, temperature=0, max_rows=max_rows)
        assert torch.equal(out.tokens, reference.tokens.repeat_interleave(3, 0))
        assert torch.allclose(out.logprobs, reference.logprobs.repeat_interleave(3, 0), atol=1e-5)
    # The default chunk size follows the KV-cache budget: room for 2 rows here.
    weights = llama_forward.Weights(model, 18)
    monkeypatch.setattr(rollout, "KV_CACHE_BYTES", 2 * weights.kv_bytes_per_token * 18)
    out = rollout.generate(model, PROMPTS, 3, 10, temperature=0)
    assert torch.equal(out.tokens, reference.tokens.repeat_interleave(3, 0))


@pytest.mark.parametrize("temperature, top_p, top_k, n",
                         [(1.0, 1.0, 0, 3), (0.7, 0.9, 0, 3), (1.3, 1.0, 5, 3), (0.0, 1.0, 0, 3),
                          (1.0, 1.0, 0, 1)])
def test_logprobs_equal_teacher_forced(model, temperature, top_p, top_k, n):
    """Returned log-probs are log softmax(logits / T) of the trainer's forward at the sampled tokens
    (1e-4), with prompts shared by n=3 rows and with one row per prompt (whose cache holds prompt
    and completion)."""
    out = rollout.generate(model, PROMPTS, n, 10, temperature=temperature, top_p=top_p, top_k=top_k,
                           stop_ids=(7, 11), seed=1)
    logits = teacher_forced_logits(model, out)[:, :-1]  # position t predicts token t + 1
    logp = torch.log_softmax(logits / (temperature or 1.0), -1).gather(
        -1, out.tokens[:, 1:, None])[..., 0]
    mask = out.mask[:, 1:]
    assert out.mask[:, : out.prompt_len].sum() == 0
    assert torch.allclose(out.logprobs[:, 1:][mask], logp[mask], atol=1e-4)
    assert (out.logprobs[~out.mask] == 0).all()
    assert out.logprobs.dtype == torch.float32 and (out.logprobs[out.mask] <= 0).all()


def test_bf16_model_runs_in_bf16(tmp_path_factory):
    """A bf16 model is sampled in bf16: log-probs within bf16 noise of its own teacher-forced
    forward."""
    config = Qwen2Config(vocab_size=48, num_attention_heads=4, num_key_value_heads=2, **SMALL)
    model = build(tmp_path_factory, config).to(torch.bfloat16)
    out = rollout.generate(model, PROMPTS, 4, 10, seed=1)
    logits = teacher_forced_logits(model, out)[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, out.tokens[:, 1:, None])[..., 0]
    mask = out.mask[:, 1:]
    assert out.logprobs.dtype == torch.float32
    assert torch.allclose(out.logprobs[:, 1:][mask], logp[mask], atol=2e-2)


def test_fp32_weights_are_sampled_in_the_devices_sample_dtype(model, monkeypatch):
    """On CUDA the trainer keeps fp32 master weights and samples in bf16: the sampler casts once per
    call, and samples exactly what the same model loaded in bf16 samples (checked here with CPU set
    to bf16)."""
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    expected = rollout.generate(bf16_model, PROMPTS, 2, 8, seed=3)
    monkeypatch.setitem(llama_forward.SAMPLE_DTYPE, "cpu", torch.bfloat16)
    out = rollout.generate(model, PROMPTS, 2, 8, seed=3)
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched
    assert torch.equal(out.tokens, expected.tokens)
    # log-probs within bf16 noise: model.to(bf16) also rounds RoPE's frequencies, the sampler's cast
    # does not
    assert torch.allclose(out.logprobs, expected.logprobs, atol=1e-2)
    assert llama_forward.Weights(model, 16).dtype == torch.bfloat16 \
        and llama_forward.Weights(bf16_model, 16).layers[0].q.dtype == torch.bfloat16


def test_stop_tokens_mask_and_truncation(model):
    """Each row's mask covers its completion up to and including its first stop token; pads after
    it."""
    stop_ids = (3, 17, 29)
    out = rollout.generate(model, PROMPTS, 8, 12, stop_ids=stop_ids, seed=3)
    L = out.prompt_len
    assert out.tokens.shape == out.mask.shape == out.attention_mask.shape == out.logprobs.shape
    assert out.tokens.shape[0] == len(PROMPTS) * 8 and out.tokens.shape[1] <= L + 12
    ids, prompt_mask = left_pad(PROMPTS)
    assert torch.equal(out.tokens[:, :L], ids.repeat_interleave(8, 0))
    assert torch.equal(out.attention_mask[:, :L], prompt_mask.bool().repeat_interleave(8, 0))
    assert torch.equal(out.attention_mask[:, L:], out.mask[:, L:])
    for row in range(out.tokens.shape[0]):
        completion = out.tokens[row, L:].tolist()
        length = int(out.mask[row].sum())
        assert out.mask[row, L : L + length].all() and not out.mask[row, L + length :].any()
        stops = [i for i, t in enumerate(completion[:length]) if t in stop_ids]
        if out.truncated[row]:
            assert length == 12 and not stops
        else:
            assert stops == [length - 1], "a row ends exactly at its first stop token"
            assert all(t == 0 for t in completion[length:])
    assert out.truncated.any() and not out.truncated.all()
    assert out.tokens.shape[1] == L + int(out.mask.sum(1).max()), \
        "T is the longest completion generated"


def test_same_seed_same_rollout_other_seed_differs(model):
    first = rollout.generate(model, PROMPTS, 4, 10, seed=5)
    again = rollout.generate(model, PROMPTS, 4, 10, seed=5)
    other = rollout.generate(model, PROMPTS, 4, 10, seed=6)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.logprobs, again.logprobs)
    assert not torch.equal(first.tokens, other.tokens)


def test_every_prompt_prefilled_once(model, monkeypatch):
    """N samples of a prompt share one prefill, even when its rows span several chunks (max_rows <
    N)."""
    prefilled = []
    real_prefill = llama_forward.prefill

    def counting_prefill(weights, cache, prompt_ids, prompt_mask, first):
        prefilled.append(prompt_ids.shape[0])
        return real_prefill(weights, cache, prompt_ids, prompt_mask, first)

    monkeypatch.setattr(llama_forward, "prefill", counting_prefill)
    out = rollout.generate(model, PROMPTS, 40, 4, max_rows=16)  # 160 rows, 16 at a time
    assert sum(prefilled) == len(PROMPTS)
    assert out.tokens.shape[0] == 160
    # Prefill forwards are bounded too: 8 padded tokens each here, one prompt at a time.
    prefilled.clear()
    monkeypatch.setattr(rollout, "PREFILL_TOKENS", 8)
    bounded = rollout.generate(model, PROMPTS, 2, 6, temperature=0)
    assert prefilled == [1, 1, 1, 1]
    monkeypatch.undo()
    assert torch.equal(bounded.tokens, rollout.generate(model, PROMPTS, 2, 6, temperature=0).tokens)


@torch.no_grad()  # as inside generate: the forward writes activations in place
# a shared prefix; one row per prompt (one cache for both)
@pytest.mark.parametrize("samples", [3, 1])
def test_bucketed_attention_masks_unwritten_columns(model, samples):
    """Reading past the written completion columns (what CUDA graphs do, up to a bucket edge)
    changes nothing, whatever stale values those columns hold."""
    prompts, steps = len(PROMPTS), 5
    weights = llama_forward.Weights(model, 64)
    ids, mask = left_pad(PROMPTS)
    results = []
    for kv_len in (None, 12):  # the exact length, and the cache read up to column 12
        cache = llama_forward.KVCache(weights, prompts, ids.shape[1], prompts * samples, 16)
        cache.k.normal_(), cache.v.normal_()  # stale keys/values from an earlier chunk
        assert cache.shared == (samples > 1)
        logits = llama_forward.prefill(weights, cache, ids,
                                       mask.bool()).repeat_interleave(samples, 0)
        for step in range(steps):
            token = logits.argmax(-1)
            position = mask.sum(-1).repeat_interleave(samples) + step
            logits = llama_forward.decode_step(token, position, step, prompts, samples, kv_len,
                                         weights=weights, cache=cache)
        results.append(logits)
    assert torch.allclose(results[0], results[1], atol=1e-5)


# chunks of 1 prompt x 3; of 3 prompts, then 1
@pytest.mark.parametrize("n, max_rows", [(3, 5), (1, 3)])
def test_cuda_graph_decode_plumbing(model, monkeypatch, n, max_rows):
    """CudaGraphDecode's static inputs, per-shape graphs and bucketed attention, with graph capture
    replaced by eager replays of the captured step (no GPU here): greedy tokens equal the eager
    sampler's."""

    # replay() re-runs the step on the static inputs, as a real graph replays its kernels
    class EagerGraph:
        def __init__(self, decoder, key, step):
            self.decoder, self.key, self.step = decoder, key, step

        def replay(self):
            self.decoder.logits[self.key] = self.step()

    monkeypatch.setattr(llama_forward.CudaGraphDecode, "capture",
                        lambda self, key, step: EagerGraph(self, key, step))
    monkeypatch.setattr(llama_forward, "make_decoder", llama_forward.CudaGraphDecode)
    # 10 steps read 4, 8, then all 10 completion columns
    monkeypatch.setattr(llama_forward, "KV_BUCKET", 4)
    graphed = rollout.generate(model, PROMPTS, n, 10, temperature=0, max_rows=max_rows)
    monkeypatch.undo()
    eager = rollout.generate(model, PROMPTS, n, 10, temperature=0, max_rows=max_rows)
    assert torch.equal(graphed.tokens, eager.tokens)
    assert torch.allclose(graphed.logprobs, eager.logprobs, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Sampling follows the model's distribution.


def test_samples_follow_the_model_distribution(peaked_model):
    """The first two tokens of 6000 samples match p(a) · p(b | a) of the model (chi-square on 36
    cells)."""
    prompt, temperature, n = [1, 4, 2], 0.8, 6000
    out = rollout.generate(peaked_model, [prompt], n, 2, temperature=temperature, seed=0,
                           max_rows=n)
    first, second = out.tokens[:, -2], out.tokens[:, -1]
    with torch.no_grad():  # p(a | prompt) and p(b | prompt, a) for every a, by teacher forcing
        continuations = torch.tensor([prompt + [a] for a in range(6)])
        # [6, 2, V]
        probs = torch.softmax(peaked_model(continuations).logits[:, -2:] / temperature, -1)
    expected = probs[0, 0][:, None] * probs[:, 1]  # [a, b]
    observed = torch.zeros(6, 6).index_put_((first, second), torch.ones(n), accumulate=True)
    stat, dof = chi_square(observed.flatten(), n * expected.flatten())
    assert stat < chi_square_bound(dof), (stat, dof)
    assert expected.max() < 0.9, "the test needs a distribution with several likely tokens"


@pytest.mark.parametrize("top_p, top_k", [(1.0, 2), (0.8, 0), (0.9, 3)])
def test_top_p_top_k_keep_set(peaked_model, top_p, top_k):
    """Every sampled token lies in the kept set of the teacher-forced distribution at its position,
    and the first token follows the distribution renormalised over that set."""
    prompt, n = [2, 5, 1, 3], 3000
    out = rollout.generate(peaked_model, [prompt], n, 3, top_p=top_p, top_k=top_k, seed=2,
                           max_rows=n)
    # [n, 3, V]
    probs = torch.softmax(teacher_forced_logits(peaked_model, out)[:, len(prompt) - 1 : -1], -1)
    order = probs.argsort(-1, descending=True)
    sorted_probs = probs.gather(-1, order)
    if top_k:  # as HF: top-k first, then top-p over the renormalised survivors
        sorted_probs = sorted_probs * (torch.arange(6) < top_k)
        sorted_probs = sorted_probs / sorted_probs.sum(-1, keepdim=True)
    # smallest head >= top_p
    kept_sorted = (sorted_probs > 0) & ((sorted_probs.cumsum(-1) - sorted_probs) < top_p)
    kept = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)  # [n, 3, V]
    sampled = out.tokens[:, len(prompt) :]
    assert kept.gather(-1, sampled[..., None]).all()
    renormalised = probs[0, 0] * kept[0, 0] / (probs[0, 0] * kept[0, 0]).sum()
    observed = torch.bincount(sampled[:, 0], minlength=6).float()
    stat, dof = chi_square(observed, n * renormalised)
    assert kept[0, 0].sum() >= 2 and stat < chi_square_bound(dof), (stat, dof)


def test_samples_sharing_a_prefix_are_independent(peaked_model):
    """Rows 2j and 2j+1 (same prompt, same prefill) are independent: chi-square on their joint
    counts."""
    n = 8000
    out = rollout.generate(peaked_model, [[3, 3, 1]], n, 1, seed=4, max_rows=n)
    token = out.tokens[:, -1].view(-1, 2)  # [n/2, 2]
    joint = torch.zeros(6, 6).index_put_((token[:, 0], token[:, 1]), torch.ones(n // 2),
                                         accumulate=True)
    expected = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True) / joint.sum()
    stat, _ = chi_square(joint.flatten(), expected.flatten())
    used = (joint.sum(1) > 0).sum().item()
    assert used >= 2 and stat < chi_square_bound((used - 1) ** 2), stat


def test_bad_arguments_raise_one_clear_error(model):
    with pytest.raises(ValueError, match="at least one token"):
        rollout.generate(model, [[1, 2], []], 2, 4)
    with pytest.raises(ValueError, match="top_p"):
        rollout.generate(model, PROMPTS, 2, 4, top_p=0.0)


# --------------------------------------------------------------------------------------------------
# bench/rollout.py's GPU-only part, smoke: it runs on CPU too, so it cannot rot unseen between GPU
# sessions.


def test_decode_roofline_of_the_benchmark_runs_and_reports_its_bytes():
    """The roofline report reads every weight once plus each row's KV cache up to the halfway step:
    for the tiny Llama, batch 8, 10-token prompts, 16 new tokens, that is 8 x 19 tokens of KV."""
    code = (
        "import runpy; bench = runpy.run_path('bench/rollout.py', run_name='bench');"
        "model = bench['tiny_llama']();"
        "bench['decode_roofline'](model, bench['random_prompts'](8, 10, 10, 64), 16, 'H100 SXM')"
    )
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("  decode step at 19 tokens of context, batch 8:")
    layers, kv_heads, head_dim, params = 3, 4, 32, (128 * 64 + 3 * (4 * 128 * 128 + 3 * 128 * 384
                                                                    + 2 * 128) + 128)
    weight_bytes, kv_bytes = 4 * params, 8 * 19 * 2 * layers * kv_heads * head_dim * 4
    assert lines[1].split()[-1] == f"{kv_bytes / 1e9:.3g})" \
        and f"(weights {weight_bytes / 1e9:.3g}," in lines[1]
    assert lines[2].startswith("  roofline fraction") and "of 3.35 TB/s" in lines[2]
