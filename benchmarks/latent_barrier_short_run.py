"""A short, CPU-sized latent_barrier.py run on SafetyPointGoal1 from pixels, and a figure of the barrier's separation.

    nice -n 10 python benchmarks/latent_barrier_short_run.py --workdir /tmp/latent_barrier_short

Runs `latent_barrier.py` as a user would, with the default RSSM (h 200, z 30, hidden 200) and barrier/actor/value
sizes but a smaller conv net (depth 16), shorter sequences and imagination (8 x 32 rows, horizon 15), a reduced
schedule (1 env, 14k env steps, 4k of them random, 30 updates every 500 steps: 630 updates) and a label threshold of
0.1 instead of 0.01: with a few hundred updates the MSE-fitted cost head is not sharp enough for 0.01 (a first run
with 0.01 labelled 97-100 % of the imagined states unsafe) nor does it reach 0.5 anywhere (a run with 0.5 labelled
none unsafe); see docs/latent_barrier.md. A run with these defaults (ETA 21 min more at 4,000 steps on 2 shared
cores) was cut off at 5,500 env steps and has not been completed. --cost-threshold, --train-steps and
--total-timesteps reproduce the 0.5 run (the 0.01 run used --train-every 1000, an earlier version of these flags;
its command is in the doc). Then plots into docs/img/latent_barrier_short_run.png (or --out):
- in imagination (labels from the cost head): the fraction of safe states with B <= 0, of unsafe states with B >= 0,
  and of transitions violating B(z_t) - B(z_{t-1}) + alpha B(z_t) >= 0;
- on the replayed batch's REAL posterior latents labelled by the REAL cost: the same two misclassified fractions
  (a check the barrier never trains on);
- the three barrier loss terms, the fraction of imagined states labelled unsafe and the model's cost loss;
- the training episodes' return and cost.
This is NOT a learning benchmark (the paper trains for 1M steps with 1000 updates per 1000 steps); it shows whether
the barrier learns to separate the labelled latents on a CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from conftest import read_scalars, run_dirs  # noqa: E402
from plot import plot_band  # noqa: E402  (benchmarks/plot.py: one run is drawn as its line)

FLAGS = ["--env-id", "SafetyPointGoal1", "--num-envs", "1", "--warmup-steps", "4000", "--train-every", "500",
         "--batch-size", "8", "--sequence-length", "32", "--imag-horizon", "15", "--cnn-depth", "16",
         "--eval-episodes", "0", "--log-every", "2000"]


def plot(scalars: dict, out: Path, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(23, 3.9))

    def line(ax, tag, label=None, **kw):
        if tag in scalars:
            steps, values = zip(*scalars[tag])
            plot_band(ax, steps, [values], label=label or tag.split("/")[-1], marker=".", **kw)

    line(axes[0], "charts/safe_misclassified", "safe states with B <= 0")
    line(axes[0], "charts/unsafe_misclassified", "unsafe states with B >= 0")
    line(axes[0], "charts/violation_fraction", "transitions violating the condition")
    axes[0].set_title(f"imagined latents (labels: cost head > {threshold:g})")
    line(axes[1], "charts/real_safe_misclassified", "safe states with B <= 0")
    line(axes[1], "charts/real_unsafe_misclassified", "unsafe states with B >= 0")
    line(axes[1], "charts/real_unsafe_fraction", "fraction unsafe (real cost)", ls="--")
    axes[1].set_title(f"real posterior latents (labels: real cost > {threshold:g})")
    for tag in ("losses/barrier_safe", "losses/barrier_unsafe", "losses/barrier_derivative"):
        line(axes[2], tag)
    axes[2].set_yscale("symlog", linthresh=1e-4)
    axes[2].set_title("barrier loss terms (eq. 4)")
    line(axes[3], "charts/unsafe_fraction", "imagined states labelled unsafe")
    ax3b = axes[3].twinx()
    line(ax3b, "losses/cost_loss", "model cost loss (right)", color="tab:red")
    axes[3].set_title("labels and the cost head")
    line(axes[4], "charts/episodic_return", "return")
    line(axes[4], "charts/episodic_cost", "cost")
    axes[4].set_title("training episodes (1000 env steps)")
    for ax in axes:
        ax.set_xlabel("environment steps")
        ax.axvline(4000, color="grey", ls=":", lw=1)  # the end of the random warm-up
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/latent_barrier_short"), help="where runs/ is written")
    p.add_argument("--plot-only", action="store_true", help="only plot the latest run found in --workdir")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "latent_barrier_short_run.png")
    p.add_argument("--cost-threshold", type=float, default=0.1)
    p.add_argument("--train-steps", type=int, default=30, help="updates every 500 env steps")
    p.add_argument("--total-timesteps", type=int, default=14000)
    cli = p.parse_args()
    FLAGS += ["--cost-threshold", str(cli.cost_threshold), "--train-steps", str(cli.train_steps),
              "--total-timesteps", str(cli.total_timesteps)]
    cli.workdir.mkdir(parents=True, exist_ok=True)
    if not cli.plot_only:
        print("python latent_barrier.py " + " ".join(FLAGS), flush=True)
        subprocess.run([sys.executable, str(REPO / "latent_barrier.py"), *FLAGS], cwd=cli.workdir, check=True)
    run = run_dirs(cli.workdir)[-1]
    scalars = read_scalars(run)
    plot(scalars, cli.out, cli.cost_threshold)
    for tag in ["charts/safe_misclassified", "charts/unsafe_misclassified", "charts/violation_fraction",
                "charts/real_safe_misclassified", "charts/real_unsafe_misclassified", "charts/real_unsafe_fraction",
                "charts/unsafe_fraction", "losses/barrier_safe", "losses/barrier_unsafe", "losses/barrier_derivative",
                "losses/image_loss", "losses/cost_loss", "losses/kl", "charts/imagined_cost", "charts/real_cost",
                "charts/episodic_return", "charts/episodic_cost", "charts/SPS", "charts/updates_per_s",
                "eval/episodic_return", "eval/episodic_cost"]:
        if tag in scalars:
            values = [v for _, v in scalars[tag]]
            print(f"{tag}: first {values[0]:.4g} (step {scalars[tag][0][0]}), last {values[-1]:.4g} "
                  f"(step {scalars[tag][-1][0]}), min {min(values):.4g}, max {max(values):.4g}, n={len(values)}")
    print(f"figure: {cli.out}")
