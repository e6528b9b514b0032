"""ActSafe with GP dynamics on SafePendulum against its two baselines: return and constraint violations per episode.

    nice -n 10 python benchmarks/actsafe_gp.py --workdir /tmp/actsafe_gp --seeds 1 2 3 4 5

Runs `actsafe.py --dynamics gp --env-id SafePendulum` as a user would (the defaults: 10 episodes, the first 5 for the
intrinsic reward, then the swing-up), one run at a time, for three methods and each seed:
- `actsafe`:       the defaults (beta 3, 10 particles; penalty lambda 1e6 on the max over particles of the cost);
- `unconstrained`: `--gp-lambda 0`, optimistic exploration and then the task without any penalty on the cost;
- `mean`:          `--gp-beta 0`, one particle on the GP's mean: neither pessimism nor hallucinated optimism.
Each run's episodes (return, cost, violating env steps, max |speed|, time upright) and CPU time go to
`<workdir>/results.json`; the figure goes to docs/img/actsafe_gp_episodes.png and a markdown table is printed.
It also plays reference episodes of the same planner (the task reward, the script's `mpc_episode`) on the TRUE
dynamics, with and without the constraint: what a perfect model would reach.
`--plot-only` redraws the figure and the table from results.json.

Each run uses torch's default number of threads (every core, the GP variant's default); runs go one after the other.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from conftest import read_scalars, run_dirs  # noqa: E402
from plot import fmt_interval, interval_estimates, plot_band  # noqa: E402  (benchmarks/plot.py)

METHODS = {"actsafe": [], "unconstrained": ["--gp-lambda", "0"], "mean": ["--gp-beta", "0"]}
BASE = ["--dynamics", "gp", "--env-id", "SafePendulum", "--eval-episodes", "0"]
TAGS = {"return": "charts/episodic_return", "cost": "charts/episodic_cost", "violations": "charts/episodic_violations",
        "max_speed": "charts/max_abs_speed", "upright": "charts/upright_fraction", "phase": "charts/phase",
        "plan_s": "charts/plan_seconds_per_step"}


def run_one(method: str, seed: int, workdir: Path, extra: list[str]) -> dict:
    cwd = workdir / f"{method}_{seed}"
    cwd.mkdir(parents=True, exist_ok=True)
    flags = [*BASE, "--seed", str(seed), "--exp-name", method, *METHODS[method], *extra]
    print("python actsafe.py " + " ".join(flags), flush=True)
    before, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    subprocess.run([sys.executable, str(REPO / "actsafe.py"), *flags], cwd=cwd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    scalars = read_scalars(run_dirs(cwd)[-1])
    out = {key: [v for _, v in scalars[tag]] for key, tag in TAGS.items()}
    out.update(method=method, seed=seed, wall_s=time.time() - wall,
               cpu_s=(after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime))
    print(f"  {method} seed {seed}: returns {np.round(out['return'], 1).tolist()}, violating steps "
          f"{[int(v) for v in out['violations']]}, CPU {out['cpu_s'] / 60:.1f} min", flush=True)
    return out


class TrueDynamics:
    """The simulator's own dynamics behind the planner's model interface (`predict` -> mean and zero variance)."""

    def __init__(self, action_repeat: int):
        from common.pendulum import DT, G, L, M, MAX_SPEED, MAX_TORQUE

        self.repeat, self.noise_var = action_repeat, 1e-6
        self.consts = DT, G, L, M, MAX_SPEED, MAX_TORQUE

    def predict(self, z):
        import torch

        dt, g, length, m, max_speed, max_torque = self.consts
        theta, speed, torque = torch.atan2(z[:, 1], z[:, 0]), z[:, 2], z[:, 3].clamp(-1, 1) * max_torque
        for _ in range(self.repeat):  # Gymnasium's integrator, as SafePendulumEnv
            speed = (speed + (3 * g / (2 * length) * torch.sin(theta) + 3.0 / (m * length**2) * torque) * dt).clamp(
                -max_speed, max_speed)
            theta = theta + speed * dt
        nxt = torch.stack([torch.cos(theta), torch.sin(theta), speed], -1)
        return nxt - z[:, :3], torch.zeros_like(nxt)


REFERENCE_PLANNERS = [(100, 15, 3), (1000, 15, 3), (100, 20, 5), (1000, 20, 5)]  # (samples, horizon, iterations)


def reference_episodes(seeds: list[int], planners: list[tuple[int, int, int]]) -> list[dict]:
    """The task planner with a perfect model (beta 0: one particle), constrained and unconstrained, for CEM sizes
    (samples, horizon, iterations): the default (100, 15, 3) and the notes' horizon and iterations (20, 5)."""
    import torch

    import actsafe
    from common.pendulum import make_safe_pendulum

    torch.set_num_threads(1)
    env = make_safe_pendulum()
    env.reset(seed=0)
    rows = []
    for lam in (1e6, 0.0):
        for num_samples, horizon, iterations in planners:
            for seed in seeds:
                args = actsafe.Args(dynamics="gp", env_id="SafePendulum", gp_beta=0.0, gp_lambda=lam,
                                    gp_samples=num_samples, gp_elites=num_samples // 10, gp_horizon=horizon,
                                    gp_iterations=iterations)
                ep = actsafe.mpc_episode(env, TrueDynamics(args.action_repeat), args, False,
                                         torch.Generator().manual_seed(seed), torch.device("cpu"))
                rows.append({"lambda": lam, "planner": [num_samples, horizon, iterations], "seed": seed,
                             "return": ep["return"], "violations": ep["violations"], "max_speed": ep["max_speed"],
                             "upright": ep["upright"]})
                print(f"  true dynamics, lambda {lam:g}, CEM {num_samples} samples, horizon {horizon}, {iterations} "
                      f"iterations, seed {seed}: return {ep['return']:.1f}, violating steps {ep['violations']}, "
                      f"max |speed| {ep['max_speed']:.2f}", flush=True)
    return rows


def cpu_minutes(runs: list[dict]) -> str:
    """Mean CPU minutes per run over the runs with a count (a run merged from elsewhere may have none)."""
    counted = [r["cpu_s"] for r in runs if r.get("cpu_s") is not None]
    return f"{np.mean(counted) / 60:.1f}" if counted else "n/a"


def table(results: list[dict], expansion: int) -> str:
    lines = ["| method | seeds | episodes with a violation | violating env steps (total) | max \\|speed\\| (rad/s) | "
             "return, expansion episodes | return, task episodes: mean; IQM [95% CI] | time upright, task episodes | CPU min / run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        viol = np.array([r["violations"] for r in rs])
        ret = np.array([r["return"] for r in rs])
        up = np.array([r["upright"] for r in rs])
        speed = np.array([r["max_speed"] for r in rs])
        task_ret = ret[:, expansion:].mean(1)
        lines.append(f"| {method} | {len(rs)} | {(viol > 0).sum()}/{viol.size} | {int(viol.sum())} | "
                     f"{speed.max():.2f} | {ret[:, :expansion].mean():.0f} | {task_ret.mean():.0f}; IQM "
                     f"{fmt_interval(interval_estimates({'r': task_ret}, reps=5000)['r'])} "
                     f"(per seed {', '.join(f'{x:.0f}' for x in task_ret)}) | {100 * up[:, expansion:].mean():.0f}% | "
                     f"{cpu_minutes(rs)} |")
    return "\n".join(lines)


def plot(results: list[dict], reference: list[dict], expansion: int, limit: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    colors = {"actsafe": "tab:blue", "unconstrained": "tab:red", "mean": "tab:green"}
    for method, color in colors.items():
        rs = [r for r in results if r["method"] == method]
        if not rs:
            continue
        for i, (key, ax) in enumerate(zip(("return", "violations", "max_speed"), axes)):
            values = np.array([r[key] for r in rs])
            episodes = np.arange(1, values.shape[1] + 1)
            for v in values:
                ax.plot(episodes, v, color=color, alpha=0.15, lw=1)
            plot_band(ax, episodes, values, label=method, color=color, lw=2, marker="o")  # IQM and its 95% CI
    safe_ref = [r["return"] for r in reference if r["lambda"] > 0 and tuple(r["planner"]) == REFERENCE_PLANNERS[0]]
    if safe_ref:  # the script's default CEM sizes on the true dynamics
        axes[0].axhline(np.mean(safe_ref), color="k", ls="--", lw=1, label="planner on the true dynamics, constrained")
    axes[0].set_title("episode return (100 env steps)")
    axes[1].set_title("violating env steps per episode (|speed| > 5.9)")
    axes[2].axhline(limit, color="k", ls=":", lw=1, label="speed limit")
    axes[2].set_title("max |angular speed| in the episode")
    for ax in axes:
        ax.set_xlabel("episode")
        ax.axvline(expansion + 0.5, color="grey", ls=":", lw=1)  # expansion | task
        ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/actsafe_gp"), help="where the runs are written")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--no-reference", action="store_true", help="skip the true-dynamics reference episodes")
    p.add_argument("--reference-only", action="store_true", help="only the true-dynamics reference episodes")
    p.add_argument("--plot-only", action="store_true", help="redraw from <workdir>/results.json")
    p.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "actsafe_gp_episodes.png")
    p.add_argument("extra", nargs="*", help="more actsafe.py flags for every run (after --)")
    cli = p.parse_args()
    cli.workdir.mkdir(parents=True, exist_ok=True)
    store = cli.workdir / "results.json"
    saved = json.loads(store.read_text()) if store.exists() else {"runs": [], "reference": []}
    if not cli.plot_only:
        if not cli.no_reference:
            saved["reference"] = reference_episodes(cli.seeds[:3], REFERENCE_PLANNERS)
            store.write_text(json.dumps(saved))
        for seed in cli.seeds if not cli.reference_only else []:  # seed-major: an interrupted run keeps whole seeds
            for method in cli.methods:
                saved["runs"] = [r for r in saved["runs"] if (r["method"], r["seed"]) != (method, seed)]
                saved["runs"].append(run_one(method, seed, cli.workdir, cli.extra))
                store.write_text(json.dumps(saved))
    import actsafe
    from common.pendulum import SPEED_LIMIT

    expansion = actsafe.Args.gp_expansion_episodes
    plot(saved["runs"], saved["reference"], expansion, SPEED_LIMIT, cli.out)
    print(table(saved["runs"], expansion))
    print("| planner on the true dynamics | CEM samples, horizon, iterations | returns (seeds) | violating env steps | "
          "max \\|speed\\| |")
    print("|---|---|---|---|---|")
    for lam in (1e6, 0.0):
        rows = [r for r in saved["reference"] if r["lambda"] == lam]
        for planner in sorted({tuple(r["planner"]) for r in rows}):
            sel = [r for r in rows if tuple(r["planner"]) == planner]
            name = "constrained (lambda 1e6)" if lam else "unconstrained (lambda 0)"
            returns = ", ".join(f"{r['return']:.0f}" for r in sel)
            violations = ", ".join(str(r["violations"]) for r in sel)
            print(f"| {name} | {', '.join(map(str, planner))} | {returns} | {violations} | "
                  f"{max(r['max_speed'] for r in sel):.2f} |")
    print(f"figure: {cli.out}")
