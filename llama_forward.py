"""The sampler's own forward pass of a Llama / Qwen2 causal LM (Qwen2 = Llama + biases on q, k, v):
the HF module's weights arranged for sampling, a static KV cache, `prefill`, `decode_step`, and CUDA
graphs that replay the decode step. rollout.py drives it; nano-vllm splits its engine and its layers
the same way.

It never calls `model.forward`: that is what makes it fast (no per-call overhead, one static KV
cache, decode replayed from CUDA graphs on GPU). Tests check it against HF's forward and
`model.generate`.
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

# By device type: what fp32 weights are sampled in, and what the trainer's forwards compute in
# (models.compute_dtype); fp32 elsewhere.
SAMPLE_DTYPE = {"cuda": torch.bfloat16}
KV_BUCKET = 256  # on CUDA, decode attends over the completion cache rounded up to this many columns


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: bool [B, T] -> long [B, T] = cumsum(mask) - 1, pads clamped to
    0.

    The sampler and the trainer's teacher-forced forward both use these, so their log-probs
    agree."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def check_supported(config) -> None:
    """A one-line ValueError unless the sampler implements this model's forward pass (Llama /
    Qwen2)."""
    if config.model_type not in ("llama", "qwen2"):
        raise ValueError("rollout.generate supports Llama and Qwen2 models, "
                         f"not {config.model_type!r}.")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("rollout.generate does not implement sliding-window attention.")
    if (getattr(config, "rope_scaling", None) or {}).get("rope_type") == "dynamic":
        raise ValueError("rollout.generate does not implement dynamic NTK RoPE (its frequencies "
                         "follow the length of each forward, so sampler and trainer would "
                         "disagree).")
    if config.hidden_act != "silu":
        raise ValueError(f"rollout.generate expects a SiLU MLP, not {config.hidden_act!r}.")


class Weights:
    """A Hugging Face Llama / Qwen2 causal LM's tensors, arranged for the sampler.

    Projection matrices are used input-major, [in, out], so each projection is `x @ w`: on CPU as
    contiguous copies (MKL's x @ w is ~20% faster than x @ wᵀ at these sizes; the copies are made
    once per `generate`, since the trainer changes the weights between calls), on GPU as views of
    the model's own tensors (cuBLAS reads either layout, and copies would double the model's
    memory), or bf16 copies of fp32 ones (half their size, once per call). RoPE's cos/sin
    come from the model's own rotary module (rope_theta, rope scaling) for positions
    0..max_len-1."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        config = model.config
        check_supported(config)
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = (getattr(config, "head_dim", None)
                         or config.hidden_size // config.num_attention_heads)
        self.norm_eps = config.rms_norm_eps
        weight = model.model.embed_tokens.weight
        self.device = weight.device
        # fp32 weights (the trainer's master copy) are sampled in SAMPLE_DTYPE where one is set
        # (bf16 on CUDA): the cast is a copy, made once per `generate`; bf16/fp16 weights are used
        # as they are.
        self.dtype = (SAMPLE_DTYPE.get(self.device.type, weight.dtype)
                      if weight.dtype == torch.float32 else weight.dtype)
        self.embed = weight.to(self.dtype)  # [V, d]
        self.final_norm = model.model.norm.weight.to(self.dtype)  # [d]
        self.lm_head = input_major(model.lm_head.weight, self.dtype)  # [d, V]
        self.kv_bytes_per_token = (  # a key and a value per layer and kv head
            2 * config.num_hidden_layers * self.num_kv_heads * self.head_dim
            * self.embed.element_size()
        )
        self.layers = [LayerWeights.of(layer, self.dtype) for layer in model.model.layers]
        positions = torch.arange(max_len, device=self.device)[None]  # [1, max_len]
        cos, sin = model.model.rotary_emb(self.embed[:1], positions)  # [1, max_len, D] each
        half = self.head_dim // 2
        self.cos = cos[0]  # [max_len, D]
        # [max_len, D], see apply_rope_
        self.signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)


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
    # by projection name: Qwen2's q/k/v; Llama's with attention_bias / mlp_bias
    biases: dict[str, torch.Tensor]

    @staticmethod
    def of(layer: torch.nn.Module, dtype: torch.dtype) -> "LayerWeights":
        attn, mlp = layer.self_attn, layer.mlp
        linears = {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
                   "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
        return LayerWeights(
            attn_norm=layer.input_layernorm.weight.to(dtype),
            mlp_norm=layer.post_attention_layernorm.weight.to(dtype),
            biases={name: linear.bias.to(dtype) for name, linear in linears.items()
                    if linear.bias is not None},
            **{name: input_major(linear.weight, dtype) for name, linear in linears.items()},
        )

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] @ w [in, out] (+ bias [out])."""
        bias = self.biases.get(name)
        weight = getattr(self, name)
        return x @ weight if bias is None else torch.addmm(bias, x, weight)


def input_major(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """nn.Linear's [out, in] weight as [in, out] in `dtype`: a contiguous copy on CPU, a view
    elsewhere unless the dtype changes (see Weights)."""
    return (weight.t().contiguous().to(dtype) if weight.device.type == "cpu"
            else weight.t().to(dtype))


class KVCache:
    """The static cache of one chunk: p prompts' keys/values, shared by their rows, and each row's
    own.

    prefix_k, prefix_v [layers, p, kv_heads, L, D]: the prompts (zero at pads), written by
    `prefill`; prefix_bias [p·kv_heads, 1, L]: 0 on real prompt tokens, -inf on pads;
    k, v [layers, rows, kv_heads, max_new_tokens, D]: each row's completion so far, written by
    `decode_step`. With one row per prompt (rows == p) there is nothing to share: prefix and
    completion are then two views of one tensor per row, context_k [layers, rows, kv_heads, L +
    max_new_tokens, D] (and context_v), so that a decode step scores the whole context with one
    product instead of two (`shared` is False). Zero-initialised: masked columns get softmax weight
    0, and 0 · garbage would be NaN if garbage were NaN or inf (torch.empty can hold either)."""

    def __init__(self, weights: Weights, prompts: int, prompt_len: int, rows: int,
                 max_new_tokens: int):
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
            self.context_k = torch.zeros(layers, rows, num_kv, prompt_len + max_new_tokens,
                                         head_dim, **options)
            self.context_v = torch.zeros(layers, rows, num_kv, prompt_len + max_new_tokens,
                                         head_dim, **options)
            self.prefix_k, self.k = self.context_k.split([prompt_len, max_new_tokens], dim=3)
            self.prefix_v, self.v = self.context_v.split([prompt_len, max_new_tokens], dim=3)
        self.prompt_len, self.max_new_tokens = prompt_len, max_new_tokens


# In-place ops (mul_, add_) below are not style: on CPU, every fresh activation tensor is one more
# trip through memory, and the prefill's activations do not fit in cache.


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm, x / sqrt(mean(x²) + eps) · weight: normalised in float32, cast back, then
    scaled."""
    hidden32 = hidden.float()
    return ((hidden32 * torch.rsqrt(hidden32.pow(2).mean(-1, keepdim=True) + eps))
            .to(hidden.dtype).mul_(weight))


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's half-split convention, in place: x <- x·cos + rotate_half(x)·sin,
    rotate_half(x) = [-x2, x1].

    x [..., D]; cos, signed_sin broadcastable to it, signed_sin = [-sin1, sin2] so that
    rotate_half(x)·sin = roll(x, D/2)·signed_sin (one op instead of slice, negate and
    concatenate)."""
    rotated = x.roll(x.shape[-1] // 2, dims=-1).mul_(signed_sin)
    return x.mul_(cos).add_(rotated)


def transformer(weights: Weights, input_ids: torch.Tensor, positions: torch.Tensor,
                attend) -> torch.Tensor:
    """Embedding -> layers -> final norm over a flat list of tokens: input_ids, positions [N] ->
    hidden [N, d].

    Everything but attention is the same for every token, so prefill packs the real prompt tokens
    (no pads) and decode passes one token per row. `attend(layer_index, q [N, H, D], k [N, Hkv, D],
    v) -> [N, H·D]` is the only part in which they differ: where keys/values go and which ones a
    query sees."""
    num_tokens = input_ids.shape[0]
    num_q, num_kv, head_dim = weights.num_heads, weights.num_kv_heads, weights.head_dim
    # [N, 1, D]
    cos, signed_sin = weights.cos[positions][:, None], weights.signed_sin[positions][:, None]
    hidden = F.embedding(input_ids, weights.embed)  # [N, d]
    for layer_index, w in enumerate(weights.layers):
        x = rms_norm(hidden, w.attn_norm, weights.norm_eps)
        # [N, H, D]
        q = apply_rope_(w.project("q", x).view(num_tokens, num_q, head_dim), cos, signed_sin)
        # [N, Hkv, D]
        k = apply_rope_(w.project("k", x).view(num_tokens, num_kv, head_dim), cos, signed_sin)
        v = w.project("v", x).view(num_tokens, num_kv, head_dim)  # [N, Hkv, D]
        hidden.add_(w.project("o", attend(layer_index, q, k, v)))
        x = rms_norm(hidden, w.mlp_norm, weights.norm_eps)
        gate, up = w.project("gate", x), w.project("up", x)  # [N, F] each
        hidden.add_(w.project("down", F.silu(gate, inplace=True).mul_(up)))
    return rms_norm(hidden, weights.final_norm, weights.norm_eps)


def prefill(
    weights: Weights, cache: KVCache, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
    first: int = 0,
) -> torch.Tensor:
    """Run left-padded prompts [p, L] once, writing their keys/values into the cache's shared prefix
    at prompts first ... first + p - 1. Returns the float32 logits of each prompt's next token
    [p, V]."""
    num_prompts, prompt_len = prompt_ids.shape
    prompts = slice(first, first + num_prompts)  # their places in the cache
    bias = torch.zeros(num_prompts, prompt_len, dtype=weights.dtype, device=weights.device)
    # what decode steps add to their scores against the prompt
    bias.masked_fill_(~prompt_mask, float("-inf"))
    num_kv = weights.num_kv_heads
    cache.prefix_bias[first * num_kv : (first + num_prompts) * num_kv] = (
        bias.repeat_interleave(num_kv, 0)[:, None])
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=weights.device).tril()
    # A real token attends to the real tokens up to itself; a pad attends to itself only, so no
    # softmax row is empty (no NaN) and no real token ever sees a pad.
    eye = torch.eye(prompt_len, dtype=torch.bool, device=weights.device)
    attn_mask = ((causal & prompt_mask[:, None, :]) | eye)[:, None]  # [p, 1, L, L]

    def unpack(x: torch.Tensor) -> torch.Tensor:
        """Packed tokens [N, heads, D] back to their padded places [p, heads, L, D], zero at
        pads."""
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

    hidden = transformer(weights, prompt_ids[prompt_mask], position_ids(prompt_mask)[prompt_mask],
                         attend)
    # Each prompt's last token is the last of its packed run; only it needs the lm_head.
    last_token = prompt_mask.sum(-1).cumsum(0) - 1  # [p]
    return (hidden[last_token] @ weights.lm_head).float()  # [p, V]


def decode_step(token: torch.Tensor, position: torch.Tensor, slot: int, prompts: int, samples: int,
                kv_len: int | None = None, *, weights: Weights, cache: KVCache) -> torch.Tensor:
    """One new token for each of R = prompts·samples rows (row r continues prompt r // samples):
    token, position [R] -> float32 logits [R, V].

    Its keys/values go to completion column `slot` (an int, or a 0-dim tensor inside a CUDA graph);
    a row attends to its prompt and to its completion columns [0, kv_len), kv_len = slot + 1 unless
    given (a bucket edge under CUDA graphs; columns past `slot` are masked)."""
    kv_len = slot + 1 if kv_len is None else kv_len
    slot = torch.as_tensor(slot, device=weights.device).view(1)
    rows, num_kv, head_dim = prompts * samples, weights.num_kv_heads, weights.head_dim
    group = weights.num_heads // num_kv  # query heads per kv head (GQA)
    scale = head_dim**-0.5
    prompt_len = cache.prompt_len
    prefix_bias = cache.prefix_bias[: prompts * num_kv]  # [p·Hkv, 1, L]
    # [1, 1, kv_len]
    own_bias = torch.zeros(1, 1, kv_len, dtype=weights.dtype, device=weights.device)
    own_bias.masked_fill_(torch.arange(kv_len, device=weights.device) > slot, float("-inf"))

    if not cache.shared:  # one row per prompt: prompt and completion columns are one cache
        # [R·Hkv, 1, L + kv_len]
        bias = torch.cat([prefix_bias, own_bias.expand(rows * num_kv, 1, kv_len)], dim=-1)
        columns = prompt_len + kv_len

        def attend(layer_index, q, k, v):
            context_k = cache.context_k[layer_index, :rows]  # [R, Hkv, L + max_new, D]
            context_v = cache.context_v[layer_index, :rows]
            context_k.index_copy_(2, slot + prompt_len, k[:, :, None])
            context_v.index_copy_(2, slot + prompt_len, v[:, :, None])
            context_k = context_k[:, :, :columns].flatten(0, 1)  # [R·Hkv, L + kv_len, D]
            context_v = context_v[:, :, :columns].flatten(0, 1)
            q_by_row = q.reshape(rows * num_kv, group, head_dim)
            # [R·Hkv, g, L + kv_len]
            scores = torch.baddbmm(bias, q_by_row, context_k.transpose(1, 2), alpha=scale)
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
            # Against the shared prompt, the `samples` rows of a prompt and the `group` heads of a
            # kv head are one batch of samples·group queries: one matrix product reads the prompt's
            # keys once.
            q_by_prompt = q.view(prompts, samples, num_kv, group, head_dim).transpose(1, 2)
            q_by_prompt = q_by_prompt.reshape(prompts * num_kv, samples * group, head_dim)
            prefix_scores = torch.baddbmm(prefix_bias, q_by_prompt, prefix_k.transpose(1, 2),
                                          alpha=scale)
            prefix_scores = prefix_scores.view(prompts, num_kv, samples, group,
                                               prompt_len).transpose(1, 2)
            q_by_row = q.reshape(rows * num_kv, group, head_dim)
            # [R·Hkv, g, kv_len]
            own_scores = torch.baddbmm(own_bias, q_by_row, own_k.transpose(1, 2), alpha=scale)
            # One softmax over the prompt's keys and the row's own, in float32 as HF does.
            scores = torch.cat([prefix_scores.reshape(rows * num_kv, group, prompt_len),
                                own_scores], dim=-1)
            # [R·Hkv, g, L + kv_len]
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            prefix_probs, own_probs = probs.split([prompt_len, kv_len], dim=-1)
            prefix_probs = prefix_probs.reshape(prompts, samples, num_kv, group,
                                                prompt_len).transpose(1, 2)
            prefix_out = (prefix_probs.reshape(prompts * num_kv, samples * group, prompt_len)
                          @ prefix_v)
            prefix_out = prefix_out.view(prompts, num_kv, samples, group, head_dim).transpose(1, 2)
            return prefix_out.reshape(rows, -1) + (own_probs @ own_v).view(rows, -1)  # [R, H·D]

    hidden = transformer(weights, token, position, attend)  # [R, d]
    return (hidden @ weights.lm_head).float()  # [R, V]


# --------------------------------------------------------------------------------------------------
# CUDA graphs: a small model's decode step is hundreds of tiny kernels whose launch cost (Python +
# driver) would dominate; replaying a captured graph launches them all at once.


def make_decoder(weights: Weights, cache: KVCache):
    """decode(token, position, slot, prompts, samples) -> logits: replayed CUDA graphs on GPU, eager
    on CPU."""
    if weights.device.type == "cuda":
        return CudaGraphDecode(weights, cache)
    return partial(decode_step, weights=weights, cache=cache)


class CudaGraphDecode:
    """`decode_step` replayed from CUDA graphs, one per (prompts, samples, kv_len bucket).

    Attention reads the completion cache up to the next multiple of KV_BUCKET columns (unwritten
    columns are masked), so a 1024-token generation needs 4 graphs and reads at most KV_BUCKET - 1
    extra columns per step. Graphs live for one `generate` call: they hold the addresses of this
    call's weights and cache."""

    def __init__(self, weights: Weights, cache: KVCache):
        self.weights, self.cache = weights, cache
        rows = cache.v.shape[1]
        self.token = torch.zeros(rows, dtype=torch.long, device=weights.device)  # static inputs
        self.position = torch.zeros(rows, dtype=torch.long, device=weights.device)
        self.slot = torch.zeros((), dtype=torch.long, device=weights.device)
        # by (prompts, samples, kv_len): the graph and its output [R, V]
        self.graphs, self.logits = {}, {}
        self.pool = None  # one memory pool shared by this call's graphs

    def __call__(self, token: torch.Tensor, position: torch.Tensor, slot: int, prompts: int,
                 samples: int):
        rows = prompts * samples
        # next bucket edge
        kv_len = min(self.cache.max_new_tokens, -(-(slot + 1) // KV_BUCKET) * KV_BUCKET)
        self.token[:rows].copy_(token)
        self.position[:rows].copy_(position)
        self.slot.fill_(slot)
        key = (prompts, samples, kv_len)
        if key not in self.graphs:
            self.graphs[key] = self.capture(key, partial(
                decode_step, self.token[:rows], self.position[:rows], self.slot, prompts, samples,
                kv_len, weights=self.weights, cache=self.cache,
            ))
        self.graphs[key].replay()
        return self.logits[key]

    def capture(self, key: tuple[int, int, int], step) -> torch.cuda.CUDAGraph:
        # Warm up on a side stream (allocator, kernel selection), as torch.cuda.graphs recommends.
        # The warm-up writes this step's keys/values into the cache, exactly as the replay will
        # again.
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
