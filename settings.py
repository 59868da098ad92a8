"""The run's configuration: one dataclass of options (each with its help line), the papers' presets,
and the range checks a config must pass before any work starts. `python train.py --help` lists
them all.

A leaf: it imports no module of ours. Checks that need one (task names, KL kinds, the model, the
device) run in that module, where train.main first uses it, still before the run directory
exists.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path


def option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    model: str = option("", "a local Hugging Face model directory, a hub id (org/name: the local "
                        "cache, or a download when online) or a .gguf file; empty: build the "
                        "tiny built-in base")
    system_prompt: str = option("", "a system message before every prompt, through a chat model's "
                                "template: how its answers must look (preset chat-cpu sets "
                                "one); empty: none")
    tasks: str = option("sort,reverse,countdown", "task mix SOURCE[:WEIGHT],...: built-in "
                        "add/sort/reverse/countdown, a domain (math, code, logic, mcq, ifeval), "
                        "rg:NAME (reasoning-gym), or a JSONL path")
    level: int = option(1, "difficulty of the built-in tasks (1-3)")
    run: str = option("",
                      "run name; metrics go to runs/<run>/ (empty: <preset>-s<seed>, -2, "
                      "-3 ... if taken)")
    seed: int = option(0, "seed of the base model build, the prompt stream and the sampler")
    steps: int = option(80, "RL steps")
    prompts_per_step: int = option(64, "groups (prompts) per step after dynamic sampling")
    n: int = option(16, "rollouts per prompt (group size)")
    max_new_tokens: int = option(16, "completion length limit; longer completions are truncated")
    temperature: float = option(1.0, "sampling temperature (ProRL: 1.2)")
    top_p: float = option(1.0, "nucleus sampling threshold")
    lr: float = option(2e-4, "AdamW learning rate")
    lr_scale_from_batch: int = option(0,
                                      "BroRL: scale lr by sqrt(samples per step / this) (0: off)")
    advantage: str = option("grpo", "advantage estimator: grpo, reinforce_pp, rloo, passk")
    passk_k: int = option(8,
                          "k of --advantage passk: the advantage of pass@k as the reward "
                          "(arXiv 2508.10751)")
    unlikeliness: float = option(0.0, "β_rank of the unlikeliness reward: right answers the "
                                 "policy finds likely earn less (arXiv 2506.02355 "
                                 "uses 0.25; 0: off)")
    clip_low: float = option(0.2, "ε_low: ratio clipped below at 1 − ε_low")
    clip_high: float = option(0.28, "ε_high: ratio clipped above at 1 + ε_high (ProRL: 0.4)")
    loss_agg: str = option("token-mean", "token-mean, seq-mean-token-mean or seq-mean-token-sum")
    kl_coef: float = option(1e-3, "β: weight of KL(π‖π_ref) in the loss (0: no reference model)")
    kl_kind: str = option("k3", "KL estimator: k1, k2, k3 (k1 in the loss has zero expected "
                          "gradient: use it with --kl-in-reward)")
    kl_clamp: float = option(0.0, "clamp the per-token KL term to ±this (0: off)")
    kl_in_reward: bool = option(False, "fold β·KL into each response's reward instead of the loss")
    overlong_filter: bool = option(False,
                                   "mask truncated responses out of the loss instead of "
                                   "rewarding them 0")
    dynamic_sampling: bool = option(True,
                                    "drop groups whose rewards are all equal, refill "
                                    "with fresh prompts")
    max_sampling_rounds: int = option(2,
                                      "sampling rounds per step to fill the batch with "
                                      "informative groups")
    minibatches: int = option(4, "optimizer steps per rollout batch (PPO mini-batches)")
    epochs: int = option(1, "passes over each rollout batch")
    micro_batch_rows: int = option(256,
                                   "rows per forward/backward (gradient accumulation); memory only")
    activation_checkpointing: bool = option(False, "recompute each layer's activations in "
                                            "backward instead of keeping them (less memory per "
                                            "row, ~1/3 more compute)")
    grad_clip: float = option(1.0, "max gradient norm")
    reset_every: int = option(0, "reset π_ref ← π every this many steps (0: never)")
    reset_patience: int = option(0,
                                 "reset when validation pass@1 has not improved this many "
                                 "evaluations (0: off)")
    reset_kl: float = option(0.0, "reset when a step's mean KL exceeds this (0: off)")
    reset_optimizer: bool = option(True,
                                   "re-initialise the optimizer state at a reset "
                                   "(ProRL v1; v2: off)")
    length_eta_max: float = option(0.0,
                                   "ProRL v2 cosine length penalty: η at the start of each cycle")
    length_eta_min: float = option(0.0,
                                   "η the on-phase decays towards, cosine over "
                                   "--length-period steps")
    length_period: int = option(100, "steps of each on-phase of the length penalty")
    length_off_steps: int = option(0, "steps with the length penalty off after each on-phase")
    eval_every: int = option(20, "validation every this many steps (drives stall resets)")
    val_problems: int = option(100, "held-out problems per family for validation during training")
    eval_problems: int = option(500,
                                "held-out problems per family for the final base-vs-trained report")
    eval_samples: int = option(4, "samples per problem for pass@1")
    eval_temperature: float = option(1.0, "sampling temperature of evaluation")
    boundary_problems: int = option(50,
                                    "held-out problems per family for the final pass@k "
                                    "boundary (0: skip)")
    boundary_n: int = option(256,
                             "samples per problem for the boundary report, at ProRL's "
                             "T=0.6, top-p 0.95")
    device: str = option("auto", "cpu, cuda, or auto")
    dtype: str = option("auto", "what the trainer's forwards compute in: fp32, bf16 (weights stay "
                        "fp32), or auto: bf16 on CUDA, fp32 on CPU")
    save_every: int = option(50,
                             "write <run>/checkpoint.pt every this many steps, and always at the "
                             "end (0: end only)")
    resume: str = option("",
                         "continue the run in this directory from its checkpoint (flags "
                         "given now override)")
    log: str = option("",
                      "also log each step to tensorboard or wandb (offline), if that "
                      "package is installed")
    curriculum: bool = option(False, "edge curriculum over the levels of the one procedural "
                              "family in --tasks, starting at --level (curriculum.py)")
    curriculum_top: int = option(0,
                                 "the curriculum's highest level (0: the family's own, chains 5)")
    curriculum_threshold: float = option(0.5,
                                         "promote when the current level's pass rate reaches "
                                         "this (> 1: never)")
    curriculum_replay: float = option(0.25, "share of prompts drawn from the easier levels")
    curriculum_window: int = option(32,
                                    "groups of the current level whose pass rate the "
                                    "promotion rule averages")
    preset: str = option("tiny", "tiny, prorl, prorl-v2, brorl (the papers' hyperparameters) or "
                         "chat-cpu (a small chat model on a CPU), then your flags")
    bug: str = option("", "workshop only: switch on a deliberately broken variant (bugs.py: "
                      "kl-sign, no-adv-norm, no-clip); empty: none")


PRESETS = {
    "tiny": {},
    # ProRL (arXiv 2505.24864): GRPO, clip 0.2/0.4, n=16, T=1.2, KL + resets that also reset Adam.
    "prorl": {"advantage": "grpo", "clip_low": 0.2, "clip_high": 0.4, "n": 16, "temperature": 1.2,
              "lr": 2e-6, "prompts_per_step": 256, "minibatches": 4, "kl_coef": 1e-4,
              "kl_kind": "k3", "reset_patience": 3, "reset_optimizer": True, "max_new_tokens": 8192,
              "micro_batch_rows": 1},
    # ProRL v2: REINFORCE++-baseline, clip 0.2/0.28, k2 KL β=1e-4, resets every 300 steps keeping
    # Adam, scheduled cosine length penalty.
    "prorl-v2": {"advantage": "reinforce_pp", "clip_low": 0.2, "clip_high": 0.28, "n": 16,
                 "temperature": 1.2, "lr": 2e-6, "prompts_per_step": 256, "minibatches": 4,
                 "kl_coef": 1e-4, "kl_kind": "k2", "reset_every": 300, "reset_optimizer": False,
                 "length_eta_max": 0.1, "length_eta_min": 0.0, "length_period": 200,
                 "length_off_steps": 100, "max_new_tokens": 8192, "micro_batch_rows": 1},
    # BroRL (arXiv 2510.01180): N=512 rollouts for 128 prompts, lr scaled by sqrt(B_new / B_old)
    # against ProRL's 256 prompts × 16.
    "brorl": {"advantage": "reinforce_pp", "clip_low": 0.2, "clip_high": 0.28, "n": 512,
              "prompts_per_step": 128, "temperature": 1.2, "lr": 2e-6,
              "lr_scale_from_batch": 256 * 16, "minibatches": 4, "kl_coef": 1e-4, "kl_kind": "k2",
              "reset_every": 300, "reset_optimizer": False, "max_new_tokens": 8192,
              "micro_batch_rows": 1},
    # A small chat model on a CPU (README "A real pretrained model"): a system prompt asks for the
    # bare number, which math-verify reads; 8 prompts × 8, 16 new tokens, one on-policy update a
    # batch, no reference model. Evaluation is most of the run's time: 4 samples per problem at
    # T=0.6 give the gain's interval (the printed line), 1 at T=1 gives result.md.
    "chat-cpu": {"system_prompt": "Answer with only the number.", "prompts_per_step": 8, "n": 8,
                 "max_new_tokens": 16, "lr": 2e-5, "kl_coef": 0.0, "minibatches": 1, "steps": 3,
                 "eval_every": 0, "eval_problems": 54, "eval_samples": 1, "boundary_problems": 54,
                 "boundary_n": 4},
}
# micro_batch_rows 1 in the paper presets: one 8k-token row of a 1.5B model holds ~2.5 GB of
# bf16 logits and roughly 26-29 GB of activations (no activation checkpointing); 256 rows would
# need terabytes.


class Parser(argparse.ArgumentParser):
    # "error: <message>" on one line (see __main__), not a usage dump
    def error(self, message: str):
        raise ValueError(message)


def add_options(parser: argparse.ArgumentParser, names: tuple[str, ...] = (),
                given_only: bool = False):
    """A --flag for each Config field in `names` (all when empty), with the field's type, default
    and help line: train.py's command line and evaluation.py's share them. given_only: flags left
    out parse as None, so that parse_config can tell which were given."""
    for f in dataclasses.fields(Config):
        if names and f.name not in names:
            continue
        kind = parse_bool if f.type is bool else f.type
        default = f.default if given_only else "%(default)s"
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind,
                            default=None if given_only else f.default,
                            help=f"{f.metadata['help']} (default: {default})")


def parse_config(argv: list[str]) -> Config:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(parser, given_only=True)
    args = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    # a resumed run's own settings, then the flags given now (e.g. more --steps)
    if args.get("resume"):
        args = resumed_settings(args["resume"], args)
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
    """Every check a config must pass, one per line, each with the sentence a user sees."""
    check(c.n >= 2, "--n must be at least 2: group advantages compare samples of one prompt")
    check(c.prompts_per_step >= 1 and c.steps >= 1, "--prompts-per-step and --steps must be ≥ 1")
    check(c.lr > 0, "--lr must be positive")
    check(c.temperature > 0, "--temperature must be > 0 (the loss is at the sampling temperature)")
    check(0 < c.top_p <= 1, "--top-p must be in (0, 1]")
    check(c.max_new_tokens >= 1, "--max-new-tokens must be ≥ 1")
    check(0 <= c.clip_low < 1 and c.clip_high >= 0,
          "--clip-low must be in [0, 1) and --clip-high ≥ 0")
    check(c.minibatches >= 1 and c.epochs >= 1, "--minibatches and --epochs must be ≥ 1")
    check(c.kl_coef >= 0, "--kl-coef must be ≥ 0")
    check(c.eval_samples >= 1 and c.eval_every >= 0, "--eval-samples must be ≥ 1, --eval-every ≥ 0")
    check(c.eval_problems >= 1 and c.val_problems >= 1,
          "--eval-problems and --val-problems must be ≥ 1")
    check(c.boundary_problems >= 0 and c.boundary_n >= 1,
          "--boundary-problems must be ≥ 0, --boundary-n ≥ 1")
    # see sampling.sampler_seed
    check(1 <= c.max_sampling_rounds <= 10, "--max-sampling-rounds must be in 1..10")
    check(c.micro_batch_rows >= 1, "--micro-batch-rows must be ≥ 1")
    check(c.save_every >= 0, "--save-every must be ≥ 0")
    check(c.length_period >= 1 and c.length_off_steps >= 0,
          "--length-period must be ≥ 1, --length-off-steps ≥ 0")
    check(c.lr_scale_from_batch >= 0 and c.kl_clamp >= 0,
          "--lr-scale-from-batch and --kl-clamp must be ≥ 0")
    check(all(math.isfinite(v) for v in dataclasses.asdict(c).values() if isinstance(v, float)),
          "every number must be finite (no nan or inf)")
    check(c.grad_clip > 0, "--grad-clip must be > 0")
    check(c.reset_kl >= 0 and c.eval_temperature >= 0,
          "--reset-kl and --eval-temperature must be ≥ 0")
    check(c.kl_coef > 0 or not c.kl_in_reward, "--kl-in-reward needs --kl-coef > 0")
    check(c.advantage != "passk"
          or (c.length_eta_max == 0 and not c.unlikeliness and not c.kl_in_reward),
          "--advantage passk needs rewards of 0 or 1: no length penalty, unlikeliness "
          "or --kl-in-reward")
    check(c.advantage != "passk" or 1 <= c.passk_k <= c.n, "--passk-k must be between 1 and --n")
    check(0 <= c.unlikeliness < 1, "--unlikeliness must be in [0, 1)")
    check(c.log in ("", "tensorboard", "wandb"),
          f"--log must be tensorboard or wandb, not {c.log!r}")
    check(not c.log or importlib.util.find_spec(c.log) is not None,
          f"--log {c.log} needs the {c.log} package, which is not installed: pip install {c.log}")


def check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# What a resumed run may not change:
# its checkpoint, base evaluation and prompt stream depend on them.
FIXED_IN_A_RUN = ("preset", "model", "seed", "tasks", "level", "max_new_tokens", "val_problems",
                  "eval_problems", "eval_samples", "eval_temperature", "boundary_problems",
                  "boundary_n")


def resumed_settings(run_dir: str | Path, given: dict) -> dict:
    """The settings of the run in run_dir (its config.json), overridden by the flags `given` now; a
    one-line error for a flag in FIXED_IN_A_RUN that differs, or a kl_coef switching between 0
    and > 0. A run stopped before its first checkpoint is resumed from its start (train.py says
    so)."""
    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise ValueError(f"--resume {run_dir}: not a run directory (no config.json)")
    try:
        saved = {**json.loads((path / "config.json").read_text()), "resume": str(run_dir)}
    except (ValueError, TypeError):
        raise ValueError(f"--resume {run_dir}: its config.json is not a JSON "
                         "object of settings") from None
    for name in FIXED_IN_A_RUN:
        if name in given and given[name] != saved.get(name, given[name]):
            raise ValueError(f"--resume {run_dir}: --{name.replace('_', '-')} cannot change within "
                             f"a run (it is {saved[name]!r}): its model, base evaluation, held-out "
                             "sets and prompt stream were made with it; start a new "
                             "run to change it")
    if "kl_coef" in given and (given["kl_coef"] > 0) != (saved.get("kl_coef", 0) > 0):
        raise ValueError(f"--resume {run_dir}: --kl-coef cannot switch between 0 and > 0 within a "
                         "run (it decides whether the run has a reference model)")
    return {**saved, **given}
