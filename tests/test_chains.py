"""The chains family (chains.py): operations, prompts and written steps, the held-out chains, the
verifier, the warm-start coverage, and its registration in tasks, rewards and the tokenizer."""

import json
import random

import pytest

import chains
import models
import rewards
import tasks


def test_each_operation_on_a_hand_worked_list():
    digits = [3, 1, 4, 1, 5]
    assert chains.OPERATIONS["asc"](digits) == [1, 1, 3, 4, 5]
    assert chains.OPERATIONS["rev"](digits) == [5, 1, 4, 1, 3]
    assert chains.OPERATIONS["inc"]([9, 0, 4, 1, 5]) == [0, 1, 5, 2, 6]  # 9 + 1 wraps to 0
    assert chains.OPERATIONS["rot"](digits) == [1, 4, 1, 5, 3]
    assert chains.OPERATIONS["swp"](digits) == [1, 3, 1, 4, 5]  # 0↔1, 2↔3, the fifth stays


def test_a_chain_writes_one_step_per_operation():
    """31415 → rev 51413 → inc 62524 → asc 22456."""
    example = chains.make_chain(random.Random(0), ("rev", "inc", "asc"))
    digits = "".join(map(str, example["digits"]))
    assert example["prompt"] == f"{digits}:rev inc asc="
    fixed = {**example, "digits": [3, 1, 4, 1, 5]}
    assert chains.score_chains(fixed, "51413 62524 22456") == 1.0
    # surrounding whitespace is ignored
    assert chains.score_chains(fixed, " 51413 62524 22456\n") == 1.0


def test_verifier_needs_every_step_and_nothing_else():
    example = {"task": "chains", "prompt": "31415:rev inc asc=", "digits": [3, 1, 4, 1, 5],
               "ops": ["rev", "inc", "asc"]}
    # rewards.score reaches the chains verifier
    assert rewards.score(example, "51413 62524 22456") == 1.0
    assert rewards.score(example, "22456") == 0.0  # the answer alone: the steps are required
    assert rewards.score(example, "51413 62524 22457") == 0.0  # a wrong answer
    assert rewards.score(example, "51413 62534 22456") == 0.0  # a wrong middle step, right answer
    assert rewards.score(example, "51413 62524 22456 22456") == 0.0  # a step too many
    assert rewards.score(example, "5141362524 22456") == 0.0


def test_generated_problems_are_solved_by_their_solution_at_every_level():
    rng = random.Random(1)
    for level in range(1, chains.MAX_DEPTH + 1):
        for _ in range(20):
            example = tasks.generate("chains", rng, level)
            assert len(example["ops"]) == level == example["level"]
            assert rewards.score(example, example["solution"]) == 1.0
            assert example["solution"].split()[-1] == example["answer"]
            # RL never draws a held-out chain
            assert not chains.is_heldout_composition(tuple(example["ops"]))
            tasks.check_example(example)
    with pytest.raises(ValueError, match="depths 1..5"):
        chains.make_chains(rng, chains.MAX_DEPTH + 1)


def test_composition_counts_and_the_held_out_split():
    """5 atoms, then 5·4^(d−1) chains with no operation twice in a row; none of the atoms is held
    out; the hash holds out 3 of the 20 depth-2 chains (rev swp, rot asc, swp rev) and 20 of the 80
    depth-3 chains."""
    assert [len(chains.compositions(d)) for d in range(1, 5)] == [5, 20, 80, 320]
    assert ("asc", "asc") not in chains.compositions(2) and ("asc", "rev") in chains.compositions(2)
    assert chains.split(1) == (chains.compositions(1), [])
    train, held = chains.split(2)
    assert held == [("rev", "swp"), ("rot", "asc"), ("swp", "rev")]
    assert len(train) == 17 and not set(train) & set(held)
    assert len(chains.split(3)[1]) == 20
    problems = chains.heldout_composition_problems(2, 6)
    assert [tuple(p["ops"]) for p in problems] == held + held
    assert problems == chains.heldout_composition_problems(2, 6)  # the same on every run


def test_heldout_problems_of_trainable_chains_follow_the_prompt_hash():
    examples = tasks.heldout("chains", 10, level=2)
    assert len({ex["prompt"] for ex in examples}) == 10
    assert all(tasks.is_heldout(ex)
               and not chains.is_heldout_composition(tuple(ex["ops"])) for ex in examples)


def test_coverage_places_the_edge():
    """1 = the 5 atoms; 2 = atoms and the 17 trainable pairs;
    1.5 = atoms and round(8.5) = 8 of the pairs;
    2.25 = all of depth ≤ 2 and round(0.25 · 60) = 15 of the 60 trainable depth-3 chains."""
    assert chains.shown_compositions(1) == chains.compositions(1)
    assert len(chains.shown_compositions(2)) == 5 + 17
    half = chains.shown_compositions(1.5)
    assert len(half) == 5 + 8 and set(half) < set(chains.shown_compositions(2))
    assert len(chains.shown_compositions(2.25)) == 5 + 17 + 15
    assert not any(chains.is_heldout_composition(ops)
                   for ops in chains.shown_compositions(chains.MAX_DEPTH))
    with pytest.raises(ValueError, match="coverage"):
        chains.shown_compositions(0.5)


def warm_start_examples(monkeypatch, recipe: dict) -> list[dict]:
    """Every example models.warm_start trains on with this recipe (seed 0), in order."""
    seen, original = [], models.supervised_batch

    def recording_batch(tokenizer, examples):
        seen.extend(examples)
        return original(tokenizer, examples)

    monkeypatch.setattr(models, "supervised_batch", recording_batch)
    tokenizer = models.build_tokenizer()
    models.warm_start(models.build_tiny_model(tokenizer), tokenizer, recipe, seed=0)
    return seen


def test_edge_compositions_are_the_trainable_chains_of_the_first_depth_not_shown_in_full():
    assert chains.edge_compositions(2.0) == chains.split(3)[0]
    assert chains.edge_compositions(2.15) == chains.split(3)[0]
    assert len(chains.edge_compositions(1.5)) == 17
    assert chains.edge_compositions(chains.MAX_DEPTH) == []


def test_warm_start_edge_share_draws_that_fraction_from_every_edge_chain(monkeypatch):
    """chain_edge_share: about that fraction of the chains problems come from the edge's
    trainable chains (all of them reachable), the rest from the shown ones; 0 draws none."""
    def drawn_with(share: float) -> list[dict]:
        recipe = {"task_mix": "chains", "level": 1, "steps": 4, "batch_size": 100, "lr": 1e-3,
                  "noise": 0.0, "chain_coverage": 2.0, "chain_edge_share": share}
        return warm_start_examples(monkeypatch, recipe)

    drawn = drawn_with(0.25)
    deep = [tuple(ex["ops"]) for ex in drawn if len(ex["ops"]) == 3]
    assert len(drawn) == 400 and 60 < len(deep) < 140  # 100 expected
    assert set(deep) <= set(chains.split(3)[0]) and len(set(deep)) > 30
    assert all(len(ex["ops"]) <= 2 or tuple(ex["ops"]) in deep for ex in drawn)
    assert not any(len(ex["ops"]) == 3 for ex in drawn_with(0.0))


def test_warm_start_draws_chains_only_from_the_shown_ones(monkeypatch):
    shown = chains.shown_compositions(1.5)
    rng = random.Random(0)
    # all 13, no other
    assert {tuple(models.shown_chain(rng, shown)["ops"]) for _ in range(300)} == set(shown)
    recipe = {"task_mix": "chains:1,sort:1", "level": 2, "steps": 2, "batch_size": 64, "lr": 1e-3,
              "noise": 0.0, "chain_coverage": 1.5}
    seen = warm_start_examples(monkeypatch, recipe)
    drawn = [ex for ex in seen if ex["task"] == "chains"]
    # about half of the mix, and the sort half untouched
    assert 30 < len(drawn) < 98 and len(seen) == 128
    assert all(tuple(ex["ops"]) in shown and not tasks.is_heldout(ex) for ex in drawn)


def test_tokenizer_keeps_old_ids_and_spells_every_chain():
    """The operation letters come after the 18 older characters, so ids 0..21 are what they were."""
    vocab = models.build_tokenizer().get_vocab()
    assert [vocab[c] for c in "09+ "] == [4, 13, 14, 21]
    assert len(vocab) == 22 + len(set("".join(chains.OPERATIONS)))
    example = chains.make_chain(random.Random(0), ("asc", "rev", "inc", "rot", "swp"))
    ids = models.encode_prompt(models.build_tokenizer(), example["prompt"])
    assert vocab["<unk>"] not in ids
    assert len(ids) + len(example["solution"]) + 1 <= models.TINY_CONFIG["max_position_embeddings"]


def test_a_chains_base_is_one_call_with_its_recipe_recorded(tmp_path):
    """ensure_tiny_base's keywords override WARMSTART's entries and enter the recipe that decides
    reuse."""
    path = models.ensure_tiny_base(str(tmp_path / "chains"), log=lambda line: None,
                                   task_mix="chains", chain_coverage=1.5, steps=2, batch_size=8)
    recipe = json.loads((tmp_path / "chains" / "recipe.json").read_text())["warmstart"]
    assert recipe == {**models.WARMSTART, "task_mix": "chains", "chain_coverage": 1.5, "steps": 2,
                      "batch_size": 8}
    policy, tokenizer = models.load(path)
    assert policy.config.vocab_size == len(tokenizer) == len(models.build_tokenizer())
    with pytest.raises(ValueError, match="unknown warm-start setting"):
        models.ensure_tiny_base(str(tmp_path / "x"), chain_depth=2)
