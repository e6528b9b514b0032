"""A short, CPU-sized ActSafe run on SafetyPointGoal1 from pixels, and a figure of what it logged.

    nice -n 10 python benchmarks/actsafe_short_run.py --workdir /tmp/actsafe_short

Runs `actsafe.py` as a user would, with the default networks but a reduced schedule (2 envs, 16k env steps,
10 updates every 1k steps on 8 x 32 sequences, expansion phase until 8k), then plots the world-model losses,
the imagined epistemic uncertainty, the training episodes' return and cost, and the imagined vs real cost per
step into docs/img/actsafe_short_run.png. This is NOT a learning benchmark (the paper trains for 5M steps with
100 updates per 1k steps); it shows the mechanics on a CPU: whether the model's losses fall, how the
uncertainty that drives the expansion phase evolves, and the imagined vs real cost.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import read_scalars, run_dirs  # noqa: E402

FLAGS = ["--env-id", "SafetyPointGoal1", "--num-envs", "2", "--total-timesteps", "16000", "--warmup-steps", "2000",
         "--exploration-steps", "8000", "--train-every", "1000", "--train-steps", "10", "--batch-size", "8",
         "--sequence-length", "32", "--eval-episodes", "1", "--log-every", "2000"]


def plot(scalars: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))

    def line(ax, tag, label=None, **kw):
        if tag in scalars:
            steps, values = zip(*scalars[tag])
            ax.plot(steps, values, label=label or tag, **kw)

    line(axes[0], "losses/image_loss")
    ax0b = axes[0].twinx()
    line(ax0b, "losses/kl", color="tab:orange")
    axes[0].set_title("world model: image NLL (left), KL (right)")
    line(axes[1], "charts/explore_uncertainty_mean", "exploration actor's imagination")
    line(axes[1], "charts/uncertainty_mean", "task actor's imagination")
    axes[1].set_title("mean epistemic uncertainty u_t")
    line(axes[2], "charts/episodic_return", "return", marker="o")
    line(axes[2], "charts/episodic_cost", "cost", marker="x")
    axes[2].set_title("training episodes (1000 env steps)")
    line(axes[3], "charts/imagined_cost", "imagined (model, task actor)")
    line(axes[3], "charts/real_cost", "real (replayed batch)")
    axes[3].set_title("cost per agent step")
    for ax in axes:
        ax.set_xlabel("environment steps")
        ax.axvline(8000, color="grey", ls=":", lw=1)  # the switch from expansion to the task policy
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/actsafe_short"), help="where runs/ is written")
    p.add_argument("--plot-only", action="store_true", help="only plot the latest run found in --workdir")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "actsafe_short_run.png")
    cli = p.parse_args()
    cli.workdir.mkdir(parents=True, exist_ok=True)
    if not cli.plot_only:
        print("python actsafe.py " + " ".join(FLAGS), flush=True)
        subprocess.run([sys.executable, str(REPO / "actsafe.py"), *FLAGS], cwd=cli.workdir, check=True)
    run = run_dirs(cli.workdir)[-1]
    scalars = read_scalars(run)
    plot(scalars, cli.out)
    for tag in ["losses/image_loss", "losses/kl", "charts/explore_uncertainty_mean", "charts/uncertainty_mean",
                "charts/episodic_return", "charts/episodic_cost", "charts/imagined_cost", "charts/real_cost",
                "charts/SPS", "charts/updates_per_s", "eval/episodic_return", "eval/episodic_cost"]:
        if tag in scalars:
            values = scalars[tag]
            print(f"{tag}: first {values[0][1]:.4g} (step {values[0][0]}), last {values[-1][1]:.4g} "
                  f"(step {values[-1][0]}), n={len(values)}")
    print(f"figure: {cli.out}")
