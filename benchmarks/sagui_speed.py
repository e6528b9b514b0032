"""Benchmark (run by hand, not a test): env steps/s of sagui.py beside CleanRL's sac_continuous_action.py.

Side by side, one after the other in one session on the same machine, each on one thread, SafetyPointGoal1,
256 x 256 networks, batch 256, one gradient step per env step after 500 random/warm-up steps:
1. CleanRL's `sac_continuous_action.py`, run from a scratch folder OUTSIDE this repository (`--cleanrl-dir`),
   adapted only to import Safety-Gymnasium (see docs/sagui.md); CleanRL's own defaults otherwise;
2. `sagui.py --no-use-guide` (the SAC-Lagrangian baseline: three critics, actor, alpha, beta), eager and compiled;
3. `sagui.py --guide-path ...` (the SaGui-CS student: the same update plus the guide's KL), eager and compiled;
4. the guide phase with `--num-envs 1` and `--num-envs 4` (vectorised collection, same update-to-data ratio).
Every stdout line is time-stamped as it arrives; steps/s is measured between two progress lines after the
first update round (so compile time is reported separately, as the time to reach the first of them).

    python benchmarks/sagui_speed.py --cleanrl-dir /tmp/cleanrl-sac
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tyro

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    cleanrl_dir: str = "/tmp/cleanrl-sac"
    """folder holding CleanRL's sac_continuous_action.py (and cleanrl_utils/), adapted to import Safety-Gymnasium"""
    steps: int = 3000
    """env steps per run; steps/s is measured from step `--measure-from` to this"""
    measure_from: int = 1500
    """first step of the measured window (after learning starts at 500, and after compilation)"""
    guide_steps: int = 2500
    """steps of each guide-phase run (item 4)"""
    out_dir: str = "bench_runs/sagui_speed"
    """scratch folder for the runs (relative to the repository)"""
    only: str = ""
    """comma-separated subset of run names to do (default: all)"""


def timed_run(cmd: list[str], cwd: Path) -> list[tuple[float, str]]:
    """Run `cmd`, returning (seconds since start, line) for every line it prints."""
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    t0, cpu0 = time.time(), children_cpu()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = [(time.time() - t0, line.rstrip()) for line in proc.stdout]
    if proc.wait() != 0:
        print("\n".join(line for _, line in lines[-30:]))
        raise SystemExit(f"run failed: {' '.join(cmd)}")
    print(f"  took {time.time() - t0:.0f}s wall, {children_cpu() - cpu0:.0f}s CPU (with its compile workers)", flush=True)
    lines.append((children_cpu() - cpu0, "CPU_SECONDS"))
    return lines


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sagui_progress(lines, phase_marker=None):
    """(time, step) of sagui.py's console lines (`global_step=1500/3000 ...`), of one phase if a marker is given."""
    points = []
    for t, line in lines:
        m = re.match(r"global_step=(\d+)/", line)
        if m and (phase_marker is None or (phase_marker in line) == (phase_marker == "[guide]")):
            points.append((t, int(m.group(1))))
    return points


def cleanrl_progress(lines, learning_starts=500):
    """(time, step) of CleanRL's `SPS:` lines, printed at steps 600, 700, ... (every 100 steps after learning starts)."""
    sps_lines = [t for t, line in lines if line.startswith("SPS:")]
    return [(t, learning_starts + 100 * (k + 1)) for k, t in enumerate(sps_lines)]


def window_sps(points, start, end):
    by_step = dict((s, t) for t, s in points)
    if start not in by_step or end not in by_step:
        raise SystemExit(f"no progress lines at steps {start} and {end}: have {sorted(by_step)[:5]}...")
    return (end - start) / (by_step[end] - by_step[start]), by_step[start]


if __name__ == "__main__":
    args = tyro.cli(Args)
    out = REPO / args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    wanted = set(args.only.split(",")) if args.only else None
    sagui = [sys.executable, str(REPO / "sagui.py"), "--no-cuda", "--hidden-size", "256", "--batch-size", "256",
             "--learning-starts", "500", "--log-every", "100", "--eval-every", "1000000", "--eval-episodes", "1"]
    results = {}

    def record(name, points, start, end, cpu_seconds):
        sps, t_start = window_sps(points, start, end)
        results[name] = {"steps_per_s": round(sps, 1), "seconds_to_step_%d" % start: round(t_start, 1),
                         "cpu_seconds_whole_run": round(cpu_seconds)}
        print(f"  {name}: {sps:.1f} env steps/s between steps {start} and {end} "
              f"(reached step {start} after {t_start:.0f}s)", flush=True)

    # a guide for the SaGui-CS student runs (its quality does not matter for speed)
    guide_file = out / "speed_guide.pt"
    if not guide_file.exists() and (wanted is None or wanted & {"sagui_cs_eager", "sagui_cs_compiled"}):
        timed_run([*sagui, "--guide-total-timesteps", "600", "--total-timesteps", "100", "--exp-name", "speed_guide"],
                  cwd=out)
        made = sorted(out.glob("runs/*__speed_guide__*/guide.pt"))[-1]
        guide_file.write_bytes(made.read_bytes())

    runs = {
        "cleanrl_sac": ([sys.executable, "sac_continuous_action.py", "--env-id", "SafetyPointGoal1Gymnasium-v0",
                         "--total-timesteps", str(args.steps + 1), "--learning-starts", "500", "--no-cuda"],
                        Path(args.cleanrl_dir)),
        "sagui_saclag_eager": ([*sagui, "--no-use-guide", "--total-timesteps", str(args.steps), "--compile", "off"],
                               out),
        "sagui_saclag_compiled": ([*sagui, "--no-use-guide", "--total-timesteps", str(args.steps), "--compile", "on"],
                                  out),
        "sagui_cs_eager": ([*sagui, "--guide-path", str(guide_file), "--total-timesteps", str(args.steps),
                            "--compile", "off"], out),
        "sagui_cs_compiled": ([*sagui, "--guide-path", str(guide_file), "--total-timesteps", str(args.steps),
                               "--compile", "on"], out),
    }
    for name, (cmd, cwd) in runs.items():
        if wanted is not None and name not in wanted:
            continue
        lines = timed_run(cmd, cwd)
        points = cleanrl_progress(lines) if name == "cleanrl_sac" else sagui_progress(lines)
        record(name, points, args.measure_from, args.steps, lines[-1][0])
    for num_envs in (1, 4):
        name = f"sagui_guide_phase_num_envs_{num_envs}"
        if wanted is not None and name not in wanted:
            continue
        lines = timed_run([*sagui, "--guide-total-timesteps", str(args.guide_steps), "--total-timesteps", "100",
                           "--num-envs", str(num_envs), "--compile", "off", "--exp-name", name], out)
        record(name, sagui_progress(lines, "[guide]"), args.measure_from, args.guide_steps, lines[-1][0])
    print(json.dumps(results, indent=1))
    (out / "speed_results.json").write_text(json.dumps(results, indent=1))
