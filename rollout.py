"""The hand-written batched sampler: N completions for each of P prompts, with per-token log-probs.

Read it top to bottom: `generate` (the loop over prompt groups and row chunks), `decode_rows` (one chunk's
decode loop), then the forward pass of a Llama / Qwen2 causal LM written out with a static KV cache
(`prefill`, `decode_step`), the CUDA-graph wrapper, and sampling.

Layout of one rollout (row i is sample i % n of prompt i // n):

    tokens  [P·N, T]   pad pad p p p p | c c c STOP pad pad
    mask    [P·N, T]    0   0  0 0 0 0 | 1 1 1  1    0   0     (completion tokens, the stop included)
                       <-- L = longest prompt --> <-- longest completion generated -->

Log-probs are those of the temperature-scaled distribution softmax(logits / temperature), *not*
renormalised over the top-p / top-k kept set: that is the distribution the trainer's teacher-forced
forward recomputes (same temperature, positions from `position_ids`), so the importance ratio
exp(logp - old_logp) starts at 1. With temperature=0 (greedy) they are those of softmax(logits).

The sampler runs in the model's own dtype (load it in bf16 on CUDA); logits are cast to float32
before sampling. It never calls `model.forward` or `model.generate`: it reads the HF module's weights
and runs its own forward, which is what makes it fast (no per-call overhead, one static KV cache,
decode replayed from CUDA graphs on GPU).
"""

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

DEFAULT_MAX_ROWS = 256  # rows decoded together; the KV cache holds max_rows · (L + max_new_tokens) tokens
KV_BUCKET = 256  # on CUDA, decode attends over the cache rounded up to this many columns (one graph each)


@dataclass
class Rollout:
    tokens: torch.Tensor  # long [P·N, T]: left-padded prompt, then completion, then pad_id
    attention_mask: torch.Tensor  # bool [P·N, T]: True on real prompt and completion tokens
    mask: torch.Tensor  # bool [P·N, T]: True on completion tokens (the stop token included)
    logprobs: torch.Tensor  # float32 [P·N, T]: log p(token | prefix) where mask, else 0
    truncated: torch.Tensor  # bool [P·N]: reached max_new_tokens without a stop token
    prompt_len: int  # L: completions start at column L


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
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Rollout:
    """Sample n completions for each prompt (a list of token-id lists); see the module docstring.

    Rows are decoded max_rows at a time, so memory is bounded whatever P·N is. The same arguments and
    seed give the same rollout."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token.")
    if n < 1 or max_new_tokens < 1 or max_rows < 1:
        raise ValueError("n, max_new_tokens and max_rows must all be at least 1.")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0.")
    was_training = model.training
    model.eval()
    num_prompts, prompt_len = len(prompts), max(len(p) for p in prompts)
    num_rows, max_len = num_prompts * n, prompt_len + max_new_tokens
    weights = Weights(model, max_len)
    device = weights.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    prompt_lens = torch.tensor([len(p) for p in prompts], device=device)  # [P]
    prompt_mask = torch.arange(prompt_len, device=device) >= prompt_len - prompt_lens[:, None]  # [P, L]
    prompt_ids = torch.full((num_prompts, prompt_len), pad_id, dtype=torch.long, device=device)  # [P, L]
    prompt_ids[prompt_mask] = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)

    tokens = torch.full((num_rows, max_len), pad_id, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = prompt_ids.repeat_interleave(n, dim=0)
    attention_mask = torch.zeros(num_rows, max_len, dtype=torch.bool, device=device)
    attention_mask[:, :prompt_len] = prompt_mask.repeat_interleave(n, dim=0)
    logprobs = torch.zeros(num_rows, max_len, dtype=torch.float32, device=device)
    truncated = torch.zeros(num_rows, dtype=torch.bool, device=device)
    longest_completion = 0

    # One static cache for the whole call, reused by every chunk (CUDA graphs need fixed addresses).
    chunk_rows = min(max_rows, num_rows)
    cache = KVCache(weights, chunk_rows, max_len)
    if device.type == "cuda":
        decode = CudaGraphDecode(weights, cache)
    else:
        decode = partial(decode_step, weights=weights, cache=cache)

    # Prefill each prompt exactly once, then copy its keys/values into its n rows: BroRL's N=512 costs one
    # prefill per prompt, not 512. Prompts go in groups whose rows fit in max_rows; a prompt with more than
    # max_rows samples has its rows decoded in several chunks that all reuse its one prefill.
    prompts_per_group = max(1, max_rows // n)
    for first_prompt in range(0, num_prompts, prompts_per_group):
        group = slice(first_prompt, min(first_prompt + prompts_per_group, num_prompts))
        prefix_k, prefix_v, prefix_logits = prefill(weights, prompt_ids[group], prompt_mask[group])
        group_rows = (group.stop - group.start) * n
        for first_row in range(0, group_rows, max_rows):
            row_prompt = torch.arange(first_row, min(first_row + max_rows, group_rows), device=device) // n  # [R]
            rows = slice(group.start * n + first_row, group.start * n + first_row + len(row_prompt))
            cache.fill_prefix(prefix_k, prefix_v, prompt_mask[group], row_prompt)
            completion, completion_logp, completion_mask, stopped = decode_rows(
                decode, cache, prefix_logits[row_prompt], prompt_lens[group][row_prompt], max_new_tokens,
                temperature, top_p, top_k, stop_ids, pad_id, generator,
            )
            steps = completion.shape[1]
            tokens[rows, prompt_len : prompt_len + steps] = completion
            logprobs[rows, prompt_len : prompt_len + steps] = completion_logp
            attention_mask[rows, prompt_len : prompt_len + steps] = completion_mask
            truncated[rows] = ~stopped
            longest_completion = max(longest_completion, steps)

    model.train(was_training)
    end = prompt_len + longest_completion
    mask = attention_mask[:, :end].clone()
    mask[:, :prompt_len] = False
    return Rollout(
        tokens=tokens[:, :end],
        attention_mask=attention_mask[:, :end],
        mask=mask,
        logprobs=logprobs[:, :end],
        truncated=truncated,
        prompt_len=prompt_len,
    )


def decode_rows(
    decode, cache, logits, prompt_lens, max_new_tokens, temperature, top_p, top_k, stop_ids, pad_id, generator
):
    """The decode loop of one chunk of R rows whose prompts are already in `cache`.

    logits float32 [R, V] (of each row's first completion token), prompt_lens [R]. Returns the completions
    [R, S], their log-probs [R, S], the completion mask [R, S] and whether each row stopped [R], where
    S <= max_new_tokens is the number of steps run (the loop ends once every row has stopped)."""
    num_rows = logits.shape[0]
    completion = torch.full((num_rows, max_new_tokens), pad_id, dtype=torch.long, device=logits.device)
    completion_logp = torch.zeros(num_rows, max_new_tokens, dtype=torch.float32, device=logits.device)
    completion_mask = torch.zeros(num_rows, max_new_tokens, dtype=torch.bool, device=logits.device)
    stopped = torch.zeros(num_rows, dtype=torch.bool, device=logits.device)
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
        logits = decode(token, prompt_lens + step, cache.prompt_len + step, num_rows)
    steps = step + 1
    return completion[:, :steps], completion_logp[:, :steps], completion_mask[:, :steps], stopped


# ----------------------------------------------------------------------------------------------------
# The forward pass, written out for Llama / Qwen2 (Qwen2 = Llama + biases on q, k, v).


class Weights:
    """A Hugging Face Llama / Qwen2 causal LM's tensors, arranged for the sampler.

    Matrices are stored transposed, [in, out], and q/k/v and gate/up concatenated, so each projection is one
    `x @ w` (on CPU, MKL's plain x @ w is ~20% faster than F.linear's x @ wᵀ at these sizes). These are
    copies, made once per `generate` since the trainer changes the weights between calls. RoPE's cos/sin
    come from the model's own rotary module (rope_theta, rope scaling) for positions 0..max_len-1."""

    def __init__(self, model: torch.nn.Module, max_len: int):
        config = model.config
        if config.model_type not in ("llama", "qwen2"):
            raise ValueError(f"rollout.generate supports Llama and Qwen2 models, not {config.model_type!r}.")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("rollout.generate does not implement sliding-window attention.")
        if config.hidden_act != "silu":
            raise ValueError(f"rollout.generate expects a SiLU MLP, not {config.hidden_act!r}.")
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.norm_eps = config.rms_norm_eps
        self.embed = model.model.embed_tokens.weight  # [V, d]
        self.final_norm = model.model.norm.weight  # [d]
        self.lm_head = model.lm_head.weight.t().contiguous()  # [d, V]
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self.layers = [LayerWeights.of(layer) for layer in model.model.layers]
        positions = torch.arange(max_len, device=self.device)[None]  # [1, max_len]
        cos, sin = model.model.rotary_emb(self.embed[:1], positions)  # [1, max_len, D] each
        half = self.head_dim // 2
        self.cos = cos[0]  # [max_len, D]
        self.signed_sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1)  # [max_len, D], see apply_rope


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [d]
    qkv: torch.Tensor  # [d, (H + 2·Hkv)·D]
    qkv_bias: torch.Tensor | None  # [(H + 2·Hkv)·D] for Qwen2, None for Llama
    o: torch.Tensor  # [H·D, d]
    mlp_norm: torch.Tensor  # [d]
    gate_up: torch.Tensor  # [d, 2·F]
    down: torch.Tensor  # [F, d]

    @staticmethod
    def of(layer: torch.nn.Module) -> "LayerWeights":
        attn, mlp = layer.self_attn, layer.mlp
        qkv_bias = None
        if attn.q_proj.bias is not None:
            qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
        return LayerWeights(
            attn_norm=layer.input_layernorm.weight,
            qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).t().contiguous(),
            qkv_bias=qkv_bias,
            o=attn.o_proj.weight.t().contiguous(),
            mlp_norm=layer.post_attention_layernorm.weight,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).t().contiguous(),
            down=mlp.down_proj.weight.t().contiguous(),
        )


class KVCache:
    """Static keys/values [layers, rows, kv_heads, max_len, D] and which columns hold real keys [rows, max_len].

    Zero-initialised: masked columns get softmax weight 0, and 0 · garbage would be NaN if garbage were
    NaN or inf (torch.empty can hold either)."""

    def __init__(self, weights: Weights, rows: int, max_len: int):
        shape = (len(weights.layers), rows, weights.num_kv_heads, max_len, weights.head_dim)
        self.k = torch.zeros(shape, dtype=weights.dtype, device=weights.device)
        self.v = torch.zeros(shape, dtype=weights.dtype, device=weights.device)
        self.key_mask = torch.zeros(rows, max_len, dtype=torch.bool, device=weights.device)
        self.prompt_len = 0

    def fill_prefix(self, prefix_k, prefix_v, prompt_mask, row_prompt) -> None:
        """Copy prompt row_prompt[r]'s prefilled keys/values [layers, p, kv_heads, L, D] into cache row r."""
        rows, self.prompt_len = len(row_prompt), prefix_k.shape[3]
        self.k[:, :rows, :, : self.prompt_len] = prefix_k[:, row_prompt]
        self.v[:, :rows, :, : self.prompt_len] = prefix_v[:, row_prompt]
        self.key_mask[:rows] = False  # completion columns become visible one step at a time
        self.key_mask[:rows, : self.prompt_len] = prompt_mask[row_prompt]


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm, x / sqrt(mean(x²) + eps) · weight: normalised in float32, cast back, then scaled."""
    normed = F.rms_norm(hidden.float(), hidden.shape[-1:], eps=eps)
    return weight * normed.to(hidden.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE in HF's half-split convention, x·cos + rotate_half(x)·sin with rotate_half(x) = [-x2, x1].

    x [..., D]; cos, signed_sin broadcastable to it, signed_sin = [-sin1, sin2] so that
    rotate_half(x)·sin = roll(x, D/2)·signed_sin (one op instead of slice, negate and concatenate)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


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
        qkv = x @ w.qkv if w.qkv_bias is None else torch.addmm(w.qkv_bias, x, w.qkv)
        qkv = qkv.view(num_tokens, num_q + 2 * num_kv, head_dim)
        qk = apply_rope(qkv[:, : num_q + num_kv], cos, signed_sin)  # queries and keys rotated together
        q, k, v = qk[:, :num_q], qk[:, num_q:], qkv[:, num_q + num_kv :]  # [N, H | Hkv | Hkv, D]
        hidden = hidden + attend(layer_index, q, k, v) @ w.o
        x = rms_norm(hidden, w.mlp_norm, weights.norm_eps)
        gate, up = (x @ w.gate_up).chunk(2, dim=-1)  # [N, F] each
        hidden = hidden + (F.silu(gate) * up) @ w.down
    return rms_norm(hidden, weights.final_norm, weights.norm_eps)


def prefill(
    weights: Weights, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run left-padded prompts [p, L] once. Returns their keys and values [layers, p, kv_heads, L, D] (zero
    at pads) and the float32 logits of each prompt's next token [p, V]."""
    num_prompts, prompt_len = prompt_ids.shape
    shape = (len(weights.layers), num_prompts, prompt_len, weights.num_kv_heads, weights.head_dim)
    prefix_k = torch.zeros(shape, dtype=weights.dtype, device=weights.device)  # [layers, p, L, Hkv, D]
    prefix_v = torch.zeros_like(prefix_k)
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=weights.device).tril()
    # A real token attends to the real tokens up to itself; a pad attends to itself only, so no softmax
    # row is empty (no NaN) and no real token ever sees a pad.
    eye = torch.eye(prompt_len, dtype=torch.bool, device=weights.device)
    attn_mask = ((causal & prompt_mask[:, None, :]) | eye)[:, None]  # [p, 1, L, L]

    def attend(layer_index, q, k, v):
        # Scatter the packed tokens back to their [p, L] places for attention only.
        prefix_k[layer_index][prompt_mask], prefix_v[layer_index][prompt_mask] = k, v
        q_padded = q.new_zeros(num_prompts, prompt_len, *q.shape[1:])  # [p, L, H, D]
        q_padded[prompt_mask] = q
        out = F.scaled_dot_product_attention(
            q_padded.transpose(1, 2), prefix_k[layer_index].transpose(1, 2), prefix_v[layer_index].transpose(1, 2),
            attn_mask=attn_mask, enable_gqa=weights.num_heads != weights.num_kv_heads,
        )  # [p, H, L, D]
        return out.transpose(1, 2)[prompt_mask].flatten(1)  # [N, H·D]

    hidden = transformer(weights, prompt_ids[prompt_mask], position_ids(prompt_mask)[prompt_mask], attend)
    # Each prompt's last token is the last of its packed run; only it needs the lm_head.
    last_token = prompt_mask.sum(-1).cumsum(0) - 1  # [p]
    logits = (hidden[last_token] @ weights.lm_head).float()  # [p, V]
    return prefix_k.transpose(2, 3), prefix_v.transpose(2, 3), logits


def decode_step(token: torch.Tensor, position: torch.Tensor, slot: int, rows: int, kv_len: int | None = None,
                *, weights: Weights, cache: KVCache) -> torch.Tensor:
    """One new token for each of the first `rows` cache rows: token, position [R] -> float32 logits [R, V].

    Its keys/values go to cache column `slot` (an int, or a 0-dim tensor inside a CUDA graph); attention
    reads columns [0, kv_len), kv_len = slot + 1 unless given (a bucket boundary under CUDA graphs)."""
    kv_len = slot + 1 if kv_len is None else kv_len
    slot = torch.as_tensor(slot, device=weights.device).view(1)
    num_kv, head_dim = weights.num_kv_heads, weights.head_dim
    group = weights.num_heads // num_kv  # query heads per kv head (GQA)
    key_mask = cache.key_mask[:rows]
    key_mask.index_fill_(1, slot, True)  # the new token sees itself and every real token before it
    # 0 where a key is visible, -inf where not; shared by every layer and head.
    bias = torch.zeros(rows, kv_len, dtype=weights.dtype, device=weights.device).masked_fill_(
        ~key_mask[:, :kv_len], float("-inf")
    )
    bias = bias[:, None, None].expand(rows, num_kv, 1, kv_len).reshape(rows * num_kv, 1, kv_len)

    def attend(layer_index, q, k, v):
        k_cache, v_cache = cache.k[layer_index, :rows], cache.v[layer_index, :rows]  # [R, Hkv, max_len, D]
        k_cache.index_copy_(2, slot, k[:, :, None])
        v_cache.index_copy_(2, slot, v[:, :, None])
        # GQA without copying keys: the `group` query heads that share a kv head act as its `group` queries.
        keys = k_cache[:, :, :kv_len].reshape(rows * num_kv, kv_len, head_dim)  # a view, no copy
        values = v_cache[:, :, :kv_len].reshape(rows * num_kv, kv_len, head_dim)
        scores = torch.baddbmm(bias, q.reshape(rows * num_kv, group, head_dim), keys.transpose(1, 2),
                               alpha=head_dim**-0.5)  # [R·Hkv, g, kv_len]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in float32, as HF
        return torch.bmm(probs, values).view(rows, -1)  # [R, H·D]

    hidden = transformer(weights, token, position, attend)  # [R, d]
    return (hidden @ weights.lm_head).float()  # [R, V]


# ----------------------------------------------------------------------------------------------------
# CUDA graphs: a small model's decode step is hundreds of tiny kernels whose launch cost (Python + driver)
# would dominate; replaying a captured graph launches them all at once.


class CudaGraphDecode:
    """`decode_step` replayed from CUDA graphs, one per (rows, kv_len bucket).

    Attention reads the cache up to the next multiple of KV_BUCKET columns (unwritten columns are masked),
    so a 1024-token generation needs ~4 graphs and reads at most KV_BUCKET - 1 extra columns per step.
    Graphs live for one `generate` call: they hold the addresses of this call's weights and cache."""

    def __init__(self, weights: Weights, cache: KVCache):
        self.weights, self.cache = weights, cache
        rows = cache.k.shape[1]
        self.token = torch.zeros(rows, dtype=torch.long, device=weights.device)  # static inputs
        self.position = torch.zeros(rows, dtype=torch.long, device=weights.device)
        self.slot = torch.zeros((), dtype=torch.long, device=weights.device)
        self.graphs, self.logits = {}, {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, token: torch.Tensor, position: torch.Tensor, slot: int, rows: int) -> torch.Tensor:
        max_len = self.cache.k.shape[3]
        kv_len = min(max_len, -(-(slot + 1) // KV_BUCKET) * KV_BUCKET)
        self.token[:rows].copy_(token)
        self.position[:rows].copy_(position)
        self.slot.fill_(slot)
        key = (rows, kv_len)
        if key not in self.graphs:
            self.graphs[key] = self._capture(rows, kv_len)
        self.graphs[key].replay()
        return self.logits[key]

    def _capture(self, rows: int, kv_len: int) -> torch.cuda.CUDAGraph:
        def step():
            return decode_step(self.token[:rows], self.position[:rows], self.slot, rows, kv_len,
                               weights=self.weights, cache=self.cache)

        # Warm up on a side stream (allocator, kernel selection), as torch.cuda.graphs recommends. The warm-up
        # writes this step's keys/values into the cache, exactly as the replay will again.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.logits[(rows, kv_len)] = step()
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
        kept_logp = kept_logp.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    # Exponential race (as in gpt-fast): argmax_i p_i / E_i with E_i ~ Exp(1) is a draw from p, with no
    # renormalisation needed. E = -log(U), U ~ U[0, 1), is never 0, so p_i / E_i is never 0/0.
    exponential = torch.rand(kept_logp.shape, generator=generator, device=kept_logp.device).log_().neg_()
    token = (kept_logp.exp() / exponential).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)
