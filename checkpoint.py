"""Checkpoints: everything a run needs to continue exactly as if it had never stopped.

One file, <run>/checkpoint.pt, holding the policy, the reference, the optimizer, every rank's RNG
states and prompt-stream position, the step, the reset tracker, and whatever else train.py passes
(the base model's evaluation, so a resumed run does not measure the trained policy as its
"base"). The length penalty needs no state of its own: its η is a function of the step.

Atomic: rank 0 writes a temporary file in the same directory and renames it onto checkpoint.pt (a
rename within one file system is atomic), so a run killed mid-save leaves the previous checkpoint
intact and at worst a stale checkpoint.pt.tmp, which nothing reads and the next save overwrites.
"""

import json
import os
import random
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed.checkpoint.state_dict as dcp
from tqdm import tqdm

import dist

FILE = "checkpoint.pt"
# Whole (unsharded) tensors on the CPU:
# the file is the same whatever the number of ranks that wrote it.
FULL = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
# loading: rank 0 sends each tensor
FROM_RANK0 = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
WHOLE_TENSORS = ("policy", "reference", "optimizer")  # what only rank 0 reads from the file


class TrainState(NamedTuple):
    """What a checkpoint holds besides the step: the models, the optimizer, the reset tracker and
    the prompt stream (and, per rank, every random generator)."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    tracker: object  # reset.ResetTracker
    stream: object  # tasks.TaskMix or curriculum.EdgeCurriculum


def save(run_dir: str | Path, step: int, train_state: TrainState, **extra) -> None:
    """Write <run_dir>/checkpoint.pt atomically. Every rank must call it (gathering shards is
    collective)."""
    policy, reference, optimizer, tracker, stream = train_state
    state = {
        "step": step,
        "world_size": dist.world_size(),
        "policy": dcp.get_model_state_dict(policy, options=FULL),
        "reference": (dcp.get_model_state_dict(reference, options=FULL)
                      if reference is not None else None),
        # An empty optimizer (just reset, ProRL v1) is saved as None: get_optimizer_state_dict
        # would fill it by taking a zero-gradient step, which sets Adam's step count and changes
        # every later update.
        "optimizer": (dcp.get_optimizer_state_dict(policy, optimizer, options=FULL)
                      if optimizer.state else None),
        "tracker": tracker.state_dict(),
        # [world_size]: each rank's RNGs and prompt stream
        "ranks": dist.gather_objects(rank_state(stream)),
        **extra,
    }
    failure = None
    if dist.is_main():
        try:
            write_atomically(Path(run_dir) / FILE, lambda file: torch.save(state, file))
        # a full disk: torch.save raises RuntimeError("... unexpected pos")
        except (OSError, RuntimeError) as error:
            failure = error
    dist.barrier()  # no rank runs ahead of a checkpoint that is not yet written
    message = None if failure is None else (f"{Path(run_dir) / FILE} not written "
                                            f"({first_line(failure)}); any earlier one is intact")
    # every rank raises, so all of them go on (or stop) alike
    message = dist.broadcast_object(message)
    if message is not None:
        raise OSError(message)


def first_line(error: BaseException) -> str:
    """An exception's message cut to one line (of at most 200 characters), for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else ""


def write_atomically(path: Path, write) -> None:
    """write(binary file) to path.tmp, then rename it onto path: a crash leaves the old file or the
    new one."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())  # the bytes are on disk before the rename makes them the file
    # a failed write (a full disk, say) frees its space; a killed process leaves the file
    except Exception:
        temporary.unlink(missing_ok=True)
        raise
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # and the rename itself survives a power cut
    finally:
        os.close(directory)


def load(run_dir: str | Path, train_state: TrainState) -> dict:
    """Restore a checkpoint written by `save` into already-built objects; returns the saved step and
    extras.

    Only rank 0 reads the file: it holds whole tensors (policy, reference, Adam's moments), and a
    copy per rank would not fit in a node's memory. The other ranks receive their shards from
    rank 0 (broadcast), and everything else (step, tracker, each rank's RNGs) as one small
    object."""
    policy, reference, optimizer, tracker, stream = train_state
    state, error = None, None
    if dist.is_main():
        # any failure is sent to the other ranks, which would otherwise wait for rank 0 forever
        try:
            state = torch.load(Path(run_dir) / FILE, map_location="cpu", weights_only=False)
            if not (isinstance(state, dict)
                    and {"world_size", "optimizer", *WHOLE_TENSORS} <= set(state)):
                raise ValueError("not a checkpoint of train.py")
        # any exception: a truncated file, a foreign pickle, a missing module...
        except Exception as failure:  # noqa: BLE001
            error = (f"--resume {run_dir}: cannot read its {FILE} "
                     f"({first_line(failure) or 'not a checkpoint'})")
        else:
            if state["world_size"] != dist.world_size():
                error = (f"--resume {run_dir}: the checkpoint was written by {state['world_size']} "
                         "ranks; resume with the same --nproc-per-node × --nnodes")
    small = None  # built on rank 0, which has read the file
    if dist.is_main():
        small = {"error": error} if error else {
            **{k: v for k, v in state.items() if k not in WHOLE_TENSORS},
            "has_optimizer": state["optimizer"] is not None}
    small = dist.broadcast_object(small)
    if small.get("error"):
        raise ValueError(small["error"])
    # ranks other than 0 hold nothing: rank 0 sends it
    whole = state or {key: {} for key in WHOLE_TENSORS}
    options = FULL if dist.world_size() == 1 else FROM_RANK0
    dcp.set_model_state_dict(policy, whole["policy"], options=options)
    if reference is not None:
        dcp.set_model_state_dict(reference, whole["reference"], options=options)
    if small["has_optimizer"]:
        dcp.set_optimizer_state_dict(policy, optimizer, whole["optimizer"], options=options)
    tracker.load_state_dict(small["tracker"])
    load_rank_state(small["ranks"][dist.rank()], stream)
    return small


def rank_state(stream) -> dict:
    """What differs between ranks: random number generators and the position in the prompt
    stream."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "stream": stream.state_dict()}


def load_rank_state(state: dict, stream) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    stream.load_state_dict(state["stream"])


def is_run(run_dir: str | Path) -> bool:
    """Whether a run has started in run_dir (its config.json is the first thing a run writes)."""
    return (Path(run_dir) / "config.json").exists()


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether the run in run_dir has saved a checkpoint (one stopped before its first save has
    not)."""
    return (Path(run_dir) / FILE).is_file()


def new_run_dir(name: str, explicit: bool = False) -> Path:
    """runs/<name>, or runs/<name>-2, -3, ... if earlier runs hold it: a new run never overwrites an
    old one. An explicit name (--run) that an earlier run holds is an error instead."""
    path, suffix = Path("runs") / name, 2
    if explicit and is_run(path):
        raise ValueError(f"runs/{name} already holds a run: --resume runs/{name} continues it, "
                         "another --run starts anew")
    while is_run(path):
        path, suffix = Path("runs") / f"{name}-{suffix}", suffix + 1
    return path


def save_config(run_dir: str | Path, config: dict) -> None:
    """<run_dir>/config.json: the run's settings, which --resume reads back."""
    if dist.is_main():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_atomically(Path(run_dir) / "config.json",
                         lambda file: file.write(json.dumps(config, indent=1).encode()))


def parse_line(line: str) -> dict | None:
    """A metrics.jsonl line, or None for a blank or torn one (the run was killed while writing it),
    or any line that is not a step's record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def open_metrics(run_dir: str | Path, resume_step: int):
    """metrics.jsonl for appending, keeping the lines of steps up to resume_step (0: a fresh run,
    none). Lines of steps after the checkpoint (written before the run stopped, and about to be
    redone) are dropped, so the file reads as one uninterrupted run."""
    if not dist.is_main():
        return open(os.devnull, "w")
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    kept = [line for line in lines
            if (record := parse_line(line)) and record["step"] <= resume_step]
    write_atomically(path, lambda file: file.write("".join(line + "\n" for line in kept).encode()))
    return path.open("a")


@contextmanager
def stop_requests():
    """Catches SIGTERM (a preemption, a kill) and the first Ctrl-C while a run trains: `requested()`
    turns True, and train.py finishes the step, saves a checkpoint and stops. Every SIGTERM is
    caught (a launcher and a scheduler may both send one); a second Ctrl-C stops at once. Signals
    this process was set to ignore stay ignored. Under torchrun, which kills its workers 30 s
    after passing a signal on, signal the workers themselves when a step takes longer."""
    caught = []

    def catch(signum, frame):
        caught.append(signum)
        if signum == signal.SIGINT:
            signal.signal(signum, previous[signum])  # the next Ctrl-C acts as usual

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    previous = {signum: handler for signum, handler in previous.items()
                if handler not in (signal.SIG_IGN, None)}
    for signum in previous:
        signal.signal(signum, catch)
    try:
        yield lambda: bool(caught)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def resume(run_dir: Path, resume: str, steps: int, lr: float,
           train_state: TrainState) -> dict | None:
    """The saved step and extras when resuming a run that has saved (weights, optimizer, tracker,
    every RNG and the prompt stream restored into train_state), else None: the run starts at step
    0. The lr given now wins over the one in a loaded optimizer state."""
    resuming = bool(resume) and has_checkpoint(run_dir)
    if resume and not resuming and dist.is_main():
        print(f"{run_dir} stopped before its first checkpoint: starting it over from step 0",
              flush=True)
    if not resuming:
        return None
    saved = load(run_dir, train_state)
    if saved["step"] >= steps:
        raise ValueError(f"{run_dir} is at step {saved['step']} already: give --steps "
                         "beyond it to train on")
    for group in train_state.optimizer.param_groups:
        group["lr"] = lr
    if dist.is_main():
        print(f"resuming at step {saved['step']}, on to step {steps}", flush=True)
    return saved


def save_when_due(run_dir: Path, step: int, steps: int, save_every: int, stop: bool,
                  train_state: TrainState, **extra) -> None:
    """save() every `save_every` steps, at the last step and when stopping. A failed periodic save
    (a full disk, say) warns and a long run goes on, and the next save tries again; the last one
    must succeed."""
    if not (step == steps or stop or (save_every and step % save_every == 0)):
        return
    try:
        save(run_dir, step, train_state, **extra)
    except OSError as error:
        if step == steps or stop:
            raise ValueError(f"step {step}: {error}") from None
        tqdm.write(f"warning: step {step}: {error}; training goes on")


def experiment_logger(kind: str, run_dir: Path, config: dict):
    """log(metrics): each step's numbers sent to TensorBoard or to Weights & Biases (offline unless
    WANDB_MODE says otherwise), beside metrics.jsonl, which is always written. kind "": nothing
    more. Rank 0 only."""
    if not kind or not dist.is_main():
        return lambda metrics: None

    # what a chart can show: the numeric metrics (a reset's reason is text)
    def numbers(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}

    if kind == "tensorboard":
        # settings.validate checked it is installed
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

        def log(metrics: dict) -> None:
            for name, value in numbers(metrics).items():
                writer.add_scalar(name, value, metrics["step"])
            writer.flush()
        return log
    import wandb
    run = wandb.init(project="prorl", name=Path(run_dir).name, dir=str(run_dir), config=config,
                     mode=os.environ.get("WANDB_MODE", "offline"), resume="allow",
                     id=Path(run_dir).name)
    return lambda metrics: run.log(numbers(metrics), step=metrics["step"])
