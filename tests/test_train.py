"""train.py: configuration errors, sampling with dynamic-sampling refill, the PPO-style update, and a couple of
real steps of every paper preset on a tiny random model.

The tiny model answers at random, so it never solves a task: where a test needs groups with unequal
rewards it turns on a small length penalty (completions of different lengths then score differently), or
swaps in a verifier whose scores it chooses.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import dist
import grpo
import model as model_lib
import rewards
import rollout
import tasks
import train

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- configuration errors

def config_error(capsys, argv: list[str]) -> str:
    """parse_config must refuse argv with one sentence: a SystemExit with one line on stderr, or a ValueError
    (which train.py's __main__ prints as "error: <message>"). Returns that line."""
    try:
        train.parse_config(argv)
    except ValueError as error:
        message = str(error)
    except SystemExit as exit_info:
        assert exit_info.code not in (0, None)
        message = (exit_info.code if isinstance(exit_info.code, str) else "") + capsys.readouterr().err
    else:
        pytest.fail(f"parse_config accepted {argv}")
    lines = [line for line in message.splitlines() if line.strip()]
    assert len(lines) == 1, "a config error should be one sentence, not a usage dump:\n" + "\n".join(lines)
    return lines[0]


def test_cli_n_1_exits_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--n", "1"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--n must be at least 2" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, message", [
    (["--n", "1"], "--n must be at least 2"),
    (["--preset", "prorl-v3"], "unknown preset 'prorl-v3'"),
    (["--model", "/no/such/dir"], "--model /no/such/dir: no such model directory"),
    (["--tasks", "add,nope"], "unknown task 'nope'"),  # before a model is loaded or runs/ is written
    (["--advantage", "ppo"], "unknown advantage estimator 'ppo'"),
    (["--kl-kind", "k4"], "unknown KL estimator 'k4'"),
    (["--loss-agg", "sum"], "unknown loss aggregation 'sum'"),
    (["--length-eta-max", "0.1", "--length-period", "0"], "--length-period"),  # each of these five ends in a
    (["--max-sampling-rounds", "0"], "--max-sampling-rounds"),                 # traceback later on
    (["--max-sampling-rounds", "11"], "--max-sampling-rounds must be in 1..10"),  # seeds step·10 + round
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--grad-clip", "nan"], "must be finite"), (["--grad-clip", "-1"], "--grad-clip must be > 0"),
    (["--length-eta-max", "inf"], "must be finite"), (["--reset-kl", "-1"], "--reset-kl"),
    (["--overlong-filter", "on"], "argument --overlong-filter: expected true or false, got 'on'"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--device", "tpu"], "--device must be cpu, cuda or auto"),
    (["--micro-batch-rows", "0"], "--micro-batch-rows"),
    (["--eval-problems", "0"], "--eval-problems"),
    (["--lr-scale-from-batch", "-5"], "--lr-scale-from-batch"),
])
def test_bad_config_is_one_line(capsys, argv, message):
    assert message in config_error(capsys, argv)


def test_device_cuda_without_one_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert "--device cuda: this machine has no CUDA device" in config_error(capsys, ["--device", "cuda"])


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path, monkeypatch, capsys, tiny_model_dir):
    monkeypatch.chdir(tmp_path)
    fast = ["--model", tiny_model_dir, "--steps", "1", "--prompts-per-step", "2", "--n", "2", "--max-new-tokens", "4",
            "--eval-problems", "1", "--val-problems", "1", "--eval-samples", "1", "--boundary-problems", "0"]
    train.main(fast)  # the default name: runs/tiny-s0
    first = (tmp_path / "runs" / "tiny-s0" / "checkpoint.pt").read_bytes()
    train.main(fast)  # again: a run of its own beside the first
    assert (tmp_path / "runs" / "tiny-s0-2" / "checkpoint.pt").is_file()
    assert (tmp_path / "runs" / "tiny-s0" / "checkpoint.pt").read_bytes() == first
    assert "run directory: runs/tiny-s0-2" in capsys.readouterr().out
    assert "runs/tiny-s0 already holds a run: --resume runs/tiny-s0 continues it" in config_error(
        capsys, fast + ["--run", "tiny-s0"])
    assert "is at step 1 already: give --steps beyond it" in str(
        pytest.raises(ValueError, train.main, ["--resume", "runs/tiny-s0"]).value)


def test_a_model_the_sampler_cannot_run_is_one_line_and_leaves_the_run_name_free(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = model_lib.build_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="supports Llama and Qwen2 models, not 'gpt2'"):
        train.main(["--model", str(tmp_path / "gpt2"), "--run", "x"])
    assert not checkpoint.is_run(tmp_path / "runs" / "x")
    train.parse_config(["--run", "x"])  # the name is still free


def test_flags_override_the_preset():
    c = train.parse_config(["--preset", "prorl", "--n", "8", "--clip-high", "0.3"])
    assert (c.n, c.clip_high, c.advantage, c.temperature) == (8, 0.3, "grpo", 1.2)


# ----------------------------------------------------------------------------- collect: dynamic sampling

@pytest.fixture
def scripted_rewards(monkeypatch):
    """Make every token a stop token (each completion is one token, none truncated) and score the "add"
    task from a script: the k-th completion scored gets script[k]. Returns the list of prompts scored."""
    monkeypatch.setattr(model_lib, "stop_ids", lambda model, tokenizer: tuple(range(len(tokenizer))))
    scored_prompts, script = [], []

    def scripted(example, completion):
        scored_prompts.append(example["prompt"])
        return script[len(scored_prompts) - 1]

    monkeypatch.setitem(rewards.VERIFIERS, "add", scripted)
    return script, scored_prompts


def collect(policy, tokenizer, stream: tasks.TaskMix, c: train.Config):
    return grpo.sample_groups(policy, tokenizer, stream, c.prompts_per_step, c.n, c.max_new_tokens, c.temperature,
                              c.top_p, rounds=c.max_sampling_rounds if c.dynamic_sampling else 1,
                              dynamic_sampling=c.dynamic_sampling)


def prompt_of(batch: rollout.Rollout, row: int, tokenizer) -> str:
    prompt_tokens = batch.tokens[row][batch.attention_mask[row] & ~batch.mask[row]]
    return tokenizer.decode(prompt_tokens, skip_special_tokens=True)


def test_dynamic_sampling_refills_from_fresh_prompts(tiny_model, scripted_rewards):
    policy, tokenizer = tiny_model
    script, scored_prompts = scripted_rewards
    # round 1: group A all right (dropped), group B mixed (kept); round 2: C all wrong (dropped), D mixed (kept)
    script += [1, 1, 1, 1] + [1, 0, 0, 0] + [0, 0, 0, 0] + [0, 1, 1, 1]
    stream = tasks.TaskMix("add", seed=0)
    c = train.Config(prompts_per_step=2, n=4, max_new_tokens=4, max_sampling_rounds=3)
    batch, group_rewards, stats = collect(policy, tokenizer, stream, c)
    assert group_rewards.tolist() == [[1, 0, 0, 0], [0, 1, 1, 1]]
    assert stream.drawn == 4  # two rounds of two prompts; the third round was not needed
    assert stats == pytest.approx({"reward": 8 / 16, "pass_rate": 8 / 16, "kept_frac": 2 / 4, "response_len": 1.0,
                                   "sampling_rounds": 2})
    # the batch holds exactly the kept groups' rows, in order: B's four samples, then D's
    group_b, group_d = scored_prompts[4], scored_prompts[12]
    assert batch.tokens.shape[0] == 8
    assert [prompt_of(batch, row, tokenizer) for row in range(8)] == [group_b] * 4 + [group_d] * 4


def test_without_dynamic_sampling_every_group_is_kept(tiny_model, scripted_rewards):
    policy, tokenizer = tiny_model
    script, _ = scripted_rewards
    script += [1, 1, 1, 1] + [1, 0, 0, 0]
    c = train.Config(prompts_per_step=2, n=4, max_new_tokens=4, dynamic_sampling=False)
    batch, group_rewards, stats = collect(policy, tokenizer, tasks.TaskMix("add"), c)
    assert group_rewards.tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]] and stats["kept_frac"] == 1.0
    assert batch.tokens.shape[0] == 8


def test_when_no_group_is_informative_the_batch_is_empty(tiny_model, scripted_rewards):
    policy, tokenizer = tiny_model
    script, _ = scripted_rewards
    script += [0.0] * 24
    stream = tasks.TaskMix("add")
    c = train.Config(prompts_per_step=2, n=4, max_new_tokens=4, max_sampling_rounds=3)
    batch, group_rewards, stats = collect(policy, tokenizer, stream, c)
    assert group_rewards.shape == (0, 4) and batch.tokens.shape[0] == 0
    assert stats["kept_frac"] == 0.0 and stream.drawn == 6  # it tried every round


def test_truncated_responses_score_zero_and_the_length_penalty_shapes_the_rest(tiny_model, monkeypatch):
    policy, tokenizer = tiny_model
    monkeypatch.setitem(rewards.VERIFIERS, "add", lambda example, completion: 1.0)  # every answer "right"
    c = train.Config(prompts_per_step=4, n=8, max_new_tokens=3, dynamic_sampling=False)
    batch, scores, _ = collect(policy, tokenizer, tasks.TaskMix("add"), c)
    assert 0 < batch.truncated.sum() < len(batch.truncated)  # the random model stops on some rows only
    torch.testing.assert_close(scores.flatten(), (~batch.truncated).float())
    # step 1 is halfway through a 2-step on-phase: η = 0.1 + ½ · 0.2 · (1 + cos(π/2)) = 0.2
    eta = rewards.length_penalty_coef(1, eta_min=0.1, eta_max=0.3, period=2)
    lengths = batch.mask.sum(dim=1).view_as(scores)
    shaped = rewards.apply_length_penalty(scores, lengths, 3, eta)
    torch.testing.assert_close(shaped.flatten(), (~batch.truncated).float() - 0.2 * lengths.flatten() / 3)


# ----------------------------------------------------------------------------- update

@pytest.fixture
def rollout_batch(tiny_model):
    policy, tokenizer = tiny_model
    prompts = [model_lib.encode_prompt(tokenizer, text) for text in ("12+34=", "5 3 9 1 7=", "3 7 9>30:", "8+8=")]
    batch = rollout.generate(policy, prompts, n=4, max_new_tokens=6, seed=0, pad_id=tokenizer.pad_token_id)
    adv = grpo.group_advantages(torch.rand(4, 4, generator=torch.Generator().manual_seed(0))).flatten()
    return batch, adv


def test_update_has_zero_kl_to_an_identical_reference(tiny_model, tiny_model_dir, rollout_batch):
    policy, _ = tiny_model
    reference = model_lib.load(tiny_model_dir)[0].eval()
    batch, adv = rollout_batch
    before = [p.clone() for p in policy.parameters()]
    c = train.Config(minibatches=1, epochs=1, kl_coef=1e-3)
    ref_logp = train.batch_logprobs(reference, batch, c)
    stats = train.update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3), batch, adv, ref_logp, c)
    assert stats["kl"] == 0.0 and stats["entropy"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(before, policy.parameters()))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_update_steps_down_the_gradient_of_the_loss_written_out_by_hand(tiny_model_dir, agg):
    """One SGD step (lr 1) of update() — micro-batches of 3 rows, k3 KL to another model, T = 1.3 — equals
    minus the gradient of the clipped loss + β·k3 written out here from log_softmax, for the whole batch."""
    policy, tokenizer = model_lib.load(tiny_model_dir)
    reference = model_lib.build_tiny_model(tokenizer, seed=1).eval()
    prompts = [model_lib.encode_prompt(tokenizer, text) for text in ("12+34=", "5 3 9 1 7=", "3 7 9>30:", "8+8=")]
    batch = rollout.generate(policy, prompts, n=4, max_new_tokens=6, temperature=1.3, seed=0,
                             pad_id=tokenizer.pad_token_id)
    adv = torch.randn(16, generator=torch.Generator().manual_seed(0))
    c = train.Config(micro_batch_rows=3, loss_agg=agg, kl_coef=0.1, kl_kind="k3", grad_clip=1e9, minibatches=1,
                     temperature=1.3)
    ref_logp = train.batch_logprobs(reference, batch, c)
    before = [p.clone() for p in policy.parameters()]
    train.update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, adv, ref_logp, c)
    step = torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), before)])

    fresh = model_lib.load(tiny_model_dir)[0]
    logits = fresh(input_ids=batch.tokens, attention_mask=batch.attention_mask.long(),
                   position_ids=rollout.position_ids(batch.attention_mask)).logits[:, :-1]
    logp = torch.log_softmax(logits / 1.3, -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
    ratio = torch.exp(logp - logp.detach())  # on-policy: 1, with the gradient of logp
    log_ratio = ref_logp - logp
    per_token = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.28))
    per_token = per_token + 0.1 * (torch.exp(log_ratio) - log_ratio - 1)
    mask = batch.mask[:, 1:].float()
    seq_sum, seq_tokens = (per_token * mask).sum(1), mask.sum(1)
    loss = {"token-mean": seq_sum.sum() / mask.sum(),
            "seq-mean-token-mean": (seq_sum / seq_tokens.clamp(min=1)).sum() / (seq_tokens > 0).sum(),
            "seq-mean-token-sum": seq_sum.sum() / (seq_tokens > 0).sum()}[agg]
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in fresh.parameters()])
    assert gradient.abs().max() > 1e-4
    torch.testing.assert_close(step, -gradient, atol=1e-6, rtol=1e-4)


def test_minibatches_and_epochs_take_one_optimizer_step_each(tiny_model, rollout_batch):
    policy, _ = tiny_model
    batch, adv = rollout_batch
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stats = train.update(policy, optimizer, batch, adv, None, train.Config(minibatches=2, epochs=3, kl_coef=0.0))
    assert optimizer.state[next(policy.parameters())]["step"].item() == 6
    # after the first optimizer step the policy is no longer the one that produced old_logp
    assert stats["ratio_mean"] != 1.0 and stats["approx_kl"] > 0
    assert "kl" not in stats  # β = 0: no reference, no KL


def test_minibatches_are_near_equal_and_a_batch_with_no_tokens_takes_no_step(tiny_model, rollout_batch):
    """16 rows in 6 mini-batches: 6 optimizer steps of 3, 3, 3, 3, 2 and 2 rows (chunk cut 5 of 3 and one
    of 1); and a mini-batch whose tokens are all masked out takes no step (AdamW's momentum would move the
    weights anyway)."""
    policy, _ = tiny_model
    batch, adv = rollout_batch
    rows, sizes = [0], []  # rows forwarded since the last optimizer step; rows of each step
    real_logprobs = train.sequence_logprobs

    def counting_logprobs(policy, micro, temperature, entropy=False):
        rows[0] += len(micro.tokens) if entropy else 0  # entropy=True: the update's forwards, not old log-probs
        return real_logprobs(policy, micro, temperature, entropy)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    real_step = optimizer.step

    def counting_step(*args, **kwargs):
        sizes.append(rows[0])
        rows[0] = 0
        return real_step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "sequence_logprobs", counting_logprobs)
        patch.setattr(optimizer, "step", counting_step)
        train.update(policy, optimizer, batch, adv, None, train.Config(minibatches=6, epochs=1, kl_coef=0.0))
    assert sizes == [3, 3, 3, 3, 2, 2]
    assert optimizer.state[next(policy.parameters())]["step"].item() == 6
    # every response truncated, and --overlong-filter: no token has a gradient, so nothing moves
    truncated = rollout.Rollout(batch.tokens, batch.attention_mask, batch.mask, batch.logprobs,
                                torch.ones_like(batch.truncated), batch.prompt_len)
    before = [p.clone() for p in policy.parameters()]
    stats = train.update(policy, optimizer, truncated, adv, None,
                         train.Config(minibatches=2, epochs=1, kl_coef=0.0, overlong_filter=True))
    assert all(torch.equal(p, q) for p, q in zip(before, policy.parameters()))
    assert optimizer.state[next(policy.parameters())]["step"].item() == 6
    assert stats == {"skipped_updates": 0}


def test_logged_stats_are_token_weighted_over_the_whole_update(tiny_model, rollout_batch):
    """The logged entropy is the mean over every token the update saw, whatever the mini-batches'
    sizes: with one epoch and no KL, it equals the token mean of the entropies of the policy's forwards."""
    policy, _ = tiny_model
    batch, adv = rollout_batch
    entropies = []
    real = train.sequence_logprobs

    def recording(policy, micro, temperature, entropy=False):
        if not entropy:  # the pass that computes the old log-probs
            return real(policy, micro, temperature)
        logp, ent = real(policy, micro, temperature, entropy=True)
        entropies.append(ent[micro.mask[:, 1:]].detach())
        return logp, ent

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "sequence_logprobs", recording)
        stats = train.update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, adv, None,
                             train.Config(minibatches=3, epochs=1, kl_coef=0.0, micro_batch_rows=2))
    seen = torch.cat(entropies)  # mini-batches of 6, 5 and 5 rows, of different token counts
    assert len(seen) == int(batch.mask[:, 1:].sum())
    assert stats["entropy"] == pytest.approx(seen.mean().item(), rel=1e-5)


def test_old_logprobs_are_recomputed_not_taken_from_the_sampler(tiny_model, tiny_model_dir, rollout_batch):
    # Two identical policies updated on the same batch, one whose sampler log-probs are garbage: the
    # update must not read them, so both end with the same weights.
    batch, adv = rollout_batch
    garbage = rollout.select_rows(batch, slice(None))
    garbage.logprobs = torch.full_like(batch.logprobs, -7.0)
    c = train.Config(minibatches=2, epochs=2, kl_coef=0.0)
    results = []
    for sampled in (batch, garbage):
        policy = model_lib.load(tiny_model_dir)[0]
        torch.manual_seed(0)  # the same mini-batch shuffle
        train.update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-2), sampled, adv, None, c)
        results.append(list(policy.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(*results))


def test_activation_checkpointing_changes_memory_not_the_update(tiny_model_dir, rollout_batch):
    """--activation-checkpointing recomputes each layer in backward: the same SGD step, and each decoder layer
    really runs twice (its forward, then again in backward) instead of once (its MLP is counted: a recompute
    stops once it has what backward needs, so the layer's own forward hook never fires a second time)."""
    batch, adv = rollout_batch
    deltas = []
    for checkpointing in (False, True):
        policy = model_lib.load(tiny_model_dir)[0]
        if checkpointing:  # as train.main does for --activation-checkpointing
            model_lib.enable_activation_checkpointing(policy)
        runs = []
        policy.model.layers[0].mlp.register_forward_pre_hook(lambda *args, runs=runs: runs.append(1))
        before = [p.clone() for p in policy.parameters()]
        c = train.Config(kl_coef=0.0, grad_clip=1e9, minibatches=1, activation_checkpointing=checkpointing)
        train.update(policy.train(), torch.optim.SGD(policy.parameters(), lr=1.0), batch, adv, None, c)
        deltas.append(torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), before)]))
        assert len(runs) == (2 if checkpointing else 1)  # one micro-batch, on-policy: one forward
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-6, rtol=1e-4)


def test_the_activation_checkpointing_flag_checkpoints_the_policy(tmp_path, monkeypatch, tiny_model_dir):
    class Enabled(Exception):
        pass

    def enabled(model):
        raise Enabled(model.config.model_type)

    monkeypatch.setattr(model_lib, "enable_activation_checkpointing", enabled)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Enabled, match="llama"):
        train.main(["--model", tiny_model_dir, "--activation-checkpointing", "true"])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_change_memory_not_the_update(tiny_model_dir, rollout_batch, agg):
    batch, adv = rollout_batch
    batch = rollout.select_rows(batch, slice(None))  # responses of 1 to 6 tokens, so rows weigh differently
    last = batch.prompt_len + torch.arange(len(batch.mask)) % 6  # the last completion column each row keeps
    batch.mask = batch.mask & (torch.arange(batch.mask.shape[1])[None] <= last[:, None])
    deltas, stats = [], []
    for micro_batch_rows in (3, 16):
        policy = model_lib.load(tiny_model_dir)[0]
        before = [p.clone() for p in policy.parameters()]
        c = train.Config(micro_batch_rows=micro_batch_rows, loss_agg=agg, kl_coef=0.0, grad_clip=1e9, minibatches=1)
        stats.append(train.update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, adv, None, c))
        deltas.append(torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), before)]))  # Δθ = −∇loss
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-6, rtol=1e-4)
    # the logged statistics are means over the batch's tokens, however the rows are split
    assert stats[0]["entropy"] == pytest.approx(stats[1]["entropy"], rel=1e-5)


# ----------------------------------------------------------------------------- mixed precision (bf16 on CUDA)

def test_bf16_compute_keeps_fp32_weights_that_move_at_the_presets_lr_and_saves_as_the_checkpoint_came(
        tmp_path, monkeypatch, tiny_model_dir):
    """With bf16 compute (CUDA's; forced here on CPU) the forwards run in bf16 and the sampler samples bf16
    copies, but the weights AdamW updates are fp32: at ProRL's lr of 2e-6 nearly every weight moves (a bf16
    weight near 0.02 moves in steps of 1e-4, so in bf16 almost none would). final/ is saved in the dtype the
    checkpoint came in (bf16 here), not in the fp32 of training."""
    bf16_dir = tmp_path / "bf16"
    policy, tokenizer = model_lib.load(tiny_model_dir)
    dist.save_pretrained(policy, tokenizer, bf16_dir, torch.bfloat16)
    monkeypatch.setattr(model_lib, "compute_dtype", lambda device: torch.bfloat16)
    monkeypatch.setitem(rollout.SAMPLE_DTYPE, "cpu", torch.bfloat16)
    logits_dtypes, moved = [], []
    real_update = train.update

    def recording_update(policy, optimizer, *args):
        policy.lm_head.register_forward_hook(lambda module, inputs, output: logits_dtypes.append(output.dtype))
        before = [p.detach().clone() for p in policy.parameters()]
        stats = real_update(policy, optimizer, *args)
        assert all(p.dtype == torch.float32 for p in policy.parameters())
        moved.append(torch.cat([(p != q).flatten() for p, q in zip(policy.parameters(), before)]).float().mean())
        return stats

    monkeypatch.setattr(train, "update", recording_update)
    monkeypatch.chdir(tmp_path)
    train.main(["--model", str(bf16_dir), "--run", "mixed", "--steps", "1", "--lr", "2e-6", "--n", "4",
                "--prompts-per-step", "4", "--max-new-tokens", "6", "--dynamic-sampling", "false",
                "--length-eta-max", "0.05", "--eval-problems", "2", "--val-problems", "2", "--eval-samples", "1",
                "--boundary-problems", "0", "--minibatches", "1"])
    assert set(logits_dtypes) == {torch.bfloat16} and moved[0] > 0.9
    final = tmp_path / "runs" / "mixed" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file
    saved = load_file(final / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied to the embedding: still stored once after the cast
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert model_lib.saved_dtype(str(final)) == torch.bfloat16


# ----------------------------------------------------------------------------- end to end, per preset

# A random model never answers right, so dynamic sampling (which filters on correctness) would drop every
# group; with it off, a small length penalty makes completions of different lengths score differently, so
# the update runs. (prorl-v2 has a length penalty of its own.)
PRESET_RUNS = {
    "prorl": (["--n", "4", "--length-eta-max", "0.05", "--dynamic-sampling", "false"],
              {"advantage": "grpo", "clip_low": 0.2, "clip_high": 0.4, "temperature": 1.2, "kl_kind": "k3",
               "kl_coef": 1e-4, "reset_patience": 3, "reset_optimizer": True, "minibatches": 4}),
    "prorl-v2": (["--n", "4", "--dynamic-sampling", "false"],
                 {"advantage": "reinforce_pp", "clip_high": 0.28, "kl_kind": "k2", "reset_every": 300,
                  "reset_optimizer": False, "length_eta_max": 0.1, "length_period": 200, "length_off_steps": 100}),
    "brorl": (["--n", "16", "--length-eta-max", "0.05", "--dynamic-sampling", "false"],
              {"advantage": "reinforce_pp", "n": 16, "lr_scale_from_batch": 256 * 16, "kl_kind": "k2"}),
}
STEP_KEYS = {"step", "reward", "pass_rate", "kept_frac", "response_len", "clipfrac", "approx_kl", "ratio_mean",
             "kl", "entropy", "val_pass1", "resets", "gen_s", "ref_s", "update_s", "step_s", "tokens_per_s"}


def run_train(tmp_path, monkeypatch, model_dir: str, argv: list[str]) -> tuple[dict, list[dict], list[float]]:
    """train.main in tmp_path → (config.json, metrics.jsonl records, the learning rate AdamW was built with)."""
    monkeypatch.chdir(tmp_path)
    learning_rates = []

    class RecordingAdamW(torch.optim.AdamW):
        def __init__(self, params, lr, **kwargs):
            learning_rates.append(lr)
            super().__init__(params, lr=lr, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    train.main(["--model", model_dir, "--run", "e2e", "--max-new-tokens", "8", "--eval-problems", "5",
                "--val-problems", "5", "--eval-samples", "2", "--boundary-problems", "2", "--boundary-n", "4"] + argv)
    run_dir = tmp_path / "runs" / "e2e"
    config = json.loads((run_dir / "config.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (run_dir / "result.md").is_file() and (run_dir / "final" / "config.json").is_file()
    assert {"base", "trained"} == set(json.loads((run_dir / "result.json").read_text()))
    assert (run_dir / "boundary.md").is_file() and (run_dir / "training.png").is_file()
    return config, metrics, learning_rates


@pytest.mark.parametrize("preset", list(PRESET_RUNS))
def test_preset_trains_end_to_end(tmp_path, monkeypatch, tiny_model_dir, preset):
    extra, expected_settings = PRESET_RUNS[preset]
    config, metrics, learning_rates = run_train(
        tmp_path, monkeypatch, tiny_model_dir,
        ["--preset", preset, "--steps", "2", "--prompts-per-step", "4", "--eval-every", "1"] + extra)
    assert {k: config[k] for k in expected_settings} == expected_settings
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert STEP_KEYS <= set(m), STEP_KEYS - set(m)
        assert all(math.isfinite(m[k]) for k in STEP_KEYS)
        assert 0 < m["gen_s"] + m["ref_s"] + m["update_s"] <= m["step_s"]  # the time split is part of the step
        assert 0 < m["kept_frac"] <= 1
    # BroRL: lr · sqrt(B_new / B_old) = 2e-6 · sqrt(4·16 / (256·16)) = 2e-6 / 8; the others use the preset's lr
    expected_lr = 2e-6 / 8 if preset == "brorl" else 2e-6
    assert learning_rates == [pytest.approx(expected_lr)]
    result = (tmp_path / "runs" / "e2e" / "result.md").read_text()
    assert all(f"| {family} |" in result for family in ("sort", "reverse", "countdown", "average"))


def test_scheduled_reset_makes_the_next_steps_kl_exactly_zero(tmp_path, monkeypatch, tiny_model_dir):
    # One mini-batch per step, so a step's KL is measured before its own update: step 1 starts at π = π_ref
    # (0), step 2 after one update (> 0), reset after step 2, step 3 back at π = π_ref (exactly 0).
    _, metrics, _ = run_train(tmp_path, monkeypatch, tiny_model_dir,
                              ["--steps", "3", "--prompts-per-step", "8", "--n", "4", "--eval-every", "0", "--minibatches", "1",
                               "--lr", "1e-2", "--reset-every", "2", "--length-eta-max", "0.1",
                               "--dynamic-sampling", "false"])
    assert metrics[0]["kl"] == 0.0 and metrics[1]["kl"] > 0 and metrics[2]["kl"] == 0.0
    assert metrics[0]["length_eta"] == 0.1  # step 1 opens the first on-phase of the length penalty at η_max
    assert [m.get("reset") for m in metrics] == [None, "schedule", None]
    assert [m["resets"] for m in metrics] == [0, 1, 1]


def capture_shaped_rewards(monkeypatch) -> list[dict]:
    """Record, at each step of train.main, the sampled batch, its scores, the reference's log-probs and the
    rewards handed to the advantage estimator."""
    steps = []
    real_sample, real_logprobs, real_advantages = grpo.sample_groups, train.batch_logprobs, grpo.group_advantages

    def sample(*args, **kwargs):
        batch, scores, stats = real_sample(*args, **kwargs)
        steps.append({"batch": batch, "scores": scores})
        return batch, scores, stats

    def logprobs(model, batch, c):
        out = real_logprobs(model, batch, c)
        if steps:
            steps[-1].setdefault("ref_logp", out)  # the first call of a step is the reference's
        return out

    def advantages(shaped, estimator):
        if steps:  # (validate() calls it too, before any step, to check the estimator's name)
            steps[-1]["shaped"] = shaped.clone()
        return real_advantages(shaped, estimator)

    monkeypatch.setattr(grpo, "sample_groups", sample)
    monkeypatch.setattr(train, "batch_logprobs", logprobs)
    monkeypatch.setattr(grpo, "group_advantages", advantages)
    return steps


def test_the_loop_shapes_rewards_with_the_length_penalty_of_its_step(tmp_path, monkeypatch, tiny_model_dir):
    steps = capture_shaped_rewards(monkeypatch)
    run_train(tmp_path, monkeypatch, tiny_model_dir,
              ["--steps", "2", "--prompts-per-step", "4", "--n", "4", "--eval-every", "0", "--dynamic-sampling", "false",
               "--length-eta-max", "0.3", "--length-eta-min", "0.1", "--length-period", "2", "--kl-coef", "0"])
    # η(step 1) = η_max = 0.3; η(step 2) = 0.1 + ½·0.2·(1 + cos(π/2)) = 0.2; shaped = score − η·len/max_new_tokens
    for step, eta in zip(steps, (0.3, 0.2), strict=True):
        lengths = step["batch"].mask.sum(dim=1).float().view_as(step["scores"])
        torch.testing.assert_close(step["shaped"], step["scores"] - eta * lengths / 8)


def test_kl_in_reward_subtracts_beta_times_the_summed_kl_of_each_response(tmp_path, monkeypatch, tiny_model_dir):
    steps = capture_shaped_rewards(monkeypatch)
    run_train(tmp_path, monkeypatch, tiny_model_dir,
              ["--steps", "2", "--prompts-per-step", "4", "--n", "4", "--eval-every", "0", "--dynamic-sampling", "false",
               "--length-eta-max", "0.05", "--kl-in-reward", "true", "--kl-coef", "0.5", "--kl-kind", "k3",
               "--minibatches", "1", "--lr", "5e-2"])
    step = steps[1]  # after one update π ≠ π_ref, so the KL is not 0
    log_ratio = step["ref_logp"] - step["batch"].logprobs[:, 1:]  # the sampler's log-probs stand for π
    k3 = (torch.exp(log_ratio) - log_ratio - 1) * step["batch"].mask[:, 1:]
    lengths = step["batch"].mask.sum(dim=1).float()
    eta = rewards.length_penalty_coef(1, 0.0, 0.05, 100)
    expected = step["scores"].flatten() - eta * lengths / 8 - 0.5 * k3.sum(dim=1)
    assert k3.sum() > 1e-4
    torch.testing.assert_close(step["shaped"].flatten(), expected)


def test_a_kl_spike_resets_the_reference(tmp_path, monkeypatch, tiny_model_dir):
    _, metrics, _ = run_train(tmp_path, monkeypatch, tiny_model_dir,
                              ["--steps", "3", "--prompts-per-step", "4", "--n", "4", "--eval-every", "0",
                               "--dynamic-sampling", "false", "--length-eta-max", "0.1", "--minibatches", "1",
                               "--lr", "5e-2", "--reset-kl", "1e-9"])
    assert metrics[0]["kl"] == 0.0 and metrics[0].get("reset") is None  # π = π_ref at step 1
    assert metrics[1]["kl"] > 1e-9 and metrics[1]["reset"] == "kl"
    assert metrics[2]["kl"] == 0.0  # measured right after the reset, before step 3's update


def test_kl_clamp_bounds_the_per_token_kl_term(tiny_model, rollout_batch):
    policy, tokenizer = tiny_model
    batch, adv = rollout_batch
    reference = model_lib.build_tiny_model(tokenizer, seed=1).eval()  # far from the policy: a large KL
    c = train.Config(minibatches=1, kl_coef=0.1, kl_kind="k3")
    ref_logp = train.batch_logprobs(reference, batch, c)
    unclamped = train.update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, adv, ref_logp, c)["kl"]
    clamped = train.update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, adv, ref_logp,
                           train.Config(minibatches=1, kl_coef=0.1, kl_kind="k3", kl_clamp=0.05))["kl"]
    assert unclamped > 0.05 >= clamped > 0


def test_overlong_filter_gives_truncated_responses_no_gradient(tiny_model_dir, rollout_batch):
    batch, _ = rollout_batch
    batch = rollout.select_rows(batch, slice(None))
    batch.truncated = torch.arange(len(batch.truncated)) % 2 == 0  # say half the responses hit the limit
    adv = batch.truncated.float() * 2 - 1  # +1 on truncated responses, −1 on the others
    steps = []
    for overlong_filter, only_truncated in ((True, True), (False, True), (True, False)):
        policy = model_lib.load(tiny_model_dir)[0]
        before = [p.clone() for p in policy.parameters()]
        rows = batch.truncated if only_truncated else torch.ones_like(batch.truncated)
        c = train.Config(minibatches=1, kl_coef=0.0, grad_clip=1e9, overlong_filter=overlong_filter)
        train.update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), rollout.select_rows(batch, rows), adv[rows],
                     None, c)
        steps.append(torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), before)]))
    assert steps[0].abs().max() == 0  # a batch of truncated responses only: nothing to learn from
    assert steps[1].abs().max() > 0  # without the filter they are rewarded like the rest
    assert steps[2].abs().max() > 0  # the complete responses still train


def test_stalled_validation_resets_right_after_the_evaluation_that_shows_it(tmp_path, monkeypatch, tiny_model_dir):
    # The random model scores 0 on every validation: step 1 sets the best (0), step 2 does not beat it, which
    # with patience 1 is a stall, so π_ref is reset at the end of step 2, not one step later.
    _, metrics, _ = run_train(tmp_path, monkeypatch, tiny_model_dir,
                              ["--steps", "2", "--prompts-per-step", "2", "--n", "2", "--eval-every", "1",
                               "--reset-patience", "1"])
    assert [m["val_pass1"] for m in metrics] == [0.0, 0.0]
    assert [m.get("reset") for m in metrics] == [None, "stalled"]


# ----------------------------------------------------------------------------- bench/ablate.py, smoke

def test_ablation_script_runs_each_variant_in_its_own_dir_and_tabulates_them(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.chdir(tmp_path)
    import ablate

    ablate.main(["--quick", "--only", "no-kl,n4,n32", "--model", tiny_model_dir, "--max-new-tokens", "8"])
    configs = {name: json.loads((tmp_path / "runs" / f"ablate-{name}" / "config.json").read_text())
               for name in ("no-kl", "n4", "n32")}
    assert configs["no-kl"]["kl_coef"] == 0.0
    # the same rollout budget, spent on more prompts or more samples per prompt
    assert [(configs[k]["prompts_per_step"], configs[k]["n"]) for k in ("n4", "n32")] == [(16, 4), (2, 32)]
    rows = (tmp_path / "runs" / "ablate.md").read_text().splitlines()
    assert len(rows) == 2 + 3 and rows[2].startswith("| no-kl |") and "| 16 × 4 |" in rows[3]


# ----------------------------------------------------------------------------- bench/step.py, smoke

def test_step_benchmark_runs_one_prorl_v2_step_and_prints_its_time_split(tmp_path):
    for _ in range(2):  # a rerun replaces the first run's directory
        done = subprocess.run([sys.executable, str(REPO / "bench" / "step.py"), "--sizes", "2", "2", "4", "4"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    split = dict(zip(*[iter(done.stdout.strip().splitlines()[-1].split()[:8])] * 2, strict=True))
    assert set(split) == {"gen_s", "ref_s", "update_s", "step_s"}
    assert sum(float(split[k]) for k in ("gen_s", "ref_s", "update_s")) <= float(split["step_s"]) + 0.02
    config = json.loads((tmp_path / "runs" / "bench-step" / "small" / "train" / "config.json").read_text())
    assert (config["advantage"], config["kl_kind"], config["n"], config["max_new_tokens"]) == ("reinforce_pp", "k2", 2, 4)
