"""`runs/<run>/summary.json`: what a finished run reports, so that runs of many seeds and methods can be compared.

    write_summary(logger.run_dir, args, script="actsafe", start_time=t0, eval_return=..., eval_cost=...,
                  train_cost=..., violations=..., cost_rate=logger.cost_rate, sps=...)

Adds the git commit of the code that ran (or None outside a git checkout), the wall time and all args. Written
atomically (a temporary file renamed), so a sweep never reads half a summary.
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


def write_summary(run_dir: str, args, script: str, start_time: float, **metrics) -> str:
    """Write summary.json with `metrics` (floats, ints, lists), the script, commit, wall time and args."""
    params = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
    summary = {"script": script, **metrics, "wall_time_s": time.time() - start_time, "git_commit": git_commit(),
               "args": params}
    path = os.path.join(run_dir, "summary.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    os.replace(tmp, path)
    return path
