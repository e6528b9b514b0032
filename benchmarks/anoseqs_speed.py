"""Benchmark: env steps per second of stage 3 (TD3 + scoring) beside CleanRL's td3_continuous_action.py.

Same task, same budget, same TD3 sizes (256 units, batch 256), on the CPU, runs interleaved round by round so
that the load of a shared machine hits every variant alike:
  cleanrl          CleanRL's file as it is (torch's default threads)
  cleanrl-1-thread the same file with OMP_NUM_THREADS=1 (the thread count anoseqs.py uses by default)
  anoseqs          anoseqs.py --stage 3 with a trained detector (scoring every step)
  td3              anoseqs.py --method td3 (the same loop without the detector)
SPS = env steps / wall time of the training loop, as each script prints it (both count from the loop's start);
CPU s = user + sys time of the whole process (imports included).

CleanRL's file is NOT part of this repository: fetch github.com/vwxyzjn/cleanrl, copy
cleanrl/td3_continuous_action.py and cleanrl_utils/{__init__,buffers}.py into a scratch folder outside the
repository, and replace its `gym.make(env_id)` with
`CostInInfo(import_safety_gymnasium().make(normalize_env_id(env_id)[0]))` from `common.envs` (sys.path pointing at
this repository): Safety-Gymnasium ids are not registered with gymnasium, and CostInInfo gives the 5-tuple step
(`make_safety_env` would not do: its episode statistics clash with CleanRL's RecordEpisodeStatistics).

    nice -n 10 python benchmarks/anoseqs_speed.py --cleanrl-dir /tmp/cleanrl-td3 --source-run <run with detector.pt>
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cleanrl-dir", required=True, help="scratch folder holding the adapted td3_continuous_action.py")
    p.add_argument("--source-run", required=True, help="a run directory holding detector.pt (stage 2)")
    p.add_argument("--env-id", default="SafetyPointRun0")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--learning-starts", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["cleanrl", "cleanrl-1-thread", "anoseqs", "td3"])
    p.add_argument("--workdir", default="/tmp/bench_anoseqs_speed")
    a = p.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    budget = ["--env-id", a.env_id, "--total-timesteps", str(a.steps), "--learning-starts", str(a.learning_starts),
              "--no-cuda"]
    cleanrl = [sys.executable, str(Path(a.cleanrl_dir) / "td3_continuous_action.py"), *budget]
    ours = [sys.executable, str(REPO / "anoseqs.py"), *budget, "--eval-episodes", "0", "--log-every", str(a.steps)]
    variants = {
        "cleanrl": (cleanrl, {}, a.cleanrl_dir),
        "cleanrl-1-thread": (cleanrl, {"OMP_NUM_THREADS": "1"}, a.cleanrl_dir),
        "anoseqs": (ours + ["--stage", "3", "--source-run", str(Path(a.source_run).resolve())], {}, str(work)),
        "td3": (ours + ["--method", "td3"], {}, str(work)),
    }
    variants = {k: v for k, v in variants.items() if k in a.variants}
    results = {k: [] for k in variants}
    for r in range(a.rounds):
        for name, (cmd, env, cwd) in variants.items():
            before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
            proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True,
                                  env=dict(os.environ, CUDA_VISIBLE_DEVICES="", **env))
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            (work / f"{name}_{r}.log").write_text(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed (exit {proc.returncode}); see {work / f'{name}_{r}.log'}")
            sps = re.findall(r"SPS[:=] ?(\d+)", proc.stdout)[-1]
            cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
            results[name].append((int(sps), cpu, time.time() - t0))
            print(f"round {r + 1} {name:17s} SPS {sps:>4s}  CPU {cpu:6.1f}s  wall {time.time() - t0:6.1f}s  "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    print(f"\n{a.env_id}, {a.steps} steps ({a.learning_starts} random), TD3 256 units, batch 256, CPU, "
          f"{a.rounds} interleaved rounds")
    print("| variant | SPS per round | mean SPS | CPU s per run |")
    print("|---|---|---|---|")
    for name, res in results.items():
        sps, cpu = [r[0] for r in res], [r[1] for r in res]
        print(f"| {name} | {', '.join(map(str, sps))} | {np.mean(sps):.0f} | {np.mean(cpu):.0f} |")
    for ref in ("cleanrl", "cleanrl-1-thread"):
        if "anoseqs" in results and ref in results:
            ratio = [o[0] / c[0] for o, c in zip(results["anoseqs"], results[ref])]
            print(f"anoseqs / {ref} SPS per round: {', '.join(f'{x:.2f}' for x in ratio)}")


if __name__ == "__main__":
    main()
