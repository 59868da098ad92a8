"""The policy update of one step: token log-probs from the last hidden state (completion positions
only), the loss Σ w·(clipped surrogate + β·KL) per micro-batch, and AdamW steps over mini-batches
and epochs.

    update          epochs × mini-batches optimizer steps, each accumulated over micro-batches
    policy_loss     one micro-batch: completion_logprobs, then grpo.token_loss (the RL math)
    batch_logprobs  the same log-probs without gradient: the reference's and the old policy's
"""

import torch

import dist
import grpo
import models
import prefix_forward
import prorl_kernels
import rollout
import settings


def completion_logprobs(model, batch: rollout.Rollout, c: settings.Config):
    """(logp, entropy), each [B, T−1] fp32 (position t scores token t+1, as mask[:, 1:]), on the
    completion tokens only (0 elsewhere): each prompt runs through the layers once for its rows
    (prefix_forward), and the head and log-softmax see the completion positions alone, chunk by
    chunk (prorl_kernels.linear_token_logprobs). Policy, old and reference log-probs come from
    here."""
    compute = models.compute_dtype(batch.tokens.device, c.dtype)
    # hidden [B, W, H] covers columns start .. start+W−1 only (each prompt run once, padding
    # trimmed)
    hidden, start = prefix_forward.completion_hidden(model, batch.tokens, batch.attention_mask,
                                                     batch.mask, compute)
    columns = slice(start, start + hidden.shape[1])
    # [B, W]
    targets = batch.mask[:, 1:][:, columns]
    labels = batch.tokens[:, 1:][:, columns][targets]
    logp, entropy = prorl_kernels.linear_token_logprobs(hidden[targets], model.lm_head.weight,
                                                        labels, c.temperature, compute)
    zeros = torch.zeros(targets.shape, device=logp.device)
    # zeros left and right of the columns
    sides = (start, batch.mask.shape[1] - 1 - columns.stop)
    return (torch.nn.functional.pad(zeros.masked_scatter(targets, logp), sides),
            torch.nn.functional.pad(zeros.masked_scatter(targets, entropy), sides))


@torch.no_grad()
def batch_logprobs(model, batch: rollout.Rollout, c: settings.Config) -> torch.Tensor:
    """Teacher-forced log-probs [B, T−1] of the whole batch without gradient, micro-batch by
    micro-batch."""
    logprobs = []
    for rows in torch.arange(len(batch.tokens)).split(c.micro_batch_rows):
        logprobs.append(completion_logprobs(model, rollout.select_rows(batch, rows), c)[0])
    return torch.cat(logprobs)


def policy_loss(policy, part: rollout.Rollout, terms: grpo.LossTerms, spec: grpo.LossSpec,
                c: settings.Config):
    """One micro-batch's Σ_t w_t · (clipped surrogate + β·KL)_t and its statistics: log-probs from
    the hidden state (completion tokens only), then grpo.token_loss on [B, T−1]. terms.old_logp
    None: on-policy (ρ = 1, with logp's gradient)."""
    logp, entropy = completion_logprobs(policy, part, c)
    loss, stats = grpo.token_loss(logp, terms, spec)
    stats["entropy"] = grpo.masked_mean(entropy, terms.mask)
    return loss, stats


def loss_spec(c: settings.Config) -> grpo.LossSpec:
    """The loss's settings, checked (train.main builds one first, so a bad name fails before any
    work)."""
    # with --kl-in-reward the KL is only logged here: it is in the reward instead
    kl_coef = 0.0 if c.kl_in_reward else c.kl_coef
    return grpo.LossSpec(c.clip_low, c.clip_high, kl_coef, c.kl_kind, c.kl_clamp or None,
                         c.temperature, c.loss_agg)


def update(policy, optimizer, batch: rollout.Rollout, adv: torch.Tensor,
           ref_logp: torch.Tensor | None, c: settings.Config) -> dict:
    """PPO-style update: `epochs` passes, each split into `minibatches` optimizer steps, each
    accumulated over micro-batches of `micro_batch_rows` rows. Returns the step's statistics
    (token means)."""
    mask = batch.mask[:, 1:]  # the loss is on completion tokens
    # DAPO: a truncated response is no evidence either way, so it gets no gradient
    if c.overlong_filter:
        mask = mask & ~batch.truncated[:, None]
    spec = loss_spec(c)
    rows = torch.arange(len(adv))
    # Old log-probs are recomputed by the policy before any update (not taken from the sampler), so
    # the ratio is exactly 1 on the first mini-batch; a single update per batch needs no extra pass.
    on_policy = c.minibatches == 1 and c.epochs == 1
    old_logp = None if on_policy else batch_logprobs(policy, batch, c)  # [B, T−1] or None
    totals, tokens, skipped = {}, 0.0, 0  # stats summed over tokens, and the tokens they cover
    for _ in range(c.epochs):
        # tensor_split, not chunk: exactly `minibatches` near-equal pieces (chunk can cut fewer, or
        # leave a last piece of one row); every rank holds as many rows (dist.my_share), so all of
        # them cut alike.
        for minibatch in rows[torch.randperm(len(rows))].tensor_split(c.minibatches):
            # no token to learn from, on any rank: AdamW would still move the weights on its
            # momentum, so there is no step at all
            if not dist.any_true(bool(mask[minibatch].any())):
                continue
            # once per mini-batch
            count = dist.loss_denominator(grpo.loss_count(mask[minibatch], spec.agg))
            terms = grpo.LossTerms(old_logp, ref_logp, adv, mask,
                                   grpo.loss_weights(mask, spec.agg, count))
            finite = True
            # sorted, the rows of one group share micro-batches, and so their prompt's forward
            for micro in minibatch.sort().values.split(c.micro_batch_rows):
                loss, stats = policy_loss(policy, rollout.select_rows(batch, micro),
                                          terms.rows(micro), spec, c)
                finite = finite and bool(torch.isfinite(loss))
                # Σ over micro-batches and ranks = the gradient of the whole mini-batch's loss
                loss.backward()
                micro_tokens = float(mask[micro].sum())
                for name, value in stats.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * micro_tokens
                tokens += micro_tokens
            grad_norm = dist.clip_grad_norm_(policy.parameters(), c.grad_clip)
            # NaN/inf on any rank: skip, not poison
            ok = dist.all_true(finite and bool(torch.isfinite(grad_norm)))
            if ok:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            skipped += not ok
    return {**dist.token_means(totals, tokens), **dist.reduce_metrics({"skipped_updates": skipped})}
