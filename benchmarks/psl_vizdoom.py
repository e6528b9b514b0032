"""Benchmark: ViZDoom, the four methods with a small CPU budget: violations, game reward, env steps/s.

    nice -n 10 python benchmarks/psl_vizdoom.py --total-timesteps 30000 --seeds 1

Runs psl.py as a user does (one process per run, one after the other), reads the TensorBoard scalars, prints a
markdown table and writes docs/img/psl_vizdoom.png.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import tyro

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(REPO, "tests"))
from conftest import read_scalars  # noqa: E402


@dataclass
class Bench:
    total_timesteps: int = 30000
    """psl.py --total-timesteps per run"""
    seeds: int = 1
    """seeds per method"""
    methods: list[str] = field(default_factory=lambda: ["psl", "zero-shot", "intrinsic-fear", "baseline"])
    """methods to run"""
    extra: str = ""
    """extra psl.py flags, space separated"""
    out: str = "docs/img/psl_vizdoom.png"
    """figure path"""


def main(b: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    root = tempfile.mkdtemp(prefix="psl_doom_")
    rows, curves = [], {}
    for method in b.methods:
        for seed in range(1, b.seeds + 1):
            cwd = os.path.join(root, f"{method}_{seed}")
            os.makedirs(cwd)
            cmd = [sys.executable, os.path.join(REPO, "psl.py"), "--env-id", "vizdoom", "--method", method,
                   "--seed", str(seed), "--total-timesteps", str(b.total_timesteps), *b.extra.split()]  # fmt: skip
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            print(proc.stdout.strip().splitlines()[-1], flush=True)
            (run_dir,) = glob.glob(os.path.join(cwd, "runs", "*"))
            s = read_scalars(Path(run_dir))
            game = [v for _, v in s["charts/episodic_game_reward"]]
            rows.append((method, seed, s["charts/violations"][-1][1], len(game), np.mean(game[-20:]),
                         np.mean([v for _, v in s["eval/episodic_return"]]),
                         np.mean([v for _, v in s["eval/episodic_cost"]]), s["charts/SPS"][-1][1]))  # fmt: skip
            curves.setdefault(method, []).append((s["charts/violations"], s["charts/episodic_game_reward"]))
    print("\n| method | seed | training violations | training episodes | game reward (last 20 episodes) | "
          "eval game reward | eval violation rate | env steps/s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.2f} | {r[7]:.0f} |")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, runs in curves.items():
        for k, (viol, game) in enumerate(runs):
            axes[0].plot(*zip(*viol), label=method if k == 0 else None)
            steps, vals = zip(*game)
            w = min(20, len(vals))
            axes[1].plot(steps[w - 1 :], np.convolve(vals, np.ones(w) / w, mode="valid"), label=method if k == 0 else None)
    axes[0].set(xlabel="env steps", ylabel="cumulative training violations", title="ViZDoom, violations")
    axes[1].set(xlabel="env steps", ylabel="game reward per episode (20-episode mean)", title="ViZDoom, game reward")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(b.out, dpi=90)
    print(f"figure: {b.out}")


if __name__ == "__main__":
    main(tyro.cli(Bench))
