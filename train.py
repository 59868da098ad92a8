"""ProRL / BroRL training: sample → verify → advantages → clipped policy loss + KL → reset → repeat.

    python train.py                         # tiny built-in base, built-in tasks, CPU, a few minutes
    python train.py --preset prorl-v2 --model DIR --tasks data/math.jsonl
    python train.py --help                  # every option (settings.py)

One step, in the order the code below runs it (each file imports only the ones after it in this list):
    sampling.py   prompts → rollout.py (N completions each) → rewards.py (scores) → dynamic sampling with refill
    rewards.py    the length penalty shapes the scores;  kl.py folds β·KL into them with --kl-in-reward
    grpo.py       group advantages
    train.update  log-probs and the loss Σ w·(clipped surrogate + β·KL) (prorl_kernels/, grpo.py, kl.py) → AdamW
    reset.py      π_ref ← π on a schedule, a stall or a KL spike
    checkpoint.py metrics, atomic checkpoints, stop and resume
"""

import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import bugs
import checkpoint
import curves
import dist
import evaluation
import grpo
import kl
import llama_forward
import models
import prefix_forward
import prorl_kernels
import reset
import rewards
import rollout
import sampling
import settings
import tasks


def completion_logprobs(model, batch: rollout.Rollout, c: settings.Config):
    """(logp, entropy), each [B, T−1] fp32 (position t scores token t+1, as mask[:, 1:]), on the
    completion tokens only (0 elsewhere): the head and log-softmax see those positions alone, chunk
    by chunk (prorl_kernels.linear_token_logprobs). Policy, old and reference log-probs come from here."""
    compute = models.compute_dtype(batch.tokens.device, c.dtype)
    # hidden [B, W, H] covers columns start .. start+W−1 only (each prompt run once, padding trimmed)
    hidden, start = prefix_forward.completion_hidden(model, batch.tokens, batch.attention_mask,
                                                     batch.mask, compute)
    columns = slice(start, start + hidden.shape[1])
    targets = batch.mask[:, 1:][:, columns]  # [B, W]
    labels = batch.tokens[:, 1:][:, columns][targets]
    logp, entropy = prorl_kernels.linear_token_logprobs(hidden[targets], model.lm_head.weight, labels,
                                                        c.temperature, compute)
    zeros = torch.zeros(targets.shape, device=logp.device)
    sides = (start, batch.mask.shape[1] - 1 - columns.stop)  # zeros left and right of the columns
    return (torch.nn.functional.pad(zeros.masked_scatter(targets, logp), sides),
            torch.nn.functional.pad(zeros.masked_scatter(targets, entropy), sides))


@torch.no_grad()
def batch_logprobs(model, batch: rollout.Rollout, c: settings.Config) -> torch.Tensor:
    """Teacher-forced log-probs [B, T−1] of the whole batch without gradient, micro-batch by micro-batch."""
    logprobs = []
    for rows in torch.arange(len(batch.tokens)).split(c.micro_batch_rows):
        logprobs.append(completion_logprobs(model, rollout.select_rows(batch, rows), c)[0])
    return torch.cat(logprobs)


def policy_loss(policy, part: rollout.Rollout, old_logp, ref_logp, adv, mask, weights,
                c: settings.Config, kl_coef: float):
    """One micro-batch's Σ_t w_t · (clipped surrogate + β·KL)_t and its statistics: log-probs from
    the hidden state (completion tokens only), then grpo.token_loss on [B, T−1]. old_logp None:
    on-policy (ρ = 1, with logp's gradient)."""
    logp, entropy = completion_logprobs(policy, part, c)
    old_logp = logp.detach() if old_logp is None else old_logp
    per_token, stats = grpo.token_loss(logp, old_logp, ref_logp, adv, mask, c.clip_low, c.clip_high,
                                       kl_coef, c.kl_kind, c.kl_clamp or None)
    stats["entropy"] = grpo.masked_mean(entropy, mask)
    return (per_token * weights).sum(), stats


def update(policy, optimizer, batch: rollout.Rollout, adv: torch.Tensor, ref_logp: torch.Tensor | None,
           c: settings.Config) -> dict:
    """PPO-style update: `epochs` passes, each split into `minibatches` optimizer steps, each accumulated over
    micro-batches of `micro_batch_rows` rows. Returns the step's statistics (token means)."""
    mask = batch.mask[:, 1:]  # the loss is on completion tokens
    if c.overlong_filter:  # DAPO: a truncated response is no evidence either way, so it gets no gradient
        mask = mask & ~batch.truncated[:, None]
    kl_coef = 0.0 if c.kl_in_reward else c.kl_coef  # with --kl-in-reward the KL is only logged here
    rows = torch.arange(len(adv))
    # Old log-probs are recomputed by the policy before any update (not taken from the sampler), so the
    # ratio is exactly 1 on the first mini-batch; a single update per batch needs no extra pass.
    on_policy = c.minibatches == 1 and c.epochs == 1
    old_logp = None if on_policy else batch_logprobs(policy, batch, c)
    totals, tokens, skipped = {}, 0.0, 0  # stats summed over tokens, and the tokens they cover
    for _ in range(c.epochs):
        # tensor_split, not chunk: exactly `minibatches` near-equal pieces (chunk can cut fewer, or leave a
        # last piece of one row); every rank holds as many rows (dist.my_share), so all of them cut alike.
        for minibatch in rows[torch.randperm(len(rows))].tensor_split(c.minibatches):
            if not dist.any_true(bool(mask[minibatch].any())):  # no token to learn from, on any rank: AdamW
                continue  # would still move the weights on its momentum, so there is no step at all
            count = dist.loss_denominator(grpo.loss_count(mask[minibatch], c.loss_agg))  # once per mini-batch
            finite = True
            # Sorted, rows of one group share micro-batches, and so their prompt's forward (prefix_forward).
            for micro in minibatch.sort().values.split(c.micro_batch_rows):
                part = rollout.select_rows(batch, micro)
                loss, stats = policy_loss(
                    policy, part, None if on_policy else old_logp[micro],
                    None if ref_logp is None else ref_logp[micro], adv[micro], mask[micro],
                    grpo.loss_weights(mask[micro], c.loss_agg, count), c, kl_coef)
                finite = finite and bool(torch.isfinite(loss))
                loss.backward()  # Σ over micro-batches and ranks = the gradient of the whole mini-batch's loss
                micro_tokens = float(mask[micro].sum())
                for name, value in stats.items():
                    totals[name] = totals.get(name, 0.0) + float(value) * micro_tokens
                tokens += micro_tokens
            grad_norm = dist.clip_grad_norm_(policy.parameters(), c.grad_clip)
            ok = dist.all_true(finite and bool(torch.isfinite(grad_norm)))  # NaN/inf on any rank: skip, not poison
            if ok:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            skipped += not ok
    return {**dist.token_means(totals, tokens), **dist.reduce_metrics({"skipped_updates": skipped})}


def held_out_pass1(policy, tokenizer, examples: list[dict], c: settings.Config) -> dict:
    """pass@1 per source, per family and overall on held-out problems (pass_at_k_by_source);
    every rank evaluates, so every rank decides resets alike."""
    with dist.full_weights(policy):
        return evaluation.evaluate(policy.eval(), tokenizer, examples, c.eval_samples,
                                   c.max_new_tokens, c.eval_temperature, seed=12345)


def boundary_counts(policy, tokenizer, examples: list[dict], c: settings.Config, name: str) -> list[int]:
    """Correct samples out of boundary_n per problem, for the pass@k report."""
    if not examples:
        return []
    with dist.full_weights(policy):
        return evaluation.correct_counts(policy.eval(), tokenizer, examples, c.boundary_n, c.max_new_tokens,
                                         seed=12345, progress=f"{name} pass@k" if dist.is_main() else "")


def clock() -> float:
    """time.time() once the GPU has finished what was queued, so that each phase's time is its own."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.time()


def main(argv: list[str]) -> None:
    c = settings.parse_config(argv)
    bugs.switch_on(c.bug)  # the workshop's broken variants (bugs.py); none unless --bug names one
    device = dist.setup(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
    torch.manual_seed(c.seed)  # loading too draws from it (a checkpoint's missing weights are initialised at random)
    name = c.run or f"{c.preset}-s{c.seed}"  # taken: -2, -3, ... (an explicit --run that is taken fails validate)
    run_dir = Path(c.resume) if c.resume else dist.gather_objects(checkpoint.new_run_dir(name))[0]
    model_dir = dist.main_first(lambda: models.resolve(c.model) if c.model else  # a hub id or GGUF: a local dir
                                models.ensure_tiny_base(f"runs/base/tiny-s{c.seed}", seed=c.seed))
    # Mixed precision: weights (and so AdamW's state) are fp32 on every device, or updates of lr ≈ 1e-6 would
    # round away; on CUDA forwards compute in bf16 and the sampler samples bf16 copies (llama_forward.SAMPLE_DTYPE).
    compute = models.compute_dtype(device, c.dtype)
    policy, tokenizer = models.load(model_dir, device, torch.float32)
    models.set_system_prompt(tokenizer, c.system_prompt)  # every prompt, sampled or evaluated, starts with it
    llama_forward.check_supported(policy.config)
    if c.activation_checkpointing:  # before sharding, so that FSDP2 wraps the checkpointed layers
        models.enable_activation_checkpointing(policy)
    checkpoint.save_config(run_dir, dataclasses.asdict(c))  # the run exists from here on, not before: a model
    if dist.is_main():                                        # that cannot be loaded or sampled leaves nothing
        print(f"run directory: {run_dir}", flush=True)
    policy = dist.shard(policy, compute)  # FSDP2 under torchrun; the optimizer is built on the shards
    reference = (dist.shard(models.load(model_dir, device, torch.float32)[0].eval().requires_grad_(False), compute)
                 if c.kl_coef else None)  # fp32 too: before any update, its log-probs are the policy's exactly
    # BroRL: more samples per step → a larger lr, scaled by sqrt(B_new / B_old)
    lr = c.lr * math.sqrt(c.prompts_per_step * c.n / c.lr_scale_from_batch) if c.lr_scale_from_batch else c.lr
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    stream = settings.prompt_stream(c, dist.rank())  # a task mix, or the edge curriculum; a stream per rank
    # held-out problems, each labelled with the source that reports it (a file may hold fewer)
    val_set, test_set, boundary_set = (
        tasks.label_sources({f: tasks.heldout(f, count, c.level) for f in stream.weights})
        for count in (c.val_problems, c.eval_problems, c.boundary_problems))
    tracker = reset.ResetTracker(c.reset_every, c.reset_patience, c.reset_kl)

    def start_fresh() -> dict:  # the base model's scores, measured once, before step 1
        base = held_out_pass1(policy, tokenizer, test_set, c)
        base_counts = boundary_counts(policy, tokenizer, boundary_set, c, "base")
        # Seed every generator the steps draw from, from the config alone: whether the base model was built
        # in this process (drawing from them) or reused from disk must not change the run. A resumed run
        # restores their states from its checkpoint instead.
        torch.manual_seed(c.seed)
        random.seed(c.seed)
        return {"step": 0, "base": base, "base_counts": base_counts}

    saved = checkpoint.resume_or_start(run_dir, c.resume, c.steps, lr, start_fresh, policy, reference, optimizer,
                                       tracker, stream)
    metrics_file, said_idle = checkpoint.open_metrics(run_dir, saved["step"]), False
    log = checkpoint.experiment_logger(c.log, run_dir, dataclasses.asdict(c))  # --log tensorboard|wandb
    progress = tqdm(range(saved["step"] + 1, c.steps + 1), desc="RL", dynamic_ncols=True, file=sys.stdout,
                    disable=not dist.is_main())
    with checkpoint.stop_requests() as stop_requested:
        for step in progress:
            start = clock()
            with dist.full_weights(policy):  # each rank samples its share of whole groups, with its own seed
                batch, scores, metrics = sampling.sample_groups(
                    policy.eval(), tokenizer, stream, c.prompts_per_step // dist.world_size(), c.n, c.max_new_tokens,
                    c.temperature, c.top_p, rounds=c.max_sampling_rounds if c.dynamic_sampling else 1,
                    dynamic_sampling=c.dynamic_sampling, seed=sampling.sampler_seed(c.seed, step, dist.rank()))
            batch, scores = dist.gather_groups(batch, scores, tokenizer.pad_token_id)  # the whole batch everywhere
            metrics = {"step": step, **dist.reduce_metrics(metrics), "gen_s": clock() - start}  # means over ranks
            if len(scores):
                eta = rewards.length_penalty_coef(step - 1, c.length_eta_min, c.length_eta_max, c.length_period,
                                                  c.length_off_steps)
                lengths = batch.mask.sum(dim=1).view_as(scores)
                shaped = rewards.apply_length_penalty(scores, lengths, c.max_new_tokens, eta)  # [P, N]
                local, rows = dist.my_share(batch)  # the rows this rank's forward/backward passes cover
                ref_start = clock()
                ref_logp = batch_logprobs(reference, local, c) if reference is not None else None
                update_start = clock()
                if c.kl_in_reward:  # r − β · Σ_t KL_t, with the sampler's log-probs as π (no extra forward)
                    all_ref_logp = dist.gather_rows(ref_logp, len(batch.tokens))
                    token_kl = kl.kl_estimate(batch.logprobs[:, 1:], all_ref_logp, c.kl_kind)
                    shaped = shaped - c.kl_coef * (token_kl * batch.mask[:, 1:]).sum(dim=1).view_as(shaped)
                if c.unlikeliness:  # right answers ranked by their mean log-prob under the sampler (no extra pass)
                    seq_logp = (batch.logprobs * batch.mask).sum(1) / batch.mask.sum(1).clamp(min=1)
                    shaped = grpo.unlikeliness_rewards(shaped, seq_logp.view_as(shaped), c.unlikeliness)
                adv = grpo.group_advantages(shaped, c.advantage, c.passk_k).flatten()  # [P·N]: one per response
                metrics.update(update(policy.train(), optimizer, local, adv[rows], ref_logp, c), length_eta=eta,
                               ref_s=update_start - ref_start, update_s=clock() - update_start)
            elif dist.is_main() and not said_idle:  # said once: metrics.jsonl's kept_frac shows every such step
                said_idle = True
                tqdm.write(f"step {step}: every group's answers scored alike (all right or all wrong), so there was "
                           "nothing to learn; if this goes on, the tasks are out of the model's reach (or too easy)")
            if c.eval_every and step % c.eval_every == 0:  # the mean over ranks: all take the same reset decision
                val = evaluation.validation_metrics(held_out_pass1(policy, tokenizer, val_set, c))
                metrics.update(dist.reduce_metrics(val))  # val_pass1, val_pass1/<source>, ...
                tracker.observe_validation(metrics["val_pass1"])
            reason = tracker.should_reset(metrics.get("kl", 0.0))
            if reason and reference is not None:
                reset.reset_reference(policy, reference, optimizer if c.reset_optimizer else None)
                tracker.did_reset()
                metrics["reset"] = reason
            step_s = clock() - start
            metrics.update(resets=tracker.count, step_s=step_s, tokens_per_s=float(batch.mask.sum()) / step_s,
                           **stream.stats())
            if device.startswith("cuda"):  # the most this rank's GPU has held so far, in GB
                metrics["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            log(metrics)
            stop = dist.any_true(stop_requested()) and step < c.steps  # SIGTERM / Ctrl-C on any rank: all stop
            checkpoint.save_when_due(run_dir, step, c.steps, c.save_every, stop, policy, reference, optimizer,
                                     tracker, stream, base=saved["base"], base_counts=saved["base_counts"])
            progress.set_postfix(reward=f"{metrics['reward']:.3f}", kept=f"{metrics['kept_frac']:.2f}",
                                 kl=f"{metrics.get('kl', 0):.4f}", ent=f"{metrics.get('entropy', 0):.2f}")
            if stop:
                progress.close()
                if dist.is_main():
                    print(f"stopped by a signal after step {step}, checkpoint saved: --resume {run_dir} continues")
                return
    dist.save_pretrained(policy, tokenizer, run_dir / "final", models.saved_dtype(model_dir))  # as it came
    trained = held_out_pass1(policy, tokenizer, test_set, c)
    trained_counts = boundary_counts(policy, tokenizer, boundary_set, c, "trained")
    if dist.is_main():
        report(run_dir, model_dir, saved, trained, trained_counts, boundary_set, test_set, c)


def report(run_dir, model_dir, saved, trained, trained_counts, boundary_set, test_set, c) -> None:
    """The base-vs-trained table (result.md), the pass@k boundary and the training curves."""
    if boundary_set:
        evaluation.write_boundary(run_dir, {"base": saved["base_counts"], "trained": trained_counts}, boundary_set,
                                  c.boundary_n, settings={"base": model_dir, "trained": str(run_dir / "final")})
        print(evaluation.pass1_gain(saved["base_counts"], trained_counts, c.boundary_n))
    curves.plot_training(run_dir)
    sizes = f"held-out problems: {evaluation.problem_counts(test_set)}; {c.eval_samples} samples each"
    print(evaluation.write_result(run_dir, saved["base"], trained, f"{sizes}, T={c.eval_temperature}"))
    print(f"wrote {run_dir}/: result.md, metrics.jsonl, training.png, " + ("boundary.md, boundary.png (pass@k at "
          "T=0.6, top-p 0.95), " if boundary_set else "") + "checkpoint.pt, final/ (the trained model)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as error:  # bad input the user can fix: one line, no traceback
        sys.exit(f"error: {error}")
