"""The edge curriculum (curriculum.py): the promotion rule on hand-worked sequences, replay, exact
resume."""

import pickle
from collections import Counter

import pytest
import torch

import curriculum
import tasks


def at(level: int) -> dict:
    return {"task": "chains", "prompt": "", "level": level}


def test_promotion_on_a_hand_worked_sequence():
    """window 2, threshold 0.5. Pass rates at level 1: 0.25 (window not full), then 0.5 (mean 0.375
    < 0.5), then 0.75 (mean of the last two 0.625 ≥ 0.5) → level 2 and an empty window. A score of
    0.5 is not a pass."""
    stream = curriculum.EdgeCurriculum("chains", levels=3, threshold=0.5, replay=0.0, window=2)
    assert not stream.observe([at(1)], torch.tensor([[1.0, 0, 0, 0]]))
    assert stream.level == 1 and stream.stats() == {"curriculum_level": 1,
                                                    "curriculum_pass_rate": 0.25}
    assert not stream.observe([at(1)], [[1.0, 1.0, 0.5, 0]])  # 2 passes of 4: the 0.5 is not one
    assert stream.level == 1 and stream.stats()["curriculum_pass_rate"] == 0.375
    assert stream.observe([at(1)], [[1.0, 1.0, 1.0, 0]])
    assert stream.level == 2 and stream.stats() == {"curriculum_level": 2,
                                                    "curriculum_pass_rate": 0.0}


def test_only_groups_at_the_current_level_count_and_the_top_level_stays():
    """Replayed level-1 groups, and level-2 groups sampled before a mid-batch promotion, are not
    counted."""
    stream = curriculum.EdgeCurriculum("chains", levels=3, start=2, threshold=0.5,
                                       replay=0.0, window=2)
    right, wrong = [1.0, 1.0], [0.0, 0.0]
    stream.observe([at(1), at(1), at(2)], [right, right, wrong])  # window [0]
    assert stream.level == 2 and list(stream.window) == [0.0]
    # [0, 1] → 0.5: promote; the next two now lie below
    stream.observe([at(2), at(2), at(2)], [right, right, right])
    assert stream.level == 3 and list(stream.window) == []
    for _ in range(5):
        assert not stream.observe([at(3)], [right])
    assert stream.level == 3  # the top level


def test_a_threshold_above_one_never_promotes():
    stream = curriculum.EdgeCurriculum("chains", levels=3, start=2, threshold=1.01,
                                       replay=0.0, window=1)
    for _ in range(10):
        stream.observe([at(2)], [[1.0, 1.0]])
    assert stream.level == 2


def test_replay_draws_easier_levels_uniformly_and_nothing_held_out():
    """replay 0.25 at level 3: 3/4 of the prompts at level 3, 1/8 at each of levels 1 and 2
    (±4σ, n = 4000)."""
    stream = curriculum.EdgeCurriculum("chains", levels=5, start=3, replay=0.25, seed=0)
    examples = [stream.sample() for _ in range(4000)]
    counts = Counter(ex["level"] for ex in examples)
    assert set(counts) == {1, 2, 3} and stream.drawn == 4000
    assert abs(counts[3] - 3000) < 4 * (4000 * 0.75 * 0.25) ** 0.5
    assert abs(counts[1] - 500) < 4 * (4000 * 0.125 * 0.875) ** 0.5
    assert all(len(ex["ops"]) == ex["level"] and not tasks.is_heldout(ex) for ex in examples)
    first = curriculum.EdgeCurriculum("chains", levels=5, start=1, replay=0.25, seed=0)
    assert {first.sample()["level"] for _ in range(50)} == {1}  # nothing easier to replay


def test_state_dict_resumes_the_same_stream_exactly():
    stream = curriculum.EdgeCurriculum("chains", levels=5, threshold=0.5, replay=0.3,
                                       window=3, seed=7)
    for _ in range(4):
        examples = [stream.sample() for _ in range(4)]
        stream.observe(examples, [[1.0, 0.0]] * 4)
    state = pickle.loads(pickle.dumps(stream.state_dict()))  # as a checkpoint stores it
    expected = [stream.sample()["prompt"] for _ in range(20)]
    resumed = curriculum.EdgeCurriculum("chains", levels=5, threshold=0.5, replay=0.3,
                                        window=3, seed=123)
    resumed.load_state_dict(state)
    assert resumed.level == state["level"] > 1 and list(resumed.window) == state["window"]
    assert ([resumed.sample()["prompt"] for _ in range(20)] == expected
            and resumed.drawn == stream.drawn)


def test_settings_a_user_can_get_wrong_fail_in_one_sentence():
    with pytest.raises(ValueError, match="procedural family"):
        curriculum.EdgeCurriculum("math", levels=3)
    with pytest.raises(ValueError, match="--curriculum-start"):
        curriculum.EdgeCurriculum("chains", levels=3, start=4)
    with pytest.raises(ValueError, match="--curriculum-replay"):
        curriculum.EdgeCurriculum("chains", levels=3, replay=1.0)
