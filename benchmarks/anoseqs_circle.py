"""Benchmark: AnoSeqs vs plain TD3 vs TD3-Lag on SafetyPointCircle1, same budget and seeds.

One source run (stage 1 + 2, seed 1) trains the detector once; every AnoSeqs target run reuses it
(`--stage 3 --source-run`). Then, per seed: AnoSeqs, TD3 (`--penalty-coef 0`), TD3-Lag (`--lagrangian`).
Writes docs/img/anoseqs_circle.png and prints a markdown table (numbers for docs/anoseqs.md).

    nice -n 10 python benchmarks/anoseqs_circle.py                      # defaults below
    nice -n 10 python benchmarks/anoseqs_circle.py --steps 20000 --seeds 1 2 3
    python benchmarks/anoseqs_circle.py --report-only --workdir bench_anoseqs   # re-plot finished runs
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from conftest import read_scalars  # noqa: E402

METHODS = {
    "AnoSeqs": ["--exp-name", "anoseqs"],
    "TD3": ["--exp-name", "td3", "--penalty-coef", "0"],
    "TD3-Lag": ["--exp-name", "td3_lag", "--penalty-coef", "0", "--lagrangian"],
}


def run(cmd: list[str], cwd: Path, log: Path, timeout: int) -> float:
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    return time.time() - t0


def newest_run(cwd: Path, pattern: str) -> Path:
    runs = sorted(glob.glob(str(cwd / "runs" / pattern)), key=os.path.getmtime)
    if not runs:
        raise SystemExit(f"no run matching {pattern} under {cwd / 'runs'}")
    return Path(runs[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="SafetyPointCircle1")
    p.add_argument("--steps", type=int, default=20_000, help="target steps of every method")
    p.add_argument("--source-steps", type=int, default=20_000, help="source steps of stage 1")
    p.add_argument("--detector-steps", type=int, default=2_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--workdir", default="bench_anoseqs")
    p.add_argument("--extra", default="--hidden-size 64 --batch-size 128 --learning-starts 2000 --num-envs 2 "
                                      "--log-every 1000 --eval-episodes 3 --no-cuda",
                   help="flags passed to every run")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    cwd = (REPO / a.workdir).resolve()
    cwd.mkdir(exist_ok=True)
    script = str(REPO / "anoseqs.py")
    common = ["--env-id", a.env_id, "--total-timesteps", str(a.steps), *a.extra.split()]
    index_file = cwd / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}

    if not a.report_only:
        if "source" not in index:
            wall = run([sys.executable, script, *common, "--stage", "1", "--source-timesteps", str(a.source_steps),
                        "--exp-name", "source"], cwd, cwd / "source.log", a.timeout)
            src = newest_run(cwd, f"{a.env_id}__source__*")
            wall2 = run([sys.executable, script, *common, "--stage", "2", "--source-run", str(src),
                         "--detector-steps", str(a.detector_steps), "--exp-name", "detector"], cwd,
                        cwd / "detector.log", a.timeout)
            index["source"] = {"stage1": str(src), "stage1_wall_s": wall,
                               "detector": str(newest_run(cwd, f"{a.env_id}__detector__*")), "stage2_wall_s": wall2}
            index_file.write_text(json.dumps(index, indent=1))
        for seed in a.seeds:
            for method, flags in METHODS.items():
                key = f"{method}/{seed}"
                if key in index:
                    continue
                extra = ["--stage", "3", "--source-run", index["source"]["detector"]] if method == "AnoSeqs" else []
                wall = run([sys.executable, script, *common, *flags, *extra, "--seed", str(seed)], cwd,
                           cwd / f"{method}_{seed}.log", a.timeout)
                index[key] = {"run": str(newest_run(cwd, f"{a.env_id}__{flags[1]}__{seed}__*")), "wall_s": wall}
                index_file.write_text(json.dumps(index, indent=1))
    report(index, a)


def detector_histogram(index: dict, a, plt) -> None:
    """Scores of held-out safe vs unsafe source windows (the split of stage 2, seed 1), as a histogram."""
    import torch

    sys.path.insert(0, str(REPO))
    import anoseqs

    model, tau, _ = anoseqs.load_detector(os.path.join(index["source"]["detector"], "detector.pt"), torch.device("cpu"))
    with np.load(os.path.join(index["source"]["stage1"], "source_data.npz")) as f:
        d = {k: f[k] for k in ("obs", "cost", "terminal", "episode_start")}
    ends, safe = anoseqs.label_windows(d["cost"], d["terminal"], d["episode_start"], model.window)
    held = anoseqs.split_episodes(d["episode_start"], ends, 0.2, np.random.default_rng(1))  # as stage 2 with --seed 1
    obs = torch.as_tensor(d["obs"])
    hold = anoseqs.score_in_batches(model, obs, anoseqs.window_indices(d["episode_start"], ends[safe & held], model.window))
    train = anoseqs.score_in_batches(model, obs, anoseqs.window_indices(d["episode_start"], ends[safe & ~held], model.window))
    bad = anoseqs.score_in_batches(model, obs, anoseqs.window_indices(d["episode_start"], ends[~safe], model.window))
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, max(hold.max(), bad.max(), train.max()), 60)
    for scores, label in ((train, "safe, training"), (hold, "safe, held out"), (bad, "unsafe (cost or termination)")):
        ax.hist(scores, bins=bins, alpha=0.5, density=True, label=f"{label} (n={len(scores)})")
    ax.axvline(tau, color="k", ls="--", label=f"tau = {tau:.4f}")
    ax.set_xlabel("anomaly score (window MAE)")
    ax.set_title(f"detector on the source windows: ROC AUC {anoseqs.roc_auc(hold, bad):.3f}")
    ax.legend()
    fig.tight_layout()
    out = REPO / "docs" / "img" / "anoseqs_detector_scores.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}; mean score train {train.mean():.4f}, held-out safe {hold.mean():.4f}, unsafe {bad.mean():.4f}")


def report(index: dict, a) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    det = read_scalars(Path(index["source"]["detector"]))
    print(f"\ndetector (stage 2): ROC AUC held-out safe vs unsafe source windows = "
          f"{det['detector/charts/detector_roc_auc'][-1][1]:.3f}, tau = {det['detector/charts/anomaly_threshold'][-1][1]:.4f}, "
          f"unsafe windows above tau = {det['detector/charts/unsafe_flagged_fraction'][-1][1]:.1%}; "
          f"stage 1 {index['source']['stage1_wall_s']:.0f}s, stage 2 {index['source']['stage2_wall_s']:.0f}s")
    detector_histogram(index, a, plt)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    rows = []
    for method in METHODS:
        runs = [(k, v) for k, v in index.items() if k.startswith(method + "/")]
        if not runs:
            continue
        stats = {k: [] for k in ("cost_rate", "ret", "cost", "eval_ret", "eval_cost", "sps", "wall", "score_frac",
                                 "target_auc", "penalised")}
        for key, info in runs:
            s = read_scalars(Path(info["run"]))
            steps, rate = zip(*s["charts/cost_rate"])
            axes[0].plot(steps, rate, color=f"C{list(METHODS).index(method)}", alpha=0.8,
                         label=method if key.endswith("/" + str(a.seeds[0])) else None)
            ep = s["charts/episodic_return"]
            axes[1].plot(*zip(*ep), color=f"C{list(METHODS).index(method)}", alpha=0.8)
            axes[2].plot(*zip(*s["charts/episodic_cost"]), color=f"C{list(METHODS).index(method)}", alpha=0.8)
            stats["cost_rate"].append(rate[-1])
            stats["ret"].append(np.mean([v for _, v in ep[-4:]]))
            stats["cost"].append(np.mean([v for _, v in s["charts/episodic_cost"][-4:]]))
            stats["eval_ret"].append(np.mean([v for _, v in s["eval/episodic_return"]]))
            stats["eval_cost"].append(np.mean([v for _, v in s["eval/episodic_cost"]]))
            stats["sps"].append(s["charts/SPS"][-1][1])
            stats["wall"].append(info["wall_s"])
            if "charts/scoring_time_fraction" in s:
                stats["score_frac"].append(s["charts/scoring_time_fraction"][-1][1])
                stats["target_auc"].append(s["charts/target_roc_auc"][-1][1])
                stats["penalised"].append(np.mean([v for _, v in s["charts/penalised_fraction"]]))

        def f(name, fmt="{:.3f}"):
            v = stats[name]
            return (fmt.format(np.mean(v)) + (" ± " + fmt.format(np.std(v)) if len(v) > 1 else "")) if v else "-"

        rows.append(f"| {method} | {len(runs)} | {f('cost_rate')} | {f('ret', '{:.1f}')} | {f('cost', '{:.0f}')} | "
                    f"{f('eval_ret', '{:.1f}')} | {f('eval_cost', '{:.0f}')} | {f('sps', '{:.0f}')} | "
                    f"{f('score_frac', '{:.3f}')} | {f('target_auc')} | {f('penalised')} |")
    for ax, title in zip(axes, ["charts/cost_rate (training)", "charts/episodic_return", "charts/episodic_cost"]):
        ax.set_title(title)
        ax.set_xlabel("environment steps")
    axes[0].legend()
    fig.suptitle(f"{a.env_id}: AnoSeqs vs TD3 vs TD3-Lag, seeds {a.seeds} (one line per seed)")
    fig.tight_layout()
    out = REPO / "docs" / "img" / "anoseqs_circle.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"\nwrote {out}\n")
    print("| method | seeds | final cost rate | return (last 4 ep.) | episodic cost (last 4 ep.) | eval return | "
          "eval cost | SPS | scoring time fraction | target ROC AUC | penalised fraction |")
    print("|" + "---|" * 11)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
