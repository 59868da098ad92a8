"""dist.py: torchrun + FSDP2 on CPU with the gloo backend, two processes.

1. The update: two ranks, each with half the rows of one global batch (15 rows: one rank gets a
   padding row), FSDP2-sharded policy and reference, end with the same weights on both ranks, and
   with the weights a single process gets from the whole batch (within fp32 tolerance): the
   token-mean is over the global batch.
2. train.py under torchrun: two ranks run the whole loop (sampling on gathered weights, evaluation,
   a reset, a checkpoint), and only rank 0 writes the logs.
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

import checkpoint
import dist
import grpo
import learner
import models
import reset
import rollout
import settings
import tasks

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["12+34=", "5 3 9 1 7=", "3 7 9>30:", "8+8=", "41 2 17="]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_updates(model_dir: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Three RL updates (two epochs each, micro-batches of 3 rows, KL to a reference) on fixed
    batches; returns the whole policy weights and the last update's logged statistics.
    Single-process outside a process group, sharded inside one."""
    policy = dist.shard(models.load(model_dir)[0])
    reference = dist.shard(models.load(model_dir)[0].eval().requires_grad_(False))
    tokenizer = models.build_tokenizer()
    prompts = [models.encode_prompt(tokenizer, text) for text in PROMPTS]
    # every rank generates the same global batches from the same weights
    with dist.full_weights(policy):
        batches = [rollout.generate(policy, prompts, n=3, max_new_tokens=6, seed=s,
                                    pad_id=tokenizer.pad_token_id)
                   for s in range(3)]
    optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
    c = settings.Config(minibatches=1, epochs=2, micro_batch_rows=3, kl_coef=0.1, grad_clip=1.0)
    for step, batch in enumerate(batches):
        # the same on every rank
        scores = torch.rand(len(PROMPTS), 3, generator=torch.Generator().manual_seed(step))
        adv = grpo.group_advantages(scores).flatten()
        local, rows = dist.my_share(batch)
        ref_logp = learner.batch_logprobs(reference, local, c)
        stats = learner.update(policy.train(), optimizer, local, adv[rows], ref_logp, c)
    with dist.full_weights(policy):  # the whole weights as this rank holds them for sampling
        return {name: p.detach().clone() for name, p in policy.named_parameters()}, stats


def update_worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.setup("cpu")
    torch.save(run_updates(model_dir), Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def load_worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    """Save a sharded policy, reference and Adam state, then load them into fresh shards, counting
    the reads of checkpoint.pt: rank 0 reads it, the others are sent their shards."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.setup("cpu")

    def build():
        policy, reference = (dist.shard(models.load(model_dir)[0]) for _ in range(2))
        return policy, reference, torch.optim.AdamW(policy.parameters(), lr=1e-2)

    policy, reference, optimizer = build()
    sum(p.sum() for p in policy.parameters()).backward()
    optimizer.step()  # Adam state to save
    tracker, stream = reset.ResetTracker(), tasks.TaskMix("sort", seed=rank)
    state = checkpoint.TrainState(policy, reference, optimizer, tracker, stream)
    checkpoint.save(out_dir, 7, state, base={"sort": 0.5})
    reads, real_load = [], torch.load
    torch.load = lambda file, *args, **kwargs: (reads.append(file)
                                                if str(file).endswith(checkpoint.FILE) else None) \
        or real_load(file, *args, **kwargs)  # (broadcast_object_list unpickles with torch.load too)
    fresh_policy, fresh_reference, fresh_optimizer = build()
    fresh = checkpoint.TrainState(fresh_policy, fresh_reference, fresh_optimizer,
                                  reset.ResetTracker(), stream)
    saved = checkpoint.load(out_dir, fresh)
    torch.load = real_load
    with dist.full_weights(policy), dist.full_weights(fresh_policy):
        same = all(torch.equal(p, q)
                   for p, q in zip(policy.parameters(), fresh_policy.parameters(), strict=True))
    moments = [(s["exp_avg"].full_tensor(), fresh_optimizer.state[q]["exp_avg"].full_tensor())
               for (p, s), q in zip(optimizer.state.items(), fresh_optimizer.state, strict=True)]
    torch.save({"reads": len(reads), "same_weights": same, "step": saved["step"],
                "base": saved["base"], "same_moments": all(torch.equal(a, b) for a, b in moments)},
               Path(out_dir) / f"load{rank}.pt")
    torch.distributed.destroy_process_group()


def failure_worker(rank: int, world: int, port: int, model_dir: str, out_dir: str) -> None:
    """A save that fails on rank 0 (a full disk), then a checkpoint.pt that is not one: every rank
    gets the error."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.setup("cpu")
    policy = dist.shard(models.load(model_dir)[0])
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    tracker, stream, errors = reset.ResetTracker(), tasks.TaskMix("sort", seed=rank), []

    # rank 0 writes; torch.save itself is left alone (collectives pickle with it)
    def disk_full(path, write):
        raise RuntimeError("unexpected pos 64 vs 0")

    real_write, checkpoint.write_atomically = checkpoint.write_atomically, disk_full
    try:
        checkpoint.save(out_dir, 1, checkpoint.TrainState(policy, None, optimizer, tracker, stream))
    except OSError as error:
        errors.append(str(error))
    checkpoint.write_atomically = real_write
    if rank == 0:
        torch.save(["not", "a", "checkpoint"], Path(out_dir) / checkpoint.FILE)
    dist.barrier()
    try:
        checkpoint.load(out_dir, checkpoint.TrainState(policy, None, optimizer, tracker, stream))
    except ValueError as error:
        errors.append(str(error))
    (Path(out_dir) / f"errors{rank}.json").write_text(json.dumps(errors))
    torch.distributed.destroy_process_group()


def test_a_failed_save_or_an_unreadable_checkpoint_is_an_error_on_every_rank(tmp_path,
                                                                             tiny_model_dir):
    mp.spawn(failure_worker, args=(2, free_port(), tiny_model_dir, str(tmp_path)), nprocs=2)
    for rank in range(2):
        save_error, load_error = json.loads((tmp_path / f"errors{rank}.json").read_text())
        assert "checkpoint.pt not written (unexpected pos 64 vs 0)" in save_error
        assert "cannot read its checkpoint.pt (not a checkpoint of train.py)" in load_error


def test_only_rank_0_reads_the_checkpoint_the_others_receive_their_shards(tmp_path, tiny_model_dir):
    mp.spawn(load_worker, args=(2, free_port(), tiny_model_dir, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"load{r}.pt") for r in range(2)]
    assert [r["reads"] for r in ranks] == [1, 0]
    assert all(r["same_weights"] and r["same_moments"] and r["step"] == 7
               and r["base"] == {"sort": 0.5}
               for r in ranks)


def test_two_ranks_end_with_identical_weights_equal_to_one_process(tmp_path, tiny_model_dir):
    mp.spawn(update_worker, args=(2, free_port(), tiny_model_dir, str(tmp_path)), nprocs=2)
    (ranks, rank_stats) = zip(*[torch.load(tmp_path / f"rank{r}.pt") for r in range(2)],
                              strict=True)
    single, stats = run_updates(tiny_model_dir)
    start = dict(models.load(tiny_model_dir)[0].named_parameters())
    assert set(ranks[0]) == set(single)
    for name in single:
        assert torch.equal(ranks[0][name], ranks[1][name]), name
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-4, atol=1e-5, msg=name)
    moved = max((single[name] - start[name].detach()).abs().max().item() for name in single)
    # far above the tolerance: the comparison is not between two unchanged models
    assert moved > 1e-2
    # The logged statistics are the global token means, as one process logs them (the ranks hold 8
    # rows each, one a padding row, with different token counts: a plain mean of the ranks' means is
    # off).
    assert rank_stats[0] == rank_stats[1] and set(rank_stats[0]) == set(stats)
    for name in ("kl", "entropy", "clipfrac", "ratio_mean", "approx_kl"):
        assert rank_stats[0][name] == pytest.approx(stats[name], rel=1e-4, abs=1e-7), name


def torchrun_train(cwd: Path, model_dir: str, argv: list[str]) -> subprocess.CompletedProcess:
    """train.py on two CPU ranks (gloo), with the small settings of these tests."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(free_port()),
               # "--": torchrun's parser would claim --n and --run
               str(REPO / "train.py"), "--",
               "--model", model_dir, "--prompts-per-step", "4", "--n", "4", "--max-new-tokens", "6",
               "--dynamic-sampling", "false", "--advantage", "reinforce_pp",
               "--kl-in-reward", "true", "--length-eta-max", "0.05", "--eval-every", "1",
               "--eval-problems", "2", "--val-problems", "2", "--eval-samples", "1",
               "--boundary-problems", "1", "--boundary-n", "2", *argv]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                            check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_py_under_torchrun_on_two_cpu_ranks(tmp_path, tiny_model_dir):
    result = torchrun_train(tmp_path, tiny_model_dir,
                            ["--run", "d", "--steps", "2", "--reset-every", "1"])
    run_dir = tmp_path / "runs" / "d"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]  # one line per step: rank 1 wrote nothing
    assert ([m.get("reset") for m in metrics] == ["schedule", "schedule"]
            and metrics[-1]["resets"] == 2)
    assert result.stdout.count("held-out pass@1") == 1  # the report is printed once
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 2 and saved["world_size"] == 2 and len(saved["ranks"]) == 2
    assert (saved["ranks"][0]["stream"]["drawn"]
            == saved["ranks"][1]["stream"]["drawn"] == 2 * 4 // 2)
    trained = models.load(str(run_dir / "final"))[0].state_dict()
    assert all(torch.equal(trained[name], saved["policy"][name]) for name in saved["policy"])


def test_a_run_on_two_ranks_stopped_and_resumed_is_the_straight_run(tmp_path, tiny_model_dir):
    """3 steps straight, and 2 steps then --resume to 3 (a reset every 2 steps, Adam state, both
    ranks' RNGs and prompt streams): the same metrics and the same final weights, bit for bit."""
    timing = {"gen_s", "ref_s", "update_s", "step_s", "tokens_per_s"}
    runs = {}
    for name, steps in (("straight", ["--steps", "3"]), ("resumed", ["--steps", "2"])):
        torchrun_train(tmp_path, tiny_model_dir,
                       ["--run", name, "--reset-every", "2", "--minibatches", "2", *steps])
    torchrun_train(tmp_path, tiny_model_dir, ["--resume", "runs/resumed", "--steps", "3"])
    for name in ("straight", "resumed"):
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        runs[name] = ([{k: v for k, v in json.loads(line).items() if k not in timing}
                       for line in lines],
                      models.load(str(tmp_path / "runs" / name / "final"))[0].state_dict())
    assert ([m["step"] for m in runs["resumed"][0]] == [1, 2, 3]
            and runs["resumed"][0] == runs["straight"][0])
    assert [m.get("reset") for m in runs["straight"][0]] == [None, "schedule", None]
    assert all(torch.equal(runs["resumed"][1][k], runs["straight"][1][k])
               for k in runs["straight"][1])
