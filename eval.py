"""Evaluation: sample n completions per problem, score them, and report pass@k per task family.

pass@k is the unbiased estimator of Chen et al. (Codex, 2021): with n samples of which c are right,
    pass@k = 1 − C(n−c, k) / C(n, k)
the chance that at least one of k samples drawn without replacement from the n is right.
"""

import math
from collections import defaultdict

import torch

import model as model_lib
import rewards
import rollout


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 − C(n−c, k)/C(n, k), computed as a product so that it is exact and stable for n up to 1024+."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 ≤ c ≤ n and 1 ≤ k ≤ n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    # C(n−c, k)/C(n, k) = Π_{i=0}^{k−1} (n−c−i)/(n−i)
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def rollout_and_score(policy, tokenizer, examples: list[dict], n: int, max_new_tokens: int,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                      max_rows: int = 4096) -> tuple[rollout.Rollout, torch.Tensor]:
    """Generate n completions per example and score them → (rollout, rewards [P, N]).

    A truncated completion (no stop token within max_new_tokens) scores 0: it never gave an answer.
    """
    prompts = [model_lib.encode_prompt(tokenizer, ex["prompt"]) for ex in examples]
    result = rollout.generate(policy, prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_p=top_p, stop_ids=model_lib.stop_ids(policy, tokenizer), seed=seed,
                              pad_id=tokenizer.pad_token_id, max_rows=max_rows)
    completions = tokenizer.batch_decode(torch.where(result.mask, result.tokens, tokenizer.pad_token_id)
                                         [:, result.prompt_len:], skip_special_tokens=True)
    scores = [rewards.score(examples[i // n], text) for i, text in enumerate(completions)]
    scores = torch.tensor(scores).masked_fill(result.truncated, 0.0)
    return result, scores.view(len(examples), n)


def evaluate(policy, tokenizer, examples: list[dict], n: int = 4, max_new_tokens: int = 32,
             temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, ks: tuple[int, ...] = (1,),
             chunk: int = 256) -> dict[str, dict[int, float]]:
    """{family: {k: pass@k}} plus "average" (the mean over families). A sample is right iff reward ≥ 1."""
    correct = []
    for start in range(0, len(examples), chunk):
        _, scores = rollout_and_score(policy, tokenizer, examples[start:start + chunk], n, max_new_tokens,
                                      temperature, top_p, seed=seed + start)
        correct += (scores >= 1.0).sum(dim=1).tolist()
    by_family = defaultdict(list)
    for example, c in zip(examples, correct):
        by_family[example["task"]].append(c)
    report = {family: {k: sum(pass_at_k(n, c, k) for c in counts) / len(counts) for k in ks if k <= n}
              for family, counts in by_family.items()}
    report["average"] = {k: sum(r[k] for r in report.values()) / len(report) for k in report[next(iter(report))]}
    return report
