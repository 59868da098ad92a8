"""Shared fixtures: the repository on sys.path, and a tiny random model saved the way a real
checkpoint is.

The model is `models.build_tiny_model` (a stock `transformers` Llama, ~0.6M parameters) with the
built-in tasks' character tokenizer, *not* warm-started: its answers are random, which is what tests
want (fast, no download, and it loads through the same `models.load` path as any `--model DIR`).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# The test tensors are tiny: one thread is as fast, and on a shared machine several threads per
# process spin against each other (a 0.2 s test took 14 s with two). OMP_NUM_THREADS, if set, wins;
# subprocesses (the CLI tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A directory holding a tiny random Llama and its tokenizer (config.json, safetensors,
    tokenizer.json)."""
    path = tmp_path_factory.mktemp("tiny-random-model")
    tokenizer = models.build_tokenizer()
    models.build_tiny_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_model(tiny_model_dir):
    """(model, tokenizer) freshly loaded from `tiny_model_dir`: each test may train it without
    touching others."""
    return models.load(tiny_model_dir)
