"""Sampling one step's groups: prompts → N completions each (rollout.py) → scores (rewards.py) → dynamic sampling.

DAPO / ProRL dynamic sampling keeps only the groups whose rewards differ (grpo.dynamic_sampling_mask) and
samples fresh prompts until the batch is full. Evaluation samples through `rollout_and_score` too, so the
model is measured exactly as it is trained.
"""

import torch

import grpo
import models
import rewards
import rollout


def rollout_and_score(policy, tokenizer, examples: list[dict], n: int, max_new_tokens: int,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                      max_rows: int | None = None) -> tuple[rollout.Rollout, torch.Tensor]:
    """Generate n completions per example and score them → (rollout, rewards [P, N]).

    A truncated completion (no stop token within max_new_tokens) scores 0: it never gave an answer.
    """
    # chat-message prompts (verl's, Nemotron's) go through the model's chat template as they were published
    prompts = [models.encode_prompt(tokenizer, ex.get("messages", ex["prompt"])) for ex in examples]
    result = rollout.generate(policy, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, stop_ids=models.stop_ids(policy, tokenizer), seed=seed,
                              pad_id=tokenizer.pad_token_id, max_rows=max_rows)
    completions = tokenizer.batch_decode(torch.where(result.mask, result.tokens, tokenizer.pad_token_id)
                                         [:, result.prompt_len:], skip_special_tokens=True)
    scores = rewards.score_batch([examples[i // n] for i in range(len(completions))], completions)
    scores = torch.tensor(scores, device=result.truncated.device).masked_fill(result.truncated, 0.0)  # [P·N]
    return result, scores.view(len(examples), n)


def sample_groups(policy, tokenizer, stream, groups: int, n: int, max_new_tokens: int, temperature: float,
                  top_p: float, rounds: int = 1, dynamic_sampling: bool = True, seed: int = 0):
    """Dynamic sampling with refill (DAPO; ProRL): sample `groups` fresh prompts × n completions, keep the
    informative groups, and sample again until `groups` groups are kept or `rounds` rounds are spent.

    Filtering looks at the verifier's scores (correctness), not at shaped rewards. Returns the kept rows
    (a Rollout of G·N rows, G ≤ groups), their scores [G, N], and the statistics of *all* sampled groups
    (reward and pass rate before filtering, and the kept fraction).
    """
    kept_batches, kept_scores, all_scores, lengths = [], [], [], []
    for round_ in range(rounds):
        examples = [stream.sample() for _ in range(groups)]
        batch, scores = rollout_and_score(policy, tokenizer, examples, n, max_new_tokens, temperature, top_p,
                                          seed=seed + round_)
        stream.observe(examples, scores)  # every group, before dropping the all-right ones biases its pass rate
        # (under torchrun each rank's stream sees its own groups, so ranks may promote at different steps)
        keep = grpo.dynamic_sampling_mask(scores) if dynamic_sampling else torch.ones(len(scores), dtype=torch.bool,
                                                                                      device=scores.device)
        kept_batches.append(rollout.select_rows(batch, keep.repeat_interleave(n)))
        kept_scores.append(scores[keep])
        all_scores.append(scores)
        lengths.append(batch.mask.sum(dim=1).float())
        if sum(len(s) for s in kept_scores) >= groups:
            break
    scores, all_scores = torch.cat(kept_scores)[:groups], torch.cat(all_scores)  # [G, N], [groups·rounds, N]
    batch = rollout.concat_rows(kept_batches, tokenizer.pad_token_id)
    batch = rollout.select_rows(batch, slice(0, len(scores) * n))
    stats = {"reward": all_scores.mean().item(), "pass_rate": (all_scores >= 1).float().mean().item(),
             "kept_frac": sum(len(s) for s in kept_scores) / len(all_scores),
             "response_len": torch.cat(lengths).mean().item(), "sampling_rounds": round_ + 1}
    return batch, scores, stats


def sampler_seed(seed: int, step: int, rank: int) -> int:
    """The sampler's seed for one step of one rank: distinct for every (run seed, step, rank, refill round).
    sample_groups adds the round (< 10, settings.validate) to it, so steps are 10 apart; ranks and run seeds
    are spaced by large primes, so their seeds do not meet for any realistic number of steps."""
    return seed * 100_003 + step * 10 + rank * 1_000_003
