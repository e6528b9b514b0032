"""`runs/<run>/summary.json`: what a finished run reports, so that runs of many seeds and methods can be compared.

    write_summary(logger.run_dir, args, script="actsafe", start_time=t0, env_id=env_id, total_steps=global_step,
                  eval_return=..., eval_cost=..., train_cost=..., train_episodes=..., train_violating_episodes=...,
                  cost_limit=args.cost_limit, cost_rate=logger.cost_rate, sps=...)

Every script writes the REQUIRED keys (what `benchmarks/plot.py` and `benchmarks/sweep.py` read): the final
evaluation's mean return and cost (None when the script has no evaluation), the training episodes' mean cost, their
number and how many exceeded the cost limit (`cost > cost_limit`), the fraction of training steps with a cost, the
run's SPS and the env steps it took. `method` is `args.exp_name` (a sweep names each method's runs by it) and `seed`
is `args.seed` unless given. Adds the git commit of the code that ran (or None outside a git checkout), the wall time
and all args. Written atomically (a temporary file renamed), so a sweep never reads half a summary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import time


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


REQUIRED = ("env_id", "total_steps", "eval_return", "eval_cost", "train_cost", "train_episodes",
            "train_violating_episodes", "cost_limit", "cost_rate", "sps")


def write_summary(run_dir: str, args, script: str, start_time: float, **metrics) -> str:
    """Write summary.json with `metrics` (floats, ints, lists), the script, commit, wall time and args."""
    missing = [k for k in REQUIRED if k not in metrics]
    if missing:
        raise ValueError(f"write_summary: missing {missing} (every script reports {list(REQUIRED)})")
    params = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    metrics.setdefault("method", params.get("exp_name", script))
    metrics.setdefault("seed", params.get("seed"))
    summary = {"script": script, **metrics, "wall_time_s": time.time() - start_time, "git_commit": git_commit(),
               "args": params}
    path = os.path.join(run_dir, "summary.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, path)
    return path
