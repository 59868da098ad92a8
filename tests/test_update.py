"""learner.update: the PPO-style update (mini-batches, epochs, micro-batches, old and reference
log-probs, the clipped loss plus KL written out by hand, the logged statistics), and mixed precision
(fp32 weights, bf16 compute) on a tiny random model."""

import json

import pytest
import torch

import dist
import grpo
import learner
import llama_forward
import models
import rollout
import settings
import train
from prorl_kernels.reference import token_logprobs_ref

# ----------------------------------------------------------------------------- update

@pytest.fixture
def rollout_batch(tiny_model):
    policy, tokenizer = tiny_model
    prompts = [models.encode_prompt(tokenizer, text)
               for text in ("12+34=", "5 3 9 1 7=", "3 7 9>30:", "8+8=")]
    batch = rollout.generate(policy, prompts, n=4, max_new_tokens=6, seed=0,
                             pad_id=tokenizer.pad_token_id)
    adv = grpo.group_advantages(torch.rand(4, 4,
                                           generator=torch.Generator().manual_seed(0))).flatten()
    return batch, adv


def test_update_has_zero_kl_to_an_identical_reference(tiny_model, tiny_model_dir, rollout_batch):
    policy, _ = tiny_model
    reference = models.load(tiny_model_dir)[0].eval()
    batch, adv = rollout_batch
    before = [p.clone() for p in policy.parameters()]
    c = settings.Config(minibatches=1, epochs=1, kl_coef=1e-3)
    ref_logp = learner.batch_logprobs(reference, batch, c)
    stats = learner.update(policy, torch.optim.AdamW(policy.parameters(), lr=1e-3), batch,
                           adv, ref_logp, c)
    assert stats["kl"] == 0.0 and stats["entropy"] > 0
    assert any(not torch.equal(p, q) for p, q in zip(before, policy.parameters()))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_update_steps_down_the_gradient_of_the_loss_written_out_by_hand(tiny_model_dir, agg):
    """One SGD step (lr 1) of update() — micro-batches of 3 rows, k3 KL to another model, T = 1.3 —
    equals minus the gradient of the clipped loss + β·k3 written out here from log_softmax, for the
    whole batch."""
    policy, tokenizer = models.load(tiny_model_dir)
    reference = models.build_tiny_model(tokenizer, seed=1).eval()
    prompts = [models.encode_prompt(tokenizer, text)
               for text in ("12+34=", "5 3 9 1 7=", "3 7 9>30:", "8+8=")]
    batch = rollout.generate(policy, prompts, n=4, max_new_tokens=6, temperature=1.3, seed=0,
                             pad_id=tokenizer.pad_token_id)
    adv = torch.randn(16, generator=torch.Generator().manual_seed(0))
    c = settings.Config(micro_batch_rows=3, loss_agg=agg, kl_coef=0.1, kl_kind="k3", grad_clip=1e9,
                        minibatches=1, temperature=1.3)
    ref_logp = learner.batch_logprobs(reference, batch, c)
    before = [p.clone() for p in policy.parameters()]
    learner.update(policy, torch.optim.SGD(policy.parameters(), lr=1.0), batch, adv, ref_logp, c)
    step = torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), before)])

    fresh = models.load(tiny_model_dir)[0]
    logits = fresh(input_ids=batch.tokens, attention_mask=batch.attention_mask.long(),
                   position_ids=llama_forward.position_ids(batch.attention_mask)).logits[:, :-1]
    logp = torch.log_softmax(logits / 1.3, -1).gather(-1, batch.tokens[:, 1:, None])[..., 0]
    ratio = torch.exp(logp - logp.detach())  # on-policy: 1, with the gradient of logp
    log_ratio = ref_logp - logp
    per_token = torch.maximum(-adv[:, None] * ratio, -adv[:, None] * ratio.clamp(0.8, 1.28))
    per_token = per_token + 0.1 * (torch.exp(log_ratio) - log_ratio - 1)
    mask = batch.mask[:, 1:].float()
    seq_sum, seq_tokens = (per_token * mask).sum(1), mask.sum(1)
    loss = {"token-mean": seq_sum.sum() / mask.sum(),
            "seq-mean-token-mean": (seq_sum / seq_tokens.clamp(min=1)).sum()
            / (seq_tokens > 0).sum(),
            "seq-mean-token-sum": seq_sum.sum() / (seq_tokens > 0).sum()}[agg]
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in fresh.parameters()])
    assert gradient.abs().max() > 1e-4
    torch.testing.assert_close(step, -gradient, atol=1e-6, rtol=1e-4)


def test_minibatches_and_epochs_take_one_optimizer_step_each(tiny_model, rollout_batch):
    policy, _ = tiny_model
    batch, adv = rollout_batch
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    stats = learner.update(policy, optimizer, batch, adv, None,
                           settings.Config(minibatches=2, epochs=3, kl_coef=0.0))
    assert optimizer.state[next(policy.parameters())]["step"].item() == 6
    # after the first optimizer step the policy is no longer the one that produced old_logp
    assert stats["ratio_mean"] != 1.0 and stats["approx_kl"] > 0
    assert "kl" not in stats  # β = 0: no reference, no KL


def test_minibatches_are_near_equal_and_a_batch_with_no_tokens_takes_no_step(tiny_model,
                                                                             rollout_batch):
    """16 rows in 6 mini-batches: 6 optimizer steps of 3, 3, 3, 3, 2 and 2 rows (chunk cut 5 of 3
    and one of 1); and a mini-batch whose tokens are all masked out takes no step (AdamW's momentum
    would move the weights anyway)."""
    policy, _ = tiny_model
    batch, adv = rollout_batch
    rows, sizes = [0], []  # rows forwarded since the last optimizer step; rows of each step
    real_logprobs = learner.completion_logprobs

    def counting_logprobs(policy, micro, c):
        # the update's forwards, not old log-probs
        rows[0] += len(micro.tokens) if torch.is_grad_enabled() else 0
        return real_logprobs(policy, micro, c)

    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    real_step = optimizer.step

    def counting_step(*args, **kwargs):
        sizes.append(rows[0])
        rows[0] = 0
        return real_step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(learner, "completion_logprobs", counting_logprobs)
        patch.setattr(optimizer, "step", counting_step)
        learner.update(policy, optimizer, batch, adv, None,
                       settings.Config(minibatches=6, epochs=1, kl_coef=0.0))
    assert sizes == [3, 3, 3, 3, 2, 2]
    assert optimizer.state[next(policy.parameters())]["step"].item() == 6
    # every response truncated, and --overlong-filter: no token has a gradient, so nothing moves
    truncated = rollout.Rollout(batch.tokens, batch.attention_mask, batch.mask, batch.logprobs,
                                torch.ones_like(batch.truncated), batch.prompt_len)
    before = [p.clone() for p in policy.parameters()]
    stats = learner.update(policy, optimizer, truncated, adv, None,
                           settings.Config(minibatches=2, epochs=1, kl_coef=0.0,
                                           overlong_filter=True))
    assert all(torch.equal(p, q) for p, q in zip(before, policy.parameters()))
    assert optimizer.state[next(policy.parameters())]["step"].item() == 6
    assert stats == {"skipped_updates": 0}


def test_logged_stats_are_token_weighted_over_the_whole_update(tiny_model, rollout_batch):
    """The logged entropy is the mean over every token the update saw, whatever the mini-batches'
    sizes: with one epoch and no KL, it equals the token mean of the entropies of the policy's
    forwards."""
    policy, _ = tiny_model
    batch, adv = rollout_batch
    entropies = []
    real = learner.completion_logprobs

    def recording(policy, micro, c):
        # the update's forwards, not the pass that computes the old log-probs
        if torch.is_grad_enabled():
            with torch.no_grad():  # the entropy of the full logits, apart from the trainer's path
                positions = llama_forward.position_ids(micro.attention_mask)
                logits = policy(input_ids=micro.tokens, position_ids=positions,
                                attention_mask=micro.attention_mask.long()).logits
            labels = micro.tokens[:, 1:]
            _, entropy = token_logprobs_ref(logits[:, :-1], labels, return_entropy=True)
            entropies.append(entropy[micro.mask[:, 1:]])
        return real(policy, micro, c)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(learner, "completion_logprobs", recording)
        config = settings.Config(minibatches=3, epochs=1, kl_coef=0.0, micro_batch_rows=2)
        stats = learner.update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, adv,
                               None, config)
    seen = torch.cat(entropies)  # mini-batches of 6, 5 and 5 rows, of different token counts
    assert len(seen) == int(batch.mask[:, 1:].sum())
    assert stats["entropy"] == pytest.approx(seen.mean().item(), rel=1e-5)


def test_old_logprobs_are_recomputed_not_taken_from_the_sampler(tiny_model, tiny_model_dir,
                                                                rollout_batch):
    # Two identical policies updated on the same batch, one whose sampler log-probs are garbage: the
    # update must not read them, so both end with the same weights.
    batch, adv = rollout_batch
    garbage = rollout.select_rows(batch, slice(None))
    garbage.logprobs = torch.full_like(batch.logprobs, -7.0)
    c = settings.Config(minibatches=2, epochs=2, kl_coef=0.0)
    results = []
    for sampled in (batch, garbage):
        policy = models.load(tiny_model_dir)[0]
        torch.manual_seed(0)  # the same mini-batch shuffle
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
        learner.update(policy, optimizer, sampled, adv, None, c)
        results.append(list(policy.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(*results))


def test_activation_checkpointing_changes_memory_not_the_update(tiny_model_dir, rollout_batch):
    """--activation-checkpointing recomputes each layer in backward: the same SGD step, and each
    decoder layer really runs twice (its forward, then again in backward) instead of once (its MLP
    is counted: a recompute stops once it has what backward needs, so the layer's own forward hook
    never fires a second time)."""
    batch, adv = rollout_batch
    deltas, mlp_runs = [], []
    for checkpointing in (False, True):
        policy = models.load(tiny_model_dir)[0]
        if checkpointing:  # as train.main does for --activation-checkpointing
            models.enable_activation_checkpointing(policy)
        runs = []
        policy.model.layers[0].mlp.register_forward_pre_hook(lambda
                                                             *args, runs=runs: runs.append(1))
        before = [p.clone() for p in policy.parameters()]
        c = settings.Config(kl_coef=0.0, grad_clip=1e9, minibatches=1,
                            activation_checkpointing=checkpointing)
        learner.update(policy.train(), torch.optim.SGD(policy.parameters(), lr=1.0),
                       batch, adv, None, c)
        deltas.append(torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), before)]))
        mlp_runs.append(len(runs))
    # one micro-batch, on-policy: one forward (of the prompt rows, then of the completion rows, in
    # prefix_forward), recomputed once more in backward with checkpointing
    assert mlp_runs[0] >= 1 and mlp_runs[1] == 2 * mlp_runs[0]
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-6, rtol=1e-4)


def test_the_activation_checkpointing_flag_checkpoints_the_policy(tmp_path, monkeypatch,
                                                                  tiny_model_dir):
    class Enabled(Exception):
        pass

    def enabled(model):
        raise Enabled(model.config.model_type)

    monkeypatch.setattr(models, "enable_activation_checkpointing", enabled)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Enabled, match="llama"):
        train.main(["--model", tiny_model_dir, "--activation-checkpointing", "true"])


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_change_memory_not_the_update(tiny_model_dir, rollout_batch, agg):
    batch, adv = rollout_batch
    # responses of 1 to 6 tokens, so rows weigh differently
    batch = rollout.select_rows(batch, slice(None))
    # the last completion column each row keeps
    last = batch.prompt_len + torch.arange(len(batch.mask)) % 6
    batch.mask = batch.mask & (torch.arange(batch.mask.shape[1])[None] <= last[:, None])
    deltas, stats = [], []
    for micro_batch_rows in (3, 16):
        policy = models.load(tiny_model_dir)[0]
        before = [p.clone() for p in policy.parameters()]
        c = settings.Config(micro_batch_rows=micro_batch_rows, loss_agg=agg, kl_coef=0.0,
                            grad_clip=1e9, minibatches=1)
        stats.append(learner.update(policy, torch.optim.SGD(policy.parameters(), lr=1.0),
                                    batch, adv, None, c))
        # Δθ = −∇loss
        deltas.append(torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), before)]))
    assert deltas[0].abs().max() > 0
    torch.testing.assert_close(deltas[0], deltas[1], atol=1e-6, rtol=1e-4)
    # the logged statistics are means over the batch's tokens, however the rows are split
    assert stats[0]["entropy"] == pytest.approx(stats[1]["entropy"], rel=1e-5)


# ------------------------------------------------------------------- mixed precision (bf16 on CUDA)

def test_bf16_compute_keeps_fp32_weights_moving_at_the_presets_lr_and_saves_as_it_came(
        tmp_path, monkeypatch, tiny_model_dir):
    """With bf16 compute (CUDA's; forced here on CPU) the forwards run in bf16 and the sampler
    samples bf16 copies, but the weights AdamW updates are fp32: at ProRL's lr of 2e-6 nearly every
    weight moves (a bf16 weight near 0.02 moves in steps of 1e-4, so in bf16 almost none would).
    final/ is saved in the dtype the checkpoint came in (bf16 here), not in the fp32 of training."""
    bf16_dir = tmp_path / "bf16"
    policy, tokenizer = models.load(tiny_model_dir)
    dist.save_pretrained(policy, tokenizer, bf16_dir, torch.bfloat16)
    monkeypatch.setitem(llama_forward.SAMPLE_DTYPE, "cpu", torch.bfloat16)
    forward_dtypes, moved = [], []
    real_update = learner.update

    def recording_update(policy, optimizer, *args):
        # the last layer's MLP: what the forward computes in, on either path (the model's head
        # is not called on the shared-prefix one)
        policy.model.layers[-1].mlp.down_proj.register_forward_hook(
            lambda module, inputs, output: forward_dtypes.append(output.dtype))
        before = [p.detach().clone() for p in policy.parameters()]
        stats = real_update(policy, optimizer, *args)
        assert all(p.dtype == torch.float32 for p in policy.parameters())
        moved.append(torch.cat([(p != q).flatten()
                                for p, q in zip(policy.parameters(), before)]).float().mean())
        return stats

    monkeypatch.setattr(learner, "update", recording_update)
    monkeypatch.chdir(tmp_path)
    train.main(["--model", str(bf16_dir), "--run", "mixed", "--steps", "1", "--lr", "2e-6",
                "--n", "4", "--prompts-per-step", "4", "--max-new-tokens", "6",
                "--dynamic-sampling", "false", "--length-eta-max", "0.05", "--eval-problems", "2",
                "--val-problems", "2", "--eval-samples", "1", "--boundary-problems", "0",
                "--minibatches", "1"])
    assert set(forward_dtypes) == {torch.bfloat16} and moved[0] > 0.9
    final = tmp_path / "runs" / "mixed" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file
    saved = load_file(final / "model.safetensors")
    assert "lm_head.weight" not in saved  # tied to the embedding: still stored once after the cast
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert models.saved_dtype(str(final)) == torch.bfloat16


def test_kl_clamp_bounds_the_per_token_kl_term(tiny_model, rollout_batch):
    policy, tokenizer = tiny_model
    batch, adv = rollout_batch
    reference = models.build_tiny_model(tokenizer, seed=1).eval()  # far from the policy: a large KL
    c = settings.Config(minibatches=1, kl_coef=0.1, kl_kind="k3")
    ref_logp = learner.batch_logprobs(reference, batch, c)
    unclamped = learner.update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch,
                               adv, ref_logp, c)["kl"]
    bound = unclamped / 2  # below the mean, so some tokens' KL must be cut
    clamped = learner.update(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, adv,
                             ref_logp, settings.Config(minibatches=1, kl_coef=0.1, kl_kind="k3",
                                                       kl_clamp=bound))["kl"]
    assert unclamped > bound >= clamped > 0


def test_overlong_filter_gives_truncated_responses_no_gradient(tiny_model_dir, rollout_batch):
    batch, _ = rollout_batch
    batch = rollout.select_rows(batch, slice(None))
    # say half the responses hit the limit
    batch.truncated = torch.arange(len(batch.truncated)) % 2 == 0
    adv = batch.truncated.float() * 2 - 1  # +1 on truncated responses, −1 on the others
    steps = []
    for overlong_filter, only_truncated in ((True, True), (False, True), (True, False)):
        policy = models.load(tiny_model_dir)[0]
        before = [p.clone() for p in policy.parameters()]
        rows = batch.truncated if only_truncated else torch.ones_like(batch.truncated)
        c = settings.Config(minibatches=1, kl_coef=0.0, grad_clip=1e9,
                            overlong_filter=overlong_filter)
        learner.update(policy, torch.optim.SGD(policy.parameters(), lr=1.0),
                       rollout.select_rows(batch, rows), adv[rows], None, c)
        steps.append(torch.cat([(p - q).flatten() for p, q in zip(policy.parameters(), before)]))
    assert steps[0].abs().max() == 0  # a batch of truncated responses only: nothing to learn from
    assert steps[1].abs().max() > 0  # without the filter they are rewarded like the rest
    assert steps[2].abs().max() > 0  # the complete responses still train
