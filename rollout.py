"""The hand-written batched sampler: N completions for each of P prompts, with per-token log-probs.

Read it top to bottom: `generate` (the loop over prompt groups and row chunks), `decode_rows` (one
chunk's decode loop), then sampling. The forward pass itself (weights, static KV cache, `prefill`,
`decode_step`, CUDA graphs) is llama_forward.py.

Prefix sharing (BroRL's N=512 samples per prompt): each prompt is prefilled once, and its
keys/values are *shared*, not copied, by its N rows. A decode step scores each row's query against
its prompt's keys with the N rows batched as N queries of one matrix product, so the prompt's keys
are read once per step instead of N times, and only the completions' keys/values are stored per
row. (With N=1 there is nothing to share: each row's cache then holds its prompt and its
completion, and a decode step scores them with one product instead of two.)

Layout of one rollout (row i is sample i % n of prompt i // n):

    tokens  [P·N, T]   pad pad p p p p | c c c STOP pad pad
    mask    [P·N, T]    0   0  0 0 0 0 | 1 1 1  1    0   0   (completion tokens, stop included)
                       <-- L = longest prompt --> <-- longest completion generated -->

Log-probs are those of the temperature-scaled distribution softmax(logits / temperature), *not*
renormalised over the top-p / top-k kept set: that is the distribution the trainer's teacher-forced
forward recomputes (same temperature, positions from `llama_forward.position_ids`), so the
importance ratio exp(logp - old_logp) starts at 1. With temperature=0 (greedy) they are those of
softmax(logits).

The sampler runs in the model's own dtype, except that fp32 weights (the trainer's master copy) are
sampled in bf16 on CUDA (llama_forward.SAMPLE_DTYPE); logits are cast to float32 before sampling. It
never calls `model.forward` or `model.generate`: it reads the HF module's weights and runs its own
forward, which is what makes it fast (no per-call overhead, one static KV cache, decode replayed
from CUDA graphs on GPU).
"""

import dataclasses
from dataclasses import dataclass

import torch

import llama_forward

# rows decoded together by default, at most: more gains little, and logits [rows, V] grow
MAX_ROWS = 1024
# ... and never more than a KV cache of this size holds (CPU), or of a quarter of
KV_CACHE_BYTES = 4 * 2**30
# the GPU's memory: its total, not what is free now, so that the chunking, and with it the samples a
# seed gives, does not depend on what else is allocated (a resumed run samples as the uninterrupted
# one would)
PREFILL_TOKENS = 16384  # padded prompt tokens per prefill forward, at most: bounds its activations


@dataclass
class Rollout:
    tokens: torch.Tensor  # long [P·N, T]: left-padded prompt, then completion, then pad_id
    attention_mask: torch.Tensor  # bool [P·N, T]: True on real prompt and completion tokens
    mask: torch.Tensor  # bool [P·N, T]: True on completion tokens (the stop token included)
    logprobs: torch.Tensor  # float32 [P·N, T]: log p(token | prefix) where mask, else 0
    truncated: torch.Tensor  # bool [P·N]: reached max_new_tokens without a stop token
    prompt_len: int  # L: completions start at column L


def select_rows(batch: Rollout, rows) -> Rollout:
    """The rows `rows` (an index, slice or bool mask) of a rollout."""
    return Rollout(batch.tokens[rows], batch.attention_mask[rows], batch.mask[rows],
                   batch.logprobs[rows], batch.truncated[rows], batch.prompt_len)


def to_device(batch: Rollout, device) -> Rollout:
    """The same rollout with every tensor on `device`."""
    return Rollout(**{f.name: getattr(batch, f.name).to(device)
                      if isinstance(getattr(batch, f.name), torch.Tensor)
                      else getattr(batch, f.name) for f in dataclasses.fields(Rollout)})


def concat_rows(batches: list[Rollout], pad_id: int) -> Rollout:
    """Stack rollouts of different widths, right-padding the narrower ones (pads are masked out)."""
    width = max(b.tokens.shape[1] for b in batches)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return Rollout(torch.cat([pad(b.tokens, pad_id) for b in batches]),
                   torch.cat([pad(b.attention_mask, False) for b in batches]),
                   torch.cat([pad(b.mask, False) for b in batches]),
                   torch.cat([pad(b.logprobs, 0.0) for b in batches]),
                   torch.cat([b.truncated for b in batches]), min(b.prompt_len for b in batches))


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompts: list[list[int]],
    n: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: tuple[int, ...] | list[int] = (),
    seed: int = 0,
    pad_id: int = 0,
    max_rows: int | None = None,
) -> Rollout:
    """Sample n completions for each prompt (a list of token-id lists); see the module docstring.

    Rows are decoded max_rows at a time (default MAX_ROWS), and never more than a KV cache of
    KV_CACHE_BYTES on CPU, a quarter of the GPU's memory on GPU, holds: memory is bounded whatever
    P·N and max_rows are. The same arguments and seed give the same rollout on the same kind of
    device."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least "
                         "one token.")
    if n < 1 or max_new_tokens < 1 or (max_rows is not None and max_rows < 1):
        raise ValueError("n, max_new_tokens and max_rows must all be at least 1.")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0.")
    was_training = model.training
    model.eval()
    num_prompts, prompt_len = len(prompts), max(len(p) for p in prompts)
    num_rows = num_prompts * n
    weights = llama_forward.Weights(model, prompt_len + max_new_tokens)
    device = weights.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    budget = (torch.cuda.get_device_properties(device).total_memory // 4
              if device.type == "cuda" else KV_CACHE_BYTES)
    rows_that_fit = max(1, budget // (weights.kv_bytes_per_token * (prompt_len + max_new_tokens)))
    max_rows = min(max_rows or MAX_ROWS, rows_that_fit)

    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)  # [P]
    # [P, L]
    prompt_mask = torch.arange(prompt_len, device=device) >= prompt_len - prompt_lens[:, None]
    # [P, L]
    prompt_ids = torch.full((num_prompts, prompt_len), pad_id, dtype=torch.long, device=device)
    prompt_ids[prompt_mask] = torch.tensor([t for p in prompts for t in p], dtype=torch.long,
                                           device=device)

    # A chunk of rows is either whole prompts (p prompts x n samples, p·n <= max_rows) or, when n >
    # max_rows, a run of one prompt's samples; either way its rows are contiguous in the output.
    samples_per_chunk = min(n, max_rows)
    prompts_per_group = min(max_rows // samples_per_chunk, num_prompts)
    prompts_per_prefill = max(1, PREFILL_TOKENS // prompt_len)
    # One static cache for the whole call, reused by every chunk (CUDA graphs need fixed addresses).
    cache = llama_forward.KVCache(weights, prompts_per_group, prompt_len,
                                  prompts_per_group * samples_per_chunk, max_new_tokens)
    decode = llama_forward.make_decoder(weights, cache)

    # (first row, completion [R, S], log-probs [R, S], completion mask [R, S], stopped [R])
    chunks = []
    for first_prompt in range(0, num_prompts, prompts_per_group):
        group = slice(first_prompt, min(first_prompt + prompts_per_group, num_prompts))
        prefix_logits = []  # [p, V] in pieces; each prompt prefilled once
        for first in range(group.start, group.stop, prompts_per_prefill):
            piece = slice(first, min(first + prompts_per_prefill, group.stop))
            prefix_logits.append(llama_forward.prefill(weights, cache, prompt_ids[piece],
                                                       prompt_mask[piece], first - group.start))
        prefix_logits = torch.cat(prefix_logits)
        for first_sample in range(0, n, samples_per_chunk):
            samples = min(samples_per_chunk, n - first_sample)
            completion = decode_rows(
                decode, prefix_logits, prompt_lens[group], samples, max_new_tokens,
                temperature, top_p, top_k, stop_ids, pad_id, generator,
            )
            chunks.append((first_prompt * n + first_sample, *completion))

    # Assemble [P·N, T]: T = L + the longest completion any chunk generated.
    end = prompt_len + max(completion.shape[1] for _, completion, *_ in chunks)
    tokens = torch.full((num_rows, end), pad_id, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = prompt_ids.repeat_interleave(n, dim=0)
    mask = torch.zeros(num_rows, end, dtype=torch.bool, device=device)
    logprobs = torch.zeros(num_rows, end, dtype=torch.float32, device=device)
    truncated = torch.zeros(num_rows, dtype=torch.bool, device=device)
    for first_row, completion, completion_logp, completion_mask, stopped in chunks:
        rows = slice(first_row, first_row + completion.shape[0])
        columns = slice(prompt_len, prompt_len + completion.shape[1])
        tokens[rows, columns] = completion
        logprobs[rows, columns] = completion_logp
        mask[rows, columns] = completion_mask
        truncated[rows] = ~stopped
    attention_mask = mask.clone()
    attention_mask[:, :prompt_len] = prompt_mask.repeat_interleave(n, dim=0)
    model.train(was_training)
    return Rollout(tokens, attention_mask, mask, logprobs, truncated, prompt_len)


def decode_rows(
    decode, prefix_logits, prompt_lens, samples, max_new_tokens, temperature, top_p, top_k,
    stop_ids, pad_id, generator,
):
    """The decode loop of one chunk: `samples` rows for each of the p prompts
    prefilled into the cache.

    prefix_logits float32 [p, V] (of each prompt's first completion token), prompt_lens [p]. Returns
    the completions [R, S], their log-probs [R, S], the completion mask [R, S] and whether each row
    stopped [R], R = p·samples, S <= max_new_tokens the number of steps run (the loop ends once
    every row has stopped)."""
    num_prompts = prefix_logits.shape[0]
    num_rows, device = num_prompts * samples, prefix_logits.device
    logits = prefix_logits.repeat_interleave(samples, dim=0)  # [R, V]
    # [R] position of each row's first completion token
    positions = prompt_lens.repeat_interleave(samples)
    completion = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    completion_logp = torch.zeros(num_rows, max_new_tokens, dtype=torch.float32, device=device)
    completion_mask = torch.zeros(num_rows, max_new_tokens, dtype=torch.bool, device=device)
    stopped = torch.zeros(num_rows, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token, token_logp = sample_tokens(logits, temperature, top_p, top_k, generator)
        # Rows that already stopped keep decoding (the batch stays rectangular) but their tokens are
        # pads outside the mask: they get no log-prob and, in the trainer, no gradient.
        completion_mask[:, step] = ~stopped
        completion[:, step] = torch.where(stopped, pad_id, token)
        completion_logp[:, step] = torch.where(stopped, 0.0, token_logp)
        stopped |= torch.isin(token, stop_ids)
        if step == max_new_tokens - 1 or bool(stopped.all()):
            break
        logits = decode(token, positions + step, step, num_prompts, samples)
    steps = step + 1
    return completion[:, :steps], completion_logp[:, :steps], completion_mask[:, :steps], stopped


# --------------------------------------------------------------------------------------------------
# Sampling


def sample_tokens(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [R, V] -> (token [R], its log-prob under softmax(logits / temperature) [R]).

    temperature=0 is greedy (log-prob under softmax(logits)). top-k / top-p restrict which tokens
    can be drawn; the returned log-prob is still that of the full tempered distribution (module
    docstring)."""
    if temperature == 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits if temperature == 1 else logits / temperature, -1)  # [R, V]
    kept_logp = logp
    if 0 < top_k < logp.shape[-1]:
        kth_best = logp.topk(top_k, -1).values[:, -1:]  # [R, 1]
        kept_logp = kept_logp.masked_fill(kept_logp < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = kept_logp.sort(-1, descending=True)
        sorted_probs = sorted_logp.exp()
        # Keep the smallest head of the sorted vocabulary whose mass reaches top_p (of what top-k
        # kept): a token is dropped when the mass before it already reaches it; the most likely is
        # always kept.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= top_p * sorted_probs.sum(-1, keepdim=True)
        # back to vocabulary order
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        kept_logp = kept_logp.masked_fill(drop, float("-inf"))
    # Exponential race (as in gpt-fast): argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p, with
    # no renormalisation needed. E = -log(U), U ~ U[0, 1), is never 0, so p_i / E_i is never 0/0.
    exponential = torch.rand(kept_logp.shape, generator=generator,
                             device=kept_logp.device).log_().neg_()
    token = (kept_logp.exp() / exponential).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)
