"""The tiny built-in base: a real tokenizer and model that load like any checkpoint, and a
warm-start that learns."""

import pytest
import torch

import models
import tasks


def test_tokenizer_is_character_level_and_round_trips():
    tokenizer = models.build_tokenizer()
    text = "12 7 31>40:3*9+7-1="
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text
    assert models.encode_prompt(tokenizer, "1+2=")[0] == tokenizer.bos_token_id


def test_supervised_batch_puts_loss_on_the_answer_only():
    tokenizer = models.build_tokenizer()
    input_ids, labels = models.supervised_batch(tokenizer, [{"prompt": "1+2=", "solution": "3"},
                                                               {"prompt": "10+20=",
                                                                "solution": "30"}])
    vocab = tokenizer.get_vocab()
    # row 0: <bos> 1 + 2 = 3 <eos>, right-padded to row 1's 10 tokens; only "3" and <eos> are
    # predicted
    assert (input_ids[0].tolist()
            == [vocab[t] for t in ["<bos>", "1", "+", "2", "=", "3", "<eos>"] + ["<pad>"] * 3])
    assert labels[0].tolist() == [-100] * 5 + [vocab["3"], vocab["<eos>"]] + [-100] * 3
    assert labels[1].tolist() == [-100] * 7 + [vocab["3"], vocab["0"], vocab["<eos>"]]


def test_saved_base_loads_like_a_checkpoint_and_is_reused(tmp_path, monkeypatch):
    monkeypatch.setitem(models.WARMSTART, "steps", 2)
    built = []
    path = models.ensure_tiny_base(str(tmp_path / "base"), seed=0, log=built.append)
    models.ensure_tiny_base(str(tmp_path / "base"), seed=0, log=built.append)
    assert len(built) == 2 and built[0].startswith("building")  # "building ...", then "built ..."
    assert built[1].startswith("built")  # and the second call found the same recipe and reused it
    policy, tokenizer = models.load(path)
    assert policy.config.model_type == "llama"
    assert policy.num_parameters() < 2_000_000
    assert models.stop_ids(policy, tokenizer) == (tokenizer.eos_token_id,)


def test_load_reports_a_missing_directory_in_one_line(tmp_path):
    try:
        models.load(str(tmp_path / "nope"))
    except ValueError as error:
        assert "no such model directory" in str(error) and "\n" not in str(error)
    else:
        raise AssertionError("load of a missing directory did not fail")


def test_warm_start_lowers_the_loss_on_held_out_problems():
    tokenizer = models.build_tokenizer()
    policy = models.build_tiny_model(tokenizer, seed=0)
    held_out = [ex for family in tasks.BUILTIN for ex in tasks.heldout(family, 20)]
    input_ids, labels = models.supervised_batch(tokenizer, held_out)

    def loss() -> float:
        with torch.no_grad():
            return policy(input_ids=input_ids, labels=labels).loss.item()

    before = loss()
    recipe = {"task_mix": "add,sort,countdown", "level": 1, "steps": 40, "batch_size": 32,
              "lr": 3e-3, "noise": 0.0, "chain_coverage": 1.0}
    models.warm_start(policy, tokenizer, recipe, seed=0)
    assert loss() < 0.75 * before


def test_corrupt_changes_at_most_one_character_of_the_solution():
    import random
    example = {"task": "sort", "prompt": "52 7 31=", "answer": "7 31 52", "solution": "7 31 52"}
    rng = random.Random(0)
    for _ in range(100):
        noisy = models.corrupt(example, rng)
        assert len(noisy["solution"]) == len(example["solution"])
        assert sum(a != b for a, b in zip(noisy["solution"], example["solution"])) <= 1
        # the original is untouched
        assert noisy["answer"] == example["answer"] and example["solution"] == "7 31 52"


def test_load_reports_a_directory_without_weights_in_one_line(tmp_path):
    models.build_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')  # a config, but no weights
    with pytest.raises(ValueError, match=f"--model {tmp_path}: cannot load it") as error:
        models.load(str(tmp_path))
    assert "\n" not in str(error.value)


def test_stop_ids_include_the_generation_configs_end_of_turn_and_a_model_without_eos_is_refused(
        tmp_path):
    """Chat checkpoints (Llama-3-Instruct) name their end-of-turn token only in
    generation_config.json."""
    tokenizer = models.build_tokenizer()
    model = models.build_tiny_model(tokenizer, seed=0)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    model.save_pretrained(tmp_path / "chat")
    tokenizer.save_pretrained(tmp_path / "chat")
    policy, loaded = models.load(str(tmp_path / "chat"))
    assert models.stop_ids(policy, loaded) == (tokenizer.eos_token_id, 7)
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    model.save_pretrained(tmp_path / "no-eos")
    tokenizer.eos_token = None
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "no-eos")
    with pytest.raises(ValueError,
                       match="no-eos: its tokenizer and configs name no end-of-sequence token"):
        models.load(str(tmp_path / "no-eos"))


def test_a_tokenizer_without_pad_or_eos_pads_with_the_configs_eos(tmp_path):
    tokenizer = models.build_tokenizer()
    model = models.build_tiny_model(tokenizer, seed=0)
    eos = tokenizer.eos_token_id
    model.config.eos_token_id = eos
    model.save_pretrained(tmp_path)
    tokenizer.eos_token, tokenizer.pad_token = None, None
    tokenizer.save_pretrained(tmp_path)
    policy, loaded = models.load(str(tmp_path))
    assert loaded.eos_token_id is None and loaded.pad_token_id == eos
    assert models.stop_ids(policy, loaded) == (eos,)
