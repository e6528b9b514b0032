"""Benchmark: ViZDoom, the four methods with a small CPU budget: the common violation metric, game reward, speed.

    nice -n 10 python benchmarks/psl_vizdoom.py --total-timesteps 60000          # one seed, 4 methods
    nice -n 10 python benchmarks/psl_vizdoom.py --speed                          # env and training steps/s only

Runs psl.py as a user does (one process per run, one after the other), reads the TensorBoard scalars, prints a
markdown table and writes docs/img/psl_vizdoom.png. --speed measures the bare games (random actions) in this
process and in worker processes, and a short training run of each, side by side.
"""

from __future__ import annotations

import glob
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(REPO, "tests"))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from conftest import read_scalars  # noqa: E402
from plot import fmt_interval, interpolate_runs, interval_estimates, plot_band  # noqa: E402  (benchmarks/plot.py)


@dataclass
class Bench:
    total_timesteps: int = 60000
    """psl.py --total-timesteps per run"""
    seeds: int = 1
    """seeds per method"""
    methods: list[str] = field(default_factory=lambda: ["psl", "zero-shot", "intrinsic-fear", "baseline"])
    """methods to run"""
    extra: str = ""
    """extra psl.py flags, space separated (pass as --extra="...")"""
    out: str = "docs/img/psl_vizdoom.png"
    """figure path"""
    speed: bool = False
    """measure env and training steps/s with and without worker processes instead"""


def run(cmd: list[str], cwd: str) -> tuple[str, float, float]:
    """Run a command; return its stdout, wall seconds and CPU seconds (its processes and their children)."""
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return proc.stdout, time.time() - t0, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def speed() -> None:
    from common.doom import ACTIONS, DoomVecEnv, write_wad

    wad = write_wad(os.path.join(tempfile.mkdtemp(prefix="psl_speed_"), "m.wad"))
    rng = np.random.default_rng(0)
    for workers in (0, 2):
        env = DoomVecEnv(32, wad, 1, 4, 4200, 2, num_workers=workers)
        env.reset()
        t0 = time.time()
        for _ in range(100):
            env.step(rng.integers(0, len(ACTIONS), 32))
        print(f"bare env, 32 games, workers={workers}: {3200 / (time.time() - t0):.0f} agent steps/s", flush=True)
        env.close()
    root = tempfile.mkdtemp(prefix="psl_speed_")
    for workers in (0, 2):
        cmd = [sys.executable, os.path.join(REPO, "psl.py"), "--env-id", "vizdoom", "--total-timesteps", "4096",
               "--doom-workers", str(workers), "--doom-eval-episodes", "1"]  # fmt: skip
        out, wall, cpu = run(cmd, root)
        print(f"training, workers={workers}: {out.strip().splitlines()[-1]}  (wall {wall:.0f} s, CPU {cpu:.0f} s)",
              flush=True)  # fmt: skip


def main(b: Bench) -> None:
    if b.speed:
        return speed()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = tempfile.mkdtemp(prefix="psl_doom_")
    rows, curves = [], {}
    for method in b.methods:
        for seed in range(1, b.seeds + 1):
            cwd = os.path.join(root, f"{method}_{seed}")
            os.makedirs(cwd)
            cmd = [sys.executable, os.path.join(REPO, "psl.py"), "--env-id", "vizdoom", "--method", method,
                   "--seed", str(seed), "--total-timesteps", str(b.total_timesteps), *b.extra.split()]  # fmt: skip
            out, wall, cpu = run(cmd, cwd)
            print(out.strip().splitlines()[-1], f"(wall {wall:.0f} s, CPU {cpu:.0f} s)", flush=True)
            (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
            s = read_scalars(Path(run_dir))
            game = [v for _, v in s["charts/episodic_game_reward"]]
            cost = [v for _, v in s["charts/episodic_cost"]]
            rows.append((method, seed, len(game), s["charts/violations"][-1][1], s["charts/violation_steps"][-1][1],
                         s["charts/safeguard_violations"][-1][1], np.mean(cost), np.mean(game[-50:]),
                         np.mean([v for _, v in s["eval/episodic_return"]]),
                         np.mean([v for _, v in s["eval/episodic_cost"]]), b.total_timesteps / wall, cpu))  # fmt: skip
            curves.setdefault(method, []).append((s["charts/violations"], s["charts/episodic_game_reward"]))
    print(f"\n--total-timesteps {b.total_timesteps} {b.extra}\n")
    print("| method | seed | training episodes | violations (common metric, per episode, summed) | violating steps | "
          "violations of the safeguard in force | violations per episode | game reward (last 50 episodes) | "
          "eval game reward | eval violations per episode | env steps/s (wall) | CPU s |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.0f} | {r[6]:.2f} | {r[7]:.3f} | "
              f"{r[8]:.3f} | {r[9]:.2f} | {r[10]:.0f} | {r[11]:.0f} |")
    if b.seeds > 1:  # over seeds: IQM [95% stratified-bootstrap CI] of the common metric and the game reward
        print("\n| method | seeds | violations (common metric) | game reward (last 50 episodes) | eval game reward |\n"
              "|---|---|---|---|---|")
        for method in curves:
            rs = np.array([r[3:] for r in rows if r[0] == method], dtype=float)
            cells = [fmt_interval(interval_estimates({"x": rs[:, j]}, reps=5000)["x"]) for j in (0, 4, 5)]
            print(f"| {method} | {len(rs)} | " + " | ".join(cells) + " |")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (method, runs) in enumerate(curves.items()):  # one seed: the run; several: IQM and 95% CI over seeds
        plot_band(axes[0], *interpolate_runs([viol for viol, _ in runs], 100), label=method, color=f"C{i}")
        smoothed = []
        for _, game in runs:
            steps, vals = zip(*game)
            w = min(50, len(vals))
            smoothed.append(list(zip(steps[w - 1 :], np.convolve(vals, np.ones(w) / w, mode="valid"))))
        plot_band(axes[1], *interpolate_runs(smoothed, 100), label=method, color=f"C{i}")
    axes[0].set(xlabel="env steps", ylabel="cumulative violations (lava w/o armor, boss w/o weapon)",
                title="ViZDoom, the common metric")  # fmt: skip
    axes[1].set(xlabel="env steps", ylabel="game reward per episode (50-episode mean)", title="ViZDoom, game reward")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(b.out, dpi=80)
    print(f"figure: {b.out}")


if __name__ == "__main__":
    main(tyro.cli(Bench))
