"""The trainer's teacher-forced forward: the last hidden state at the positions whose next token the
loss scores, with each prompt run through the layers once (the shared-prefix forward of BroRL and
Prefix Grouper, as rollout.py's prefill does for sampling).

The N samples of a GRPO group share their prompt. HF's forward would run that prompt N times
through every layer, in the update, the reference pass and the old-log-prob pass; here the
distinct prompts of a micro-batch run once (U rows), and only the completion columns run per row
(B rows), attending to [their prompt's keys/values, their own]. The prompt's keys/values reach a
row by an index (a gather), so autograd sums each row's gradient back into its one prompt: the
gradient is the full forward's. Columns past the micro-batch's longest row are dropped before
anything runs (pure padding).

Layout (rollout.Rollout; S = the first completion column, prompt_len; T' = last real column + 1):

    columns   0 ........ S-1 | S ............ T'-2 | T'-1
    pass      prompt (U rows) | completion (B rows)  | not run: its hidden scores no token

The hidden state returned covers columns S-1 .. T'-2 ([B, T'-S, H]): column t scores token t+1.
The plain HF forward (`model(...)`) remains the path under FSDP2 (its hooks gather each layer's
weights around the layer's own forward, which this one bypasses) and for models it does not cover.
"""

import torch
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

import llama_forward


def completion_hidden(model, tokens: torch.Tensor, attention_mask: torch.Tensor,
                      completion_mask: torch.Tensor,
                      compute: torch.dtype) -> tuple[torch.Tensor, int]:
    """(hidden [B, W, H], start): the final norm's output at columns start .. start+W-1 of the rows
    tokens, attention_mask, completion_mask [B, T] (a rollout's tokens, attention_mask and mask);
    column t scores token t+1. start = S - 1 on the shared-prefix path, S the first completion
    column of any row (columns < S hold prompts only); 0 on HF's."""
    width = int(attention_mask.any(0).nonzero().max()) + 1  # T': the rest is padding in every row
    tokens, attention_mask = tokens[:, :width], attention_mask[:, :width]
    completion_columns = completion_mask[:, :width].any(0).nonzero()
    with torch.autocast(tokens.device.type, dtype=compute, enabled=compute != torch.float32):
        if shares_prefix(model) and len(completion_columns):
            S = int(completion_columns.min())
            if 0 < S < width - 1:  # a prompt column to share and a completion column to run
                return prefix_shared_hidden(model, tokens, attention_mask, S), S - 1
        return hf_hidden(model, tokens, attention_mask)[:, :-1], 0


def shares_prefix(model) -> bool:
    """Whether this module's forward covers the model: a Llama / Qwen2 that is not FSDP-sharded, and
    no attention dropout in training (HF's would draw it; this forward has none)."""
    if isinstance(model, FSDPModule):
        return False
    try:
        llama_forward.check_supported(model.config)
    except ValueError:
        return False
    return not (model.training and getattr(model.config, "attention_dropout", 0.0))


def hf_hidden(model, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The final norm's output [B, T, H], from the model's own forward (so FSDP's hooks gather and
    reduce the head and embeddings) asked for no logits: the head runs on 0 positions."""
    captured = {}
    norm = model.get_decoder().norm
    hook = norm.register_forward_hook(lambda module, args, out: captured.update(h=out))
    no_positions = torch.zeros(0, dtype=torch.long, device=tokens.device)
    try:
        model(input_ids=tokens, attention_mask=attention_mask.long(),
              position_ids=llama_forward.position_ids(attention_mask), logits_to_keep=no_positions,
              use_cache=False)
    finally:
        hook.remove()
    return captured["h"]


def prefix_shared_hidden(model, tokens: torch.Tensor, attention_mask: torch.Tensor,
                         S: int) -> torch.Tensor:
    """Final-norm hidden [B, T'-S, H] at columns S-1 .. T'-2, each distinct prompt (columns < S)
    run once."""
    # Rows with the same prompt columns (tokens and mask) share one prompt pass; a pad id may
    # equal a real token's, so the mask is part of the key.
    key = torch.cat([tokens[:, :S], attention_mask[:, :S].long()], dim=1)
    prompts, row_prompt = torch.unique(key, dim=0, return_inverse=True)  # [U, 2S], [B]
    prompt_ids, prompt_mask = prompts[:, :S], prompts[:, S:].bool()  # [U, S] each
    own_ids, own_mask = tokens[:, S:-1], attention_mask[:, S:-1]  # [B, C], C = T' - 1 - S
    positions = llama_forward.position_ids(attention_mask)
    decoder = model.get_decoder()
    prompt_h = decoder.embed_tokens(prompt_ids)  # [U, S, H]
    own_h = decoder.embed_tokens(own_ids)  # [B, C, H]
    prompt_rope = decoder.rotary_emb(prompt_h, llama_forward.position_ids(prompt_mask))
    own_rope = decoder.rotary_emb(own_h, positions[:, S:-1])
    masks = attention_masks(prompt_mask, own_mask, row_prompt)
    for layer in decoder.layers:
        # --activation-checkpointing: HF marks each layer it recomputes in backward; so do we.
        if getattr(layer, "gradient_checkpointing", False) and torch.is_grad_enabled():
            prompt_h, own_h = torch.utils.checkpoint.checkpoint(
                decoder_layer, layer, prompt_h, own_h, prompt_rope, own_rope, masks, row_prompt,
                use_reentrant=False)
        else:
            prompt_h, own_h = decoder_layer(layer, prompt_h, own_h, prompt_rope, own_rope, masks,
                                            row_prompt)
    # Column S-1 (the prompt's last) scores the first completion token: from the prompt pass.
    hidden = torch.cat([prompt_h[row_prompt, S - 1 :], own_h], dim=1)  # [B, 1 + C, H]
    return decoder.norm(hidden)


def attention_masks(prompt_mask, own_mask, row_prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean SDPA masks (True = may attend): the prompt pass's [U, 1, S, S] and the completion
    pass's [B, 1, C, S + C]. A real token sees the real tokens up to itself; every query also sees
    itself, so no softmax row is empty (a pad's output is never read)."""
    S, C = prompt_mask.shape[1], own_mask.shape[1]
    device = prompt_mask.device
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    eye = torch.eye(S, dtype=torch.bool, device=device)
    prompt_attn = ((causal & prompt_mask[:, None, :]) | eye)[:, None]
    own_causal = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    own_eye = torch.eye(C, dtype=torch.bool, device=device)
    own_attn = (own_causal & own_mask[:, None, :]) | own_eye  # [B, C, C]
    to_prompt = prompt_mask[row_prompt][:, None, :].expand(-1, C, -1)  # [B, C, S]
    return prompt_attn, torch.cat([to_prompt, own_attn], dim=2)[:, None]


def decoder_layer(layer, prompt_h, own_h, prompt_rope, own_rope, masks, row_prompt):
    """One HF decoder layer (its own modules and weights) on the prompt rows and the completion
    rows: pre-norm attention then pre-norm MLP, each added to the residual stream."""
    attn = layer.self_attn
    prompt_q, prompt_k, prompt_v = project_qkv(attn, layer.input_layernorm(prompt_h), prompt_rope)
    own_q, own_k, own_v = project_qkv(attn, layer.input_layernorm(own_h), own_rope)
    gqa = attn.config.num_attention_heads != attn.config.num_key_value_heads
    prompt_out = F.scaled_dot_product_attention(prompt_q, prompt_k, prompt_v, attn_mask=masks[0],
                                                scale=attn.scaling, enable_gqa=gqa)  # [U, H, S, D]
    # Each row's keys/values: its prompt's (gathered by index; their gradients sum back to the
    # prompt), then its own. The gather copies [B, Hkv, S, D], small next to the prompt's layers.
    keys = torch.cat([prompt_k[row_prompt], own_k], dim=2)  # [B, Hkv, S + C, D]
    values = torch.cat([prompt_v[row_prompt], own_v], dim=2)
    own_out = F.scaled_dot_product_attention(own_q, keys, values, attn_mask=masks[1],
                                             scale=attn.scaling, enable_gqa=gqa)  # [B, H, C, D]
    prompt_h = prompt_h + attn.o_proj(prompt_out.transpose(1, 2).flatten(2))
    own_h = own_h + attn.o_proj(own_out.transpose(1, 2).flatten(2))
    prompt_h = prompt_h + layer.mlp(layer.post_attention_layernorm(prompt_h))
    own_h = own_h + layer.mlp(layer.post_attention_layernorm(own_h))
    return prompt_h, own_h


def project_qkv(attn, x: torch.Tensor, rope) -> tuple[torch.Tensor, ...]:
    """q [B, H, T, D], k and v [B, Hkv, T, D] of normed x [B, T, H·D], RoPE applied to q and k."""
    heads = (*x.shape[:2], -1, attn.head_dim)
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    q, k, v = (proj(x).view(heads).transpose(1, 2) for proj in projections)
    cos, sin = rope[0][:, None], rope[1][:, None]  # [B, 1, T, D]
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE, HF's half-split convention: x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin
