"""Benchmark: the Minecraft gridworld, 4 methods x N seeds, under the authors' configuration and ours (paper fig. 5).

    nice -n 10 python benchmarks/psl_gridworld.py --config ours --seeds 10 --baseline-seeds 3    # psl.py defaults
    nice -n 10 python benchmarks/psl_gridworld.py --config authors --seeds 5 --baseline-seeds 3  # their code's set-up
    nice -n 10 python benchmarks/psl_gridworld.py --config ours --methods intrinsic-fear baseline \
        --extra="--baselines-guarded" --tag guarded --seeds 3          # the other construction of the baselines

The authors' configuration (their minecraft.py): a fixed schedule of 1666 episodes per safeguard (`int(episode /
1666)`, so their 4th and final safeguard gets 2 of the 5000 episodes), the Q update on the greedy action, and the
eq. 7 average over the states 0..i-1 of the i-th safeguard. Ours: psl.py's defaults. Both run 32 episodes side by
side (psl.py --num-envs 32). Prints a markdown table (IQM over seeds [95% stratified-bootstrap CI], benchmarks/plot.py) and writes docs/img/psl_gridworld_<tag>.png
and the raw numbers to docs/img/psl_gridworld_<tag>.json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import tyro

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import psl  # noqa: E402
from plot import fmt_interval, interval_estimates, plot_band  # noqa: E402  (benchmarks/plot.py)

CONFIGS = {
    "ours": {},
    "authors": {"progression": "fixed", "stage_episodes": 1666, "authors_update": True, "transfer": "authors"},
}


@dataclass
class Bench:
    config: str = "ours"
    """ours (psl.py defaults) or authors (their schedule, update and transfer average)"""
    seeds: int = 10
    """number of seeds per method (1..seeds)"""
    baseline_seeds: int = 0
    """seeds for baseline and intrinsic-fear (0 = --seeds); their results are far apart from the others'"""
    methods: list[str] = field(default_factory=lambda: list(psl.METHODS))
    """methods to run"""
    extra: str = ""
    """extra psl.Args fields as flag=value pairs, space separated, e.g. "--baselines-guarded --num-envs 1" """
    tag: str = ""
    """name of the outputs (default: the config)"""
    cache: str = "/tmp/psl_gridworld_{tag}.jsonl"
    """finished runs are appended here and not run again (delete it to start over)"""


def parse_extra(extra: str) -> dict:
    out, words = {}, extra.split()
    for k, w in enumerate(words):
        if w.startswith("--"):
            name = w[2:].replace("-", "_")
            nxt = words[k + 1] if k + 1 < len(words) else "--"
            if nxt.startswith("--"):
                out[name] = True
            else:
                field_type = type(getattr(psl.Args(), name))
                out[name] = field_type(nxt)
    return out


def main(b: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tag = b.tag or b.config
    overrides = {**CONFIGS[b.config], **parse_extra(b.extra)}
    cache = b.cache.format(tag=tag)
    done = {}
    if os.path.exists(cache):
        with open(cache) as fh:
            for line in fh:
                r = json.loads(line)
                if r["overrides"] == overrides:
                    done[(r["method"], r["seed"])] = r
    results, root = {}, tempfile.mkdtemp(prefix="psl_bench_")
    for method in b.methods:
        seeds = b.baseline_seeds if method in ("baseline", "intrinsic-fear") and b.baseline_seeds else b.seeds
        for seed in range(1, seeds + 1):
            if (method, seed) not in done:
                args = psl.Args(method=method, seed=seed, **overrides)
                psl.check_args(args)
                psl.seed_everything(seed)
                logger = psl.Logger(f"{method}_{seed}", args, root=root, quiet=True, total_steps=0)
                t0, c0 = time.time(), time.process_time()
                r = psl.run_gridworld(args, logger)
                logger.close()
                r = {k: v for k, v in r.items() if k != "Q"}
                r["curves"] = {k: v.tolist() for k, v in r["curves"].items()}
                r.update(wall=time.time() - t0, cpu=time.process_time() - c0, method=method, seed=seed,
                         overrides=overrides)  # fmt: skip
                with open(cache, "a") as fh:
                    fh.write(json.dumps(r) + "\n")
                done[(method, seed)] = r
            r = done[(method, seed)]
            r["curves"] = {k: np.array(v) for k, v in r["curves"].items()}
            results.setdefault(method, []).append(r)
            print(f"{method} seed {seed}: violations {r['training_violations']} steps {r['violation_steps']} "
                  f"P(safe) {r['safety_probability']:.4f} switches {r['switches']} {r['wall']:.0f} s "
                  f"(cpu {r['cpu']:.0f} s)", flush=True)

    def f(xs, d=3):  # IQM over seeds [95% stratified-bootstrap CI] (benchmarks/plot.py, rliable)
        return fmt_interval(interval_estimates({"x": np.asarray(xs, dtype=float)}, reps=2000)["x"])

    print(f"\nconfig {b.config}, overrides {overrides}, seeds 1-{b.seeds} (baseline, intrinsic-fear: 1-"
          f"{b.baseline_seeds or b.seeds})\n")
    print("| method | training violations (episodes, common metric) | violating steps | violations of the safeguard "
          "in force | P(safe) of the greedy policy (exact) | test success (100 episodes) | V(s0) | U(s0) | "
          "safeguard switches (episode) | wall s | CPU s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    raw = {}
    for method, rs in results.items():
        sw = np.array([r["switches"] for r in rs]) if rs[0]["switches"] else None
        sw_txt = " / ".join(f"{m:.0f}" for m in sw.mean(0)) if sw is not None and sw.ndim == 2 else "-"
        print(f"| {method} | {f([r['training_violations'] for r in rs], 0)} | {f([r['violation_steps'] for r in rs], 0)} "
              f"| {f([r['safeguard_violations'] for r in rs], 0)} | {f([r['safety_probability'] for r in rs])} | "
              f"{100 * np.mean([r['test_success'] for r in rs]):.1f}% | {f([r['V_s0'] for r in rs])} | "
              f"{f([r['U_s0'] for r in rs])} | {sw_txt} | {np.mean([r['wall'] for r in rs]):.0f} | "
              f"{np.mean([r['cpu'] for r in rs]):.0f} |")
        raw[method] = [{k: v for k, v in r.items() if k not in ("curves", "overrides")} for r in rs]
    print(f"\noptimal P(safe) (value iteration, layout known): {results[b.methods[0]][0]['optimal_safety_probability']:.6f}")
    # when the violations happen: per 100 episodes, early in training and after
    cuts = [0, 250, 1000, 1666, 3332, 4998]
    print("\n| method | " + " | ".join(f"episodes {a}-{c}" for a, c in zip(cuts, cuts[1:])) +
          " |\n|---|" + "---|" * (len(cuts) - 1) + "\n", end="")  # fmt: skip
    for method, rs in results.items():
        per = [[(r["curves"]["violations"][c - 1] - (r["curves"]["violations"][a - 1] if a else 0)) * 100 / (c - a)
                for a, c in zip(cuts, cuts[1:])] for r in rs]  # fmt: skip
        print(f"| {method} | " + " | ".join(f"{m:.1f}" for m in np.mean(per, 0)) + " |")
    print("(violations per 100 episodes, common metric, mean over seeds)")
    for method, rs in results.items():  # how fast the authors' measures saturate
        first = [int(np.argmax(r["curves"]["V_s0"] >= 0.99)) for r in rs]
        print(f"{method}: V(s0) >= 0.99 from episode start {min(first)}-{max(first)} on; mean U(s0) over episodes "
              f"1000-5000: {np.mean([r['curves']['U_s0'][1000:].mean() for r in rs]):.4f}")
    if "psl" in results and "zero-shot" in results:  # paired by seed
        k = min(len(results["psl"]), len(results["zero-shot"]))
        for key in ("training_violations", "safety_probability"):
            d = np.array([results["psl"][i][key] - results["zero-shot"][i][key] for i in range(k)])
            print(f"psl - zero-shot, {key}, paired over seeds 1-{k}: {d.mean():.3f} ± {d.std(ddof=1) / np.sqrt(k):.3f} "
                  f"(standard error); psl lower in {int((d < 0).sum())} of {k} seeds")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for method, rs in results.items():
        n = min(len(r["curves"]["violations"]) for r in rs)
        c = np.stack([r["curves"]["violations"][:n] for r in rs])
        every = max(1, n // 100)  # 100 points per curve: the bootstrap runs at each point
        plot_band(axes[0], np.arange(n)[::every], c[:, ::every], label=method)
        p = np.stack([r["curves"]["safety_probability"] for r in rs])  # (seeds, evals, 2)
        plot_band(axes[1], p[0, :, 0], p[:, :, 1], label=method, marker="o")
        n = min(len(r["curves"]["U_s0"]) for r in rs)
        u = np.stack([np.convolve(r["curves"]["U_s0"][:n], np.ones(150) / 150, mode="valid") for r in rs])
        plot_band(axes[2], np.arange(u.shape[1])[::every], u[:, ::every], label=method)
    axes[0].set(xlabel="episode", ylabel="cumulative training violations (final safeguard)",
                title=f"{tag}: violations, IQM and 95% CI over seeds")  # fmt: skip
    axes[1].set(xlabel="episode", ylabel="P(greedy policy satisfies the final safeguard, 1000 steps)",
                title="exact safety probability", ylim=(-0.02, 1.02))  # fmt: skip
    axes[2].set(xlabel="episode started", ylabel="U(s0), 150-episode moving average",
                title="the authors' pessimistic value at s0")  # fmt: skip
    axes[0].legend()
    fig.tight_layout()
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "img", f"psl_gridworld_{tag}")
    fig.savefig(out + ".png", dpi=80)
    with open(out + ".json", "w") as fh:
        json.dump({"config": b.config, "overrides": overrides, "results": raw}, fh, indent=1)
    print(f"figure: docs/img/psl_gridworld_{tag}.png")


if __name__ == "__main__":
    main(tyro.cli(Bench))
