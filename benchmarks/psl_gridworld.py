"""Benchmark: the Minecraft gridworld, 4 methods x N seeds, V(s0) and training violations (paper fig. 5).

    nice -n 10 python benchmarks/psl_gridworld.py                      # defaults of psl.py, 10 seeds
    nice -n 10 python benchmarks/psl_gridworld.py --authors-update     # the authors' Q update, for comparison

Writes a markdown table to stdout and the figure docs/img/psl_gridworld[_authors].png.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import psl  # noqa: E402


@dataclass
class Bench:
    seeds: int = 10
    """number of seeds per method"""
    authors_update: bool = False
    """pass --authors-update to psl.py (the authors' Q-update on the greedy action)"""
    num_envs: int = 32
    """psl.py --num-envs"""
    progression: str = "converge"
    """psl.py --progression"""
    out: str = "docs/img/psl_gridworld.png"
    """figure path (the suffix _authors is added with --authors-update)"""


def main(b: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = {}
    root = tempfile.mkdtemp(prefix="psl_bench_")
    for method in psl.METHODS:
        for seed in range(1, b.seeds + 1):
            args = psl.Args(method=method, seed=seed, authors_update=b.authors_update, num_envs=b.num_envs,
                            progression=b.progression)  # fmt: skip
            psl.seed_everything(seed)
            logger = psl.Logger(f"{method}_{seed}", args, root=root, quiet=True)
            t0 = time.time()
            r = psl.run_gridworld(args, logger)
            logger.close()
            r["wall"] = time.time() - t0
            results.setdefault(method, []).append(r)
    print(f"\n| method | V(s0) final | V(s0) mean over the last 500 episodes | training violations | "
          f"test success | wall s per run |\n|---|---|---|---|---|---|")
    for method, rs in results.items():
        f = lambda xs: f"{np.mean(xs):.3f} ± {np.std(xs):.3f}"  # noqa: E731
        print(f"| {method} | {f([r['V_s0'] for r in rs])} | {f([r['V_s0_curve'][-500:].mean() for r in rs])} | "
              f"{np.mean([r['training_violations'] for r in rs]):.0f} ± {np.std([r['training_violations'] for r in rs]):.0f} | "
              f"{100 * np.mean([r['test_success'] for r in rs]):.1f}% | {np.mean([r['wall'] for r in rs]):.1f} |")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, rs in results.items():
        n = min(len(r["V_s0_curve"]) for r in rs)
        v = np.stack([np.convolve(r["V_s0_curve"][:n], np.ones(50) / 50, mode="valid") for r in rs])
        axes[0].plot(v.mean(0), label=method)
        axes[0].fill_between(np.arange(v.shape[1]), v.mean(0) - v.std(0), v.mean(0) + v.std(0), alpha=0.2)
        n = min(len(r["violation_curve"]) for r in rs)
        c = np.stack([r["violation_curve"][:n] for r in rs])
        axes[1].plot(c.mean(0), label=method)
        axes[1].fill_between(np.arange(n), c.mean(0) - c.std(0), c.mean(0) + c.std(0), alpha=0.2)
    title = "authors' Q update" if b.authors_update else "Q-learning on the executed action"
    axes[0].set(xlabel="episode", ylabel="V(s0) (50-episode moving average)", title=f"V(s0), {title}")
    axes[1].set(xlabel="episode", ylabel="cumulative training violations", title=f"{b.seeds} seeds, mean ± std")
    axes[0].legend()
    out = b.out.replace(".png", "_authors.png") if b.authors_update else b.out
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(f"figure: {out}")
    print("args:", dataclasses.asdict(b))


if __name__ == "__main__":
    main(tyro.cli(Bench))
