"""dist.py: torchrun + FSDP2 on CPU with the gloo backend, two processes.

1. The update: two ranks, each with half the rows of one global batch (15 rows: one rank gets a padding row),
   FSDP2-sharded policy and reference, end with the same weights on both ranks, and with the weights a single
   process gets from the whole batch (within fp32 tolerance): the token-mean is over the global batch.
2. train.py under torchrun: two ranks run the whole loop (sampling on gathered weights, evaluation, a reset,
   a checkpoint), and only rank 0 writes the logs.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import dist
import grpo
import model as model_lib
import rollout
import train

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["12+34=", "5 3 9 1 7=", "3 7 9>30:", "8+8=", "41 2 17="]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_updates(model_dir: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Three RL updates (two epochs each, micro-batches of 3 rows, KL to a reference) on fixed batches;
    returns the whole policy weights and the last update's logged statistics. Single-process outside a
    process group, sharded inside one."""
    policy = dist.shard(model_lib.load(model_dir)[0])
    reference = dist.shard(model_lib.load(model_dir)[0].eval().requires_grad_(False))
    tokenizer = model_lib.build_tokenizer()
    prompts = [model_lib.encode_prompt(tokenizer, text) for text in PROMPTS]
    with dist.full_weights(policy):  # every rank generates the same global batches from the same weights
        batches = [rollout.generate(policy, prompts, n=3, max_new_tokens=6, seed=s, pad_id=tokenizer.pad_token_id)
                   for s in range(3)]
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    c = train.Config(minibatches=1, epochs=2, micro_batch_rows=3, kl_coef=0.1, grad_clip=1.0)
    for step, batch in enumerate(batches):
        scores = torch.rand(len(PROMPTS), 3, generator=torch.Generator().manual_seed(step))  # the same on every rank
        adv = grpo.group_advantages(scores).flatten()
        local, rows = dist.my_share(batch)
        ref_logp = train.batch_logprobs(reference, local, c)
        stats = train.update(policy.train(), optimizer, local, adv[rows], ref_logp, c)
    with dist.full_weights(policy):  # the whole weights as this rank holds them for sampling
        return {name: p.detach().clone() for name, p in policy.named_parameters()}, stats


def update_worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.setup("cpu")
    torch.save(run_updates(model_dir), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_two_ranks_end_with_identical_weights_equal_to_one_process(tmp_path, tiny_model_dir):
    mp.spawn(update_worker, args=(2, free_port(), tiny_model_dir, str(tmp_path)), nprocs=2)
    (ranks, rank_stats) = zip(*[torch.load(tmp_path / f"rank{r}.pt") for r in range(2)], strict=True)
    single, stats = run_updates(tiny_model_dir)
    start = dict(model_lib.load(tiny_model_dir)[0].named_parameters())
    assert set(ranks[0]) == set(single)
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = max((single[name] - start[name].detach()).abs().max().item() for name in single)
    assert moved > 1e-2  # far above the tolerance: the comparison is not between two unchanged models
    # The logged statistics are the global token means, as one process logs them (the ranks hold 8 rows
    # each, one a padding row, with different token counts: a plain mean of the ranks' means is off).
    assert rank_stats[0] == rank_stats[1] and set(rank_stats[0]) == set(stats)
    for name in ("kl", "entropy", "clipfrac", "ratio_mean", "approx_kl"):
        assert rank_stats[0][name] == pytest.approx(stats[name], rel=1e-4, abs=1e-7), name


def test_train_py_under_torchrun_on_two_cpu_ranks(tmp_path, tiny_model_dir):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), str(REPO / "train.py"), "--",  # "--": torchrun's parser would claim --n and --run
               "--model", tiny_model_dir, "--run", "d", "--steps", "2",
               "--prompts-per-step", "4", "--n", "4", "--max-new-tokens", "6", "--dynamic-sampling", "false",
               "--advantage", "reinforce_pp", "--kl-in-reward", "true", "--length-eta-max", "0.05",
               "--reset-every", "1", "--eval-every", "1", "--eval-problems", "2", "--val-problems", "2",
               "--eval-samples", "1", "--boundary-problems", "1", "--boundary-n", "2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "d"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # one line per step: rank 1 wrote nothing
    assert [m.get("reset") for m in metrics] == ["schedule", "schedule"] and metrics[-1]["resets"] == 2
    assert result.stdout.count("held-out pass@1") == 1  # the report is printed once
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2 and saved["world_size"] == 2 and len(saved["ranks"]) == 2
    assert saved["ranks"][0]["stream_drawn"] == saved["ranks"][1]["stream_drawn"] == 2 * 4 // 2
    trained = model_lib.load(str(run_dir / "final"))[0].state_dict()
    assert all(torch.equal(trained[name], saved["policy"][name]) for name in saved["policy"])
