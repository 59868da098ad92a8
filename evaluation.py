"""Evaluation: sample n completions per problem, score them, report pass@k per source and family.

    python evaluation.py --model BASE_DIR --model TRAINED_DIR  # reasoning-boundary report, n=256
    python evaluation.py --plot runs/tiny-s0                   # training curves from metrics.jsonl

pass@k is the unbiased estimator of Chen et al. (Codex, 2021): with n samples of which c are
right,
    pass@k = 1 − C(n−c, k) / C(n, k)
the chance that at least one of k samples drawn without replacement from the n is right.

ProRL (arXiv 2505.24864) claims that prolonged RL *expands the reasoning boundary*: the trained
model beats its base at pass@k up to k=256, most on the tasks where the base is weak (where the
base is already strong, the paper also reports a narrowed boundary). RL has only narrowed the
distribution if pass@1 rises while pass@256 falls. The boundary report puts the pass@k curves of
the base and of the trained models side by side (table, JSON, plot) so anyone can check that
claim on their own checkpoints.
"""

import argparse
import dataclasses
import functools
import json
import math
import sys
from collections import Counter, defaultdict
from pathlib import Path
from statistics import fmean

import torch
from tqdm import tqdm

import curves
import models
import sampling
import settings
import tasks

# ProRL's evaluation sampling (Section 4): temperature 0.6, top-p 0.95, n samples per problem.
EVAL_TEMPERATURE = 0.6
EVAL_TOP_P = 0.95
EVAL_SAMPLES = 256


@functools.cache  # a report asks for the same (n, c, k) many times: counts repeat across problems
def pass_at_k(n: int, c: int, k: int) -> float:
    """1 − C(n−c, k)/C(n, k): 0 when c = 0, 1 when k > n − c (every k-subset holds a right
    sample)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 ≤ c ≤ n and 1 ≤ k ≤ n (got n={n}, c={c}, k={k})")
    # Exact integers, then one rounding: (C(n,k) − C(n−c,k)) / C(n,k). Python's int / int is
    # correctly rounded however large the integers are (C(1024, 512) has 307 digits): no overflow,
    # no cancellation. math.comb(n − c, k) is 0 when k > n − c.
    total = math.comb(n, k)
    return (total - math.comb(n - c, k)) / total


def ks_up_to(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself when it is not a power of two."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else ks + [n]


# ----------------------------------------------------------------------------- sampling

def correct_counts(policy, tokenizer, examples: list[dict], params: sampling.SamplingParams,
                   progress: str = "", chunk: int = 0) -> list[int]:
    """c for each example: how many of its params.n samples are right (reward ≥ 1; partial credit is
    not a pass).

    Problems are sampled `chunk` at a time (default 4096 // n; a chunk starting at example i uses
    params.seed + i), so memory is bounded whatever the number of problems. A non-empty
    `progress` shows a progress bar with that label.
    """
    chunk = chunk or max(1, 4096 // params.n)
    counts = []
    bar = tqdm(total=len(examples), desc=progress, unit="problem", disable=not progress,
               dynamic_ncols=True)
    with bar:
        for start in range(0, len(examples), chunk):
            chunk_params = dataclasses.replace(params, seed=params.seed + start)
            _, scores = sampling.rollout_and_score(policy, tokenizer, examples[start:start + chunk],
                                                   chunk_params)
            counts += (scores >= 1.0).sum(dim=1).tolist()
            bar.update(len(scores))
    return counts


def evaluate(policy, tokenizer, examples: list[dict], params: sampling.SamplingParams,
             ks: tuple[int, ...] = (1,), chunk: int = 256) -> dict:
    """pass_at_k_by_source's report of these samples. A sample is right iff reward ≥ 1."""
    counts = correct_counts(policy, tokenizer, examples, params, chunk=chunk)
    return pass_at_k_by_source(counts, examples, params.n, [k for k in ks if k <= params.n])


# ----------------------------------------------------------------------------- the boundary report

def pass_at_k_by_source(counts: list[int], examples: list[dict], n: int, ks: list[int]) -> dict:
    """{"sources" and "families": {name: {k: pass@k}}, "overall": {k: pass@k}, "family_of": ...}.

    A source's pass@k is the mean over its problems, a family's the mean over its sources, overall
    the mean over all sources: each source weighs the same however many problems it has (one source
    per family, as the built-in tasks: the mean over families). No "source": the family's name.
    """
    by_source, family_of = defaultdict(list), {}
    for example, c in zip(examples, counts, strict=True):
        source = example.get("source", example["task"])
        by_source[source].append(c)
        family_of[source] = example["task"]  # tasks.label_sources gives a source a single family
    sources = {source: {k: fmean([pass_at_k(n, c, k) for c in source_counts]) for k in ks}
               for source, source_counts in by_source.items()}
    families = {family: {k: fmean([v[k] for s, v in sources.items() if family_of[s] == family])
                         for k in ks} for family in dict.fromkeys(family_of.values())}
    overall = {k: fmean([values[k] for values in sources.values()]) for k in ks}
    return {"sources": sources, "families": families, "overall": overall, "family_of": family_of}


def rows(report: dict, overall: str = "overall") -> list[tuple[str, str, dict]]:
    """(source, family, {k: pass@k}) in the order every table and plot lists them: each source, each
    family's mean (source "mean"), then the overall mean (family "all")."""
    return ([(source, report["family_of"][source], v) for source, v in report["sources"].items()]
            + [("mean", family, v) for family, v in report["families"].items()]
            + [(overall, "all", report["overall"])])


def validation_metrics(report: dict) -> dict[str, float]:
    """metrics.jsonl's held-out pass@1: val_pass1 (the overall mean, which plots and resets read),
    val_pass1/<source> and val_pass1_family/<family>."""
    return {"val_pass1": report["overall"][1],
            **{f"val_pass1/{s}": v[1] for s, v in report["sources"].items()},
            **{f"val_pass1_family/{f}": v[1] for f, v in report["families"].items()}}


def boundary(counts: dict[str, list[int]], examples: list[dict], n: int) -> dict[str, dict]:
    """{model: pass_at_k_by_source's report} for k = 1, 2, 4, ..., n. pass@1 is the mean of c/n."""
    return {name: pass_at_k_by_source(model_counts, examples, n, ks_up_to(n))
            for name, model_counts in counts.items()}


def boundary_table(report: dict[str, dict]) -> str:
    """Markdown: one row per (source or mean, model), one column per k. The first model is the base;
    the other models' cells show their change against it in parentheses."""
    base_name, *_ = report
    base_rows = rows(report[base_name])
    ks = list(base_rows[0][2])
    lines = ["| source | task | model | " + " | ".join(f"pass@{k}" for k in ks) + " |",
             "|---|---|---|" + "---:|" * len(ks)]
    for row, (source, family, base) in enumerate(base_rows):
        for name, model_report in report.items():
            values = rows(model_report)[row][2]
            cells = [f"{values[k]:.3f}" for k in ks]
            if name != base_name:
                cells = [f"{cell} ({signed(values[k] - base[k])})" for cell, k in zip(cells, ks)]
            lines.append(f"| {source} | {family} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_boundary(report: dict[str, dict], path: Path, title: str = "") -> None:
    """pass@k against k (log scale): a panel per table row (rows()), a line per model."""
    # Agg renders PNGs headless. Imported here, not at the top, so that `import evaluation`
    # (train.py) stays fast.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = rows(next(iter(report.values())))
    columns, lines = min(len(panels), 4), math.ceil(len(panels) / 4)
    fig = Figure(figsize=(4 * columns, 3.6 * lines), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(lines, columns, squeeze=False).flatten()
    for row, (ax, (source, family, _)) in enumerate(zip(axes, panels)):
        for name, model_report in report.items():
            ks, values = zip(*rows(model_report)[row][2].items())
            ax.plot(ks, values, marker="o", markersize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{source} ({family})")
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    axes[0].set_ylabel("pass@k")
    axes[0].legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)


def write_boundary(out_dir: str | Path, counts: dict[str, list[int]], examples: list[dict], n: int,
                   settings: dict | None = None) -> str:
    """Write boundary.md, boundary.json and boundary.png into out_dir; return the markdown table.

    counts: {model name: [c per example]}, the first model the base, each list aligned with
    `examples`. settings: what produced the samples (models, temperature, ...), recorded in the
    JSON and the markdown.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = boundary(counts, examples, n)
    summary = f"{n} samples per problem; held-out problems: {problem_counts(examples)}"
    if settings:
        summary += "; " + ", ".join(f"{key} {value}" for key, value in settings.items())
    table = boundary_table(report)
    (out_dir / "boundary.md").write_text(f"# Reasoning boundary: pass@k\n\n{summary}.\n\n{table}\n")
    problems = [{"source": ex.get("source", ex["task"]), "task": ex["task"], "prompt": ex["prompt"]}
                for ex in examples]
    (out_dir / "boundary.json").write_text(json.dumps({
        "n": n, "ks": ks_up_to(n), "settings": settings or {}, "pass_at_k": report,
        "problems": problems, "correct": counts}, indent=1))
    plot_boundary(report, out_dir / "boundary.png", title=f"pass@k on held-out problems (n={n})")
    return table


def problem_counts(examples: list[dict]) -> str:  # 'aime_2024 30, math500 100', in order
    sources = Counter(example.get("source", example["task"]) for example in examples)
    return ", ".join(f"{source} {count}" for source, count in sources.items())


def signed(gain: float) -> str:
    """+0.123 / -0.045, and +0.000 rather than -0.000 for a loss that rounds to nothing."""
    return f"{round(gain, 3) + 0.0:+.3f}"


def write_result(run_dir: str | Path, base: dict, trained: dict, settings: str) -> str:
    """result.md and result.json: held-out pass@1 of the base and of the trained model (reports of
    pass_at_k_by_source) side by side. Returns the table with a heading, as train.py prints it."""
    lines = [f"held-out pass@1 ({settings}):",
             "| source | task | base pass@1 | trained pass@1 | gain |", "|---|---|---|---|---|"]
    for (source, family, old), (_, _, new) in zip(rows(base, "average"), rows(trained, "average")):
        gain = signed(new[1] - old[1])
        lines.append(f"| {source} | {family} | {old[1]:.3f} | {new[1]:.3f} | {gain} |")
    (Path(run_dir) / "result.md").write_text("\n".join(lines) + "\n")
    result = {"base": pass1(base), "trained": pass1(trained)}
    (Path(run_dir) / "result.json").write_text(json.dumps(result))
    return "\n".join(lines)


def pass1(report: dict) -> dict:
    """A report's pass@1, as result.json holds it."""
    return {"sources": {s: v[1] for s, v in report["sources"].items()},
            "families": {f: v[1] for f, v in report["families"].items()},
            "average": report["overall"][1], "family_of": report["family_of"]}


def pass1_gain(base_counts: list[int], trained_counts: list[int], n: int) -> str:
    """Held-out pass@1 base → trained from the boundary's samples (c of n right per problem), with
    the gain's 95% interval over problems: the m paired differences d = (c_trained − c_base) / n,
    mean(d) ± 1.96·sd(d)/√m."""
    diffs = [(trained - base) / n for base, trained in zip(base_counts, trained_counts)]
    m, gain = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - gain) ** 2 for d in diffs) / (m - 1)) if m > 1 else 0.0
    half = 1.96 * sd / math.sqrt(m)
    base, trained = sum(base_counts) / (m * n), sum(trained_counts) / (m * n)
    return (f"pass@1 at T={EVAL_TEMPERATURE}, top-p {EVAL_TOP_P} ({m} held-out problems × {n} "
            f"samples): base {base:.3f} → trained {trained:.3f}, gain {signed(gain)} (95% interval "
            f"over problems {signed(gain - half)} to {signed(gain + half)})")


# ----------------------------------------------------------------------------- command line

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows each option's default."""


def eval_problems(family: str, count: int, level: int, whole_file: bool = False) -> list[dict]:
    """A source's first `count` held-out problems; with whole_file, a file's first `count` problems,
    every one (a benchmark such as AIME is all test set, and its 10% held-out share would be 3
    problems)."""
    problems = (tasks.load_source(family)[:count] if whole_file and not tasks.is_procedural(family)
                else tasks.heldout(family, count, level))
    if not problems:
        raise tasks.no_heldout_error(family)
    return problems


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", action="append", default=[],
                        help="local Hugging Face model directory; repeat it: the first is the base")
    # as train.py's: the same fields of settings.Config
    settings.add_options(parser, ("tasks", "level", "max_new_tokens", "device"))
    parser.add_argument("--problems", type=int, default=100, help="held-out problems per source")
    parser.add_argument("--whole-file", action="store_true",
                        help="evaluate every problem of a file in --tasks (up to --problems), not "
                             "only its held-out share: for a benchmark file such as "
                             "aime_2024.parquet")
    parser.add_argument("--n", type=int, default=EVAL_SAMPLES,
                        help="samples per problem (largest k)")
    parser.add_argument("--temperature", type=float, default=EVAL_TEMPERATURE,
                        help="sampling temperature")
    parser.add_argument("--top-p", type=float, default=EVAL_TOP_P,
                        help="nucleus sampling threshold")
    parser.add_argument("--max-rows", type=int, default=None,
                        help="rows decoded at once (default: up to 1024, as many as fit, as in "
                             "train.py); lower it if memory runs out. Another value draws other "
                             "samples from the same seed")
    parser.add_argument("--out", default="runs/eval",
                        help="directory for boundary.md, boundary.json, boundary.png")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampler seed (every model gets the same)")
    parser.add_argument("--plot", metavar="RUN_DIR",
                        help="instead: draw RUN_DIR/training.png from metrics.jsonl")
    args = parser.parse_args(argv)
    if not args.plot and not args.model:
        parser.error("give --model DIR (repeatable) for a pass@k report, or --plot RUN_DIR for "
                     "training curves")
    return args


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.plot:
        print(f"wrote {curves.plot_training(args.plot)}")
        return
    checks = [(args.problems >= 1, "--problems must be at least 1"),
              (args.level in (1, 2, 3), "--level must be 1, 2 or 3")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    params = sampling.SamplingParams(args.n, args.max_new_tokens, args.temperature, args.top_p,
                                     args.seed, args.max_rows)
    models.check_device(args.device)
    for path in args.model:  # all of them before the first hour of sampling, not after
        models.check_model_dir(path)
    problems = {source: eval_problems(source, args.problems, args.level, args.whole_file)
                for source in tasks.parse_mix(args.tasks)}
    examples = tasks.label_sources(problems)  # each with its "source", the row that reports it
    names = ["base"] + (["trained"] if len(args.model) == 2
                        else [f"trained{i}" for i in range(1, len(args.model))])
    device = (("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
              else args.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    counts = {}
    for name, path in zip(names, args.model):
        policy, tokenizer = models.load(path, device, dtype)
        counts[name] = correct_counts(policy.eval(), tokenizer, examples, params, progress=name)
        del policy
    settings = {**dict(zip(names, args.model)), "temperature": args.temperature,
                "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    table = write_boundary(args.out, counts, examples, args.n, settings)
    print(table)
    print(f"wrote {args.out}/boundary.md, boundary.json, boundary.png")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ValueError as error:  # bad input the user can fix: one line, no traceback
        sys.exit(f"error: {error}")
