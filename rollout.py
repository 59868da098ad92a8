"""The hand-written batched sampler: N completions for each of P prompts, with per-token log-probs.

Read it top to bottom: `generate` (the loop over prompt groups and row chunks), `decode_rows` (one chunk's
decode loop), then the forward pass of a Llama / Qwen2 causal LM written out with a static KV cache
(`prefill`, `decode_step`), the CUDA-graph wrapper, and sampling.

Prefix sharing (BroRL's N=512 samples per prompt): each prompt is prefilled once, and its keys/values are
*shared*, not copied, by its N rows. A decode step scores each row's query against its prompt's keys
with the N rows batched as N queries of one matrix product, so the prompt's keys are read once per step
instead of N times, and only the completions' keys/values are stored per row. (With N=1 there is
nothing to share: each row's cache then holds its prompt and its completion, and a decode step scores
them with one product instead of two.)

Layout of one rollout (row i is sample i % n of prompt i // n):

    tokens  [P·N, T]   pad pad p p p p | c c c STOP pad pad
    mask    [P·N, T]    0   0  0 0 0 0 | 1 1 1  1    0   0     (completion tokens, the stop included)
                       <-- L = longest prompt --> <-- longest completion generated -->

Log-probs are those of the temperature-scaled distribution softmax(logits / temperature), *not*
renormalised over the top-p / top-k kept set: that is the distribution the trainer's teacher-forced
forward recomputes (same temperature, positions from `position_ids`), so the importance ratio
exp(logp - old_logp) starts at 1. With temperature=0 (greedy) they are those of softmax(logits).

The sampler runs in the model's own dtype, except that fp32 weights (the trainer's master copy) are
sampled in bf16 on CUDA (SAMPLE_DTYPE); logits are cast to float32 before sampling. It never calls
`model.forward` or `model.generate`: it reads the HF module's weights and runs its own forward, which is
what makes it fast (no per-call overhead, one static KV cache, decode replayed from CUDA graphs on GPU).
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

MAX_ROWS = 1024  # rows decoded together by default, at most: more gains little, and logits [rows, V] grow
KV_CACHE_BYTES = 4 * 2**30  # ... and never more than a KV cache of this size holds (CPU), or of a quarter of
# the GPU's memory: its total, not what is free now, so that the chunking, and with it the samples a seed
# gives, does not depend on what else is allocated (a resumed run samples as the uninterrupted one would)
# By device type: what fp32 weights are sampled in, and what the trainer's forwards compute in (model.compute_dtype);
# fp32 elsewhere.
SAMPLE_DTYPE = {"cuda": torch.bfloat16}
KV_BUCKET = 256  # on CUDA, decode attends over the completion cache rounded up to this many columns
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


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: bool [B, T] -> long [B, T] = cumsum(mask) - 1, pads clamped to 0.

    The sampler and the trainer's teacher-forced forward both use these, so their log-probs agree."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


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
    KV_CACHE_BYTES on CPU, a quarter of the GPU's memory on GPU, holds: memory is bounded whatever P·N
    and max_rows are. The same arguments and seed give the same rollout on the same kind of device."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token.")
    if n < 1 or max_new_tokens < 1 or (max_rows is not None and max_rows < 1):
        raise ValueError("n, max_new_tokens and max_rows must all be at least 1.")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0.")
    was_training = model.training
    model.eval()
    num_prompts, prompt_len = len(prompts), max(len(p) for p in prompts)
    num_rows = num_prompts * n
    weights = Weights(model, prompt_len + max_new_tokens)
    device = weights.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    budget = torch.cuda.get_device_properties(device).total_memory // 4 if device.type == "cuda" else KV_CACHE_BYTES
    rows_that_fit = max(1, budget // (weights.kv_bytes_per_token * (prompt_len + max_new_tokens)))
    max_rows = min(max_rows or MAX_ROWS, rows_that_fit)

    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)  # [P]
    prompt_mask = torch.arange(prompt_len, device=device) >= prompt_len - prompt_lens[:, None]  # [P, L]
    prompt_ids = torch.full((num_prompts, prompt_len), pad_id, dtype=torch.long, device=device)  # [P, L]
    prompt_ids[prompt_mask] = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)

    # A chunk of rows is either whole prompts (p prompts x n samples, p·n <= max_rows) or, when n > max_rows,
    # a run of one prompt's samples; either way its rows are contiguous in the output.
    samples_per_chunk = min(n, max_rows)
    prompts_per_group = min(max_rows // samples_per_chunk, num_prompts)
    prompts_per_prefill = max(1, PREFILL_TOKENS // prompt_len)
    # One static cache for the whole call, reused by every chunk (CUDA graphs need fixed addresses).
    cache = KVCache(weights, prompts_per_group, prompt_len, prompts_per_group * samples_per_chunk, max_new_tokens)
    decode = make_decoder(weights, cache)

    chunks = []  # (first row, completion [R, S], log-probs [R, S], completion mask [R, S], stopped [R])
    for first_prompt in range(0, num_prompts, prompts_per_group):
        group = slice(first_prompt, min(first_prompt + prompts_per_group, num_prompts))
        prefix_logits = []  # [p, V] in pieces; each prompt prefilled once
        for first in range(group.start, group.stop, prompts_per_prefill):
            piece = slice(first, min(first + prompts_per_prefill, group.stop))
            prefix_logits.append(prefill(weights, cache, prompt_ids[piece], prompt_mask[piece], first - group.start))
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
    decode, prefix_logits, prompt_lens, samples, max_new_tokens, temperature, top_p, top_k, stop_ids, pad_id,
    generator,
):
    """The decode loop of one chunk: `samples` rows for each of the p prompts prefilled into the cache.

    prefix_logits float32 [p, V] (of each prompt's first completion token), prompt_lens [p]. Returns the
    completions [R, S], their log-probs [R, S], the completion mask [R, S] and whether each row stopped [R],
    R = p·samples, S <= max_new_tokens the number of steps run (the loop ends once every row has stopped)."""
    num_prompts = prefix_logits.shape[0]
    num_rows, device = num_prompts * samples, prefix_logits.device
    logits = prefix_logits.repeat_interleave(samples, dim=0)  # [R, V]
    positions = prompt_lens.repeat_interleave(samples)  # [R] position of each row's first completion token
    completion = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    completion_logp = torch.zeros(num_rows, max_new_tokens, dtype=torch.float32, device=device)
    completion_mask = torch.zeros(num_rows, max_new_tokens, dtype=torch.bool, device=device)
    stopped = torch.zeros(num_rows, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token, token_logp = sample(logits, temperature, top_p, top_k, generator)
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


# ----------------------------------------------------------------------------------------------------
# The forward pass, written out for Llama / Qwen2 (Qwen2 = Llama + biases on q, k, v).


def check_supported(config) -> None:
    """A one-line ValueError unless the sampler implements this model's forward pass (Llama / Qwen2)."""
    if config.model_type not in ("llama", "qwen2"):
        raise ValueError(f"rollout.generate supports Llama and Qwen2 models, not {config.model_type!r}.")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("rollout.generate does not implement sliding-window attention.")
    if (getattr(config, "rope_scaling", None) or {}).get("rope_type") == "dynamic":
        raise ValueError("rollout.generate does not implement dynamic NTK RoPE (its frequencies follow the "
                         "length of each forward, so sampler and trainer would disagree).")
    if config.hidden_act != "silu":
        raise ValueError(f"rollout.generate expects a SiLU MLP, not {config.hidden_act!r}.")


class Weights:
    """A Hugging Face Llama / Qwen2 causal LM's tensors, arranged for the sampler.

    Projection matrices are used input-major, [in, out], so each projection is `x @ w`: on CPU as
    contiguous copies (MKL's x @ w is ~20% faster than x @ wᵀ at these sizes; the copies are made once
    per `generate`, since the trainer changes the weights between calls), on GPU as views of the model's
    own tensors (cuBLAS reads either layout, and copies would double the model's memory), or bf16 copies of
    fp32 ones (half their size, once per call). RoPE's cos/sin
    come from the model's own rotary module (rope_theta, rope scaling) for positions 0..max_len-1."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        config = model.config
        check_supported(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.norm_eps = config.rms_norm_eps
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        # fp32 weights (the trainer's master copy) are sampled in SAMPLE_DTYPE where one is set (bf16 on CUDA):
        # the cast is a copy, made once per `generate`; bf16/fp16 weights are used as they are.
        self.dtype = SAMPLE_DTYPE.get(self.device.type, weight.dtype) if weight.dtype == torch.float32 else weight.dtype
        self.embed = weight.to(self.dtype)  # [V, d]
        self.final_norm = model.model.norm.weight.to(self.dtype)  # [d]
        self.lm_head = input_major(model.lm_head.weight, self.dtype)  # [d, V]
        self.kv_bytes_per_token = (  # a key and a value per layer and kv head
            2 * config.num_hidden_layers * self.num_kv_heads * self.head_dim * self.embed.element_size()
        )
        self.layers = [LayerWeights.of(layer, self.dtype) for layer in model.model.layers]
        positions = torch.arange(max_len, device=self.device)[None]  # [1, max_len]
        cos, sin = model.model.rotary_emb(self.embed[:1], positions)  # [1, max_len, D] each
        half = self.head_dim // 2
        self.cos = cos[0]  # [max_len, D]
        self.signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # [max_len, D], see apply_rope_


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [d]
    q: torch.Tensor  # [d, H·D]
    k: torch.Tensor  # [d, Hkv·D]
    v: torch.Tensor  # [d, Hkv·D]
    o: torch.Tensor  # [H·D, d]
    mlp_norm: torch.Tensor  # [d]
    gate: torch.Tensor  # [d, F]
    up: torch.Tensor  # [d, F]
    down: torch.Tensor  # [F, d]
    biases: dict[str, torch.Tensor]  # by projection name: Qwen2's q/k/v; Llama's with attention_bias / mlp_bias

    @staticmethod
    def of(layer: torch.nn.Module, dtype: torch.dtype) -> "LayerWeights":
        attn, mlp = layer.self_attn, layer.mlp
        linears = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
                   "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
        return LayerWeights(
            attn_norm=layer.input_layernorm.weight.to(dtype),
            mlp_norm=layer.post_attention_layernorm.weight.to(dtype),
            biases={name: linear.bias.to(dtype) for name, linear in linears.items() if linear.bias is not None},
            **{name: input_major(linear.weight, dtype) for name, linear in linears.items()},
        )

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] @ w [in, out] (+ bias [out])."""
        bias = self.biases.get(name)
        weight = getattr(self, name)
        return x @ weight if bias is None else torch.addmm(bias, x, weight)


def input_major(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.Linear's [out, in] weight as [in, out] in `dtype`: a contiguous copy on CPU, a view elsewhere unless
    the dtype changes (see Weights)."""
    return weight.t().contiguous().to(dtype) if weight.device.type == "cpu" else weight.t().to(dtype)


class KVCache:
    """The static cache of one chunk: p prompts' keys/values, shared by their rows, and each row's own.

    prefix_k, prefix_v [layers, p, kv_heads, L, D]: the prompts (zero at pads), written by `prefill`;
    prefix_bias [p·kv_heads, 1, L]: 0 on real prompt tokens, -inf on pads;
    k, v [layers, rows, kv_heads, max_new_tokens, D]: each row's completion so far, written by `decode_step`.
    With one row per prompt (rows == p) there is nothing to share: prefix and completion are then two views
    of one tensor per row, context_k [layers, rows, kv_heads, L + max_new_tokens, D] (and context_v), so
    that a decode step scores the whole context with one product instead of two (`shared` is False).
    Zero-initialised: masked columns get softmax weight 0, and 0 · garbage would be NaN if garbage were
    NaN or inf (torch.empty can hold either)."""

    def __init__(self, weights: Weights, prompts: int, prompt_len: int, rows: int, max_new_tokens: int):
        layers, num_kv, head_dim = len(weights.layers), weights.num_kv_heads, weights.head_dim
        options = {"dtype": weights.dtype, "device": weights.device}
        self.shared = rows > prompts
        self.prefix_bias = torch.zeros(prompts * num_kv, 1, prompt_len, **options)
        if self.shared:
            self.prefix_k = torch.zeros(layers, prompts, num_kv, prompt_len, head_dim, **options)
            self.prefix_v = torch.zeros(layers, prompts, num_kv, prompt_len, head_dim, **options)
            self.k = torch.zeros(layers, rows, num_kv, max_new_tokens, head_dim, **options)
            self.v = torch.zeros(layers, rows, num_kv, max_new_tokens, head_dim, **options)
        else:
            self.context_k = torch.zeros(layers, rows, num_kv, prompt_len + max_new_tokens, head_dim, **options)
            self.context_v = torch.zeros(layers, rows, num_kv, prompt_len + max_new_tokens, head_dim, **options)
            self.prefix_k, self.k = self.context_k.split([prompt_len, max_new_tokens], dim=3)
            self.prefix_v, self.v = self.context_v.split([prompt_len, max_new_tokens], dim=3)
        self.prompt_len, self.max_new_tokens = prompt_len, max_new_tokens


# In-place ops (mul_, add_) below are not style: on CPU, every fresh activation tensor is one more trip
# through memory, and the prefill's activations do not fit in cache.


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm, x / sqrt(mean(x²) + eps) · weight: normalised in float32, cast back, then scaled."""
    hidden32 = hidden.float()
    return (hidden32 * torch.rsqrt(hidden32.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype).mul_(weight)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's half-split convention, in place: x <- x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1].

    x [..., D]; cos, signed_sin broadcastable to it, signed_sin = [-sin1, sin2] so that
    rotate_half(x)·sin = roll(x, D/2)·signed_sin (one op instead of slice, negate and concatenate)."""
    rotated = x.roll(x.shape[-1] // 2, dims=-1).mul_(signed_sin)
    return x.mul_(cos).add_(rotated)


def transformer(weights: Weights, input_ids: torch.Tensor, positions: torch.Tensor, attend) -> torch.Tensor:
    """Embedding -> layers -> final norm over a flat list of tokens: input_ids, positions [N] -> hidden [N, d].

    Everything but attention is the same for every token, so prefill packs the real prompt tokens (no
    pads) and decode passes one token per row. `attend(layer_index, q [N, H, D], k [N, Hkv, D], v) ->
    [N, H·D]` is the only part in which they differ: where keys/values go and which ones a query sees."""
    num_tokens = input_ids.shape[0]
    num_q, num_kv, head_dim = weights.num_heads, weights.num_kv_heads, weights.head_dim
    cos, signed_sin = weights.cos[positions][:, None], weights.signed_sin[positions][:, None]  # [N, 1, D]
    hidden = F.embedding(input_ids, weights.embed)  # [N, d]
    for layer_index, w in enumerate(weights.layers):
        x = rms_norm(hidden, w.attn_norm, weights.norm_eps)
        q = apply_rope_(w.project("q", x).view(num_tokens, num_q, head_dim), cos, signed_sin)  # [N, H, D]
        k = apply_rope_(w.project("k", x).view(num_tokens, num_kv, head_dim), cos, signed_sin)  # [N, Hkv, D]
        v = w.project("v", x).view(num_tokens, num_kv, head_dim)  # [N, Hkv, D]
        hidden.add_(w.project("o", attend(layer_index, q, k, v)))
        x = rms_norm(hidden, w.mlp_norm, weights.norm_eps)
        gate, up = w.project("gate", x), w.project("up", x)  # [N, F] each
        hidden.add_(w.project("down", F.silu(gate, inplace=True).mul_(up)))
    return rms_norm(hidden, weights.final_norm, weights.norm_eps)


def prefill(
    weights: Weights, cache: KVCache, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, first: int = 0
) -> torch.Tensor:
    """Run left-padded prompts [p, L] once, writing their keys/values into the cache's shared prefix at
    prompts first ... first + p - 1. Returns the float32 logits of each prompt's next token [p, V]."""
    num_prompts, prompt_len = prompt_ids.shape
    prompts = slice(first, first + num_prompts)  # their places in the cache
    bias = torch.zeros(num_prompts, prompt_len, dtype=weights.dtype, device=weights.device)
    bias.masked_fill_(~prompt_mask, float("-inf"))  # what decode steps add to their scores against the prompt
    num_kv = weights.num_kv_heads
    cache.prefix_bias[first * num_kv : (first + num_prompts) * num_kv] = bias.repeat_interleave(num_kv, 0)[:, None]
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=weights.device).tril()
    # A real token attends to the real tokens up to itself; a pad attends to itself only, so no softmax
    # row is empty (no NaN) and no real token ever sees a pad.
    eye = torch.eye(prompt_len, dtype=torch.bool, device=weights.device)
    attn_mask = ((causal & prompt_mask[:, None, :]) | eye)[:, None]  # [p, 1, L, L]

    def unpack(x: torch.Tensor) -> torch.Tensor:
        """Packed tokens [N, heads, D] back to their padded places [p, heads, L, D], zero at pads."""
        padded = x.new_zeros(num_prompts, prompt_len, *x.shape[1:])
        padded[prompt_mask] = x
        return padded.transpose(1, 2)

    def attend(layer_index, q, k, v):
        q, k, v = unpack(q), unpack(k), unpack(v)  # [p, H | Hkv | Hkv, L, D]
        cache.prefix_k[layer_index, prompts] = k  # zero keys/values at pads: masked,
        cache.prefix_v[layer_index, prompts] = v  # and never NaN
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, enable_gqa=weights.num_heads != weights.num_kv_heads
        )  # [p, H, L, D]
        return out.transpose(1, 2)[prompt_mask].flatten(1)  # [N, H·D]

    hidden = transformer(weights, prompt_ids[prompt_mask], position_ids(prompt_mask)[prompt_mask], attend)
    # Each prompt's last token is the last of its packed run; only it needs the lm_head.
    last_token = prompt_mask.sum(-1).cumsum(0) - 1  # [p]
    return (hidden[last_token] @ weights.lm_head).float()  # [p, V]


def decode_step(token: torch.Tensor, position: torch.Tensor, slot: int, prompts: int, samples: int,
                kv_len: int | None = None, *, weights: Weights, cache: KVCache) -> torch.Tensor:
    """One new token for each of R = prompts·samples rows (row r continues prompt r // samples):
    token, position [R] -> float32 logits [R, V].

    Its keys/values go to completion column `slot` (an int, or a 0-dim tensor inside a CUDA graph); a row
    attends to its prompt and to its completion columns [0, kv_len), kv_len = slot + 1 unless given (a
    bucket edge under CUDA graphs; columns past `slot` are masked)."""
    kv_len = slot + 1 if kv_len is None else kv_len
    slot = torch.as_tensor(slot, device=weights.device).view(1)
    rows, num_kv, head_dim = prompts * samples, weights.num_kv_heads, weights.head_dim
    group = weights.num_heads // num_kv  # query heads per kv head (GQA)
    scale = head_dim**-0.5
    prompt_len = cache.prompt_len
    prefix_bias = cache.prefix_bias[: prompts * num_kv]  # [p·Hkv, 1, L]
    own_bias = torch.zeros(1, 1, kv_len, dtype=weights.dtype, device=weights.device)  # [1, 1, kv_len]
    own_bias.masked_fill_(torch.arange(kv_len, device=weights.device) > slot, float("-inf"))

    if not cache.shared:  # one row per prompt: prompt and completion columns are one cache
        bias = torch.cat([prefix_bias, own_bias.expand(rows * num_kv, 1, kv_len)], dim=-1)  # [R·Hkv, 1, L + kv_len]
        columns = prompt_len + kv_len

        def attend(layer_index, q, k, v):
            context_k = cache.context_k[layer_index, :rows]  # [R, Hkv, L + max_new, D]
            context_v = cache.context_v[layer_index, :rows]
            context_k.index_copy_(2, slot + prompt_len, k[:, :, None])
            context_v.index_copy_(2, slot + prompt_len, v[:, :, None])
            context_k = context_k[:, :, :columns].flatten(0, 1)  # [R·Hkv, L + kv_len, D]
            context_v = context_v[:, :, :columns].flatten(0, 1)
            q_by_row = q.reshape(rows * num_kv, group, head_dim)
            scores = torch.baddbmm(bias, q_by_row, context_k.transpose(1, 2), alpha=scale)  # [R·Hkv, g, L + kv_len]
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            return (probs @ context_v).view(rows, -1)  # [R, H·D]

    else:
        def attend(layer_index, q, k, v):
            own_k = cache.k[layer_index, :rows]  # [R, Hkv, max_new, D]
            own_v = cache.v[layer_index, :rows]
            own_k.index_copy_(2, slot, k[:, :, None])
            own_v.index_copy_(2, slot, v[:, :, None])
            own_k = own_k[:, :, :kv_len].flatten(0, 1)  # [R·Hkv, kv_len, D]
            own_v = own_v[:, :, :kv_len].flatten(0, 1)
            prefix_k = cache.prefix_k[layer_index, :prompts].flatten(0, 1)  # [p·Hkv, L, D]
            prefix_v = cache.prefix_v[layer_index, :prompts].flatten(0, 1)
            # Against the shared prompt, the `samples` rows of a prompt and the `group` heads of a kv head are
            # one batch of samples·group queries: one matrix product reads the prompt's keys once.
            q_by_prompt = q.view(prompts, samples, num_kv, group, head_dim).transpose(1, 2)
            q_by_prompt = q_by_prompt.reshape(prompts * num_kv, samples * group, head_dim)
            prefix_scores = torch.baddbmm(prefix_bias, q_by_prompt, prefix_k.transpose(1, 2), alpha=scale)
            prefix_scores = prefix_scores.view(prompts, num_kv, samples, group, prompt_len).transpose(1, 2)
            q_by_row = q.reshape(rows * num_kv, group, head_dim)
            own_scores = torch.baddbmm(own_bias, q_by_row, own_k.transpose(1, 2), alpha=scale)  # [R·Hkv, g, kv_len]
            # One softmax over the prompt's keys and the row's own, in float32 as HF does.
            scores = torch.cat([prefix_scores.reshape(rows * num_kv, group, prompt_len), own_scores], dim=-1)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [R·Hkv, g, L + kv_len]
            prefix_probs, own_probs = probs.split([prompt_len, kv_len], dim=-1)
            prefix_probs = prefix_probs.reshape(prompts, samples, num_kv, group, prompt_len).transpose(1, 2)
            prefix_out = prefix_probs.reshape(prompts * num_kv, samples * group, prompt_len) @ prefix_v
            prefix_out = prefix_out.view(prompts, num_kv, samples, group, head_dim).transpose(1, 2)
            return prefix_out.reshape(rows, -1) + (own_probs @ own_v).view(rows, -1)  # [R, H·D]

    hidden = transformer(weights, token, position, attend)  # [R, d]
    return (hidden @ weights.lm_head).float()  # [R, V]


# ----------------------------------------------------------------------------------------------------
# CUDA graphs: a small model's decode step is hundreds of tiny kernels whose launch cost (Python + driver)
# would dominate; replaying a captured graph launches them all at once.


def make_decoder(weights: Weights, cache: KVCache):
    """decode(token, position, slot, prompts, samples) -> logits: replayed CUDA graphs on GPU, eager on CPU."""
    if weights.device.type == "cuda":
        return CudaGraphDecode(weights, cache)
    return partial(decode_step, weights=weights, cache=cache)


class CudaGraphDecode:
    """`decode_step` replayed from CUDA graphs, one per (prompts, samples, kv_len bucket).

    Attention reads the completion cache up to the next multiple of KV_BUCKET columns (unwritten columns
    are masked), so a 1024-token generation needs 4 graphs and reads at most KV_BUCKET - 1 extra columns
    per step. Graphs live for one `generate` call: they hold the addresses of this call's weights and cache."""

    def __init__(self, weights: Weights, cache: KVCache):
        self.weights, self.cache = weights, cache
        rows = cache.v.shape[1]
        self.token = torch.zeros(rows, dtype=torch.long, device=weights.device)  # static inputs
        self.position = torch.zeros(rows, dtype=torch.long, device=weights.device)
        self.slot = torch.zeros((), dtype=torch.long, device=weights.device)
        self.graphs, self.logits = {}, {}  # by (prompts, samples, kv_len): the graph and its output [R, V]
        self.pool = None  # one memory pool shared by this call's graphs

    def __call__(self, token: torch.Tensor, position: torch.Tensor, slot: int, prompts: int, samples: int):
        rows = prompts * samples
        kv_len = min(self.cache.max_new_tokens, -(-(slot + 1) // KV_BUCKET) * KV_BUCKET)  # next bucket edge
        self.token[:rows].copy_(token)
        self.position[:rows].copy_(position)
        self.slot.fill_(slot)
        key = (prompts, samples, kv_len)
        if key not in self.graphs:
            self.graphs[key] = self.capture(key, partial(
                decode_step, self.token[:rows], self.position[:rows], self.slot, prompts, samples, kv_len,
                weights=self.weights, cache=self.cache,
            ))
        self.graphs[key].replay()
        return self.logits[key]

    def capture(self, key: tuple[int, int, int], step) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (allocator, kernel selection), as torch.cuda.graphs recommends. The warm-up
        # writes this step's keys/values into the cache, exactly as the replay will again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[key] = step()
        return graph


# ----------------------------------------------------------------------------------------------------
# Sampling


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits float32 [R, V] -> (token [R], its log-prob under softmax(logits / temperature) [R]).

    temperature=0 is greedy (log-prob under softmax(logits)). top-k / top-p restrict which tokens can be
    drawn; the returned log-prob is still that of the full tempered distribution (module docstring)."""
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
        # Keep the smallest head of the sorted vocabulary whose mass reaches top_p (of what top-k kept):
        # a token is dropped when the mass before it already reaches it; the most likely is always kept.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= top_p * sorted_probs.sum(-1, keepdim=True)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        kept_logp = kept_logp.masked_fill(drop, float("-inf"))
    # Exponential race (as in gpt-fast): argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p, with no
    # renormalisation needed. E = -log(U), U ~ U[0, 1), is never 0, so p_i / E_i is never 0/0.
    exponential = torch.rand(kept_logp.shape, generator=generator, device=kept_logp.device).log_().neg_()
    token = (kept_logp.exp() / exponential).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)
