"""Benchmark (run by hand, not a test): the paper's safety-during-training claim on SafetyPointGoal1.

The claim (paper, Fig. 6-8): with control-switch sampling the behaviour policy's episodic cost stays under the cost
limit from the first episodes, SAC-Lagrangian from scratch violates it early, and only SaGui-CS ends with a safe,
well-performing student. Compared here, each run with `sagui.py` as a user runs it:
1. the guide: `sagui.py --guide-only` (or an existing one with `--guide-path`), evaluated by sagui.py alone in the
   target task over `--eval-episodes` episodes, deterministic and stochastic;
2. for each seed: SaGui-CS (`--guide-path`), SaGui-LD (`--guide-path --sampling linear-decay`) and SAC-Lag from
   scratch (`--no-use-guide`), each for `--student-steps` steps, then the student alone for 10 episodes;
then the TensorBoard scalars are read into a JSON summary and docs/img/sagui_pointgoal1.png.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/sagui_pointgoal1.py --guide-steps 200000
    python benchmarks/sagui_pointgoal1.py --plot-only      # re-read finished runs
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from conftest import read_scalars  # noqa: E402
from plot import interpolate_runs, plot_band  # noqa: E402  (benchmarks/plot.py)

METHODS = {  # name -> flags (besides the common ones); "{guide}" is replaced by the guide's path
    "sagui_cs": ["--guide-path", "{guide}"],
    "sagui_ld": ["--guide-path", "{guide}", "--sampling", "linear-decay"],
    "sac_lag": ["--no-use-guide"],
}
COLORS = {"sagui_cs": "tab:blue", "sagui_ld": "tab:green", "sac_lag": "tab:red"}


@dataclass
class Args:
    guide_path: Optional[str] = None
    """an existing guide.pt; without it, one is trained first with --guide-steps steps"""
    guide_steps: int = 200_000
    """guide (source task) steps when training one"""
    guide_num_envs: int = 4
    """environments stepped together in the guide phase (one gradient step per env step is kept)"""
    student_steps: int = 30_000
    """student steps of every SaGui-CS, SaGui-LD and SAC-Lag run"""
    seeds: int = 3
    """seeds per method"""
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """which of sagui_cs, sagui_ld, sac_lag to run"""
    hidden_size: int = 64
    """network width (the paper's 256 does not fit the CPU budget)"""
    batch_size: int = 64
    """minibatch size"""
    eval_episodes: int = 10
    """episodes of the student alone at the end of each run (and of the guide alone after its training)"""
    first_episodes: int = 5
    """the 'first episodes' of the claim: mean behaviour cost over this many episodes at the start"""
    extra: str = ""
    """extra flags for every student run, e.g. "--beta-update episodic" (with a different --tag)"""
    tag: str = ""
    """suffix of the run names, to keep variants apart"""
    out_dir: str = "bench_runs/sagui"
    """where the runs go (relative to the repository)"""
    plot_only: bool = False
    """only read the finished runs under out_dir"""
    timeout: int = 4 * 3600
    """seconds allowed per run"""


def run(cwd: Path, flags: list[str], timeout: int) -> float:
    cmd = [sys.executable, str(REPO / "sagui.py"), *flags]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(cwd / "last_run.log", "w") as log:
        subprocess.run(cmd, cwd=cwd, check=True, timeout=timeout, stdout=log, stderr=subprocess.STDOUT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    print(f"  took {time.time() - t0:.0f}s", flush=True)
    return time.time() - t0


def series(scalars, tag):
    values = scalars.get(tag, [])
    return np.array([s for s, _ in values]), np.array([v for _, v in values])


def summarise(run_dir: Path, d: float, first: int) -> dict:
    sc = read_scalars(run_dir)
    _, cost = series(sc, "charts/episodic_cost")
    _, ret = series(sc, "charts/episodic_return")
    eval_steps, eval_cost = series(sc, "eval/episodic_cost")
    _, eval_ret = series(sc, "eval/episodic_return")
    last = eval_steps == eval_steps.max() if len(eval_steps) else []
    steps, beta = series(sc, "charts/lagrange_multiplier")
    _, qc_est = series(sc, "charts/cost_critic_estimate")
    _, d_bar = series(sc, "charts/cost_target_d_bar")
    _, to_go = series(sc, "charts/discounted_cost_to_go")
    _, sps = series(sc, "charts/SPS")
    return {
        "run": run_dir.name, "episodes": len(cost),
        f"mean_cost_first_{first}_episodes": float(cost[:first].mean()) if len(cost) else None,
        "mean_cost_all_episodes": float(cost.mean()) if len(cost) else None,
        "max_episode_cost": float(cost.max()) if len(cost) else None,
        "episodes_over_limit": int((cost > d).sum()),
        f"episodes_over_limit_first_{first}": int((cost[:first] > d).sum()),
        "cumulative_cost": float(cost.sum()),
        "mean_return_last_5_episodes": float(ret[-5:].mean()) if len(ret) else None,
        "final_eval_cost": float(eval_cost[last].mean()) if len(eval_cost) else None,
        "final_eval_return": float(eval_ret[last].mean()) if len(eval_ret) else None,
        "final_eval_episodes_over_limit": int((eval_cost[last] > d).sum()) if len(eval_cost) else None,
        "beta_final": float(beta[-1]) if len(beta) else None,
        "beta_min": float(beta.min()) if len(beta) else None,
        "log_points_cost_critic_above_d_bar": f"{int((qc_est > d_bar[:len(qc_est)]).sum())}/{len(qc_est)}",
        "mean_discounted_cost_to_go": float(to_go.mean()) if len(to_go) else None,
        "d_bar": float(d_bar[0]) if len(d_bar) else None,
        "sps_last": float(sps[-1]) if len(sps) else None,
    }


if __name__ == "__main__":
    args = tyro.cli(Args)
    out = REPO / args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    common = ["--hidden-size", str(args.hidden_size), "--batch-size", str(args.batch_size), "--no-cuda",
              "--eval-episodes", str(args.eval_episodes), "--log-every", "1000"]
    guide = args.guide_path
    if guide is None and not args.plot_only:
        run(out, ["--guide-only", "--exp-name", "guide", "--guide-total-timesteps", str(args.guide_steps),
                  "--num-envs", str(args.guide_num_envs), "--seed", "1", *common], timeout=args.timeout)
    if guide is None:
        guide = sorted(glob.glob(str(out / "runs" / "*__guide__1__*" / "guide.pt")))[-1]
    if not args.plot_only:
        for seed in range(1, args.seeds + 1):
            for method in args.methods:
                flags = [f.replace("{guide}", guide) for f in METHODS[method]]
                run(out, ["--seed", str(seed), "--exp-name", method + args.tag, "--total-timesteps",
                          str(args.student_steps), "--eval-every", str(args.student_steps), *common, *flags,
                          *args.extra.split()], timeout=args.timeout)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = 25.0
    summary = {"guide": guide}
    guide_dir = Path(guide).parent / "guide"
    if guide_dir.is_dir():
        gs = read_scalars(guide_dir)
        for mode in ("deterministic", "stochastic"):
            _, c = series(gs, f"guide/eval_{mode}/episodic_cost" if f"guide/eval_{mode}/episodic_cost" in gs
                          else f"eval_{mode}/episodic_cost")
            summary[f"guide_alone_in_target_{mode}_costs"] = c.tolist()
        _, g_cost = series(gs, "charts/episodic_cost")
        summary["guide_source_task_episodes"] = len(g_cost)
        summary["guide_source_task_last_20_mean_cost"] = float(g_cost[-20:].mean()) if len(g_cost) else None
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for method in METHODS:
        name = method + args.tag
        dirs = sorted(Path(p) for p in glob.glob(str(out / "runs" / f"*__{name}__*")) if os.path.isdir(p))
        summary[name] = []
        cumulative = []
        for i, run_dir in enumerate(dirs):
            summary[name].append(summarise(run_dir, d, args.first_episodes))
            sc = read_scalars(run_dir)
            label = name if i == 0 else None
            s, c = series(sc, "charts/episodic_cost")
            axes[0, 0].plot(s, c, color=COLORS[method], alpha=0.7, marker="o", ms=3, label=label)
            cumulative.append(list(zip(s, np.cumsum(c))))
            s, b = series(sc, "charts/lagrange_multiplier")
            axes[1, 0].semilogy(s, np.maximum(b, 1e-6), color=COLORS[method], alpha=0.7, label=label)
            s, q = series(sc, "charts/cost_critic_estimate")
            axes[1, 1].plot(s, q, color=COLORS[method], alpha=0.7, label=label)
            if method == "sagui_cs":
                s, q = series(sc, "charts/cost_critic_estimate_guide_buffer")
                axes[1, 1].plot(s, q, color=COLORS[method], alpha=0.7, ls=":",
                                label="sagui_cs, guide-buffer states" if i == 0 else None)
        if cumulative:  # one seed: the run; several: their IQM and 95% bootstrap CI (benchmarks/plot.py)
            plot_band(axes[0, 1], *interpolate_runs(cumulative, 100), label=name, color=COLORS[method])
    axes[0, 0].axhline(d, color="k", ls="--", lw=1)
    axes[1, 1].axhline(25 * (1 - 0.99**1000) / 10, color="k", ls="--", lw=1, label="d_bar")
    for ax, title in zip(axes.flat, ("behaviour policy: episodic cost (training; limit dashed)",
                                     "behaviour policy: cumulative training cost (IQM, 95% CI over seeds)",
                                     "beta (the cost multiplier; omega = beta for SaGui)",
                                     "cost critic's estimate Qc(s, a~pi), batch mean, vs d_bar")):
        ax.set_title(title)
        ax.set_xlabel("student environment steps")
        ax.legend(fontsize=8)
    fig.suptitle(f"SafetyPointGoal1: guide {Path(guide).parent.name}, students {args.student_steps} steps, "
                 f"{args.hidden_size}x{args.hidden_size}, batch {args.batch_size}")
    fig.tight_layout()
    img = REPO / "docs" / "img" / f"sagui_pointgoal1{args.tag}.png"
    fig.savefig(img, dpi=70)
    (out / f"sagui_summary{args.tag}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print("wrote", img)
