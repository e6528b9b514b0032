"""Benchmark (run by hand, not a test): SaGui-CS vs SAC-Lagrangian from scratch on SafetyPointGoal1.

The paper's claim (Fig. 6): with control-switch sampling the behaviour policy's episodic cost stays under the
cost limit from the start of the student's training, while SAC-Lag from scratch violates it early.

What it does, in order, each run with `sagui.py` as a user runs it (small networks to fit a shared 2-core CPU):
1. seed 1: the guide phase (--guide-steps) then a SaGui-CS student (--student-steps), saving guide.pt;
2. seeds 2..N: SaGui-CS students reusing that guide (--guide-path);
3. seeds 1..N: SAC-Lag from scratch (--no-use-guide) for the same number of student steps;
then reads the TensorBoard scalars and writes docs/img/sagui_pointgoal1.png and a JSON summary (with the
guide alone in the target task, 10 episodes).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/sagui_pointgoal1.py
    python benchmarks/sagui_pointgoal1.py --plot-only --out-dir bench_runs/sagui   # re-plot finished runs
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import read_scalars  # noqa: E402


@dataclass
class Args:
    seeds: int = 3
    """number of seeds per method"""
    guide_steps: int = 30_000
    """guide (source task) steps, trained once (seed 1) and reused"""
    student_steps: int = 20_000
    """student steps of each SaGui-CS and SAC-Lag run"""
    hidden_size: int = 64
    """network width (the paper's 256 does not fit the CPU budget)"""
    batch_size: int = 64
    """minibatch size"""
    eval_every: int = 5000
    """student evaluation period"""
    eval_episodes: int = 3
    """episodes per evaluation"""
    out_dir: str = "bench_runs/sagui"
    """where the runs go (relative to the repository)"""
    plot_only: bool = False
    """only read the finished runs under out_dir and plot"""
    timeout: int = 3600
    """seconds allowed per run"""


def run(cwd: Path, *flags: str, timeout: int) -> None:
    cmd = [sys.executable, str(REPO / "sagui.py"), *flags]
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, cwd=cwd, check=True, timeout=timeout, stdout=subprocess.DEVNULL)
    print(f"  took {time.time() - t0:.0f}s", flush=True)


def curves(run_dir: Path, tag: str):
    values = read_scalars(run_dir).get(tag, [])
    return np.array([s for s, _ in values]), np.array([v for _, v in values])


if __name__ == "__main__":
    args = tyro.cli(Args)
    out = REPO / args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    common = ["--hidden-size", str(args.hidden_size), "--batch-size", str(args.batch_size),
              "--total-timesteps", str(args.student_steps), "--eval-every", str(args.eval_every),
              "--eval-episodes", str(args.eval_episodes), "--no-cuda"]
    if not args.plot_only:
        run(out, "--seed", "1", "--exp-name", "sagui_cs", "--guide-total-timesteps", str(args.guide_steps), *common,
            timeout=args.timeout)
        guide = glob.glob(str(out / "runs" / "*__sagui_cs__1__*" / "guide.pt"))[-1]
        for seed in range(2, args.seeds + 1):
            run(out, "--seed", str(seed), "--exp-name", "sagui_cs", "--guide-path", guide, *common,
                timeout=args.timeout)
        for seed in range(1, args.seeds + 1):
            run(out, "--seed", str(seed), "--exp-name", "sac_lag", "--no-use-guide", *common, timeout=args.timeout)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {}
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for method, color in (("sagui_cs", "tab:blue"), ("sac_lag", "tab:red")):
        dirs = sorted(Path(p) for p in glob.glob(str(out / "runs" / f"*__{method}__*")) if os.path.isdir(p))
        summary[method] = []
        for i, d in enumerate(dirs):
            label = method if i == 0 else None
            s, c = curves(d, "charts/episodic_cost")
            axes[0].plot(s, c, color=color, alpha=0.7, marker="o", ms=3, label=label)
            axes[3].plot(s, np.cumsum(c), color=color, alpha=0.7, label=label)
            s, r = curves(d, "charts/episodic_return")
            axes[1].plot(s, r, color=color, alpha=0.7, marker="o", ms=3, label=label)
            s_e, c_e = curves(d, "eval/episodic_cost")
            axes[2].plot(s_e, c_e, color=color, alpha=0.5, ls="none", marker="x", label=label)
            _, sps = curves(d, "charts/SPS")
            _, ep_c = curves(d, "charts/episodic_cost")
            summary[method].append({"run": d.name, "episodes": len(ep_c),
                                    "mean_episodic_cost": float(np.mean(ep_c)) if len(ep_c) else None,
                                    "episodes_over_limit": int((ep_c > 25).sum()),
                                    "final_eval_cost": float(np.mean(c_e[s_e == s_e.max()])) if len(c_e) else None,
                                    "sps_last": float(sps[-1]) if len(sps) else None})
    for ax, title in zip(axes, ("behaviour policy: episodic cost (training)", "behaviour policy: episodic return",
                                "student alone: eval episodic cost",
                                "behaviour policy: cumulative training cost")):
        ax.set_title(title)
        ax.set_xlabel("student environment steps")
        ax.legend()
    axes[0].axhline(25, color="k", ls="--", lw=1)
    axes[2].axhline(25, color="k", ls="--", lw=1)
    fig.suptitle(f"SafetyPointGoal1, guide {args.guide_steps} steps, students {args.student_steps} steps, "
                 f"{args.hidden_size}x{args.hidden_size}, batch {args.batch_size} (cost limit 25 dashed)")
    fig.tight_layout()
    img = REPO / "docs" / "img" / "sagui_pointgoal1.png"
    fig.savefig(img, dpi=80)
    guide_files = sorted(glob.glob(str(out / "runs" / "*__sagui_cs__1__*" / "guide.pt")))
    if guide_files:  # the guide alone in the target task, 10 episodes
        sys.path.insert(0, str(REPO))
        import torch

        import sagui
        from common import make_safety_env

        saved = torch.load(guide_files[-1])
        env = make_safety_env("SafetyPointGoal1", seed=0)
        xi, _ = sagui.abstraction_index(env.unwrapped.obs_space_dict)
        guide = sagui.Actor(len(xi), 2, saved["hidden_size"], env.action_space.low, env.action_space.high)
        guide.load_state_dict(saved["actor"])
        torch.manual_seed(0)
        res = sagui.evaluate(guide, sagui.make_target_env("SafetyPointGoal1", 10_001), 10, 10_001, "cpu", obs_index=xi)
        summary["guide_alone_in_target_costs"] = [c for _, c in res]
        summary["guide_alone_in_target_mean_cost"] = float(np.mean([c for _, c in res]))
        summary["guide_alone_in_target_mean_return"] = float(np.mean([r for r, _ in res]))
    guide_dirs = sorted(glob.glob(str(out / "runs" / "*__sagui_cs__1__*" / "guide")))
    if guide_dirs:
        _, g_cost = curves(Path(guide_dirs[-1]), "charts/episodic_cost")
        summary["guide_source_task_last10_mean_cost"] = float(np.mean(g_cost[-10:]))
        summary["guide_source_task_episodes"] = len(g_cost)
    (out / "runs" / "sagui_summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print("wrote", img)
