"""Smoke tests of the benchmarks that train: bench/ablate.py and bench/step.py run end to end on the
tiny model."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- bench/ablate.py, smoke

def test_ablation_script_runs_each_variant_in_its_own_dir_and_tabulates_them(tmp_path, monkeypatch,
                                                                             tiny_model_dir):
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.chdir(tmp_path)
    import ablate

    ablate.main(["--quick", "--only", "no-kl,n4,n32", "--model", tiny_model_dir,
                 "--max-new-tokens", "8"])
    configs = {name: json.loads((tmp_path / "runs" / f"ablate-{name}" / "config.json").read_text())
               for name in ("no-kl", "n4", "n32")}
    assert configs["no-kl"]["kl_coef"] == 0.0
    # the same rollout budget, spent on more prompts or more samples per prompt
    assert ([(configs[k]["prompts_per_step"], configs[k]["n"]) for k in ("n4", "n32")]
            == [(16, 4), (2, 32)])
    rows = (tmp_path / "runs" / "ablate.md").read_text().splitlines()
    assert len(rows) == 2 + 3 and rows[2].startswith("| no-kl |") and "| 16 × 4 |" in rows[3]


# ----------------------------------------------------------------------------- bench/step.py, smoke

def test_step_benchmark_runs_one_prorl_v2_step_and_prints_its_time_split(tmp_path):
    for _ in range(2):  # a rerun replaces the first run's directory
        done = subprocess.run([sys.executable, str(REPO / "bench" / "step.py"),
                               "--sizes", "2", "2", "4", "4"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              check=False)
        assert done.returncode == 0, done.stderr[-2000:]
    split = dict(zip(*[iter(done.stdout.strip().splitlines()[-1].split()[:8])] * 2, strict=True))
    assert set(split) == {"gen_s", "ref_s", "update_s", "step_s"}
    assert (sum(float(split[k]) for k in ("gen_s", "ref_s", "update_s"))
            <= float(split["step_s"]) + 0.02)
    config = json.loads((tmp_path / "runs" / "bench-step" / "small" / "train" / "config.json")
                        .read_text())
    assert ((config["advantage"], config["kl_kind"], config["n"], config["max_new_tokens"])
            == ("reinforce_pp", "k2", 2, 4))


# ------------------------------------------------------------------- experiments/boundary.py, smoke

def test_boundary_experiment_runs_its_arms_and_reports_each_split(tmp_path, monkeypatch):
    """A tiny run of the chains experiment: every arm × seed trains from one base, and the table
    holds every split with the base and each run; the counts it tabulates are those of pass@k's
    definition (c ≤ n)."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    monkeypatch.chdir(tmp_path)
    import boundary

    boundary.main(["--arms", "control,edge-explore", "--seeds", "0,1", "--steps", "1",
                   "--problems", "2", "--n", "4", "--warmstart-steps", "2",
                   "--prompts-per-step", "2", "--jobs", "2", "--out", "runs/bx"])
    result = json.loads((tmp_path / "runs" / "bx" / "boundary.json").read_text())
    assert set(result["runs"]) == {"control-s0", "control-s1", "edge-explore-s0", "edge-explore-s1"}
    assert set(result["seconds"]) == set(result["runs"])
    # each run's training log is its own file, not interleaved on the terminal
    assert "step" in (tmp_path / "runs" / "bx" / "control-s1.log").read_text()
    splits = list(result["base"])
    assert len(splits) == 8 and all(set(run) == set(splits) for run in result["runs"].values())
    assert all(0 <= c <= 4
               and len(counts) == 2 for counts in result["base"].values() for c in counts)
    config = json.loads((tmp_path / "runs" / "bx" / "edge-explore-s1" / "config.json").read_text())
    assert ((config["advantage"], config["seed"], config["curriculum"], config["level"])
            == ("passk", 1, True, 3))
    summary, per_run = (tmp_path / "runs" / "bx" / "boundary.md").read_text().split("Per run:")
    assert (summary.splitlines()[0] == "| split | base | control | edge-explore |"
            and summary.count("\n| ") == 8)
    assert per_run.count("| base |") == 8 and per_run.count("| control-s1 |") == 8
    assert (tmp_path / "runs" / "bx" / "boundary.png").stat().st_size > 10_000
    assert "The goal:" in summary and "- **edge-explore**: goal " in summary


def test_boundary_verdict_needs_two_seeds_of_three_on_both_splits_and_the_base_kept_inside(
        monkeypatch):
    """Hand-made counts (n = 4): the goal holds when two of three seeds gain on every problem of
    the edge split and of the edge's held-out chains while depths 1-2 stay at the base's pass@4;
    one seed fewer, or a lost in-distribution problem, and it is not met."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import boundary

    edge, heldout = f"depth {boundary.EDGE}", f"held-out chains, depth {boundary.EDGE}"
    base = {"depth 1": [4] * 10, "depth 2": [4] * 10, edge: [0] * 10, heldout: [0] * 5 + [1] * 5}
    gained = {**base, edge: [2] * 10, heldout: [3] * 10}
    result = {"base": base, "runs": {"a-s0": gained, "a-s1": gained, "a-s2": base,
                                     "b-s0": gained, "b-s1": base, "b-s2": base,
                                     "c-s0": gained, "c-s1": gained,
                                     "c-s2": {**gained, "depth 2": [4] * 7 + [0] * 3}}}
    lines = boundary.verdict(result, 4).splitlines()
    assert lines[0].startswith("- **a**: goal holds (depth 3: expanded in 2 of 3 seeds; "
                               "held-out chains, depth 3: expanded in 2 of 3 seeds;")
    assert lines[1].startswith("- **b**: goal not met (depth 3: expanded in 1 of 3 seeds")
    # depth 2 lost 0.3 of pass@4 in one seed of three: -0.1 on average
    assert lines[2].startswith("- **c**: goal not met") and "depth 2 pass@4 -0.100" in lines[2]


# ----------------------------------------------------------------------------- bench/peer.py, smoke

def test_peer_benchmark_alternates_arms_and_prints_medians_and_ratios(tmp_path, tiny_model_dir):
    """Ours against this same checkout as a "before:" arm (TRL is not in the main install): both run
    a step each round, the phase split adds up to the step, and the ratio line is printed."""
    command = [sys.executable, str(REPO / "bench" / "peer.py"), "--model", tiny_model_dir,
               "--prompts", "2", "--n", "2", "--new-tokens", "4", "--steps", "2",
               "--arms", f"ours,before:{REPO}"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True,
                         check=False, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    steps = [line for line in run.stdout.splitlines() if line.startswith("step ")]
    labels = [line.split(":")[0] for line in steps]  # "step 0 before:/path: ..." → "step 0 before"
    assert labels == ["step 0 ours", "step 0 before", "step 1 ours", "step 1 before"]
    times = dict(pair.split() for pair in steps[0].split(": ", 1)[1].split("  "))
    phases = float(times["gen_s"]) + float(times["ref_s"]) + float(times["update_s"])
    assert abs(phases - float(times["step_s"])) < 0.05 and float(times["update_peak_mb"]) >= 0
    assert "ours is " in run.stdout and "x before:" in run.stdout
