"""The hand-written batched sampler: N completions for each of P prompts, with per-token log-probs.

Read it top to bottom: `generate` (the loop), then `prefill` and `decode_step` (the forward pass of a
Llama / Qwen2 causal LM written out with a static KV cache), then sampling.

Layout of one rollout (row i is sample i % n of prompt i // n):

    tokens   [P·N, T]   pad pad p p p p | c c c STOP pad pad
    mask     [P·N, T]    0   0  0 0 0 0 | 1 1 1  1    0   0     (completion tokens, stop included)
                        <-- L = longest prompt --> <-- longest completion generated -->

Log-probs are those of the temperature-scaled distribution softmax(logits / temperature), *not*
renormalised over the top-p / top-k kept set: that is the distribution the trainer's teacher-forced
forward recomputes (kernels.token_logprobs with the same temperature), so the importance ratio
exp(logp - old_logp) starts at exactly 1. With temperature=0 (greedy) they are those of softmax(logits).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_MAX_ROWS = 256  # rows decoded together; bounds the KV cache at max_rows · (L + max_new_tokens) tokens


@dataclass
class Rollout:
    tokens: torch.Tensor  # long [P·N, T]: left-padded prompt, then completion, then pad_id
    attention_mask: torch.Tensor  # bool [P·N, T]: True on real prompt and completion tokens
    mask: torch.Tensor  # bool [P·N, T]: True on completion tokens (stop token included)
    logprobs: torch.Tensor  # float32 [P·N, T]: log p(token | prefix) where mask, else 0
    truncated: torch.Tensor  # bool [P·N]: reached max_new_tokens without a stop token
    prompt_len: int  # L: completions start at column L


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions of left-padded rows: [B, T] bool -> long [B, T], cumsum(mask) - 1, pads clamped to 0.

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
    """Sample n completions for each prompt (token-id lists). See the module docstring for the layout."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token.")
    if n < 1 or max_new_tokens < 1 or max_rows < 1:
        raise ValueError("n, max_new_tokens and max_rows must all be at least 1.")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("temperature must be >= 0, top_p in (0, 1] and top_k >= 0.")
    was_training = model.training
    model.eval()
    weights = _Weights(model)
    device = weights.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    num_prompts, prompt_len = len(prompts), max(len(p) for p in prompts)
    num_rows, max_len = num_prompts * n, prompt_len + max_new_tokens
    prompt_ids = torch.full((num_prompts, prompt_len), pad_id, dtype=torch.long)  # [P, L] left-padded
    for i, p in enumerate(prompts):
        prompt_ids[i, prompt_len - len(p) :] = torch.tensor(p, dtype=torch.long)
    prompt_ids = prompt_ids.to(device)
    prompt_mask = torch.arange(prompt_len, device=device) >= prompt_len - torch.tensor(
        [len(p) for p in prompts], device=device
    ).unsqueeze(1)  # [P, L] True on real prompt tokens

    tokens = torch.full((num_rows, max_len), pad_id, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = prompt_ids.repeat_interleave(n, dim=0)
    attention_mask = torch.zeros(num_rows, max_len, dtype=torch.bool, device=device)
    attention_mask[:, :prompt_len] = prompt_mask.repeat_interleave(n, dim=0)
    logprobs = torch.zeros(num_rows, max_len, dtype=torch.float32, device=device)
    truncated = torch.zeros(num_rows, dtype=torch.bool, device=device)
    longest_completion = 0

    # Prefill each prompt exactly once, then copy its cache into its n rows: BroRL's N=512 costs one
    # prefill per prompt, not 512. Prompts go in groups whose rows fit in max_rows; a prompt with more
    # than max_rows samples has its rows decoded in several chunks that all reuse the one prefill.
    prompts_per_group = max(1, max_rows // n)
    for first_prompt in range(0, num_prompts, prompts_per_group):
        group = slice(first_prompt, min(first_prompt + prompts_per_group, num_prompts))
        prefix_k, prefix_v, prefix_logits = prefill(weights, prompt_ids[group], prompt_mask[group])
        group_rows = (group.stop - group.start) * n
        for first_row in range(0, group_rows, max_rows):
            row_prompt = torch.arange(first_row, min(first_row + max_rows, group_rows), device=device) // n
            rows = slice(group.start * n + first_row, group.start * n + first_row + len(row_prompt))
            completion, completion_logp, completion_mask, done = _decode_rows(
                weights, prefix_k, prefix_v, prefix_logits, prompt_mask[group], row_prompt, max_new_tokens,
                temperature, top_p, top_k, stop_ids, pad_id, generator,
            )
            steps = completion.shape[1]
            tokens[rows, prompt_len : prompt_len + steps] = completion
            logprobs[rows, prompt_len : prompt_len + steps] = completion_logp
            attention_mask[rows, prompt_len : prompt_len + steps] = completion_mask
            truncated[rows] = ~done
            longest_completion = max(longest_completion, steps)

    model.train(was_training)
    end = prompt_len + longest_completion
    mask = attention_mask.clone()
    mask[:, :prompt_len] = False
    return Rollout(
        tokens=tokens[:, :end],
        attention_mask=attention_mask[:, :end],
        mask=mask[:, :end],
        logprobs=logprobs[:, :end],
        truncated=truncated,
        prompt_len=prompt_len,
    )


def _decode_rows(
    weights, prefix_k, prefix_v, prefix_logits, prompt_mask, row_prompt, max_new_tokens,
    temperature, top_p, top_k, stop_ids, pad_id, generator,
):
    """Decode one chunk of rows; row r continues prompt row_prompt[r] of the prefilled group."""
    num_rows, prompt_len = len(row_prompt), prompt_mask.shape[1]
    max_len = prompt_len + max_new_tokens
    # Static KV cache for this chunk: the shared prefix copied in, the completions written step by step.
    cache_shape = (weights.num_layers, num_rows, weights.num_kv_heads, max_len, weights.head_dim)
    k_cache = torch.empty(cache_shape, dtype=prefix_k.dtype, device=prefix_k.device)
    v_cache = torch.empty(cache_shape, dtype=prefix_v.dtype, device=prefix_v.device)
    k_cache[:, :, :, :prompt_len] = prefix_k[:, row_prompt]
    v_cache[:, :, :, :prompt_len] = prefix_v[:, row_prompt]
    key_mask = torch.ones(num_rows, max_len, dtype=torch.bool, device=prefix_k.device)  # [R, max_len]
    key_mask[:, :prompt_len] = prompt_mask[row_prompt]
    next_position = prompt_mask[row_prompt].sum(-1)  # [R] position id of the first completion token

    logits = prefix_logits[row_prompt]  # [R, V]
    done = torch.zeros(num_rows, dtype=torch.bool, device=logits.device)
    completion, completion_logp, completion_mask = [], [], []
    for step in range(max_new_tokens):
        token, token_logp = sample(logits, temperature, top_p, top_k, generator)
        # Rows that already stopped keep decoding (the batch stays rectangular) but emit pad and
        # are masked, so their tokens get no log-prob and no gradient.
        completion_mask.append(~done)
        completion.append(torch.where(done, pad_id, token))
        completion_logp.append(torch.where(done, 0.0, token_logp))
        done = done | torch.isin(token, stop_ids)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        logits = decode_step(weights, token, next_position + step, k_cache, v_cache, key_mask, prompt_len + step)
    return torch.stack(completion, 1), torch.stack(completion_logp, 1), torch.stack(completion_mask, 1), done


# ----------------------------------------------------------------------------------------------------
# The forward pass, written out for Llama / Qwen2 (Qwen2 = Llama + biases on q, k, v).


class _Weights:
    """The tensors of a Hugging Face Llama / Qwen2 causal LM, read in place (no copies)."""

    def __init__(self, model: torch.nn.Module):
        config = model.config
        if config.model_type not in ("llama", "qwen2"):
            raise ValueError(f"rollout.generate supports Llama and Qwen2 models, not {config.model_type!r}.")
        if getattr(config, "use_sliding_window", False):
            raise ValueError("rollout.generate does not implement sliding-window attention.")
        if config.hidden_act != "silu":
            raise ValueError(f"rollout.generate expects a SiLU MLP, not {config.hidden_act!r}.")
        self.embed = model.model.embed_tokens.weight  # [V, d]
        self.layers = model.model.layers
        self.num_layers = len(self.layers)
        self.final_norm = model.model.norm
        self.lm_head = model.lm_head.weight  # [V, d]
        self.rotary = model.model.rotary_emb
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.device = self.embed.device


def rms_norm(hidden: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """HF's RMSNorm: normalise in float32, cast back, then scale."""
    hidden32 = hidden.float()
    hidden32 = hidden32 * torch.rsqrt(hidden32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * hidden32.to(hidden.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE (HF's half-split convention): x [B, H, S, D], cos/sin [B, 1, S, D]."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def forward(
    weights: _Weights,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: int,
    attn_mask: torch.Tensor,
) -> torch.Tensor:
    """Run the S new tokens of each row, writing their keys/values into cache columns [start, start + S).

    input_ids, positions [B, S]; k/v_cache [layers, B, kv_heads, max_len, D];
    attn_mask bool [B, 1, S, start + S] (True = may attend). Returns the final hidden states [B, S, d]."""
    batch, seq = input_ids.shape
    end = start + seq
    hidden = F.embedding(input_ids, weights.embed)  # [B, S, d]
    cos, sin = weights.rotary(hidden, positions)  # [B, S, D] each; carries rope_theta and rope scaling
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, S, D]
    for layer_index, layer in enumerate(weights.layers):
        attn = layer.self_attn
        x = rms_norm(hidden, layer.input_layernorm)
        q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(batch, seq, -1, weights.head_dim).transpose(1, 2)
        k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(batch, seq, -1, weights.head_dim).transpose(1, 2)
        v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(batch, seq, -1, weights.head_dim).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # q [B, H, S, D], k/v [B, Hkv, S, D]
        k_cache[layer_index, :, :, start:end] = k
        v_cache[layer_index, :, :, start:end] = v
        attn_out = F.scaled_dot_product_attention(
            q, k_cache[layer_index, :, :, :end], v_cache[layer_index, :, :, :end],
            attn_mask=attn_mask, enable_gqa=weights.num_heads != weights.num_kv_heads,
        )  # [B, H, S, D]
        attn_out = attn_out.transpose(1, 2).reshape(batch, seq, -1)
        hidden = hidden + F.linear(attn_out, attn.o_proj.weight, attn.o_proj.bias)
        mlp = layer.mlp
        x = rms_norm(hidden, layer.post_attention_layernorm)
        gate_up = F.silu(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)) * F.linear(
            x, mlp.up_proj.weight, mlp.up_proj.bias
        )
        hidden = hidden + F.linear(gate_up, mlp.down_proj.weight, mlp.down_proj.bias)
    return rms_norm(hidden, weights.final_norm)


def prefill(
    weights: _Weights, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run left-padded prompts [p, L] once. Returns their keys and values [layers, p, kv_heads, L, D]
    and the float32 logits of the next token [p, V]."""
    num_prompts, prompt_len = prompt_ids.shape
    cache_shape = (weights.num_layers, num_prompts, weights.num_kv_heads, prompt_len, weights.head_dim)
    k_cache = torch.empty(cache_shape, dtype=weights.embed.dtype, device=prompt_ids.device)
    v_cache = torch.empty_like(k_cache)
    causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=prompt_ids.device).tril()
    # Real tokens attend to earlier real tokens; a pad attends to itself only, so its row of the
    # softmax is not empty (no NaN) and no real token ever sees it.
    attn_mask = (causal & prompt_mask[:, None, :]) | torch.eye(prompt_len, dtype=torch.bool, device=prompt_ids.device)
    hidden = forward(weights, prompt_ids, position_ids(prompt_mask), k_cache, v_cache, 0, attn_mask.unsqueeze(1))
    # Left padding puts every prompt's last token in the last column: only it needs the lm_head.
    logits = F.linear(hidden[:, -1], weights.lm_head).float()  # [p, V]
    return k_cache, v_cache, logits


def decode_step(
    weights: _Weights,
    token: torch.Tensor,
    position: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    key_mask: torch.Tensor,
    slot: int,
) -> torch.Tensor:
    """One new token per row: token, position [R] -> float32 logits [R, V]. Writes cache column `slot`."""
    attn_mask = key_mask[:, None, None, : slot + 1]  # [R, 1, 1, slot + 1]
    hidden = forward(weights, token[:, None], position[:, None], k_cache, v_cache, slot, attn_mask)
    return F.linear(hidden[:, 0], weights.lm_head).float()


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
    logp = torch.log_softmax(logits / temperature, -1)  # [R, V]
    kept_logp = logp
    if top_k > 0 and top_k < logp.shape[-1]:
        kth_best = logp.topk(top_k, -1).values[:, -1:]  # [R, 1]
        kept_logp = kept_logp.masked_fill(kept_logp < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = kept_logp.sort(-1, descending=True)
        sorted_probs = sorted_logp.exp()
        # Keep the smallest prefix of the sorted vocabulary whose mass reaches top_p: a token is dropped
        # when the mass before it already reaches top_p (the most likely token is always kept).
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = mass_before >= top_p * sorted_probs.sum(-1, keepdim=True)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        kept_logp = kept_logp.masked_fill(drop, float("-inf"))
    # Gumbel-max via exponentials: argmax p_i / E_i with E_i ~ Exp(1) is a draw from p (as in gpt-fast);
    # one kernel, no renormalisation, and the generator makes it reproducible.
    noise = torch.empty_like(kept_logp).exponential_(1.0, generator=generator)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a draw of exactly 0 would make 0/0 = NaN
    token = (kept_logp.exp() / noise).argmax(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)
