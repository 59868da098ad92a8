"""One micro-batch's forward + backward of the loss, several ways, alternated in one process:

    python bench/logprob_paths.py --model DIR    # e.g. SmolLM2-135M-Instruct; default: tiny random
    python bench/logprob_paths.py --model DIR --prompts 8 --n 8 --new-tokens 64 \
        --paths chunked,shared

  full     the logits [B, T, V] at every position, then fused_policy_loss (the path before issue 25)
  chunked  HF's forward to the last hidden state (every row runs its prompt), then the head on
           completion positions only, chunk by chunk (learner.policy_loss before prefix_forward)
  shared   learner.policy_loss: prefix_forward (each prompt once, padding trimmed), then the same
           head

The batch is a real rollout of the model (P prompts × N samples of the math task). Each round times
each path in turn; the script prints the medians, their ratios to the first path, and each path's
peak memory over its pass (the process's peak RSS minus its RSS before, Linux).
"""

import argparse
import os
import statistics
import sys
import time

# the repository, not bench/
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import torch

import grpo
import learner
import llama_forward
import models
import prefix_forward
import prorl_kernels
import sampling
import settings
import tasks


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def full_path(policy, batch, adv, mask, weights):
    logits = policy(input_ids=batch.tokens, attention_mask=batch.attention_mask.long(),
                    position_ids=llama_forward.position_ids(batch.attention_mask)).logits[:, :-1]
    terms = grpo.LossTerms(None, None, adv, mask, weights)
    return prorl_kernels.fused_policy_loss(logits, batch.tokens[:, 1:], terms)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="local model directory (default: tiny random)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--paths", default="full,chunked,shared", help="comma-separated, see above")
    args = parser.parse_args()
    if not args.model:
        args.model = "runs/bench-logprob-paths/tiny"
        tokenizer = models.build_tokenizer()
        models.build_tiny_model(tokenizer).save_pretrained(args.model)
        tokenizer.save_pretrained(args.model)
    policy, tokenizer = models.load(args.model)
    mix = tasks.TaskMix("math", 1, seed=0)
    examples = [mix.sample() for _ in range(args.prompts)]
    params = sampling.SamplingParams(args.n, args.new_tokens)
    batch, scores = sampling.rollout_and_score(policy, tokenizer, examples, params)
    # any nonzero advantages
    adv = grpo.group_advantages(scores + torch.rand_like(scores)).flatten()
    mask = batch.mask[:, 1:]
    weights = mask.float() / mask.sum()
    c = settings.Config(kl_coef=0.0, dtype="fp32")
    def policy_loss(shared: bool):
        prefix_forward.shares_prefix = (lambda model: shared) if not shared else shares_prefix
        return learner.policy_loss(policy, batch, terms, grpo.LossSpec(), c)[0]

    terms = grpo.LossTerms(None, None, adv, mask, weights)
    shares_prefix = prefix_forward.shares_prefix
    every = {"full": lambda: full_path(policy, batch, adv, mask, weights),
             "chunked": lambda: policy_loss(False), "shared": lambda: policy_loss(True)}
    paths = {name: every[name] for name in args.paths.split(",")}
    times, peaks = {name: [] for name in paths}, {name: [] for name in paths}
    print(f"{args.model}: {len(batch.tokens)} rows × {batch.tokens.shape[1]} positions, "
          f"{int(mask.sum())} completion tokens; load {os.getloadavg()[0]:.1f}", flush=True)
    for _ in range(args.rounds):
        for name, loss_of in paths.items():
            policy.zero_grad(set_to_none=True)
            before = rss_kb("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak (VmHWM)
            start = time.perf_counter()
            loss_of().backward()
            times[name].append(time.perf_counter() - start)
            peaks[name].append((rss_kb("VmHWM") - before) / 1024)
            last = f"{times[name][-1]:.2f} s, peak +{peaks[name][-1]:.0f} MB"
            print(f"  {name:8s} {last}", flush=True)
    median = {name: statistics.median(t) for name, t in times.items()}
    first = next(iter(paths))
    print(f"medians (load now {os.getloadavg()[0]:.1f}): " + ", ".join(
        f"{name} {median[name]:.2f} s, peak +{statistics.median(peaks[name]):.0f} MB"
        for name in paths)
        + "".join(f"; {name} is {median[first] / median[name]:.2f}x {first}" for name in paths
                  if name != first))


if __name__ == "__main__":
    main()
