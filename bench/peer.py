"""One on-policy GRPO step of this project against TRL's GRPOTrainer on the same local model,
alternated step by step.

    python -m venv /work/venv-peer && /work/venv-peer/bin/pip install -r requirements.txt \\
        -r bench/requirements-peer.txt          # TRL lives in its own venv, never the main one
    /work/venv-peer/bin/python bench/peer.py                  # the tiny built-in base
    /work/venv-peer/bin/python bench/peer.py --model DIR      # e.g. SmolLM2-135M-Instruct

Both sides get the same model, prompts (P from --tasks), N samples each, new-token limit,
β (k3 KL to a reference), lr, temperature 1, clip ε 0.2 both ways, one optimizer step on all P·N
rows, rewards from rewards.score_batch. Every step runs in a fresh process (so only one model set
is in memory at a time, and the arms are alternated: ours, TRL, ours, TRL, ...); each prints its
time, and ours its phase split (generation with rewards, reference log-probs, update) and the
update's peak memory (the process's peak RSS during the update minus its RSS before).
Arms:
    ours[-fp32|-bf16]       this project (learner.batch_logprobs + learner.update), --dtype fp32
                            or bf16
    trl                     TRL's GRPOConfig defaults (gradient checkpointing on, bf16=True)
    trl-fp32                the same with bf16=False (fp32 as ours; TRL's bf16 default on a CPU
                            without AVX512-BF16 runs its matmuls ~13x slower)
    trl-fp32-nockpt         fp32 and gradient checkpointing off
    before:DIR              this bench's "ours" arm run in another checkout DIR (e.g. the code
                            before a change)
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path[0] = os.path.dirname(
    os.path.dirname(os.path.abspath(__file__))
)  # the repository, not bench/

import torch

import models
import rewards
import tasks


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="", help="local model directory (default: the tiny built-in base)"
    )
    parser.add_argument(
        "--tasks", default="", help="prompt source (default: math for --model, else countdown)"
    )
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=1e-3)
    parser.add_argument("--lr", type=float, default=3e-6)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm")
    parser.add_argument("--arms", default="ours,trl-fp32", help="comma-separated, see above")
    parser.add_argument(
        "--worker", default="", help=argparse.SUPPRESS
    )  # one step of one arm, then exit
    parser.add_argument("--step", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def examples_of(args) -> list[dict]:
    mix = tasks.TaskMix(args.tasks or ("math" if args.model else "countdown"), 1, seed=0)
    return [mix.sample() for _ in range(args.prompts)]


def rss_kb(field: str) -> int:
    """VmRSS / VmHWM (peak) of this process in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def ours_step(args, dtype: str) -> dict:
    import grpo
    import sampling
    import settings
    try:
        import learner  # the update's home since issue 26
    except ImportError:  # a "before:" tree: it was in train.py
        import train as learner

    fields = {f.name for f in settings.dataclasses.fields(settings.Config)}
    wanted = {
        "model": args.model,
        "prompts_per_step": args.prompts,
        "n": args.n,
        "max_new_tokens": args.new_tokens,
        "kl_coef": args.beta,
        "lr": args.lr,
        "minibatches": 1,
        "epochs": 1,
        "clip_low": 0.2,
        "clip_high": 0.2,
        "dtype": dtype,
    }
    c = settings.Config(
        **{k: v for k, v in wanted.items() if k in fields}
    )  # "before:" trees may lack dtype
    policy, tokenizer = models.load(args.model)
    reference = models.load(args.model)[0].eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)
    start = time.perf_counter()
    if hasattr(sampling, "SamplingParams"):
        params = sampling.SamplingParams(args.n, args.new_tokens, seed=args.step)
        batch, scores = sampling.rollout_and_score(policy.eval(), tokenizer, examples_of(args),
                                                   params)
    else:  # a "before:" tree from before sampling.SamplingParams
        batch, scores = sampling.rollout_and_score(
            policy.eval(), tokenizer, examples_of(args), args.n, args.new_tokens, seed=args.step
        )
    ref_start = time.perf_counter()
    ref_logp = learner.batch_logprobs(reference, batch, c)
    update_start = time.perf_counter()
    rss_before = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, so it measures the update alone
    adv = grpo.group_advantages(scores, c.advantage).flatten()
    stats = learner.update(policy.train(), optimizer, batch, adv, ref_logp, c)
    end = time.perf_counter()
    return {
        "step_s": end - start,
        "gen_s": ref_start - start,
        "ref_s": update_start - ref_start,
        "update_s": end - update_start,
        "update_peak_mb": (rss_kb("VmHWM") - rss_before) / 1024,
        "tokens": int(batch.mask.sum()),
        "prompt_len": int(batch.prompt_len),
        "kl": stats.get("kl", 0.0),
    }


def trl_step(args, variant: str) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    examples = examples_of(args)
    tokenizer = models.load(args.model)[1]
    texts = [tokenizer.decode(models.encode_prompt(tokenizer, ex["prompt"])) for ex in examples]

    def reward(prompts, completions, index, **kwargs):
        return rewards.score_batch([examples[i] for i in index], completions)

    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            times.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter())

    variants = {
        "trl": {},
        "trl-fp32": {"bf16": False},
        "trl-fp32-nockpt": {"bf16": False, "gradient_checkpointing": False},
    }
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out,
            per_device_train_batch_size=args.prompts * args.n,
            num_generations=args.n,
            max_completion_length=args.new_tokens,
            beta=args.beta,
            learning_rate=args.lr,
            temperature=1.0,
            epsilon=0.2,
            max_steps=1,
            seed=args.step,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            use_cpu=True,
            disable_tqdm=True,
            **variants[variant],
        )
        trainer = GRPOTrainer(
            model=plain_model(args.model),
            reward_funcs=reward,
            args=config,
            processing_class=tokenizer,
            train_dataset=Dataset.from_list(
                [{"prompt": t, "index": i} for i, t in enumerate(texts)]
            ),
            callbacks=[Clock()],
        )
        trainer.train()
    return {"step_s": times[1] - times[0]}


def plain_model(path: str):
    """The model as ours loads it. A GGUF checkpoint converted to plain fp32 weights may still carry
    its quantization_config, which makes Trainer refuse to fine-tune it: drop that flag."""
    model = models.load(path)[0]
    # models.load may already have dropped the quantizer and the config's entry, but not the flag
    quantized = getattr(model, "hf_quantizer", None) is not None
    quantized = quantized or getattr(model, "is_quantized", False)
    if quantized and next(model.parameters()).is_floating_point():
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def worker(args) -> None:
    torch.manual_seed(args.step)
    arm = args.worker
    dtype = arm[len("ours-") :] if arm.startswith("ours-") else "auto"
    result = ours_step(args, dtype) if arm.startswith(("ours", "before:")) else trl_step(args, arm)
    print("RESULT " + json.dumps(result), flush=True)


def run_arm(arm: str, step: int, argv: list[str]) -> dict:
    """One step of `arm` in a fresh process; "before:DIR" runs DIR's copy of this file."""
    script = os.path.abspath(__file__)
    if arm.startswith("before:"):
        script = os.path.join(arm.split(":", 1)[1], "bench", "peer.py")
    command = [sys.executable, script, *argv, "--worker", arm, "--step", str(step)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise SystemExit(
            f"error: {arm} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str]) -> None:
    args = parse(argv)
    if not args.model:
        args.model = models.ensure_tiny_base("runs/base/tiny-s0", seed=0)
        argv = [*argv, "--model", args.model]
    if args.worker:
        return worker(args)
    arms = args.arms.split(",")
    results = {arm: [] for arm in arms}
    print(
        f"{args.model}: P={args.prompts} N={args.n} new tokens {args.new_tokens} "
        f"β={args.beta} lr={args.lr}; "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    for step in range(args.steps):
        for arm in arms:  # alternated: a busy spell of the shared machine hits every arm alike
            results[arm].append(run_arm(arm, step, argv))
            print(
                f"step {step} {arm}: "
                + "  ".join(
                    f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in results[arm][-1].items()
                ),
                flush=True,
            )
    print(f"medians over {args.steps} steps (load now {os.getloadavg()[0]:.1f}):")
    medians = {
        arm: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        for arm, runs in results.items()
    }
    for arm, median in medians.items():
        print(f"  {arm:18s} " + "  ".join(f"{k} {v:.2f}" for k, v in median.items()))
    ours = [arm for arm in arms if arm.startswith("ours")]
    for mine in ours:
        for other in arms:
            if other != mine:
                ratio = medians[other]["step_s"] / medians[mine]["step_s"]
                print(f"  {mine} is {ratio:.2f}x {other}'s step")


if __name__ == "__main__":
    main(sys.argv[1:])
