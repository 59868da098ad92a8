"""Training curves: RUN_DIR/training.png from RUN_DIR/metrics.jsonl, one panel per group of metrics,
reference resets as dashed vertical lines (`python evaluation.py --plot RUN_DIR` redraws it)."""

import json
import math
from pathlib import Path

# (panel title, metrics.jsonl keys drawn in it), in the order train.py logs them.
TRAINING_PANELS = [
    ("reward", ["reward", "pass_rate", "val_pass1"]),
    ("held-out pass@1 per source", ["val_pass1/"]),  # a key ending in "/": every key that starts so
    ("KL", ["kl", "approx_kl"]),
    ("entropy", ["entropy"]),
    ("response length (tokens)", ["response_len"]),
    ("batch", ["kept_frac", "clipfrac"]),
    ("throughput (tokens/s)", ["tokens_per_s"]),
]


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"--plot {run_dir}: no metrics.jsonl there (is it a run directory of "
                         "train.py?)")
    lines = path.read_text().split("\n")
    lines = lines[:-1] if lines and not lines[-1] else lines  # the newline that ends the last line
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # a half-written last line is a run still writing it, not an error
            if number < len(lines):
                raise ValueError(f"{path}:{number}: not valid JSON") from None
    if not records:
        raise ValueError(f"{path}: no steps logged yet")
    return records


def training_series(records: list[dict]) -> tuple[dict[str, dict[str, tuple[list, list]]],
                                                  list[tuple[int, str]]]:
    """({panel: {key: (steps, values)}} for the keys present, [(step, reason) of each reference
    reset])."""
    panels = {}
    for title, keys in TRAINING_PANELS:
        keys = [found for key in keys for found in (
            dict.fromkeys(k for r in records for k in r if k.startswith(key))
            if key.endswith("/") else [key])]
        series = {key: ([r["step"] for r in records if key in r],
                        [r[key] for r in records if key in r])
                  for key in keys}
        series = {key: xy for key, xy in series.items() if xy[0]}
        if series:
            panels[title] = series
    resets = [(r["step"], r["reset"]) for r in records if r.get("reset")]
    return panels, resets


def plot_training(run_dir: str | Path) -> Path:
    """Draw RUN_DIR/training.png from RUN_DIR/metrics.jsonl; reference resets are dashed vertical
    lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels, resets = training_series(read_metrics(run_dir))
    columns = 2
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(6 * columns, 3 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False).flatten()
    for ax, (title, series) in zip(axes, panels.items()):
        for key, (steps, values) in series.items():
            sparse = len(steps) < 0.5 * max(len(s) for s, _ in series.values())  # e.g. val_pass1
            ax.plot(steps, values, label=key, marker="o" if sparse else None, markersize=4)
        for number, (step, reason) in enumerate(resets):
            ax.axvline(step, color="gray", linestyle="--", linewidth=1,
                       label="reset" if number == 0 else None)
            if ax is axes[0]:
                ax.annotate(reason, (step, 1), xycoords=("data", "axes fraction"), rotation=90,
                            fontsize=7, va="top", ha="right", color="gray")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{Path(run_dir).name}: {len(resets)} reference reset(s)")
    path = Path(run_dir) / "training.png"
    fig.savefig(path, dpi=110)
    return path
