"""reset.py: when to reset the reference policy (schedule, stalled validation, KL spike) and what a
reset does (π_ref ← π, so the KL is exactly 0 again; optionally Adam starts over)."""

import torch

import kl
import llama_forward
import models
import reset
import rollout
from prorl_kernels.reference import token_logprobs_ref

# ----------------------------------------------------------------------------- when

def test_schedule_resets_every_k_steps():
    tracker = reset.ResetTracker(every=3)
    reasons = []
    for _ in range(9):
        reason = tracker.should_reset(kl=0.0)
        if reason:
            tracker.did_reset()
        reasons.append(reason)
    assert reasons == [None, None, "schedule"] * 3
    assert tracker.count == 3


def test_stalled_validation_resets_after_patience_evaluations_without_a_gain():
    tracker = reset.ResetTracker(patience=2)
    for value in [0.10, 0.20]:  # improving
        tracker.observe_validation(value)
        assert tracker.should_reset(kl=0.0) is None
    tracker.observe_validation(0.20)  # equal is not a gain: 1
    assert tracker.should_reset(kl=0.0) is None
    tracker.observe_validation(0.15)  # 2 evaluations without a gain
    assert tracker.should_reset(kl=0.0) == "stalled"
    tracker.did_reset()
    assert tracker.should_reset(kl=0.0) is None  # the count starts over after a reset
    tracker.observe_validation(0.25)  # a new best clears it too
    assert tracker.evals_without_gain == 0 and tracker.best_validation == 0.25


def test_kl_threshold_resets_on_a_spike_only():
    tracker = reset.ResetTracker(kl_threshold=0.1)
    assert ([tracker.should_reset(kl=value) for value in (0.05, 0.1, 0.11, 0.02)]
            == [None, None, "kl", None])


def test_all_triggers_off_never_reset():
    tracker = reset.ResetTracker()
    for _ in range(100):
        tracker.observe_validation(0.0)
        assert tracker.should_reset(kl=1e9) is None


def test_state_dict_round_trip():
    tracker = reset.ResetTracker(every=5, patience=2, kl_threshold=0.3)
    for value in (0.1, 0.05, 0.04):
        tracker.observe_validation(value)
        tracker.should_reset(kl=0.0)
    restored = reset.ResetTracker(every=5, patience=2, kl_threshold=0.3)
    restored.load_state_dict(tracker.state_dict())
    assert vars(restored) == vars(tracker)
    assert restored.should_reset(kl=0.0) == tracker.should_reset(kl=0.0) == "stalled"
    # the thresholds are the new tracker's (a resumed run's flags), the counters the saved ones
    tracker.did_reset()
    tracker.observe_validation(0.01)
    relaxed = reset.ResetTracker(every=0, patience=0, kl_threshold=0.0)
    relaxed.load_state_dict(tracker.state_dict())
    assert (relaxed.patience, relaxed.evals_without_gain, relaxed.count) == (0, 1, 1)
    assert relaxed.should_reset(kl=1.0) is None


# ----------------------------------------------------------------------------- what

def full_logits(model, batch) -> torch.Tensor:
    """Logits [B, T−1, V] at every position from the model's own forward (t predicts token t+1)."""
    return model(input_ids=batch.tokens, attention_mask=batch.attention_mask.long(),
                 position_ids=llama_forward.position_ids(batch.attention_mask)).logits[:, :-1]


def kl_on_a_rollout(policy, reference, tokenizer, kind: str) -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) on the completion tokens of a small rollout of the policy."""
    prompts = [models.encode_prompt(tokenizer, text) for text in ("12+34=", "5 3 9 1 7=")]
    batch = rollout.generate(policy, prompts, n=3, max_new_tokens=6, seed=0,
                             pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logp = token_logprobs_ref(full_logits(policy, batch), batch.tokens[:, 1:])
        ref_logp = token_logprobs_ref(full_logits(reference, batch), batch.tokens[:, 1:])
    return kl.kl_estimate(logp, ref_logp, kind)[batch.mask[:, 1:]]


def adam_steps(policy, optimizer, count: int) -> None:
    for _ in range(count):
        loss = sum((p.float() ** 2).sum() for p in policy.parameters())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_after_a_reset_the_kl_is_exactly_zero(tiny_model):
    policy, tokenizer = tiny_model
    reference = models.build_tiny_model(tokenizer, seed=1).eval()  # a different network
    for kind in ("k1", "k2", "k3"):
        assert kl_on_a_rollout(policy, reference, tokenizer, kind).abs().max() > 1e-3
    reset.reset_reference(policy, reference)
    for kind in ("k1", "k2", "k3"):
        kl_values = kl_on_a_rollout(policy, reference, tokenizer, kind)
        assert kl_values.numel() > 0 and torch.count_nonzero(kl_values) == 0


def test_the_reference_is_a_copy_not_an_alias(tiny_model):
    policy, tokenizer = tiny_model
    reference = models.build_tiny_model(tokenizer, seed=1)
    reset.reset_reference(policy, reference)
    adam_steps(policy, torch.optim.AdamW(policy.parameters(), lr=1e-2), 1)  # the policy moves on
    moved = [not torch.equal(p, r) for p, r in zip(policy.parameters(), reference.parameters())]
    assert all(moved)


def test_reset_with_the_optimizer_clears_adams_moments(tiny_model):
    policy, tokenizer = tiny_model
    reference = models.build_tiny_model(tokenizer, seed=1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    adam_steps(policy, optimizer, 2)
    first = next(policy.parameters())
    assert (optimizer.state[first]["exp_avg"].abs().sum() > 0
            and optimizer.state[first]["step"].item() == 2)
    reset.reset_reference(policy, reference, optimizer)
    assert len(optimizer.state) == 0  # no moments, no step count: Adam's m = v = 0, t = 0
    # ...so the next step is exactly the first step of a brand-new AdamW from the same weights
    twin = models.build_tiny_model(tokenizer)
    twin.load_state_dict(policy.state_dict())
    adam_steps(policy, optimizer, 1)
    adam_steps(twin, torch.optim.AdamW(twin.parameters(), lr=1e-3), 1)
    assert all(torch.equal(p, q) for p, q in zip(policy.parameters(), twin.parameters()))
    assert optimizer.state[first]["step"].item() == 1


def test_reset_without_the_optimizer_keeps_adams_moments(tiny_model):
    policy, tokenizer = tiny_model
    reference = models.build_tiny_model(tokenizer, seed=1)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    adam_steps(policy, optimizer, 2)
    first = next(policy.parameters())
    moment = optimizer.state[first]["exp_avg"].clone()
    reset.reset_reference(policy, reference)  # ProRL v2: the reference moves, Adam does not notice
    assert (torch.equal(optimizer.state[first]["exp_avg"], moment)
            and optimizer.state[first]["step"].item() == 2)
    assert all(torch.equal(p, r) for p, r in zip(policy.parameters(), reference.parameters()))
