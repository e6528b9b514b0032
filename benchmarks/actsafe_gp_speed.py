"""Planning time per agent step of `actsafe.py --dynamics gp`: torch threads and glibc's memory reuse, before/after.

    nice -n 10 python benchmarks/actsafe_gp_speed.py --repeats 2

One agent step of planning is what `mpc_episode` does at each step: a CEM plan (`cem_plan` over
`gp_plan_objective`, the default sizes: 100 samples x 10 particles, 10 elites, 3 iterations, horizon 15) and the
objective of the chosen plan. The GP is fitted (50 Adam steps) on 300 initial safe transitions, so that, as from the
third episode of a run on, each output conditions on `--gp-max-points` 100 of them. Each configuration runs in a
fresh process (torch's thread pool and glibc's settings are per process), the configurations interleaved, `--repeats`
times: 2 warm-up plans, then the expansion objective (intrinsic reward) and the task objective, `--plans` each.
Printed: milliseconds per agent step (median and min over the plans of both objectives) and minor page faults
per agent step. The configurations: torch threads 1 or torch's default (every core), with or without
`actsafe.keep_freed_memory()`; the script's default since this benchmark is the last row, its earlier default
(`--torch-threads 1`, glibc's default) the first.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
import numpy as np, torch
sys.path.insert(0, {repo!r})
import actsafe
from common.pendulum import make_safe_pendulum
if {threads} > 0:
    torch.set_num_threads({threads})
if {keep}:
    actsafe.keep_freed_memory()
args = actsafe.Args(dynamics="gp", env_id="SafePendulum")
env = make_safe_pendulum()
inputs, targets = actsafe.offline_safe_data(env, 300, args.action_repeat, np.random.default_rng(0))
gp = actsafe.GPDynamics(4, 3, args.gp_noise_std, args.gp_max_points, torch.device("cpu"))
gp.fit(torch.as_tensor(inputs), torch.as_tensor(targets), 50, args.gp_lr)
generator = torch.Generator().manual_seed(0)
x0 = torch.as_tensor(inputs[0, :3])
eps = torch.randn((args.gp_particles, args.gp_horizon, 3), generator=generator, dtype=torch.float64)
plan = torch.zeros(args.gp_horizon, 1, dtype=torch.float64)

def agent_step(explore):
    objective = lambda seqs: actsafe.gp_plan_objective(gp, x0, seqs, eps, args, explore)[0]
    best, _ = actsafe.cem_plan(objective, plan, args.gp_samples, args.gp_elites, args.gp_iterations, generator)
    actsafe.gp_plan_objective(gp, x0, best[None], eps, args, explore)

for explore in (True, False):
    agent_step(explore)
times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for explore in (True, False):
    for _ in range({plans}):
        start = time.perf_counter()
        agent_step(explore)
        times.append(time.perf_counter() - start)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({{"threads": torch.get_num_threads(), "ms": [t * 1e3 for t in times], "faults": faults / len(times)}}))
"""

CONFIGS = [(1, False), (1, True), (0, False), (0, True)]  # (torch threads, 0: torch's default; keep freed memory)

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="fresh processes per configuration (interleaved)")
    p.add_argument("--plans", type=int, default=10, help="timed agent steps per objective and process")
    cli = p.parse_args()
    results = {config: [] for config in CONFIGS}
    for _ in range(cli.repeats):
        for threads, keep in CONFIGS:
            code = CHILD.format(repo=str(REPO), threads=threads, keep=keep, plans=cli.plans)
            out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
            results[(threads, keep)].append(json.loads(out.strip().splitlines()[-1]))
    print("| torch threads | keep_freed_memory | ms per agent step: median (min), each process | "
          "minor page faults per agent step |")
    print("|---|---|---|---|")
    for (threads, keep), runs in results.items():
        cells = ", ".join(f"{sorted(r['ms'])[len(r['ms']) // 2]:.0f} ({min(r['ms']):.0f})" for r in runs)
        faults = ", ".join(f"{r['faults']:.0f}" for r in runs)
        name = f"{runs[0]['threads']} (torch's default)" if threads == 0 else str(threads)
        print(f"| {name} | {'yes' if keep else 'no'} | {cells} | {faults} |", flush=True)
