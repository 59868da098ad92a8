"""Reference policy resets (ProRL §3): π_ref ← π, so the KL penalty stops holding the policy back.

ProRL v1 resets when validation stalls and also re-initialises the optimizer; ProRL v2 resets on a
schedule (every 200–500 steps) or on a KL spike and keeps the optimizer state.
"""

import torch


class ResetTracker:
    """Decides, after each step, whether to reset. State: steps since the last reset, best
    validation."""

    def __init__(self, every: int = 0, patience: int = 0, kl_threshold: float = 0.0):
        self.every = every  # reset every `every` steps (0: never)
        # reset when validation has not improved for this many evaluations (0: never)
        self.patience = patience
        self.kl_threshold = kl_threshold  # reset when the step's mean KL exceeds this (0: never)
        self.steps_since_reset = 0
        self.best_validation = float("-inf")
        self.evals_without_gain = 0
        self.count = 0

    def observe_validation(self, value: float) -> None:
        if value > self.best_validation:
            self.best_validation, self.evals_without_gain = value, 0
        else:
            self.evals_without_gain += 1

    def should_reset(self, kl: float) -> str | None:
        """Called once per step with that step's mean KL; returns the reason to reset, or None."""
        self.steps_since_reset += 1
        if self.every and self.steps_since_reset >= self.every:
            return "schedule"
        if self.patience and self.evals_without_gain >= self.patience:
            return "stalled"
        if self.kl_threshold and kl > self.kl_threshold:
            return "kl"
        return None

    def did_reset(self) -> None:
        self.steps_since_reset, self.evals_without_gain = 0, 0
        self.count += 1

    # the thresholds are config
    STATE = ("steps_since_reset", "best_validation", "evals_without_gain", "count")

    def state_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.STATE}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters; the thresholds stay those this tracker was built with (a resumed
        run's flags)."""
        for name in self.STATE:
            setattr(self, name, state[name])


@torch.no_grad()
def reset_reference(policy: torch.nn.Module, reference: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Copy the policy's weights into the reference; with an optimizer, also clear its state
    (Adam's moments and step counts), as ProRL v1 does."""
    reference.load_state_dict(policy.state_dict())
    if optimizer is not None:
        optimizer.state.clear()
