"""Sampling one step's groups: prompts → N completions each (rollout.py) → scores (rewards.py) →
dynamic sampling.

DAPO / ProRL dynamic sampling keeps only the groups whose rewards differ
(grpo.dynamic_sampling_mask) and samples fresh prompts until the batch is full. Evaluation
samples through `rollout_and_score` too, so the model is measured exactly as it is trained.
"""

import dataclasses

import torch

import grpo
import models
import rewards
import rollout


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How completions are drawn, in training and in evaluation alike."""

    n: int  # completions per prompt (the group size)
    max_new_tokens: int  # a completion without its stop token by then is truncated (and scores 0)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus sampling threshold
    seed: int = 0  # the same seed draws the same completions
    max_rows: int | None = None  # rows decoded at once (None: as many as fit, up to rollout's cap)

    def __post_init__(self):
        if not (self.n >= 1 and self.max_new_tokens >= 1 and (self.max_rows or 1) >= 1):
            raise ValueError("n, max_new_tokens and max_rows must be at least 1")
        if not (self.temperature >= 0 and 0 < self.top_p <= 1):
            raise ValueError("temperature must be ≥ 0 and top_p in (0, 1]")


def rollout_and_score(policy, tokenizer, examples: list[dict],
                      params: SamplingParams) -> tuple[rollout.Rollout, torch.Tensor]:
    """Generate params.n completions per example and score them → (rollout, rewards [P, N]).

    A truncated completion (no stop token within max_new_tokens) scores 0: it never gave an answer.
    """
    # chat-message prompts (verl's, Nemotron's) go through the model's chat template as published
    prompts = [models.encode_prompt(tokenizer, ex.get("messages", ex["prompt"])) for ex in examples]
    result = rollout.generate(policy, prompts, n=params.n, max_new_tokens=params.max_new_tokens,
                              temperature=params.temperature, top_p=params.top_p,
                              stop_ids=models.stop_ids(policy, tokenizer), seed=params.seed,
                              pad_id=tokenizer.pad_token_id, max_rows=params.max_rows)
    completion_ids = torch.where(result.mask, result.tokens,
                                 tokenizer.pad_token_id)[:, result.prompt_len:]
    completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    scores = rewards.score_batch([examples[i // params.n] for i in range(len(completions))],
                                 completions)
    scores = torch.tensor(scores, device=result.truncated.device)
    scores = scores.masked_fill(result.truncated, 0.0)  # [P·N]
    return result, scores.view(len(examples), params.n)


def sample_groups(policy, tokenizer, stream, groups: int, params: SamplingParams, rounds: int = 1,
                  dynamic_sampling: bool = True):
    """Dynamic sampling with refill (DAPO; ProRL): sample `groups` fresh prompts × n completions,
    keep the informative groups, and sample again until `groups` groups are kept or `rounds`
    rounds are spent (round r samples with seed params.seed + r).

    Filtering looks at the verifier's scores (correctness), not at shaped rewards. Returns the
    kept rows (a Rollout of G·N rows, G ≤ groups), their scores [G, N], and the statistics of
    *all* sampled groups (reward and pass rate before filtering, and the kept fraction).
    """
    n = params.n
    kept_batches, kept_scores, all_scores, lengths = [], [], [], []
    for round_ in range(rounds):
        examples = [stream.sample() for _ in range(groups)]
        round_params = dataclasses.replace(params, seed=params.seed + round_)
        batch, scores = rollout_and_score(policy, tokenizer, examples, round_params)
        # every group, before dropping the all-right ones biases its pass rate (under torchrun each
        # rank's stream sees its own groups, so ranks may promote at different steps)
        stream.observe(examples, scores)
        if dynamic_sampling:
            keep = grpo.dynamic_sampling_mask(scores)
        else:
            keep = torch.ones(len(scores), dtype=torch.bool, device=scores.device)
        kept_batches.append(rollout.select_rows(batch, keep.repeat_interleave(n)))
        kept_scores.append(scores[keep])
        all_scores.append(scores)
        lengths.append(batch.mask.sum(dim=1).float())
        if sum(len(s) for s in kept_scores) >= groups:
            break
    # [G, N] and [groups·rounds, N]
    scores, all_scores = torch.cat(kept_scores)[:groups], torch.cat(all_scores)
    batch = rollout.concat_rows(kept_batches, tokenizer.pad_token_id)
    batch = rollout.select_rows(batch, slice(0, len(scores) * n))
    stats = {"reward": all_scores.mean().item(),
             "pass_rate": (all_scores >= 1).float().mean().item(),
             "kept_frac": sum(len(s) for s in kept_scores) / len(all_scores),
             "response_len": torch.cat(lengths).mean().item(), "sampling_rounds": round_ + 1}
    return batch, scores, stats


def sampler_seed(seed: int, step: int, rank: int) -> int:
    """The sampler's seed for one step of one rank: distinct for every (run seed, step, rank, refill
    round). sample_groups adds the round (< 10, settings.validate) to it, so steps are 10 apart;
    ranks and run seeds are spaced by large primes, so their seeds do not meet for any realistic
    number of steps."""
    return seed * 100_003 + step * 10 + rank * 1_000_003
