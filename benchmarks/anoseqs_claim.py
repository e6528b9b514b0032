"""Benchmark: the paper's claim (lower cost rate at a competitive return) on one Safety-Gymnasium task.

AnoSeqs (the script's default shaping, and the binary form r - 0.5 1[s > threshold], i.e. the oracle's shaping with
the detector's flag in place of the true cost) vs TD3 vs TD3-Lag vs oracle shaping (r - 0.5 c with the true cost),
same budget and seeds.
One source run (stage 1, source seed 10001) and one detector (stage 2) serve every AnoSeqs target run
(`--stage 3 --source-run`); a second detector trained with the warm-up windows (`--detector-windows all`)
is evaluated only. Every run's wall and CPU time is recorded (the CPU budget of a shared machine).

    nice -n 10 python benchmarks/anoseqs_claim.py --phase source          # stage 1 + 2, the detector table
    nice -n 10 python benchmarks/anoseqs_claim.py --phase target          # 5 methods x seeds (resumes)
    python benchmarks/anoseqs_claim.py --report-only                      # table + docs/img/anoseqs_claim*.png

Writes docs/img/anoseqs_claim.png, docs/img/anoseqs_detector_scores.png and prints markdown tables.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from conftest import read_scalars  # noqa: E402
from plot import fmt_interval, interval_estimates, plot_band  # noqa: E402  (benchmarks/plot.py)

METHODS = {
    "AnoSeqs": ["--exp-name", "anoseqs"],  # the script's defaults: r - 1.0 s 1[s > threshold]
    "AnoSeqs binary 0.5": ["--exp-name", "anoseqs_binary", "--penalty-form", "binary", "--penalty-coef", "0.5"],
    "TD3": ["--exp-name", "td3", "--method", "td3"],
    "TD3-Lag": ["--exp-name", "td3_lag", "--method", "td3-lag"],
    "Oracle shaping": ["--exp-name", "oracle", "--method", "oracle-shaping"],
}


def run(cmd: list[str], cwd: Path, log: Path, timeout: int) -> dict:
    """Run a command; its wall time and the CPU time (user + sys) it used."""
    print("$", " ".join(cmd), flush=True)
    before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout,
                              env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"  {time.time() - t0:.0f}s wall, {cpu:.0f}s CPU", flush=True)
    return {"wall_s": time.time() - t0, "cpu_s": cpu}


def newest_run(cwd: Path, pattern: str) -> Path:
    runs = sorted(glob.glob(str(cwd / "runs" / pattern)), key=os.path.getmtime)
    if not runs:
        raise SystemExit(f"no run matching {pattern} under {cwd / 'runs'}")
    return Path(runs[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="SafetyPointRun0")
    p.add_argument("--steps", type=int, default=30_000, help="target steps of every method")
    p.add_argument("--source-steps", type=int, default=30_000, help="source steps of stage 1")
    p.add_argument("--detector-steps", type=int, default=2_000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--workdir", default="/tmp/bench_anoseqs_claim")
    p.add_argument("--extra", default="--hidden-size 64 --batch-size 128 --learning-starts 2000 --log-every 1000 "
                                      "--eval-episodes 3 --no-cuda",
                   help="flags passed to every run")
    p.add_argument("--phase", choices=["all", "source", "target"], default="all")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="target-phase methods to run (default: all five)")
    p.add_argument("--timeout", type=int, default=4 * 3600, help="seconds per run")
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    cwd = Path(a.workdir).resolve()
    cwd.mkdir(parents=True, exist_ok=True)
    script = str(REPO / "anoseqs.py")
    common = ["--env-id", a.env_id, "--total-timesteps", str(a.steps), *a.extra.split()]
    index_file = cwd / "index.json"
    index = json.loads(index_file.read_text()) if index_file.exists() else {}

    def save():
        index_file.write_text(json.dumps(index, indent=1))

    if not a.report_only and a.phase in ("all", "source"):
        if "stage1" not in index:
            cost = run([sys.executable, script, *common, "--stage", "1", "--source-timesteps", str(a.source_steps),
                        "--exp-name", "source"], cwd, cwd / "source.log", a.timeout)
            index["stage1"] = {"run": str(newest_run(cwd, f"{a.env_id}__source__*")), **cost}
            save()
        for key, flags in (("stage2", []), ("stage2_all", ["--detector-windows", "all"])):
            if key not in index:
                cost = run([sys.executable, script, *common, "--stage", "2", "--source-run", index["stage1"]["run"],
                            "--detector-steps", str(a.detector_steps), "--exp-name", key, *flags], cwd,
                           cwd / f"{key}.log", a.timeout)
                index[key] = {"run": str(newest_run(cwd, f"{a.env_id}__{key}__*")), **cost}
                save()
    if not a.report_only and a.phase in ("all", "target"):
        for seed in a.seeds:
            for method, flags in METHODS.items():
                if method not in a.methods:
                    continue
                key = f"{method}/{seed}"
                if key in index:
                    continue
                extra = ["--stage", "3", "--source-run", index["stage2"]["run"]] if method.startswith("AnoSeqs") else []
                cost = run([sys.executable, script, *common, *flags, *extra, "--seed", str(seed)], cwd,
                           cwd / f"{method.replace(' ', '_')}_{seed}.log", a.timeout)
                index[key] = {"run": str(newest_run(cwd, f"{a.env_id}__{flags[1]}__{seed}__*")), **cost}
                save()
    report(index, a, cwd)


def detector_table(index: dict, plt) -> None:
    """AUCs of the saved detector and its variants on the same held-out episodes, and the score histogram."""
    import torch

    import anoseqs

    model, threshold, config = anoseqs.load_detector(os.path.join(index["stage2"]["run"], "detector.pt"),
                                                     torch.device("cpu"))
    data = anoseqs.load_source_data(index["stage1"]["run"])
    args = anoseqs.Args(window_length=config["window_length"])  # stage 2's defaults: seed 1, stride 1, 20% held out
    rng = np.random.default_rng(args.seed)  # as train_detector: the split, then the nearest-neighbour memory
    splits = anoseqs.detector_splits(data, args.window_length, args.window_stride, args.holdout_fraction, False, rng)
    obs = torch.as_tensor(data["obs"])
    start = data["episode_start"]
    print(f"\nsource data: {len(data['obs'])} rows, {len(np.unique(start))} episodes, "
          f"{(data['cost'] > 0).mean():.3f} of the rows with cost > 0, {data['terminal'].sum()} terminations; "
          f"held-out windows: {len(splits['safe_policy'])} safe / {len(splits['unsafe_policy'])} unsafe (policy), "
          f"{len(splits['safe_all'])} / {len(splits['unsafe_all'])} with the warm-up")
    rows = []
    memory_idx = anoseqs.window_indices(start, splits["train"], args.window_length)
    lo, scale = model.lo, model.scale
    keep = rng.permutation(len(memory_idx))[: args.nn_max_windows]
    memory = (obs[torch.as_tensor(np.sort(memory_idx[keep]))] - lo) / scale
    for name, det in (("autoencoder", model), ("nearest-neighbour", anoseqs.NearestNeighbourDetector(
            obs.shape[1], args.window_length, len(keep), lo.numpy(), scale.numpy(), memory))):
        for score_on in ("window", "last"):
            det.score_on = score_on
            r = anoseqs.evaluate_detector(det, obs, start, splits, 99.0)
            rows.append(f"| {name} | {score_on} | {r['auc_policy']:.3f} | {r['auc_all']:.3f} | {r['unsafe_flagged']:.1%} |")
    print("| detector | score on | ROC AUC, policy windows | ROC AUC, with warm-up | unsafe policy windows above threshold |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    for key in ("stage2", "stage2_all"):
        if key in index:
            s = read_scalars(Path(index[key]["run"]))
            print(f"{key} (logged by the run): threshold {s['detector/charts/anomaly_threshold'][-1][1]:.4f}, AUC policy "
                  f"{s['detector/charts/detector_roc_auc'][-1][1]:.3f}, with warm-up "
                  f"{s['detector/charts/detector_roc_auc_with_warmup'][-1][1]:.3f}, nearest-neighbour "
                  f"{s['detector/charts/nearest_neighbour_roc_auc'][-1][1]:.3f} / "
                  f"{s['detector/charts/nearest_neighbour_roc_auc_with_warmup'][-1][1]:.3f}; "
                  f"{index[key]['wall_s']:.0f}s wall, {index[key]['cpu_s']:.0f}s CPU")
    model.score_on = config["score_on"]
    fig, ax = plt.subplots(figsize=(7, 4))
    scores = {k: anoseqs.score_in_batches(model, obs, start, splits[k], args.window_length)
              for k in ("safe_policy", "unsafe_policy", "safe_all", "unsafe_all")}
    warm_safe = np.setdiff1d(splits["safe_all"], splits["safe_policy"])
    scores["safe_warmup"] = anoseqs.score_in_batches(model, obs, start, warm_safe, args.window_length)
    bins = np.linspace(0, np.percentile(np.concatenate(list(scores.values())), 99.5), 60)
    for k, label in (("safe_policy", "safe, policy"), ("unsafe_policy", "unsafe, policy"),
                     ("safe_warmup", "safe, random warm-up")):
        if len(scores[k]):
            ax.hist(scores[k], bins=bins, alpha=0.5, density=True, label=f"{label} (n={len(scores[k])}, "
                    f"mean {scores[k].mean():.4f})")
    ax.axvline(threshold, color="k", ls="--", label=f"anomaly threshold {threshold:.4f}")
    ax.set_xlabel("anomaly score (window MAE)")
    ax.set_title(f"held-out source episodes: ROC AUC {anoseqs.roc_auc(scores['safe_policy'], scores['unsafe_policy']):.3f} "
                 f"(policy), {anoseqs.roc_auc(scores['safe_all'], scores['unsafe_all']):.3f} (with warm-up)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = REPO / "docs" / "img" / "anoseqs_detector_scores.png"
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def binned(points: list[tuple[int, float]], edges: np.ndarray) -> np.ndarray:
    steps, values = np.array([s for s, _ in points]), np.array([v for _, v in points])
    which = np.digitize(steps, edges) - 1
    return np.array([values[which == i].mean() if (which == i).any() else np.nan for i in range(len(edges) - 1)])


def report(index: dict, a, cwd: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "stage2" in index:
        detector_table(index, plt)
        print(f"stage 1: {index['stage1']['wall_s']:.0f}s wall, {index['stage1']['cpu_s']:.0f}s CPU")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    edges = np.linspace(0, a.steps, 16)
    mids = (edges[1:] + edges[:-1]) / 2
    rows, cpu_total = [], sum(v["cpu_s"] for v in index.values())
    for m, method in enumerate(METHODS):
        runs = [(k, v) for k, v in index.items() if k.startswith(method + "/")]
        if not runs:
            continue
        stats = {k: [] for k in ("cost_rate", "ret", "cost", "eval_ret", "eval_cost", "sps", "cpu", "auc", "penalised",
                                 "score_frac")}
        curves = {"rate": [], "ret": [], "cost": []}
        for key, info in runs:
            s = read_scalars(Path(info["run"]))
            curves["rate"].append(np.interp(mids, *zip(*s["charts/cost_rate"])))
            curves["ret"].append(binned(s["charts/episodic_return"], edges))
            curves["cost"].append(binned(s["charts/episodic_cost"], edges))
            stats["cost_rate"].append(s["charts/cost_rate"][-1][1])
            stats["ret"].append(np.mean([v for _, v in s["charts/episodic_return"][-5:]]))
            stats["cost"].append(np.mean([v for _, v in s["charts/episodic_cost"][-5:]]))
            stats["eval_ret"].append(np.mean([v for _, v in s["eval/episodic_return"]]))
            stats["eval_cost"].append(np.mean([v for _, v in s["eval/episodic_cost"]]))
            stats["sps"].append(s["charts/SPS"][-1][1])
            stats["cpu"].append(info["cpu_s"])
            if "charts/target_roc_auc" in s:
                stats["auc"].append(s["charts/target_roc_auc"][-1][1])
                stats["penalised"].append(np.mean([v for _, v in s["charts/penalised_fraction"]]))
                stats["score_frac"].append(s["charts/scoring_time_fraction"][-1][1])
        for ax, name in zip(axes, ("rate", "ret", "cost")):
            c = np.array(curves[name])
            keep = ~np.isnan(c).any(0)  # bins where every seed finished an episode
            plot_band(ax, mids[keep], c[:, keep], label=f"{method} ({len(runs)} seeds)", color=f"C{m}")

        def f(name, fmt="{:.3f}"):  # one seed: its value; several: IQM [95% stratified-bootstrap CI]
            v = stats[name]
            if len(v) > 1:
                return fmt_interval(interval_estimates({"x": np.array(v, dtype=float)}, reps=5000)["x"])
            return fmt.format(v[0]) if v else "-"

        rows.append(f"| {method} | {len(runs)} | {f('cost_rate')} | {f('ret', '{:.1f}')} | {f('cost', '{:.1f}')} | "
                    f"{f('eval_ret', '{:.1f}')} | {f('eval_cost', '{:.1f}')} | {f('auc')} | {f('penalised')} | "
                    f"{f('sps', '{:.0f}')} | {f('cpu', '{:.0f}')} |")
        per_seed = ", ".join(f"seed {k.split('/')[1]}: {r:.3f} / {e:.1f} / {c:.1f}" for (k, _), r, e, c in
                             zip(runs, stats["cost_rate"], stats["eval_ret"], stats["eval_cost"]))
        rows.append(f"|   per seed (cost rate / eval return / eval cost) | {per_seed} |||||||||")
    for ax, title in zip(axes, ["charts/cost_rate (training, cumulative)", "charts/episodic_return (training)",
                                "charts/episodic_cost (training)"]):
        ax.set_title(title)
        ax.set_xlabel("environment steps")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{a.env_id}: IQM over seeds and its 95% bootstrap CI (benchmarks/plot.py; episodes binned per "
                 f"{a.steps // 15} steps)")
    fig.tight_layout()
    out = REPO / "docs" / "img" / "anoseqs_claim.png"
    fig.savefig(out, dpi=80)
    print(f"\nwrote {out}\n")
    print("| method | seeds | final cost rate | return, last 5 ep. | cost, last 5 ep. | eval return (3 ep.) | "
          "eval cost (3 ep.) | target per-step ROC AUC | penalised fraction | SPS | CPU s per run |")
    print("|" + "---|" * 11)
    print("\n".join(rows))
    print(f"\nCPU time of everything in {cwd}: {cpu_total:.0f}s ({cpu_total / 3600:.2f} CPU-hours)")


if __name__ == "__main__":
    main()
