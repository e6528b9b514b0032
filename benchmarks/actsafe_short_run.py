"""A short, CPU-sized ActSafe run on SafetyPointGoal1 from pixels, and a figure of what it logged.

    nice -n 10 python benchmarks/actsafe_short_run.py --workdir /tmp/actsafe_short

Runs `actsafe.py` as a user would, with the default RSSM (deter 200, stoch 60, hidden 200, 5 whole-prior members:
the sizes that set u_t's scale) but smaller conv nets (depth 16) and MLPs (200 units) and a reduced schedule
(2 envs, 16k env steps, 10 updates every 1k steps on 8 x 32 sequences, expansion phase until 12k), then plots the
world-model losses, the imagined epistemic uncertainty under the exploration and the task policy, the training
episodes' return and cost, and the imagined vs real cost per step into docs/img/actsafe_short_run.png. This is NOT
a learning benchmark (the paper trains for 5M steps with 100 updates per 1k steps); it shows the mechanics on a
CPU: whether the model's losses fall, the order of magnitude of u_t during expansion, and whether the exploration
policy finds more uncertain imagined states than the task policy (the optimism doing something).
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

SWITCH = 12_000  # the end of the expansion phase
FLAGS = ["--env-id", "SafetyPointGoal1", "--num-envs", "2", "--total-timesteps", "16000", "--warmup-steps", "2000",
         "--exploration-steps", str(SWITCH), "--train-every", "1000", "--train-steps", "10", "--batch-size", "8",
         "--sequence-length", "32", "--cnn-depth", "16", "--head-units", "200", "--actor-units", "200",
         "--critic-units", "200", "--eval-episodes", "1", "--log-every", "2000"]


def plot(scalars: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))

    def line(ax, tag, label=None, **kw):
        if tag in scalars:
            steps, values = zip(*scalars[tag])
            plot_band(ax, steps, [values], label=label or tag, **kw)

    line(axes[0], "losses/image_loss")
    ax0b = axes[0].twinx()
    line(ax0b, "losses/kl", color="tab:orange")
    axes[0].set_title("world model: image NLL (left), KL (right)")
    line(axes[1], "charts/explore_uncertainty_mean", "exploration actor's imagination")
    line(axes[1], "charts/uncertainty_mean", "task actor's imagination")
    axes[1].set_title("mean epistemic uncertainty u_t in imagination")
    axes[1].set_yscale("log")
    line(axes[2], "charts/episodic_return", "return", marker="o")
    line(axes[2], "charts/episodic_cost", "cost", marker="x")
    axes[2].set_title("training episodes (1000 env steps)")
    line(axes[3], "charts/imagined_cost", "imagined (model, task actor)")
    line(axes[3], "charts/real_cost", "real (replayed batch)")
    axes[3].set_title("cost per agent step")
    for ax in axes:
        ax.set_xlabel("environment steps")
        ax.axvline(SWITCH, color="grey", ls=":", lw=1)  # the switch from expansion to the task policy
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
    explore, task = dict(scalars.get("charts/explore_uncertainty_mean", [])), dict(scalars.get("charts/uncertainty_mean", []))
    both = sorted(set(explore) & set(task))
    if both:
        ratios = [explore[k] / task[k] for k in both]
        print(f"expansion rounds: {len(both)}; explore/task u_t ratio: median {sorted(ratios)[len(ratios) // 2]:.3g}, "
              f"rounds with explore > task: {sum(r > 1 for r in ratios)}/{len(ratios)}; "
              f"last half: {sum(r > 1 for r in ratios[len(ratios) // 2:])}/{len(ratios) - len(ratios) // 2}")
    for tag in ["losses/image_loss", "losses/kl", "charts/explore_uncertainty_mean", "charts/uncertainty_mean",
                "charts/episodic_return", "charts/episodic_cost", "charts/imagined_cost", "charts/real_cost",
                "charts/SPS", "charts/updates_per_s", "eval/episodic_return", "eval/episodic_cost"]:
        if tag in scalars:
            values = scalars[tag]
            print(f"{tag}: first {values[0][1]:.4g} (step {values[0][0]}), last {values[-1][1]:.4g} "
                  f"(step {values[-1][0]}), n={len(values)}")
    print(f"figure: {cli.out}")
