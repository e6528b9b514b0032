"""Learning curves and final tables per method, with IQM and 95% stratified-bootstrap confidence intervals (rliable).

    python benchmarks/plot.py sweeps/actsafe_gp --out docs/img/actsafe_gp_sweep
    python benchmarks/plot.py runs/ --out /tmp/my_runs --reps 5000

Reads every `summary.json` under the given directories (the runs of `benchmarks/sweep.py`, or any runs of the five
scripts), groups the runs by (env id, method) and writes, for each env id:
  <out>_<env>_curves.png   training return and cost per episode against env steps: at each point of a common grid the
                           IQM over the runs (seeds) and its 95% confidence interval
  <out>_<env>_final.png    the final metrics per method: IQM and 95% CI
  <out>.md                 the same final metrics as markdown tables (one per env id, and across env ids for the
                           scale-free metrics when every env id has the same number of runs)

The final metrics come from summary.json: eval_return and eval_cost (the final evaluation), train_cost (mean cost of
the training episodes), cost_rate (fraction of training steps with a cost) and over_limit (fraction of training
episodes whose cost exceeds the run's cost limit). The curves come from the runs' TensorBoard scalars
`charts/episodic_return` and `charts/episodic_cost`.

Why IQM and stratified-bootstrap CIs (Agarwal et al., 2021, "Deep RL at the edge of the statistical precipice"): with
the 3-10 seeds a safe-RL paper can afford, the mean is at the mercy of one outlier seed and a standard deviation says
nothing about the uncertainty of the estimate; the interquartile mean (mean of the middle 50% of the runs) is robust,
and the bootstrap CI, resampling runs within each task (env id), says how far it could move with other seeds. With
few runs the interval is wide: that is the honest answer.

Library (the benchmark scripts draw their figures with these):
    iqm(values)                              the interquartile mean (scipy's 25% trimmed mean, as rliable)
    interval_estimates(scores, reps, seed)   {name: (IQM, low, high)}, scores: {name: (runs, tasks) array}
    curve_estimates(curves, reps, seed)      IQM and CI at each point of (runs, points) curves
    interpolate_runs(series, points)         runs' (step, value) series on a common grid of steps
    plot_band(ax, x, curves, label=...)      an IQM line and its CI band
    markdown_table(header, rows)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # conftest.read_scalars: TensorBoard scalars as TensorBoard shows them
FINAL_METRICS = {  # summary.json key (over_limit derived) -> table heading
    "eval_return": "eval return",
    "eval_cost": "eval cost",
    "train_cost": "train cost / episode",
    "cost_rate": "cost rate",
    "over_limit": "episodes over the limit",
}
SCALE_FREE = ("cost_rate", "over_limit")  # fractions: comparable across env ids, aggregated over them
CURVE_TAGS = {"charts/episodic_return": "training return", "charts/episodic_cost": "training cost"}


# ---- statistics (rliable) ----

def iqm(values) -> float:
    """Interquartile mean: the mean of the middle 50% of all values (rliable's aggregate_iqm)."""
    from rliable import metrics

    return float(metrics.aggregate_iqm(np.asarray(values, dtype=float)))


def _bootstrap(scores: dict, func, reps: int, seed: int):
    """rliable's stratified bootstrap, percentile 95% intervals, seeded (arch warns that `random_state` will change
    to a NumPy Generator in a later release: the pinned arch 7.2 uses it as given)."""
    from rliable import library as rly

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return rly.get_interval_estimates(scores, func, reps=reps, random_state=np.random.RandomState(seed))


def interval_estimates(scores: dict, reps: int = 2000, seed: int = 0) -> dict:
    """{name: (IQM, low, high)}: the IQM of a (runs, tasks) score matrix and its 95% CI by rliable's stratified
    bootstrap (runs resampled with replacement within each task, `reps` times; percentile interval)."""
    from rliable import metrics

    scores = {k: np.asarray(v, dtype=float).reshape(len(v), -1) for k, v in scores.items()}
    point, ci = _bootstrap(scores, lambda s: np.array([metrics.aggregate_iqm(s)]), reps, seed)
    return {k: (float(point[k][0]), float(ci[k][0, 0]), float(ci[k][1, 0])) for k in scores}


def curve_estimates(curves, reps: int = 1000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM, low and high at each point of `curves` (runs, points): the pointwise 95% CI by the same bootstrap
    (one call: the points are bootstrapped as one (runs, 1, points) array, as rliable's sample-efficiency curves)."""
    from scipy.stats import trim_mean

    curves = np.asarray(curves, dtype=float)
    # aggregate_iqm of each point's (runs, 1) column = scipy's 25% trimmed mean along the runs axis, for all at once
    point, ci = _bootstrap({"c": curves[:, None, :]}, lambda s: trim_mean(s[:, 0, :], 0.25, axis=0), reps, seed)
    return point["c"], ci["c"][0], ci["c"][1]


def plot_band(ax, x, curves, label: str | None = None, color=None, reps: int = 1000, **line_kwargs):
    """Draw the IQM over runs of `curves` (runs, points) against `x` and its 95% CI as a band; one run: the run."""
    curves = np.atleast_2d(np.asarray(curves, dtype=float))
    if len(curves) == 1:
        return ax.plot(x, curves[0], label=label, color=color, **line_kwargs)
    mid, low, high = curve_estimates(curves, reps=reps)
    lines = ax.plot(x, mid, label=f"{label} (IQM of {len(curves)})" if label else None, color=color, **line_kwargs)
    ax.fill_between(x, low, high, color=lines[0].get_color(), alpha=0.2, lw=0)
    return lines


def fmt_interval(estimate: tuple[float, float, float]) -> str:
    mid, low, high = estimate
    digits = 3 if max(abs(mid), abs(low), abs(high)) < 10 else 1
    return f"{mid:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- runs ----

def load_runs(directories: list[str]) -> list[dict]:
    """Every summary.json under `directories`, with its run directory and the derived over_limit fraction."""
    runs = []
    for directory in directories:
        if not os.path.isdir(directory):
            raise SystemExit(f"error: {directory}: no such directory (give sweep output or runs/ directories)")
        for path in sorted(glob.glob(os.path.join(directory, "**", "summary.json"), recursive=True)):
            with open(path) as f:
                summary = json.load(f)
            episodes = summary.get("train_episodes") or 0
            summary["over_limit"] = summary["train_violating_episodes"] / episodes if episodes else None
            summary["run_dir"] = os.path.dirname(path)
            runs.append(summary)
    if not runs:
        raise SystemExit(f"error: no summary.json under {', '.join(directories)} (a run writes one when it ends)")
    return runs


def interpolate_runs(series: list, points: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Runs' [(step, value), ...] series (e.g. a cumulative counter) linearly interpolated on a common grid of steps
    from the latest first step to the earliest last step: (grid, (runs, points))."""
    arrays = [np.array(sorted(s), dtype=float).T for s in series]
    grid = np.linspace(max(a[0][0] for a in arrays), min(a[0][-1] for a in arrays), points)
    return grid, np.stack([np.interp(grid, steps, values) for steps, values in arrays])


def episode_curves(run_dirs: list[str], tag: str, points: int = 50) -> tuple[np.ndarray, np.ndarray] | None:
    """The runs' per-episode scalar `tag` on a common grid of env steps: (grid, (runs, points)). Each grid value is
    the mean of the episodes that ended in that cell, carried forward over cells where none ended; the grid starts
    where every run has finished an episode and ends at the shortest run's last episode."""
    from conftest import read_scalars

    series = []
    for run_dir in run_dirs:
        values = read_scalars(Path(run_dir)).get(tag)
        if not values:
            return None
        steps, vals = np.array(sorted(values)).T
        series.append((steps, vals))
    start = max(s[0] for s, _ in series)
    end = min(s[-1] for s, _ in series)
    if end <= start:
        grid = np.array([end])
        return grid, np.array([[v[s <= end][-1]] for s, v in series])
    grid = np.linspace(start, end, points)
    curves = []
    for steps, vals in series:
        cell = np.searchsorted(grid, steps, side="left")  # episode at `steps` counts for the first grid point >= it
        curve = np.full(points, np.nan)
        for j in range(points):
            inside = vals[cell == j]
            curve[j] = inside.mean() if inside.size else (curve[j - 1] if j else vals[steps <= start][-1])
        curves.append(curve)
    return grid, np.stack(curves)


def final_estimates(groups: dict, reps: int, seed: int) -> dict:
    """{metric: {method: (IQM, low, high)}} over the runs of each method (metrics a method's runs all report)."""
    out = {}
    for metric in FINAL_METRICS:
        scores = {method: [r[metric] for r in rs] for method, rs in groups.items()
                  if all(r.get(metric) is not None for r in rs)}
        if scores:
            out[metric] = interval_estimates({m: np.array(v)[:, None] for m, v in scores.items()}, reps, seed)
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directories", nargs="+", help="sweep output or runs/ directories to read summary.json files from")
    p.add_argument("--out", default="plots/summary", help="prefix of the PNG and markdown files written")
    p.add_argument("--reps", type=int, default=5000, help="bootstrap resamples for the final tables")
    p.add_argument("--curve-reps", type=int, default=1000, help="bootstrap resamples at each point of the curves")
    p.add_argument("--points", type=int, default=50, help="grid points of the learning curves")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    b = p.parse_args(argv)
    if b.reps <= 0 or b.curve_reps <= 0 or b.points <= 1:
        raise SystemExit("error: --reps and --curve-reps must be positive and --points at least 2")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(b.directories)
    by_env: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    several_scripts = len({r["script"] for r in runs}) > 1  # then a method is named with its script
    for r in runs:
        by_env[r["env_id"]][f"{r['script']}:{r['method']}" if several_scripts else r["method"]].append(r)
    os.makedirs(os.path.dirname(os.path.abspath(b.out)), exist_ok=True)
    doc = [f"Runs read: {len(runs)} summary.json files under {', '.join(b.directories)}. IQM over the runs (seeds) "
           f"[95% stratified-bootstrap CI, {b.reps} resamples, rliable]."]
    finals = {}
    for env_id, groups in sorted(by_env.items()):
        finals[env_id] = estimates = final_estimates(groups, b.reps, b.seed)
        metrics = list(estimates)
        rows = [[method, len(rs), *(fmt_interval(estimates[m][method]) if method in estimates[m] else "-"
                                     for m in metrics)] for method, rs in sorted(groups.items())]
        doc += [f"\n### {env_id}\n", markdown_table(["method", "runs", *(FINAL_METRICS[m] for m in metrics)], rows)]
        name = env_id.replace("/", "_")

        fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 0.7 + 0.45 * len(groups)),
                                 squeeze=False)
        for ax, metric in zip(axes[0], metrics):
            for i, (method, (mid, low, high)) in enumerate(sorted(estimates[metric].items())):
                ax.plot([low, high], [i, i], lw=6, alpha=0.5, color=f"C{i}")
                ax.plot([mid], [i], "k|", ms=14)
            ax.set_yticks(range(len(estimates[metric])), sorted(estimates[metric]) if ax is axes[0][0] else [])
            ax.set_title(FINAL_METRICS[metric], fontsize=9)
            ax.set_ylim(-0.6, len(estimates[metric]) - 0.4)
        fig.suptitle(f"{env_id}: IQM and 95% CI over runs", fontsize=9)
        fig.tight_layout()
        fig.savefig(f"{b.out}_{name}_final.png", dpi=90)
        plt.close(fig)

        fig, axes = plt.subplots(1, len(CURVE_TAGS), figsize=(6 * len(CURVE_TAGS), 3.8), squeeze=False)
        for ax, (tag, title) in zip(axes[0], CURVE_TAGS.items()):
            for i, (method, rs) in enumerate(sorted(groups.items())):
                found = episode_curves([r["run_dir"] for r in rs], tag, b.points)
                if found is not None:
                    plot_band(ax, found[0], found[1], label=method, color=f"C{i}", reps=b.curve_reps)
            limits = {r.get("cost_limit") for rs in groups.values() for r in rs}
            if tag.endswith("cost") and len(limits) == 1 and None not in limits:
                ax.axhline(limits.pop(), color="k", ls=":", lw=1, label="cost limit")
            ax.set(xlabel="env steps", title=f"{env_id}: {title}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{b.out}_{name}_curves.png", dpi=90)
        plt.close(fig)

    # across env ids: the scale-free fractions, stratified by env id (needs the same runs per method in every env)
    envs = sorted(by_env)
    if len(envs) > 1:
        methods = set.intersection(*(set(by_env[e]) for e in envs))
        rows = []
        for method in sorted(methods):
            counts = {len(by_env[e][method]) for e in envs}
            values = {m: [[r.get(m) for r in by_env[e][method]] for e in envs] for m in SCALE_FREE}
            if len(counts) != 1 or any(v is None for m in SCALE_FREE for col in values[m] for v in col):
                continue
            rows.append([method, counts.pop(), *(fmt_interval(interval_estimates(
                {method: np.array(values[m]).T}, b.reps, b.seed)[method]) for m in SCALE_FREE)])
        if rows:
            doc += [f"\n### across {len(envs)} env ids (runs resampled within each env id)\n",
                    markdown_table(["method", "runs per env", *(FINAL_METRICS[m] for m in SCALE_FREE)], rows)]
    with open(f"{b.out}.md", "w") as f:
        f.write("\n".join(doc) + "\n")
    print("\n".join(doc))
    print(f"\nwritten: {b.out}.md and {b.out}_<env>_final.png, {b.out}_<env>_curves.png per env id", flush=True)
    return "\n".join(doc)


if __name__ == "__main__":
    main()
