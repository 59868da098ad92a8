"""Ablation on the built-in tasks: what do the KL penalty, reference resets, and rollouts per prompt
buy?

    # 5 runs of the tiny preset, 60 steps each (CPU: tens of minutes)
    python bench/ablate.py
    # a smoke test of the script itself: minutes, numbers meaningless
    python bench/ablate.py --quick
    # any other flag goes to train.py
    python bench/ablate.py --steps 100 --only no-kl,kl+resets --model DIR

Every run trains the same base with the same seed and the same number of samples per step
(prompts × N), one flag changed, in its own runs/ablate-<name>/, one after the other. Then it prints
held-out pass@1 of each (base and trained, from runs/ablate-<name>/result.md) as one markdown table,
also written to runs/ablate.md. "kept" is the fraction of groups dynamic sampling kept (the rest had
all-equal rewards): with N = 4 many more groups are all right or all wrong than with N = 32.

    recipe      GRPO, k3 KL with β = 1e-3 to the base, no resets, N = 16   (the `tiny` preset)
    no-kl       β = 0: no reference policy at all
    kl+resets   β = 1e-3 and π_ref ← π (and Adam re-initialised) every steps/3 steps (ProRL)
    n4          N = 4 rollouts per prompt, 4× more prompts per step
    n32         N = 32 rollouts per prompt, 2× fewer prompts per step (BroRL's direction)
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

# the repository, not bench/
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import evaluation
import train


def variants(steps: int, samples_per_step: int) -> list[tuple[str, str, list[str]]]:
    """(name, what changes, train.py flags) of each run; every run samples `samples_per_step`
    completions per step."""
    def group_flags(n: int) -> list[str]:
        return ["--n", str(n), "--prompts-per-step", str(max(1, samples_per_step // n))]
    reset_every = str(max(1, steps // 3))
    return [
        ("recipe", "GRPO + KL (β=1e-3), N=16", group_flags(16)),
        ("no-kl", "β = 0: no KL, no reference", group_flags(16) + ["--kl-coef", "0"]),
        ("kl+resets", f"KL + reset π_ref every {reset_every} steps",
         group_flags(16) + ["--reset-every", reset_every]),
        ("n4", "N = 4, more prompts", group_flags(4)),
        ("n32", "N = 32, fewer prompts", group_flags(32)),
    ]


def read_result(run_dir: Path) -> dict[str, tuple[float, float]]:
    """{family or "average": (base pass@1, trained pass@1)} from the result.json train.py writes."""
    base, trained = (json.loads((run_dir / "result.json").read_text())[m]
                     for m in ("base", "trained"))
    return {**{f: (base["families"][f], trained["families"][f]) for f in base["families"]},
            "average": (base["average"], trained["average"])}


def mean_kept_fraction(run_dir: Path) -> float:
    records = [json.loads(line)
               for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return sum(r["kept_frac"] for r in records) / max(len(records), 1)


def table(rows: list[dict]) -> str:
    families = [f for f in rows[0]["result"] if f != "average"]
    lines = ["| run | change | prompts × N | kept | base pass@1 | trained pass@1 | gain | "
             + " | ".join(families) + " | time (s) |",
             "|---|---|---|---|---|---|---|" + "---|" * len(families) + "---|"]
    for row in rows:
        base, trained = row["result"]["average"]
        per_family = " | ".join(f"{row['result'][f][1]:.3f}" for f in families)
        lines.append(f"| {row['name']} | {row['change']} | {row['groups']} | {row['kept']:.2f} | "
                     f"{base:.3f} | {trained:.3f} | {trained - base:+.3f} | {per_family} | "
                     f"{row['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=evaluation.HelpFormatter,
                                     # an abbreviation must not swallow a flag meant for train.py
                                     allow_abbrev=False)
    parser.add_argument("--steps", type=int, default=60, help="RL steps of every run")
    parser.add_argument("--samples-per-step", type=int, default=1024,
                        help="prompts × N, the same for every run")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 steps, 64 samples per step, 10 held-out problems per "
                             "task")
    parser.add_argument("--only", default="", help="comma-separated run names (default: all)")
    # the rest (--model, --tasks, --seed, ...) go to train.py
    args, train_flags = parser.parse_known_args(argv)
    if args.quick:
        args.steps, args.samples_per_step = 2, 64
        train_flags = (["--eval-problems", "10", "--val-problems", "5", "--eval-samples", "2"]
                       + train_flags)
    runs = variants(args.steps, args.samples_per_step)
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {name for name, _, _ in runs}
        if unknown:
            parser.error(f"unknown run(s) {', '.join(sorted(unknown))} (choose from "
                         f"{', '.join(n for n, _, _ in runs)})")
        runs = [run for run in runs if run[0] in wanted]

    rows = []
    for name, change, flags in runs:
        print(f"\n=== ablate-{name}: {change}", flush=True)
        start = time.time()
        # a rerun replaces the ablation's runs
        shutil.rmtree(Path("runs") / f"ablate-{name}", ignore_errors=True)
        train.main(["--boundary-problems", "0", "--steps", str(args.steps),
                    "--eval-every", str(max(1, args.steps // 6)),
                    # later flags win: the user's come last
                    "--run", f"ablate-{name}"] + flags + train_flags)
        run_dir = Path("runs") / f"ablate-{name}"
        config = json.loads((run_dir / "config.json").read_text())
        rows.append({"name": name, "change": change,
                     "groups": f"{config['prompts_per_step']} × {config['n']}",
                     "kept": mean_kept_fraction(run_dir), "result": read_result(run_dir),
                     "seconds": time.time() - start})

    report = table(rows)
    Path("runs/ablate.md").write_text(report + "\n")
    print(f"\nheld-out pass@1 after {args.steps} steps, {args.samples_per_step} samples per step "
          f"(runs/ablate-*/, table in runs/ablate.md):\n{report}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as error:  # bad input the user can fix: one line, no traceback
        sys.exit(f"error: {error}")
