"""sampling.sample_groups: dynamic sampling (drop groups whose rewards are all equal, refill from
fresh prompts), with the sampler and the verifiers of train.py on a tiny random model. Its rewards
are scripted where a test needs groups that differ: the random model never solves a task."""


import pytest
import torch

import grpo
import models
import rewards
import rollout
import sampling
import settings
import tasks

# ------------------------------------------------------------------------ collect: dynamic sampling

@pytest.fixture
def scripted_rewards(monkeypatch):
    """Make every token a stop token (each completion is one token, none truncated) and score the
    "add" task from a script: the k-th completion scored gets script[k]. Returns the list of prompts
    scored."""
    monkeypatch.setattr(models, "stop_ids", lambda model, tokenizer: tuple(range(len(tokenizer))))
    scored_prompts, script = [], []

    def scripted(example, completion):
        scored_prompts.append(example["prompt"])
        return script[len(scored_prompts) - 1]

    monkeypatch.setitem(rewards.VERIFIERS, "add", scripted)
    return script, scored_prompts


def collect(policy, tokenizer, stream: tasks.TaskMix, c: settings.Config):
    params = sampling.SamplingParams(c.n, c.max_new_tokens, c.temperature, c.top_p)
    rounds = c.max_sampling_rounds if c.dynamic_sampling else 1
    return sampling.sample_groups(policy, tokenizer, stream, c.prompts_per_step, params, rounds,
                                  c.dynamic_sampling)


def prompt_of(batch: rollout.Rollout, row: int, tokenizer) -> str:
    prompt_tokens = batch.tokens[row][batch.attention_mask[row] & ~batch.mask[row]]
    return tokenizer.decode(prompt_tokens, skip_special_tokens=True)


def test_dynamic_sampling_refills_from_fresh_prompts(tiny_model, scripted_rewards):
    policy, tokenizer = tiny_model
    script, scored_prompts = scripted_rewards
    # round 1: group A all right (dropped), group B mixed (kept); round 2: C all wrong (dropped), D
    # mixed (kept)
    script += [1, 1, 1, 1] + [1, 0, 0, 0] + [0, 0, 0, 0] + [0, 1, 1, 1]
    stream = tasks.TaskMix("add", seed=0)
    c = settings.Config(prompts_per_step=2, n=4, max_new_tokens=4, max_sampling_rounds=3)
    batch, group_rewards, stats = collect(policy, tokenizer, stream, c)
    assert group_rewards.tolist() == [[1, 0, 0, 0], [0, 1, 1, 1]]
    assert stream.drawn == 4  # two rounds of two prompts; the third round was not needed
    assert stats == pytest.approx({"reward": 8 / 16, "pass_rate": 8 / 16, "kept_frac": 2 / 4,
                                   "response_len": 1.0, "sampling_rounds": 2})
    # the batch holds exactly the kept groups' rows, in order: B's four samples, then D's
    group_b, group_d = scored_prompts[4], scored_prompts[12]
    assert batch.tokens.shape[0] == 8
    assert [prompt_of(batch, row, tokenizer) for row in range(8)] == [group_b] * 4 + [group_d] * 4


def test_without_dynamic_sampling_every_group_is_kept(tiny_model, scripted_rewards):
    policy, tokenizer = tiny_model
    script, _ = scripted_rewards
    script += [1, 1, 1, 1] + [1, 0, 0, 0]
    c = settings.Config(prompts_per_step=2, n=4, max_new_tokens=4, dynamic_sampling=False)
    batch, group_rewards, stats = collect(policy, tokenizer, tasks.TaskMix("add"), c)
    assert group_rewards.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]] and stats["kept_frac"] == 1.0
    assert batch.tokens.shape[0] == 8


def test_when_no_group_is_informative_the_batch_is_empty(tiny_model, scripted_rewards):
    policy, tokenizer = tiny_model
    script, _ = scripted_rewards
    script += [0.0] * 24
    stream = tasks.TaskMix("add")
    c = settings.Config(prompts_per_step=2, n=4, max_new_tokens=4, max_sampling_rounds=3)
    batch, group_rewards, stats = collect(policy, tokenizer, stream, c)
    assert group_rewards.shape == (0, 4) and batch.tokens.shape[0] == 0
    assert stats["kept_frac"] == 0.0 and stream.drawn == 6  # it tried every round


def test_truncated_responses_score_zero_and_the_length_penalty_shapes_the_rest(
        tiny_model, monkeypatch):
    policy, tokenizer = tiny_model
    # every answer "right"
    monkeypatch.setitem(rewards.VERIFIERS, "add", lambda example, completion: 1.0)
    c = settings.Config(prompts_per_step=4, n=8, max_new_tokens=3, dynamic_sampling=False)
    batch, scores, _ = collect(policy, tokenizer, tasks.TaskMix("add"), c)
    # the random model stops on some rows only
    assert 0 < batch.truncated.sum() < len(batch.truncated)
    torch.testing.assert_close(scores.flatten(), (~batch.truncated).float())
    # step 1 is halfway through a 2-step on-phase: η = 0.1 + ½ · 0.2 · (1 + cos(π/2)) = 0.2
    eta = grpo.length_penalty_coef(1, eta_min=0.1, eta_max=0.3, period=2)
    lengths = batch.mask.sum(dim=1).view_as(scores)
    shaped = grpo.apply_length_penalty(scores, lengths, 3, eta)
    torch.testing.assert_close(shaped.flatten(),
                               (~batch.truncated).float() - 0.2 * lengths.flatten() / 3)
