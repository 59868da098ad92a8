"""ProRL / BroRL training: sample → verify → advantages → clipped policy loss + KL → reset → repeat.

    python train.py                         # tiny built-in base, built-in tasks, CPU, a few minutes
    python train.py --preset prorl-v2 --model DIR --tasks data/math.jsonl
    python train.py --help                  # every option (settings.py)

One step, in the order the loop in main() runs it:
    sample      sampling.py: prompts → rollout.py (N completions each) → rewards.py (scores)
                → dynamic sampling with refill
    reference   learner.batch_logprobs: the reference's token log-probs (for the KL)
    shape       grpo.shape_rewards: length penalty, KL in the reward, unlikeliness
    advantages  grpo.group_advantages: one per response
    update      learner.update: log-probs and the loss Σ w·(clipped surrogate + β·KL) → AdamW
    reset       reset.py: π_ref ← π on a schedule, a stall or a KL spike
    log, save   checkpoint.py: metrics, atomic checkpoints, stop and resume
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
import curriculum
import curves
import dist
import evaluation
import grpo
import learner
import llama_forward
import models
import reset
import sampling
import settings
import tasks


def held_out_pass1(policy, tokenizer, examples: list[dict], c: settings.Config) -> dict:
    """pass@1 per source, per family and overall on held-out problems (pass_at_k_by_source);
    every rank evaluates, so every rank decides resets alike."""
    with dist.full_weights(policy):
        params = sampling.SamplingParams(c.eval_samples, c.max_new_tokens, c.eval_temperature,
                                         seed=12345)
        return evaluation.evaluate(policy.eval(), tokenizer, examples, params)


def boundary_counts(policy, tokenizer, examples: list[dict], c: settings.Config,
                    name: str) -> list[int]:
    """Correct samples out of boundary_n per problem, for the pass@k report."""
    if not examples:
        return []
    with dist.full_weights(policy):
        params = sampling.SamplingParams(c.boundary_n, c.max_new_tokens,
                                         evaluation.EVAL_TEMPERATURE, evaluation.EVAL_TOP_P,
                                         seed=12345)
        progress = f"{name} pass@k" if dist.is_main() else ""
        return evaluation.correct_counts(policy.eval(), tokenizer, examples, params, progress)


def sample(policy, tokenizer, stream, groups: int, step: int, c: settings.Config):
    """This step's kept groups and their scores, the whole batch on every rank (each rank samples
    its share of whole groups with its own seed), and the sampling statistics averaged over
    ranks."""
    params = sampling.SamplingParams(c.n, c.max_new_tokens, c.temperature, c.top_p,
                                     seed=sampling.sampler_seed(c.seed, step, dist.rank()))
    rounds = c.max_sampling_rounds if c.dynamic_sampling else 1
    with dist.full_weights(policy):
        batch, scores, stats = sampling.sample_groups(policy.eval(), tokenizer, stream, groups,
                                                      params, rounds, c.dynamic_sampling)
    batch, scores = dist.gather_groups(batch, scores, tokenizer.pad_token_id)
    return batch, scores, dist.reduce_metrics(stats)


def clock() -> float:
    """time.time() once the GPU has finished what was queued, so each phase's time is its own."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.time()


def checked_config(argv: list[str]) -> settings.Config:
    """The config from the command line: settings.py checks its ranges, then each module that owns a
    name checks it (the model and device, KL kinds, estimators, tasks, the ranks, workshop bugs).
    A one-line ValueError, before any work starts and before the run directory exists."""
    c = settings.parse_config(argv)
    models.check_choices(c.model, c.device, c.dtype)
    learner.loss_spec(c)
    grpo.check_estimator(c.advantage)
    curriculum.prompt_stream(c)
    dist.groups_per_rank(c.prompts_per_step)
    bugs.check_name(c.bug)
    if c.run and not c.resume:
        checkpoint.new_run_dir(c.run, explicit=True)
    return c


def main(argv: list[str]) -> None:
    # --- setup: the config, the device, the run directory and the base model
    c = checked_config(argv)
    # the workshop's broken variants (bugs.py); none unless --bug names one
    bugs.switch_on(c.bug)
    device = dist.setup(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto"
                        else c.device)
    # a task mix, or the edge curriculum; a stream per rank
    stream = curriculum.prompt_stream(c, dist.rank())
    groups = dist.groups_per_rank(c.prompts_per_step)
    # loading draws from it too (a checkpoint's missing weights are initialised at random)
    torch.manual_seed(c.seed)
    if c.resume:
        run_dir = Path(c.resume)
    else:
        # a default name that is taken gets -2, -3, ...; an explicit --run that is taken is an error
        run_dir = dist.gather_objects(checkpoint.new_run_dir(c.run or f"{c.preset}-s{c.seed}",
                                                             bool(c.run)))[0]
    tiny_base = f"runs/base/tiny-s{c.seed}"
    # a hub id or a GGUF file resolves to a local directory
    model_dir = dist.main_first(lambda: models.resolve(c.model) if c.model else
                                models.ensure_tiny_base(tiny_base, seed=c.seed))

    # --- the policy, the reference and the optimizer Mixed precision: weights (and so AdamW's
    # state) are fp32 on every device, or updates of lr ≈ 1e-6 would round away; on CUDA forwards
    # compute in bf16 and the sampler samples bf16 copies.
    compute = models.compute_dtype(device, c.dtype)
    policy, tokenizer = models.load(model_dir, device, torch.float32)
    # every prompt, sampled or evaluated, starts with it
    models.set_system_prompt(tokenizer, c.system_prompt)
    llama_forward.check_supported(policy.config)
    # before sharding, so that FSDP2 wraps the checkpointed layers
    if c.activation_checkpointing:
        models.enable_activation_checkpointing(policy)
    # the run exists from here on, not before:
    # a model that cannot be loaded or sampled leaves nothing
    checkpoint.save_config(run_dir, dataclasses.asdict(c))
    if dist.is_main():
        print(f"run directory: {run_dir}", flush=True)
    # FSDP2 under torchrun; the optimizer is built on the shards
    policy = dist.shard(policy, compute)
    reference = None
    if c.kl_coef:
        # fp32 too: before any update, its log-probs are the policy's exactly
        reference = models.load(model_dir, device, torch.float32)[0].eval().requires_grad_(False)
        reference = dist.shard(reference, compute)
    # BroRL: more samples per step → a larger lr, scaled by sqrt(B_new / B_old)
    lr = c.lr
    if c.lr_scale_from_batch:
        lr = c.lr * math.sqrt(c.prompts_per_step * c.n / c.lr_scale_from_batch)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)

    # --- the held-out problems, each labelled with the source that reports it
    val_set, test_set, boundary_set = (
        tasks.label_sources({f: tasks.heldout(f, count, c.level) for f in stream.weights})
        for count in (c.val_problems, c.eval_problems, c.boundary_problems))
    tracker = reset.ResetTracker(c.reset_every, c.reset_patience, c.reset_kl)

    # --- resume from the checkpoint, or score the base model once and start at step 0
    state = checkpoint.TrainState(policy, reference, optimizer, tracker, stream)
    saved = checkpoint.resume(run_dir, c.resume, c.steps, lr, state)
    if saved is None:
        base = held_out_pass1(policy, tokenizer, test_set, c)
        base_counts = boundary_counts(policy, tokenizer, boundary_set, c, "base")
        saved = {"step": 0, "base": base, "base_counts": base_counts}
        # Seed every generator the steps draw from, from the config alone: whether the base model
        # was built in this process (drawing from them) or reused from disk must not change the run.
        torch.manual_seed(c.seed)
        random.seed(c.seed)
    metrics_file = checkpoint.open_metrics(run_dir, saved["step"])
    # --log tensorboard|wandb
    log = checkpoint.experiment_logger(c.log, run_dir, dataclasses.asdict(c))
    said_idle = False
    progress = tqdm(range(saved["step"] + 1, c.steps + 1), desc="RL", dynamic_ncols=True,
                    file=sys.stdout, disable=not dist.is_main())

    with checkpoint.stop_requests() as stop_requested:
        for step in progress:
            # --- sample: N completions per prompt, scored; groups scored all alike are dropped
            start = clock()
            batch, scores, sampled = sample(policy, tokenizer, stream, groups, step, c)
            metrics = {"step": step, **sampled, "gen_s": clock() - start}
            if len(scores):
                # --- reference: its log-probs of this rank's rows, for the KL (none without one)
                local, rows = dist.my_share(batch)
                ref_start = clock()
                ref_logp = (learner.batch_logprobs(reference, local, c)
                            if reference is not None else None)
                update_start = clock()
                # --- shape: length penalty, KL in the reward, unlikeliness (grpo.shape_rewards)
                all_ref_logp = (dist.gather_rows(ref_logp, len(batch.tokens))
                                if c.kl_in_reward else None)
                shaped, eta = grpo.shape_rewards(scores, batch.mask, batch.logprobs, all_ref_logp,
                                                 step - 1, c)
                # --- advantages: one per response [P·N]
                adv = grpo.group_advantages(shaped, c.advantage, c.passk_k).flatten()
                # --- update: Σ w·(clipped surrogate + β·KL) → AdamW
                stats = learner.update(policy.train(), optimizer, local, adv[rows], ref_logp, c)
                metrics.update(stats, length_eta=eta, ref_s=update_start - ref_start,
                               update_s=clock() - update_start)
            elif dist.is_main() and not said_idle:
                # said once: metrics.jsonl's kept_frac shows every such step
                said_idle = True
                tqdm.write(f"step {step}: every group's answers scored alike (all right or all "
                           "wrong), so there was nothing to learn; if this goes on, the tasks are "
                           "out of the model's reach (or too easy)")

            # --- validate, and reset π_ref ← π on a schedule, a stall or a KL spike
            if c.eval_every and step % c.eval_every == 0:
                val = evaluation.validation_metrics(held_out_pass1(policy, tokenizer, val_set, c))
                # the mean over ranks (val_pass1, val_pass1/<source>...): all take the same decision
                metrics.update(dist.reduce_metrics(val))
                tracker.observe_validation(metrics["val_pass1"])
            reason = tracker.should_reset(metrics.get("kl", 0.0))
            if reason and reference is not None:
                reset.reset_reference(policy, reference, optimizer if c.reset_optimizer else None)
                tracker.did_reset()
                metrics["reset"] = reason

            # --- log and save
            step_s = clock() - start
            metrics.update(resets=tracker.count, step_s=step_s,
                           tokens_per_s=float(batch.mask.sum()) / step_s, **stream.stats())
            if device.startswith("cuda"):
                # the most this rank's GPU has held so far, in GB
                metrics["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            log(metrics)
            # SIGTERM / Ctrl-C on any rank: all stop
            stop = dist.any_true(stop_requested()) and step < c.steps
            checkpoint.save_when_due(run_dir, step, c.steps, c.save_every, stop, state,
                                     base=saved["base"], base_counts=saved["base_counts"])
            progress.set_postfix(reward=f"{metrics['reward']:.3f}",
                                 kept=f"{metrics['kept_frac']:.2f}",
                                 kl=f"{metrics.get('kl', 0):.4f}",
                                 ent=f"{metrics.get('entropy', 0):.2f}")
            if stop:
                progress.close()
                if dist.is_main():
                    print(f"stopped by a signal after step {step}, checkpoint saved: "
                          f"--resume {run_dir} continues")
                return

    # --- the trained model, its scores, and the reports
    # saved in the dtype it came in
    dist.save_pretrained(policy, tokenizer, run_dir / "final", models.saved_dtype(model_dir))
    trained = held_out_pass1(policy, tokenizer, test_set, c)
    trained_counts = boundary_counts(policy, tokenizer, boundary_set, c, "trained")
    if dist.is_main():
        scores = {**saved, "trained": trained, "trained_counts": trained_counts}
        report(run_dir, model_dir, scores, test_set, boundary_set, c)


def report(run_dir, model_dir, scores: dict, test_set, boundary_set, c: settings.Config) -> None:
    """The base-vs-trained table (result.md), the pass@k boundary and the training curves. scores:
    the pass@1 reports "base" and "trained", and the boundary counts "base_counts" and
    "trained_counts"."""
    if boundary_set:
        counts = {"base": scores["base_counts"], "trained": scores["trained_counts"]}
        models_compared = {"base": model_dir, "trained": str(run_dir / "final")}
        evaluation.write_boundary(run_dir, counts, boundary_set, c.boundary_n,
                                  settings=models_compared)
        print(evaluation.pass1_gain(counts["base"], counts["trained"], c.boundary_n))
    curves.plot_training(run_dir)
    sizes = (f"held-out problems: {evaluation.problem_counts(test_set)}; "
             f"{c.eval_samples} samples each")
    print(evaluation.write_result(run_dir, scores["base"], scores["trained"],
                                  f"{sizes}, T={c.eval_temperature}"))
    boundary_files = ("boundary.md, boundary.png (pass@k at T=0.6, top-p 0.95), "
                      if boundary_set else "")
    print(f"wrote {run_dir}/: result.md, metrics.jsonl, training.png, "
          f"{boundary_files}checkpoint.pt, final/ (the trained model)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as error:  # bad input the user can fix: one line, no traceback
        sys.exit(f"error: {error}")
