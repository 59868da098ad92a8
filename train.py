"""ProRL / BroRL training: sample → verify → advantages → clipped policy loss + KL → reset → repeat.

    python train.py                         # tiny built-in base, built-in tasks, CPU, a few minutes
    python train.py --preset prorl-v2 --model DIR --tasks data/math.jsonl
    python train.py --help                  # every option
"""

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import checkpoint
import dist
import eval as evaluation
import grpo
import kernels
import kl
import model as model_lib
import reset
import rewards
import rollout
import tasks


def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = option("", "local Hugging Face model directory; empty: build the tiny built-in base")
    tasks: str = option("sort,reverse,countdown", "task mix SOURCE[:WEIGHT],...: built-in add/sort/reverse/"
                        "countdown, a domain (math, code, logic, mcq, ifeval), rg:NAME (reasoning-gym), or a JSONL path")
    level: int = option(1, "difficulty of the built-in tasks (1-3)")
    run: str = option("", "run name; metrics go to runs/<run>/ (empty: <preset>-s<seed>, -2, -3 ... if taken)")
    seed: int = option(0, "seed of the base model build, the prompt stream and the sampler")
    steps: int = option(80, "RL steps")
    prompts_per_step: int = option(64, "groups (prompts) per step after dynamic sampling")
    n: int = option(16, "rollouts per prompt (group size)")
    max_new_tokens: int = option(16, "completion length limit; longer completions are truncated")
    temperature: float = option(1.0, "sampling temperature (ProRL: 1.2)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    lr: float = option(2e-4, "AdamW learning rate")
    lr_scale_from_batch: int = option(0, "BroRL: scale lr by sqrt(samples per step / this) (0: off)")
    advantage: str = option("grpo", "advantage estimator: grpo, reinforce_pp, rloo")
    clip_low: float = option(0.2, "ε_low: ratio clipped below at 1 − ε_low")
    clip_high: float = option(0.28, "ε_high: ratio clipped above at 1 + ε_high (ProRL: 0.4)")
    loss_agg: str = option("token-mean", "token-mean, seq-mean-token-mean or seq-mean-token-sum")
    kl_coef: float = option(1e-3, "β: weight of KL(π‖π_ref) in the loss (0: no reference model)")
    kl_kind: str = option("k3", "KL estimator: k1, k2, k3 (k1 in the loss has zero expected gradient: use it with --kl-in-reward)")
    kl_clamp: float = option(0.0, "clamp the per-token KL term to ±this (0: off)")
    kl_in_reward: bool = option(False, "fold β·KL into each response's reward instead of the loss")
    overlong_filter: bool = option(False, "mask truncated responses out of the loss instead of rewarding them 0")
    dynamic_sampling: bool = option(True, "drop groups whose rewards are all equal, refill with fresh prompts")
    max_sampling_rounds: int = option(2, "sampling rounds per step to fill the batch with informative groups")
    minibatches: int = option(4, "optimizer steps per rollout batch (PPO mini-batches)")
    epochs: int = option(1, "passes over each rollout batch")
    micro_batch_rows: int = option(256, "rows per forward/backward (gradient accumulation); memory only")
    activation_checkpointing: bool = option(False, "recompute each layer's activations in backward instead of "
                                            "keeping them (less memory per row, ~1/3 more compute)")
    grad_clip: float = option(1.0, "max gradient norm")
    reset_every: int = option(0, "reset π_ref ← π every this many steps (0: never)")
    reset_patience: int = option(0, "reset when validation pass@1 has not improved this many evaluations (0: off)")
    reset_kl: float = option(0.0, "reset when a step's mean KL exceeds this (0: off)")
    reset_optimizer: bool = option(True, "re-initialise the optimizer state at a reset (ProRL v1; v2: off)")
    length_eta_max: float = option(0.0, "ProRL v2 cosine length penalty: η at the start of each cycle")
    length_eta_min: float = option(0.0, "η the on-phase decays towards, cosine over --length-period steps")
    length_period: int = option(100, "steps of each on-phase of the length penalty")
    length_off_steps: int = option(0, "steps with the length penalty off after each on-phase")
    eval_every: int = option(20, "validation every this many steps (drives stall resets)")
    val_problems: int = option(100, "held-out problems per family for validation during training")
    eval_problems: int = option(500, "held-out problems per family for the final base-vs-trained report")
    eval_samples: int = option(4, "samples per problem for pass@1")
    eval_temperature: float = option(1.0, "sampling temperature of evaluation")
    boundary_problems: int = option(50, "held-out problems per family for the final pass@k boundary (0: skip)")
    boundary_n: int = option(256, "samples per problem for the boundary report, at ProRL's T=0.6, top-p 0.95")
    device: str = option("auto", "cpu, cuda, or auto")
    save_every: int = option(50, "write <run>/checkpoint.pt every this many steps, and always at the end (0: end only)")
    resume: str = option("", "continue the run in this directory from its checkpoint (flags given now override)")
    preset: str = option("tiny", "tiny, prorl, prorl-v2 or brorl: the papers' hyperparameters, then your flags")


PRESETS = {
    "tiny": {},
    # ProRL (arXiv 2505.24864): GRPO, clip 0.2/0.4, n=16, T=1.2, KL + resets that also reset Adam.
    "prorl": {"advantage": "grpo", "clip_low": 0.2, "clip_high": 0.4, "n": 16, "temperature": 1.2, "lr": 2e-6,
              "prompts_per_step": 256, "minibatches": 4, "kl_coef": 1e-4, "kl_kind": "k3", "reset_patience": 3,
              "reset_optimizer": True, "max_new_tokens": 8192, "micro_batch_rows": 1},
    # ProRL v2: REINFORCE++-baseline, clip 0.2/0.28, k2 KL β=1e-4, resets every 300 steps keeping Adam,
    # scheduled cosine length penalty.
    "prorl-v2": {"advantage": "reinforce_pp", "clip_low": 0.2, "clip_high": 0.28, "n": 16, "temperature": 1.2, "lr": 2e-6,
                 "prompts_per_step": 256, "minibatches": 4, "kl_coef": 1e-4, "kl_kind": "k2", "reset_every": 300,
                 "reset_optimizer": False, "length_eta_max": 0.1, "length_eta_min": 0.0, "length_period": 200,
                 "length_off_steps": 100, "max_new_tokens": 8192, "micro_batch_rows": 1},
    # BroRL (arXiv 2510.01180): N=512 rollouts for 128 prompts, lr scaled by sqrt(B_new / B_old)
    # against ProRL's 256 prompts × 16.
    "brorl": {"advantage": "reinforce_pp", "clip_low": 0.2, "clip_high": 0.28, "n": 512, "prompts_per_step": 128,
              "temperature": 1.2, "lr": 2e-6, "lr_scale_from_batch": 256 * 16, "minibatches": 4, "kl_coef": 1e-4,
              "kl_kind": "k2", "reset_every": 300, "reset_optimizer": False, "max_new_tokens": 8192,
              "micro_batch_rows": 1},
}
# micro_batch_rows 1 in the paper presets: one 8k-token row of a 1.5B model holds ~2.5 GB of bf16 logits and
# roughly 26-29 GB of activations (no activation checkpointing); 256 rows would need terabytes.


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # "error: <message>" on one line (see __main__), not a usage dump
        raise ValueError(message)


def parse_config(argv: list[str]) -> Config:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Config):
        kind = parse_bool if f.type is bool else f.type
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=None,
                            help=f"{f.metadata['help']} (default: {f.default})")
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if args.get("resume"):  # the run's own settings, then the flags given now (e.g. more --steps)
        args = checkpoint.resumed_settings(args["resume"], args)
    preset = args.get("preset", "tiny")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (choose from {', '.join(PRESETS)})")
    config = Config(**{**PRESETS[preset], **args})
    validate(config)
    return config


def parse_bool(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("1", "true", "yes")


def validate(c: Config) -> None:
    checks = [(c.n >= 2, "--n must be at least 2: group advantages compare samples of one prompt"),
              (c.prompts_per_step >= 1 and c.steps >= 1, "--prompts-per-step and --steps must be ≥ 1"),
              (c.lr > 0, "--lr must be positive"), (c.temperature > 0, "--temperature must be > 0 (the loss is at the sampling temperature)"),
              (0 < c.top_p <= 1, "--top-p must be in (0, 1]"), (c.max_new_tokens >= 1, "--max-new-tokens must be ≥ 1"),
              (0 <= c.clip_low < 1 and c.clip_high >= 0, "--clip-low must be in [0, 1) and --clip-high ≥ 0"),
              (c.minibatches >= 1 and c.epochs >= 1, "--minibatches and --epochs must be ≥ 1"),
              (c.level in (1, 2, 3), "--level must be 1, 2 or 3"), (c.kl_coef >= 0, "--kl-coef must be ≥ 0"),
              (c.eval_samples >= 1 and c.eval_every >= 0, "--eval-samples must be ≥ 1, --eval-every ≥ 0"),
              (c.eval_problems >= 1 and c.val_problems >= 1, "--eval-problems and --val-problems must be ≥ 1"),
              (c.boundary_problems >= 0 and c.boundary_n >= 1, "--boundary-problems must be ≥ 0, --boundary-n ≥ 1"),
              (1 <= c.max_sampling_rounds <= 10, "--max-sampling-rounds must be in 1..10"),
              (c.micro_batch_rows >= 1, "--micro-batch-rows must be ≥ 1"), (c.save_every >= 0, "--save-every must be ≥ 0"),
              (c.prompts_per_step % dist.planned_world_size() == 0, "--prompts-per-step must divide among the ranks"),
              (c.length_period >= 1 and c.length_off_steps >= 0, "--length-period must be ≥ 1, --length-off-steps ≥ 0"),
              (c.lr_scale_from_batch >= 0 and c.kl_clamp >= 0, "--lr-scale-from-batch and --kl-clamp must be ≥ 0"),
              (all(math.isfinite(v) for v in dataclasses.asdict(c).values() if isinstance(v, float)),
               "every number must be finite (no nan or inf)"),
              (c.grad_clip > 0 and c.reset_kl >= 0 and c.eval_temperature >= 0,
               "--grad-clip must be > 0, --reset-kl and --eval-temperature ≥ 0"),
              (not c.run or c.resume or not checkpoint.is_run(Path("runs") / c.run),
               f"runs/{c.run} already holds a run: --resume runs/{c.run} continues it, another --run starts anew"),
              (c.kl_coef > 0 or not c.kl_in_reward, "--kl-in-reward needs --kl-coef > 0")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    grpo.group_advantages(torch.zeros(1, 2), c.advantage)  # unknown names raise their own one-line error
    grpo.aggregate(torch.zeros(1, 1), torch.ones(1, 1), c.loss_agg)
    kl.kl_estimate(torch.zeros(1), torch.zeros(1), c.kl_kind)
    mix = tasks.TaskMix(c.tasks, c.level)  # unknown task names and unreadable files fail here, before any work
    if not any(tasks.heldout(family, 1, c.level) for family in mix.weights):
        raise tasks.no_heldout_error(c.tasks)
    model_lib.check_device(c.device)
    if c.model:
        model_lib.check_model_dir(c.model)


def sequence_logprobs(policy, batch: rollout.Rollout, temperature: float, entropy: bool = False):
    """Teacher-forced log-probs [B, T−1] of tokens[:, 1:] (and their entropies), aligned with mask[:, 1:]."""
    compute = model_lib.compute_dtype(batch.tokens.device)
    with torch.autocast(batch.tokens.device.type, dtype=compute, enabled=compute != torch.float32):
        logits = policy(input_ids=batch.tokens, attention_mask=batch.attention_mask.long(),
                        position_ids=rollout.position_ids(batch.attention_mask), use_cache=False).logits
    return kernels.token_logprobs(logits[:, :-1], batch.tokens[:, 1:], temperature, entropy)


@torch.no_grad()
def batch_logprobs(model, batch: rollout.Rollout, c: Config) -> torch.Tensor:
    """Log-probs [B, T−1] of the whole batch without gradient, micro-batch by micro-batch."""
    return torch.cat([sequence_logprobs(model, rollout.select_rows(batch, rows), c.temperature)
                      for rows in torch.arange(len(batch.tokens)).split(c.micro_batch_rows)])


def update(policy, optimizer, batch: rollout.Rollout, adv: torch.Tensor, ref_logp: torch.Tensor | None,
           c: Config) -> dict:
    """PPO-style update: `epochs` passes, each split into `minibatches` optimizer steps, each
    accumulated over micro-batches of `micro_batch_rows` rows. Returns the step's mean statistics."""
    mask = batch.mask[:, 1:]  # the loss is on completion tokens; position t predicts token t+1
    if c.overlong_filter:  # DAPO: a truncated response is no evidence either way, so it gets no gradient
        mask = mask & ~batch.truncated[:, None]
    kl_coef = 0.0 if c.kl_in_reward or ref_logp is None else c.kl_coef
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
            share, finite = dist.loss_share(mask[minibatch], c.loss_agg), True  # this rank's part of the global mean
            for micro in minibatch.split(c.micro_batch_rows):
                logp, entropy = sequence_logprobs(policy, rollout.select_rows(batch, micro), c.temperature, entropy=True)
                micro_old = logp.detach() if on_policy else old_logp[micro]
                loss, stats = grpo.policy_loss(logp, micro_old, adv[micro], mask[micro], c.clip_low, c.clip_high, c.loss_agg)
                if ref_logp is not None:
                    kl_per_token = kl.kl_penalty(logp, ref_logp[micro], c.kl_kind, c.kl_clamp or None, mask[micro])
                    if kl_coef:  # with --kl-in-reward the KL is logged only (0 · an overflowed KL would be NaN)
                        loss = loss + kl_coef * grpo.aggregate(kl_per_token, mask[micro], c.loss_agg)
                    stats["kl"] = grpo.masked_mean(kl_per_token.detach(), mask[micro])
                stats["entropy"] = grpo.masked_mean(entropy, mask[micro])
                finite = finite and bool(torch.isfinite(loss))
                (loss * grpo.aggregate_weight(mask[micro], mask[minibatch], c.loss_agg) * share).backward()
                micro_tokens = float(mask[micro].sum())  # stats are token means over the micro-batch
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


def clock() -> float:
    """time.time() once the GPU has finished what was queued, so that each phase's time is its own."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.time()


def main(argv: list[str]) -> None:
    c = parse_config(argv)
    device = dist.setup(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
    torch.manual_seed(c.seed)
    name = c.run or f"{c.preset}-s{c.seed}"  # taken: -2, -3, ... (an explicit --run that is taken fails validate)
    run_dir = Path(c.resume) if c.resume else dist.gather_objects(checkpoint.new_run_dir(name))[0]  # rank 0's choice
    model_dir = c.model or dist.main_first(lambda: model_lib.ensure_tiny_base(f"runs/base/tiny-s{c.seed}", seed=c.seed))
    # Mixed precision: weights (and so AdamW's state) are fp32 on every device, or updates of lr ≈ 1e-6 would
    # round away (a bf16 weight near 0.02 moves in steps of 1e-4); on CUDA forwards compute in bf16 (autocast in
    # sequence_logprobs, or FSDP2's param_dtype) and the sampler samples bf16 copies (rollout.SAMPLE_DTYPE).
    compute = model_lib.compute_dtype(device)
    policy, tokenizer = model_lib.load(model_dir, device, torch.float32)
    rollout.check_supported(policy.config)
    if c.activation_checkpointing:  # before sharding, so that FSDP2 wraps the checkpointed layers
        model_lib.enable_activation_checkpointing(policy)
    # The run exists from here on (its name is taken): a model that cannot be loaded or sampled leaves nothing.
    checkpoint.save_config(run_dir, dataclasses.asdict(c))
    if dist.is_main():
        print(f"run directory: {run_dir}", flush=True)
    policy = dist.shard(policy, compute)  # FSDP2 under torchrun; the optimizer is built on the shards
    reference = (dist.shard(model_lib.load(model_dir, device, torch.float32)[0].eval().requires_grad_(False), compute)
                 if c.kl_coef else None)  # fp32 too: before any update, its log-probs are the policy's exactly
    lr = c.lr * math.sqrt(c.prompts_per_step * c.n / c.lr_scale_from_batch) if c.lr_scale_from_batch else c.lr
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    stream = tasks.TaskMix(c.tasks, level=c.level, seed=c.seed + 1_000_003 * dist.rank())  # a stream per rank
    families = list(stream.weights)
    val_set = [ex for f in families for ex in tasks.heldout(f, c.val_problems, c.level)]
    test_by_source = {f: tasks.heldout(f, c.eval_problems, c.level) for f in families}  # a file may hold fewer
    test_set = [ex for examples in test_by_source.values() for ex in examples]
    boundary_set = [ex for f in families for ex in tasks.heldout(f, c.boundary_problems, c.level)]
    tracker = reset.ResetTracker(c.reset_every, c.reset_patience, c.reset_kl)

    def held_out_pass1(examples: list[dict]) -> dict:  # every rank evaluates, so every rank decides resets alike
        with dist.full_weights(policy):
            report = evaluation.evaluate(policy.eval(), tokenizer, examples, c.eval_samples, c.max_new_tokens,
                                         c.eval_temperature, seed=12345)
        return {family: r[1] for family, r in report.items()}

    def boundary_counts(name: str) -> list[int]:
        with dist.full_weights(policy):
            return evaluation.correct_counts(policy.eval(), tokenizer, boundary_set, c.boundary_n, c.max_new_tokens,
                                             seed=12345, progress=f"{name} pass@k" if dist.is_main() else "") \
                if boundary_set else []

    resuming = bool(c.resume) and checkpoint.has_checkpoint(run_dir)
    if c.resume and not resuming and dist.is_main():
        print(f"{run_dir} stopped before its first checkpoint: starting it over from step 0", flush=True)
    saved = (checkpoint.load(run_dir, policy, reference, optimizer, tracker, stream) if resuming  # base: before step 1
             else {"step": 0, "base": held_out_pass1(test_set), "base_counts": boundary_counts("base")})
    if saved["step"] >= c.steps:
        raise ValueError(f"{run_dir} is at step {saved['step']} already: give --steps beyond it to train on")
    for group in optimizer.param_groups:  # a loaded optimizer state holds the lr it was saved with: --lr now wins
        group["lr"] = lr
    if resuming and dist.is_main():
        print(f"resuming at step {saved['step']}, on to step {c.steps}", flush=True)
    base, base_counts, metrics_file = saved["base"], saved["base_counts"], checkpoint.open_metrics(run_dir, saved["step"])
    said_idle = False
    progress = tqdm(range(saved["step"] + 1, c.steps + 1), desc="RL", dynamic_ncols=True, file=sys.stdout,
                    disable=not dist.is_main())
    with checkpoint.stop_requests() as stop_requested:
        for step in progress:
            start = clock()
            with dist.full_weights(policy):  # each rank samples its share of whole groups, with its own seed
                batch, scores, metrics = grpo.sample_groups(
                    policy.eval(), tokenizer, stream, c.prompts_per_step // dist.world_size(), c.n, c.max_new_tokens,
                    c.temperature, c.top_p, rounds=c.max_sampling_rounds if c.dynamic_sampling else 1,
                    dynamic_sampling=c.dynamic_sampling, seed=c.seed * 100_003 + step * 10 + dist.rank() * 1_000_003)  # + round < 10
            batch, scores = dist.gather_groups(batch, scores, tokenizer.pad_token_id)  # the whole batch on every rank
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
                metrics["ref_s"] = update_start - ref_start
                if c.kl_in_reward:  # r − β · Σ_t KL_t, with the sampler's log-probs as π (no extra forward)
                    token_kl = kl.kl_estimate(batch.logprobs[:, 1:], dist.gather_rows(ref_logp, len(batch.tokens)), c.kl_kind)
                    shaped = shaped - c.kl_coef * (token_kl * batch.mask[:, 1:]).sum(dim=1).view_as(shaped)
                adv = grpo.group_advantages(shaped, c.advantage).flatten()  # [P·N]: one advantage per response
                metrics.update(update(policy.train(), optimizer, local, adv[rows], ref_logp, c), length_eta=eta,
                               update_s=clock() - update_start)
            elif dist.is_main() and not said_idle:  # said once: metrics.jsonl's kept_frac shows every such step
                said_idle = True
                tqdm.write(f"step {step}: every group's answers scored alike (all right or all wrong), so there was "
                           "nothing to learn; if this goes on, the tasks are out of the model's reach (or too easy)")
            if c.eval_every and step % c.eval_every == 0:
                # the mean over ranks, so that all take the same reset decision (timeouts may differ between them)
                metrics["val_pass1"] = dist.reduce_metrics({"v": held_out_pass1(val_set)["average"]})["v"]
                tracker.observe_validation(metrics["val_pass1"])
            reason = tracker.should_reset(metrics.get("kl", 0.0))
            if reason and reference is not None:
                reset.reset_reference(policy, reference, optimizer if c.reset_optimizer else None)
                tracker.did_reset()
                metrics["reset"] = reason
            step_s = clock() - start
            metrics.update(resets=tracker.count, step_s=step_s, tokens_per_s=float(batch.mask.sum()) / step_s)
            if device.startswith("cuda"):  # the most this rank's GPU has held so far, in GB
                metrics["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            metrics_file.write(json.dumps(metrics) + "\n")
            metrics_file.flush()
            # SIGTERM or Ctrl-C on any rank: all of them save and stop (at the last step they just finish)
            stop = dist.any_true(stop_requested()) and step < c.steps
            if step == c.steps or (c.save_every and step % c.save_every == 0) or stop:
                try:
                    checkpoint.save(run_dir, step, policy, reference, optimizer, tracker, stream, base=base,
                                    base_counts=base_counts)
                except OSError as error:  # a full disk, say: a long run goes on, and the next save tries again
                    if step == c.steps or stop:
                        raise ValueError(f"step {step}: {error}") from None
                    tqdm.write(f"warning: step {step}: {error}; training goes on")
            progress.set_postfix(reward=f"{metrics['reward']:.3f}", kept=f"{metrics['kept_frac']:.2f}",
                                 kl=f"{metrics.get('kl', 0):.4f}", ent=f"{metrics.get('entropy', 0):.2f}")
            if stop:
                progress.close()
                if dist.is_main():
                    print(f"stopped by a signal after step {step}, checkpoint saved: --resume {run_dir} continues")
                return
    dist.save_pretrained(policy, tokenizer, run_dir / "final", model_lib.saved_dtype(model_dir))  # as it came
    trained, trained_counts = held_out_pass1(test_set), boundary_counts("trained")
    if not dist.is_main():
        return
    if boundary_set:
        evaluation.write_boundary(run_dir, {"base": base_counts, "trained": trained_counts}, boundary_set,
                                  c.boundary_n, settings={"base": model_dir, "trained": str(run_dir / "final")})
    evaluation.plot_training(run_dir)
    sizes = ", ".join(f"{source} {len(examples)}" for source, examples in test_by_source.items())
    print(evaluation.write_result(run_dir, base, trained, f"held-out problems: {sizes}; "
                                  f"{c.eval_samples} samples each, T={c.eval_temperature}"))
    print(f"wrote {run_dir}/: result.md, metrics.jsonl, training.png, " + ("boundary.md, boundary.png (pass@k at "
          "T=0.6, top-p 0.95), " if boundary_set else "") + "checkpoint.pt, final/ (the trained model)")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as error:  # bad input the user can fix: one line, no traceback
        sys.exit(f"error: {error}")
