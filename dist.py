"""Many GPUs, one or many nodes: PyTorch's own torchrun + FSDP2, and the few collectives RL adds to
them.

    torchrun --nproc-per-node 8 train.py -- ...                               # one node
    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 --nproc-per-node 8
    train.py -- ...

How a step is split (W ranks):
  sampling     each rank samples prompts_per_step / W whole groups with the full policy weights
               (gathered from the shards for the duration), so dynamic sampling and group
               statistics see whole groups;
  gather       the kept groups of all ranks are gathered on every rank (token ids are small), so
               advantages (REINFORCE++'s batch-wide normalisation included) are computed on the
               whole batch, alike everywhere;
  update       the batch's rows are cut into W equal contiguous shares; each rank's
               forward/backward covers its share, and FSDP2 reduce-scatters the gradients. The
               token-mean divides by the token count of the whole batch (all-reduced), so the sum
               over ranks is the single-process loss.
Outside torchrun every function here is a no-op and the run is the plain single-process one.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import rollout


def setup(device: str) -> str:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); returns this rank's device."""
    if "RANK" not in os.environ or torch_dist.is_initialized():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    torch_dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def groups_per_rank(groups: int) -> int:
    """Each rank's share of a step's groups (prompts); a one-line error when they do not divide
    among the ranks torchrun launches (known before the process group exists)."""
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if groups % ranks:
        raise ValueError("--prompts-per-step must divide among the ranks")
    return groups // ranks


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0 alone writes logs, checkpoints and reports."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch_dist.barrier()


def main_first(make):
    """make() on rank 0 first, then on the others (which then find its output cached, e.g. the tiny
    base)."""
    result = make() if is_main() else None
    barrier()
    return result if is_main() else make()


def shard(model: torch.nn.Module, compute: torch.dtype = torch.float32) -> torch.nn.Module:
    """FSDP2: each decoder layer, then the rest (embeddings, final norm, head), sharded across all
    ranks. The shards keep the model's dtype (fp32); whole weights are gathered in `compute` (bf16
    on CUDA), and gradients are reduced in fp32."""
    if world_size() == 1:
        return model
    mesh = init_device_mesh(next(model.parameters()).device.type, (world_size(),))
    mixed = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    # one all-gather per layer in forward: only one layer is ever whole
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mixed)
    fully_shard(model, mesh=mesh, mp_policy=mixed)
    return model


@contextmanager
def full_weights(model: torch.nn.Module):
    """Whole weights on every rank for the duration: the sampler (rollout.py) reads parameters
    directly."""
    modules = [module for module in model.modules() if isinstance(module, FSDPModule)]
    for module in modules:
        module.unshard()
    try:
        yield model
    finally:
        for module in modules:
            module.reshard()


def gather_objects(value) -> list:
    """[value of rank 0, value of rank 1, ...] on every rank."""
    if world_size() == 1:
        return [value]
    values = [None] * world_size()
    torch_dist.all_gather_object(values, value)
    return values


def broadcast_object(value):
    """Rank 0's value (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0, device=collective_device())
    return box[0]


def gather_groups(batch: rollout.Rollout, scores: torch.Tensor,
                  pad_id: int) -> tuple[rollout.Rollout, torch.Tensor]:
    """Every rank's kept groups, concatenated in rank order, on every rank: (rollout [G·N rows],
    scores [G, N])."""
    if world_size() == 1:
        return batch, scores
    device = batch.tokens.device
    # through the CPU: a pickled CUDA tensor would land on the sender's GPU
    parts = gather_objects((rollout.to_device(batch, "cpu"), scores.cpu()))
    batch = rollout.concat_rows([b for b, _ in parts], pad_id)
    return rollout.to_device(batch, device), torch.cat([s for _, s in parts]).to(device)


def my_share(batch: rollout.Rollout) -> tuple[rollout.Rollout, torch.Tensor]:
    """This rank's contiguous share of the rows (local rollout, their row indices). Every rank gets
    ceil(rows / W) rows, so all take the same number of forward/backward passes (FSDP2's collectives
    must pair up); the few rows past the end repeat the last row with an empty loss mask."""
    rows = len(batch.tokens)
    if world_size() == 1:
        return batch, torch.arange(rows, device=batch.tokens.device)
    per_rank = -(-rows // world_size())
    index = torch.arange(rank() * per_rank, (rank() + 1) * per_rank, device=batch.tokens.device)
    local = rollout.select_rows(batch, index.clamp(max=rows - 1))
    local.mask = local.mask & (index < rows)[:, None]
    return local, index.clamp(max=rows - 1)


def gather_rows(local: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of my_share for a per-row tensor: every rank's share, concatenated, on every rank."""
    if world_size() == 1:
        return local
    shares = [torch.empty_like(local) for _ in range(world_size())]
    torch_dist.all_gather(shares, local.contiguous())
    return torch.cat(shares)[:rows]


def loss_denominator(count: torch.Tensor) -> float:
    """What a rank divides its share of the loss by (grpo.loss_weights): the mini-batch's count of
    tokens (or responses) over all ranks, divided by W because FSDP2 averages the W ranks'
    gradients. The sum of all ranks' backward passes is then the gradient of the single-process
    loss."""
    if world_size() == 1:
        return float(count)
    total = count.float().reshape(1).to(collective_device())
    torch_dist.all_reduce(total)
    return total.item() / world_size()


def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip to a global gradient norm (over all ranks' shards); returns that norm as a plain
    tensor."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def all_true(flag: bool) -> bool:
    """The same decision on every rank: True only where it is True on all of them."""
    if world_size() == 1:
        return flag
    value = torch.tensor([float(flag)], device=collective_device())
    torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MIN)
    return bool(value.item())


def any_true(flag: bool) -> bool:
    """The same decision on every rank: True where it is True on any of them."""
    return not all_true(not flag)


def token_means(sums: dict[str, float], tokens: float) -> dict[str, float]:
    """Token-weighted means over all ranks: Σ_ranks sums[name] / Σ_ranks tokens (each rank passes
    the same names)."""
    names = sorted(sums)
    if world_size() > 1:
        values = torch.tensor([sums[k] for k in names] + [tokens], dtype=torch.float64,
                              device=collective_device())
        torch_dist.all_reduce(values)
        *total_sums, tokens = values.tolist()
        sums = dict(zip(names, total_sums, strict=True))
    return {k: sums[k] / max(tokens, 1.0) for k in names}


def reduce_metrics(metrics: dict) -> dict:
    """Floats averaged over ranks, integers (counts, rounds) their maximum; other values as they
    are."""
    if world_size() == 1:
        return metrics
    floats = sorted(k for k, v in metrics.items() if isinstance(v, float))
    ints = sorted(k for k, v in metrics.items() if isinstance(v, int) and not isinstance(v, bool))
    values = torch.tensor([float(metrics[k]) for k in floats] + [float(-metrics[k]) for k in ints],
                          dtype=torch.float64, device=collective_device())
    sums, mins = values.clone(), values.clone()
    torch_dist.all_reduce(sums)
    torch_dist.all_reduce(mins, op=torch_dist.ReduceOp.MIN)  # −max: min of the negated integers
    reduced = {k: sums[i].item() / world_size() for i, k in enumerate(floats)}
    reduced.update({k: int(-mins[len(floats) + i].item()) for i, k in enumerate(ints)})
    return {**metrics, **reduced}


def collective_device() -> torch.device:
    """Where a tensor must live to take part in a collective: NCCL works on GPU tensors only."""
    on_gpu = torch_dist.get_backend() == "nccl"
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")


def save_pretrained(model: torch.nn.Module, tokenizer, path,
                    dtype: torch.dtype | None = None) -> None:
    """The whole model in Hugging Face format (a plain `--model` directory), written by rank 0, its
    floating tensors in `dtype` (default: as they are)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    state = get_model_state_dict(model,
                                 options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # one cast per storage: tied weights (embedding = lm_head) stay one tensor
    if dtype is not None:
        cast = {}
        state = {name: cast.setdefault(t.data_ptr(), t.to(dtype)) if t.is_floating_point() else t
                 for name, t in state.items()}
    if is_main():
        model.save_pretrained(path, state_dict=state)
        # config.json names the dtype of the model's parameters (fp32): say what was saved
        if dtype is not None:
            config = Path(path) / "config.json"
            settings, name = json.loads(config.read_text()), str(dtype).split(".")[-1]
            settings.update({key: name for key in ("dtype", "torch_dtype") if key in settings}
                            or {"dtype": name})
            config.write_text(json.dumps(settings, indent=2) + "\n")
        tokenizer.save_pretrained(path)
    barrier()
