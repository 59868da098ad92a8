"""Edge curriculum: keep RL's prompts at the edge of the policy's competence (issue 15).

Why the edge: RL expands what a model can solve only where it already succeeds rarely but not never.
On synthetic dependency-graph problems (arXiv 2512.07783) RL on in-distribution depths raised pass@1
only, RL at the edge (base pass@128 > 0) raised pass@128 by up to 42 points, RL far beyond the edge
did nothing; RL on depth-2 compositions of string functions generalised to deeper ones (arXiv
2509.25123).

The rule. Prompts come from the current level; a fraction `replay` comes from the easier levels
instead (uniformly), so the atoms the deeper levels are built from are not forgotten. After each
step the loop reports every sampled group's scores (observe); the pass rate of each group at the
current level (its share of samples with score ≥ 1) enters a window of the last `window` such
groups, and once the window is full and its mean reaches `threshold`, the level goes up by one and
the window starts empty. Levels never go down; a threshold above 1 never promotes (a fixed level,
e.g. the "hardest level only" arm).

Same interface as tasks.TaskMix (.sample(), .rng, .drawn, .weights), plus observe, stats and
state_dict / load_state_dict for an exact resume.
"""

import random
from collections import deque

import tasks


class EdgeCurriculum:
    """An endless stream of training problems of one procedural family, at the level the rule above
    picks."""

    def __init__(self, family: str, levels: int, start: int = 1, threshold: float = 0.5,
                 replay: float = 0.25, window: int = 32, seed: int = 0):
        if not tasks.is_procedural(family):
            raise ValueError("--curriculum needs a procedural family with levels (e.g. chains), "
                             f"not '{family}'")
        if not 1 <= start <= levels:
            raise ValueError(f"--curriculum-start must be between 1 and {levels}, not {start}")
        if not 0 <= replay < 1:
            raise ValueError(f"--curriculum-replay must be in [0, 1), not {replay}")
        if window < 1 or threshold <= 0:
            raise ValueError("--curriculum-window must be ≥ 1 and --curriculum-threshold > 0")
        self.family, self.levels, self.threshold, self.replay = family, levels, threshold, replay
        self.weights = {family: 1.0}  # as TaskMix: the families a run evaluates
        self.level = start
        self.window = deque(maxlen=window)  # pass rates of the latest groups at the current level
        self.rng = random.Random(seed)
        self.drawn = 0  # position in the stream, saved by checkpoints

    def sample(self) -> dict:
        """A training problem (never one of tasks' held-out split), tagged with its level."""
        level = self.level
        if level > 1 and self.rng.random() < self.replay:
            level = self.rng.randint(1, self.level - 1)
        self.drawn += 1
        while True:
            example = tasks.generate(self.family, self.rng, level)
            if not tasks.is_heldout(example):
                return {**example, "level": level}

    def observe(self, examples: list[dict], scores) -> bool:
        """Record the pass rates of the groups at the current level; scores [P, N] (a tensor or
        lists), row i those of examples[i]. Give every sampled group, before dynamic sampling drops
        the all-right ones, or the pass rate is biased low. Returns True if the level went up."""
        promoted = False
        for example, row in zip(examples, scores.tolist() if hasattr(scores, "tolist") else scores,
                                strict=True):
            if example["level"] != self.level:
                continue  # a replayed easier problem, or one sampled before the last promotion
            self.window.append(sum(score >= 1 for score in row) / len(row))
            full = len(self.window) == self.window.maxlen
            if (full and sum(self.window) / len(self.window) >= self.threshold
                    and self.level < self.levels):
                self.level += 1
                self.window.clear()
                promoted = True
        return promoted

    def stats(self) -> dict[str, float]:
        """For the metrics log: the level and the window's mean pass rate (0 while it is empty)."""
        return {"curriculum_level": self.level,
                "curriculum_pass_rate": sum(self.window) / len(self.window) if self.window else 0.0}

    def state_dict(self) -> dict:
        return {"level": self.level, "window": list(self.window), "rng": self.rng.getstate(),
                "drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.level, self.drawn = state["level"], state["drawn"]
        self.window.clear()
        self.window.extend(state["window"])
        self.rng.setstate(state["rng"])


def prompt_stream(c, rank: int = 0):
    """Where the training prompts come from (c: settings.Config): the task mix, or with
    --curriculum the edge curriculum over its one family's levels. Each rank draws its own stream.
    Unknown task names, unreadable files, a level the family lacks, no held-out problems: a one-line
    ValueError, before any work starts."""
    top = tasks.max_level(c.tasks)
    if not 1 <= c.level <= top:
        raise ValueError(f"--level must be 1..{top} for these tasks")
    seed = c.seed + 1_000_003 * rank
    if not c.curriculum:
        stream = tasks.TaskMix(c.tasks, level=c.level, seed=seed)
    elif "," in c.tasks:
        raise ValueError("--curriculum takes one procedural family in --tasks "
                         "(e.g. --tasks chains)")
    elif c.curriculum_top and not c.level <= c.curriculum_top <= top:
        raise ValueError("--curriculum-top must be between --level and the family's highest level")
    else:
        stream = EdgeCurriculum(c.tasks.split(":")[0], c.curriculum_top or top, c.level,
                                c.curriculum_threshold, c.curriculum_replay, c.curriculum_window,
                                seed=seed)
    if not any(tasks.heldout(family, 1, c.level) for family in stream.weights):
        raise tasks.no_heldout_error(c.tasks)
    return stream
