"""Does RL expand the reasoning boundary, or only sharpen it? The chains experiment (issue 15), arms
side by side.

    # the headline: control vs edge-explore (the best arm of the sweep), seeds 0, 1 and 2
    python experiments/boundary.py
    # the sweep
    python experiments/boundary.py --arms control,edge,edge-explore,edge-broad

One base, warm-started on the chains task family up to a set composition depth (--coverage,
chains.py) and shown the edge's chains rarely (--edge-share), then one RL run per arm and seed from
that base (train.py with the arm's flags), --jobs of them side by side, one thread each. Every
model is measured the same way: n samples per held-out problem at ProRL's evaluation settings
(T=0.6, top-p 0.95), unbiased pass@k for k = 1 ... n per split: each depth's held-out problems (of
chains RL may train on) and the held-out chains (compositions never shown to the warm-start or to
RL). Writes <out>/boundary.json (every count), boundary.md (the table: pass@k, the trained − base
difference at k = n with a 95% bootstrap interval over problems, and the problems newly solved and
newly lost against the base; then the goal checked per arm, see verdict) and boundary.png (pass@k
curves, base vs arms).
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

# the repository's modules, not experiments/'s
sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch

import chains
import evaluation
import models
import sampling
import tasks
import train

EDGE = 3  # the depth where the chosen base solves sometimes but not always (see --edge-share)
ARMS = {  # train.py flags of each arm, on top of COMMON; all sample the chains family only
    "control": ["--curriculum", "true", "--level", "5", "--curriculum-replay", "0.8",
                "--curriculum-threshold", "2"],
    "easy": ["--curriculum", "true", "--level", "2", "--curriculum-top", "2", "--curriculum-replay",
             "0.5", "--curriculum-threshold", "2"],
    "edge": ["--curriculum", "true", "--level", str(EDGE), "--curriculum-threshold", "0.5"],
    "hard": ["--curriculum", "true", "--level", "5", "--curriculum-replay", "0",
             "--curriculum-threshold", "2"],
    "edge-explore": ["--curriculum", "true", "--level", str(EDGE), "--curriculum-threshold", "0.5",
                     "--advantage", "passk", "--passk-k", "8", "--temperature", "1.2",
                     "--clip-high", "0.4"],
    # BroRL (arXiv 2510.01180): more rollouts per prompt, fewer prompts; the same 512 rollouts a
    # step as the other arms, so the arm isolates N
    "edge-broad": ["--curriculum", "true", "--level", str(EDGE), "--curriculum-threshold", "0.5",
                   "--n", "64", "--prompts-per-step", "8"],
    # the unlikeliness reward (arXiv 2506.02355): right answers the policy already finds likely
    # earn less, so RL stops pushing mass onto them alone
    "edge-unlikely": ["--curriculum", "true", "--level", str(EDGE), "--curriculum-threshold",
                      "0.5", "--unlikeliness", "0.25"],
}
ARM_NOTES = {"control": "the default RL settings, prompts uniform over depths 1-5",
             "easy": "depths 1-2 only (what the base already solves)",
             "edge": f"edge curriculum: depth {EDGE} first, promoted at pass rate 0.5, 25% replay "
                     "of easier depths",
             "hard": "depth 5 only (never solved by the base)",
             "edge-explore": "edge curriculum + pass@k advantage (k=8), T=1.2, clip-high 0.4",
             "edge-broad": "edge curriculum with BroRL's broad rollouts: N=64 samples per prompt, "
                           "8 prompts a step (the same 512 rollouts)",
             "edge-unlikely": "edge curriculum + the unlikeliness reward (β_rank 0.25)"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="control,edge-explore",
                        help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--seeds", default="0,1,2", help="RL seeds (the base is the same for all)")
    parser.add_argument("--coverage", type=float, default=2.0,
                        help="the base's warm-start coverage of chains (chains.shown_compositions)")
    parser.add_argument("--edge-share", type=float, default=0.02,
                        help="fraction of the warm-start's chains drawn from any chain of the edge "
                             "(models.WARMSTART's chain_edge_share): shown rarely, not never")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="fraction of the warm-start's worked answers corrupted")
    parser.add_argument("--warmstart-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=80, help="RL steps per run")
    parser.add_argument("--prompts-per-step", type=int, default=32)
    parser.add_argument("--problems", type=int, default=128, help="held-out problems per split")
    parser.add_argument("--n", type=int, default=256, help="samples per problem for pass@k")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained and measured side by side, one thread each")
    parser.add_argument("--out", default="runs/boundary-experiment")
    args = parser.parse_args(argv)
    args.arms, args.seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = set(args.arms) - set(ARMS)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}")
    return args


def arm_and_seed(run: str) -> tuple[str, int]:
    """A run's name, "<arm>-s<seed>", split: "edge-explore-s2" → ("edge-explore", 2)."""
    arm, seed = run.rsplit("-s", 1)
    return arm, int(seed)


def runs_by_arm(result: dict) -> dict[str, list[str]]:
    """Each arm's runs, the arms in the order their runs appear in result["runs"]."""
    arms = {}
    for run in result["runs"]:
        arms.setdefault(arm_and_seed(run)[0], []).append(run)
    return arms


def splits(problems: int) -> dict[str, list[dict]]:
    """The held-out evaluation sets: per depth, then the held-out compositions of depths 2-4."""
    sets = {f"depth {d}": tasks.heldout("chains", problems, d)
            for d in range(1, chains.MAX_DEPTH + 1)}
    sets |= {f"held-out chains, depth {d}": chains.heldout_composition_problems(d, problems)
             for d in (2, 3, 4)}
    return sets


def counts_of(model_dir: str, sets: dict[str, list[dict]], n: int) -> dict[str, list[int]]:
    policy, tokenizer = models.load(model_dir)
    params = sampling.SamplingParams(n, 32, evaluation.EVAL_TEMPERATURE, evaluation.EVAL_TOP_P,
                                     seed=12345)
    return {name: evaluation.correct_counts(policy.eval(), tokenizer, examples, params)
            for name, examples in sets.items()}


def curve(counts: list[int], n: int) -> dict[int, float]:
    return {k: sum(evaluation.pass_at_k(n, c, k) for c in counts) / len(counts)
            for k in evaluation.ks_up_to(n)}


def bootstrap_difference(base: list[int], trained: list[int], n: int, k: int,
                         resamples: int = 2000):
    """95% interval of mean pass@k(trained) − mean pass@k(base), resampling problems (paired)."""
    gains = [evaluation.pass_at_k(n, t, k) - evaluation.pass_at_k(n, b, k)
             for b, t in zip(base, trained)]
    rng = random.Random(0)
    means = sorted(sum(rng.choices(gains, k=len(gains))) / len(gains) for _ in range(resamples))
    return sum(gains) / len(gains), means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def table(result: dict, n: int) -> str:
    ks = [k for k in (1, 16, n) if k <= n]
    head = ("| split | model | " + " | ".join(f"pass@{k}" for k in ks)
            + f" | Δpass@{n} [95% CI] | new / lost |")
    lines = [head, "|" + "---|" * (len(ks) + 4)]
    for split, base in result["base"].items():
        base_curve = curve(base, n)
        lines.append(f"| {split} | base | "
                     + " | ".join(f"{base_curve[k]:.3f}" for k in ks) + " | | |")
        for run, by_split in result["runs"].items():
            trained = by_split[split]
            mean, low, high = bootstrap_difference(base, trained, n, n)
            new = sum(b == 0 < t for b, t in zip(base, trained))
            lost = sum(t == 0 < b for b, t in zip(base, trained))
            run_curve = curve(trained, n)
            lines.append(f"| | {run} | " + " | ".join(f"{run_curve[k]:.3f}" for k in ks)
                         + f" | {mean:+.3f} [{low:+.3f}, {high:+.3f}] | {new} / {lost} |")
    return "\n".join(lines)


def summary(result: dict, n: int) -> str:
    """One row per split: pass@1 / pass@n of the base and of each arm (mean over its seeds), then
    each seed's Δpass@n with its 95% interval, the lower bound first (above 0: that seed expanded
    the boundary there)."""
    arms = runs_by_arm(result)
    lines = ["| split | base | " + " | ".join(arms) + " |", "|" + "---|" * (len(arms) + 2)]
    for split, base in result["base"].items():
        base_curve = curve(base, n)
        cells = [f"{base_curve[1]:.3f} / {base_curve[n]:.3f}"]
        for runs in arms.values():
            curves = [curve(result["runs"][run][split], n) for run in runs]
            gains = [bootstrap_difference(base, result["runs"][run][split], n, n) for run in runs]
            cells.append(f"{sum(c[1] for c in curves) / len(curves):.3f} / "
                         f"{sum(c[n] for c in curves) / len(curves):.3f}"
                         + " (" + ", ".join(f"{mean:+.2f} [{low:+.2f}]" for mean, low, _ in gains)
                         + ")")
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, n: int, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(result["base"])
    fig = Figure(figsize=(3.2 * 4, 3.0 * -(-len(names) // 4)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(-(-len(names) // 4), 4, squeeze=False).flatten()
    arms = sorted(runs_by_arm(result))
    colours = dict(zip(arms, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                  "tab:brown", "tab:pink"]))
    for ax, split in zip(axes, names):
        base = curve(result["base"][split], n)
        ax.plot(list(base), list(base.values()), color="black", lw=2, label="base")
        for run, by_split in result["runs"].items():
            arm = arm_and_seed(run)[0]
            trained = curve(by_split[split], n)
            # one legend entry per arm, not per seed
            labelled = arm in ax.get_legend_handles_labels()[1]
            ax.plot(list(trained), list(trained.values()), color=colours[arm], alpha=0.7,
                    label=None if labelled else arm)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(split, fontsize=9)
        ax.set_xlabel("k")
    axes[0].set_ylabel("pass@k")
    axes[0].legend(fontsize=7)
    for ax in axes[len(names):]:
        ax.axis("off")
    fig.savefig(path, dpi=110)


def verdict(result: dict, n: int) -> str:
    """The goal, checked per arm. A seed expands a split when its pass@k is at or above the base's
    for every k ≤ n and the lower 95% bound of its Δpass@n is above 0. The goal holds for an arm
    when that is so in at least two of three seeds on the edge split and on the held-out chains
    of the edge's depth, and in-distribution pass@n (depths below the edge, mean over seeds) is
    within 0.02 of the base's."""
    goal_splits = [f"depth {EDGE}", f"held-out chains, depth {EDGE}"]
    inside = [f"depth {d}" for d in range(1, EDGE)]
    lines = []
    for arm, runs in runs_by_arm(result).items():
        needed = -(-2 * len(runs) // 3)  # two of three seeds
        parts, holds = [], True
        for split in goal_splits:
            base, base_curve = result["base"][split], curve(result["base"][split], n)
            expanded = 0
            for run in runs:
                trained = result["runs"][run][split]
                run_curve = curve(trained, n)
                every_k = all(run_curve[k] >= base_curve[k] - 1e-9 for k in base_curve)
                expanded += every_k and bootstrap_difference(base, trained, n, n)[1] > 0
            parts.append(f"{split}: expanded in {expanded} of {len(runs)} seeds")
            holds &= expanded >= needed
        for split in inside:
            base_n = curve(result["base"][split], n)[n]
            change = sum(curve(result["runs"][run][split], n)[n] - base_n
                         for run in runs) / len(runs)
            parts.append(f"{split} pass@{n} {change:+.3f}")
            holds &= change >= -0.02
        lines.append(f"- **{arm}**: goal {'holds' if holds else 'not met'} ({'; '.join(parts)})")
    return "\n".join(lines)


def base_dir_of(args) -> str:
    """The experiment's base, warm-started once and reused while its recipe is unchanged."""
    return models.ensure_tiny_base(
        f"runs/base/tiny-chains-c{args.coverage}-e{args.edge_share}-n{args.noise}"
        f"-w{args.warmstart_steps}-s0", seed=0, task_mix="chains", chain_coverage=args.coverage,
        chain_edge_share=args.edge_share, noise=args.noise, steps=args.warmstart_steps)


def measure(model_dir: str, problems: int, n: int) -> dict[str, list[int]]:
    torch.set_num_threads(1)
    return counts_of(model_dir, splits(problems), n)


def train_and_measure(arm: str, seed: int, base_dir: str, args, retrain: bool):
    """One arm × seed: RL from the base (train.py with the arm's flags; its log goes to
    <out>/<arm>-s<seed>.log), then the trained model measured. Returns (counts, training seconds
    or None when only measured, seconds in all)."""
    torch.set_num_threads(1)
    out, run = Path(args.out), f"{arm}-s{seed}"
    seconds, started = None, time.time()
    if retrain:
        with (open(out / f"{run}.log", "w") as log, contextlib.redirect_stdout(log),
              contextlib.redirect_stderr(log)):
            train.main(["--model", base_dir, "--tasks", "chains", "--run", f"{out.name}/{run}",
                        "--seed", str(seed), "--steps", str(args.steps),
                        "--prompts-per-step", str(args.prompts_per_step),
                        "--max-new-tokens", "32", "--eval-every", "0", "--eval-problems", "16",
                        "--val-problems", "16", "--eval-samples", "4",
                        "--boundary-problems", "0", "--save-every", "0"] + ARMS[arm])
        seconds = time.time() - started
    counts = measure(f"runs/{out.name}/{run}/final", args.problems, args.n)
    return counts, seconds, time.time() - started


def side_by_side(jobs: int, calls: dict):
    """Yield (name, result) of each call, `jobs` at a time in fresh processes (one thread each;
    every run is seeded, so the results do not depend on `jobs`), or in this process if jobs = 1."""
    if jobs == 1:
        for name, (function, arguments) in calls.items():
            yield name, function(*arguments)
        return
    # Imported as a module (the tests do), this file is found by name in the children: its
    # folder goes last on the path they inherit (the top of the file put the repository first).
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.append(str(Path(__file__).resolve().parent))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(function, *arguments): name
                   for name, (function, arguments) in calls.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    base_dir = base_dir_of(args)
    saved = out / "boundary.json"
    result = json.loads(saved.read_text()) if saved.is_file() else {}
    settings = {k: v for k, v in vars(args).items() if k not in ("arms", "seeds", "out", "jobs")}
    # what the trained models depend on
    training = {k: v for k, v in settings.items() if k not in ("problems", "n")}
    if result.get("settings") != settings:  # other settings: measure everything again
        trained_before = (result.get("seconds", {}) if result.get("training", training) == training
                          else {})
        result = {"settings": settings, "training": training, "base": None, "runs": {},
                  "seconds": trained_before}
    calls = {} if result["base"] else {"base": (measure, (base_dir, args.problems, args.n))}
    for arm in args.arms:
        for seed in args.seeds:
            run = f"{arm}-s{seed}"
            if run in result["runs"]:
                continue  # measured by an earlier invocation with the same settings
            # trained alike before: measure only
            retrain = not (run in result["seconds"]
                           and Path(f"runs/{out.name}/{run}/final/config.json").is_file())
            calls[run] = (train_and_measure, (arm, seed, base_dir, args, retrain))
    for name, done in side_by_side(args.jobs, calls):
        if name == "base":
            result["base"] = done
        else:
            result["runs"][name], seconds, in_all = done
            if seconds is not None:
                result["seconds"][name] = seconds
            result.setdefault("job_seconds", {})[name] = in_all
        print(f"{name} done ({time.time() - started:.0f} s since the start)", flush=True)
        saved.write_text(json.dumps(result))
    # the report's order is ARMS' and the seeds', not the order the runs finished in
    result["runs"] = dict(sorted(result["runs"].items(), key=lambda item: (
        list(ARMS).index(arm_and_seed(item[0])[0]), arm_and_seed(item[0])[1])))
    report = (summary(result, args.n) + "\n\nThe goal:\n\n" + verdict(result, args.n)
              + "\n\nPer run:\n\n" + table(result, args.n))
    notes = "\n".join(f"- **{arm}**: {ARM_NOTES[arm]}" for arm in runs_by_arm(result))
    (out / "boundary.md").write_text(f"{report}\n\n{notes}\n")
    plot(result, args.n, out / "boundary.png")
    print(report)
    print(notes)
    print(f"wrote {out}/boundary.md, boundary.json, boundary.png in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
