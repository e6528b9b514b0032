"""Sweeps: scripts x methods x env ids x seeds, each run a Ray task; finished runs skipped, interrupted ones resumed.

    python benchmarks/sweep.py --scripts actsafe --methods actsafe-gp gp-unconstrained gp-mean \
        --env-ids SafePendulum --seeds 1 2 3 4 5 --out sweeps/actsafe_gp
    python benchmarks/plot.py sweeps/actsafe_gp --out docs/img/actsafe_gp_sweep      # IQM curves and tables
    python benchmarks/sweep.py ... --extra "--total-timesteps 200000 --checkpoint-every 20000"   # flags for every run
    python benchmarks/sweep.py ... --address ray://head:10001 --gpus-per-task 0.25  # an existing Ray cluster
    python benchmarks/sweep.py ... --dry-run                                        # the plan only

Each run has its own working directory <out>/<script>/<env id>/<method>/seed<k>/, where the script writes
`runs/<run>/` (TensorBoard, checkpoint.pt, summary.json) and its console output goes to `log.txt`. A method is a name
for a set of the script's flags (METHODS below; the run's --exp-name is the method's name, so summary.json and the
run directory say which method ran). Running the same sweep again
  - skips a run whose directory holds a summary.json (it finished),
  - resumes a run that left a checkpoint.pt but no summary.json (`--resume runs/<run>`: it was interrupted),
  - starts the others.
Scripts, methods and env ids are checked before any task starts. On a cluster, --out must be a directory every node
sees (a shared file system); each task runs `python <repo>/<script>.py` on its node, so the repository must be at the
same path there.

Resources: a local Ray gets --num-cpus (default: every core) and runs one task per --cpus-per-task of them; each task's
torch and BLAS use that many threads (OMP_NUM_THREADS). --gpus-per-task (default 0: the runs use the CPU) may be a
fraction, so that several runs share a GPU.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # common/ for the env-id checks

# script -> method -> the script's flags for it (the first method of each script is its paper's method, defaults)
METHODS = {
    "actsafe": {
        "actsafe": [],
        "greedy": ["--exploration", "greedy"],  # no expansion phase: the task policy acts from the start
        "actsafe-gp": ["--dynamics", "gp"],
        "gp-unconstrained": ["--dynamics", "gp", "--gp-lambda", "0"],
        "gp-mean": ["--dynamics", "gp", "--gp-beta", "0"],
    },
    "latent_barrier": {
        "barrier": [],
        "dreamer": ["--beta", "0"],  # the unconstrained Dreamer
        "lagrangian": ["--constraint", "lagrangian"],  # LAMBDA-like augmented Lagrangian
    },
    "anoseqs": {
        "anoseqs": [],
        "anoseqs-binary": ["--penalty-form", "binary", "--penalty-coef", "0.5"],
        "td3": ["--method", "td3"],
        "td3-lag": ["--method", "td3-lag"],
        "oracle-shaping": ["--method", "oracle-shaping"],
    },
    "psl": {
        "psl": [],
        "zero-shot": ["--method", "zero-shot"],
        "intrinsic-fear": ["--method", "intrinsic-fear"],
        "baseline": ["--method", "baseline"],
    },
    "sagui": {
        "sagui-cs": [],  # trains its guide first (--guide-path to reuse one: pass it with --extra)
        "sagui-ld": ["--sampling", "linear-decay"],
        "sac-lag": ["--no-use-guide"],
    },
}


def check_env_id(script: str, method_flags: list[str], env_id: str) -> None:
    """Refuse an env id the script would refuse, before any task starts (the script's own check, not a run)."""
    if script == "psl":
        if env_id not in ("minecraft", "vizdoom"):
            raise SystemExit(f"error: --env-ids: psl runs on minecraft or vizdoom, not {env_id!r}")
        return
    if script == "actsafe" and "gp" in method_flags:
        from common.pendulum import PENDULUM_IDS

        if env_id not in PENDULUM_IDS:
            raise SystemExit(f"error: --env-ids: actsafe's GP methods run on {' or '.join(PENDULUM_IDS)}, "
                             f"not {env_id!r}")
        return
    from common.envs import normalize_env_id

    if script == "sagui":
        import common.sagui_tasks  # noqa: F401  (registers the paper's layouts)
    try:
        normalize_env_id(env_id, vision=True if script in ("actsafe", "latent_barrier") else None)
    except ValueError as e:
        raise SystemExit(f"error: --env-ids ({script}): {e}") from None


def plan(b) -> list[dict]:
    """Every run of the sweep with its directory, command and what to do with it: 'skip', 'resume' or 'start'."""
    runs = []
    for script in b.scripts:
        if script not in METHODS:
            raise SystemExit(f"error: --scripts: unknown script {script!r}; accepted: {', '.join(METHODS)}")
        methods = b.methods or list(METHODS[script])[:1]
        unknown = [m for m in methods if m not in METHODS[script]]
        if unknown and len(b.scripts) == 1:
            raise SystemExit(f"error: --methods: {script} has no method {', '.join(map(repr, unknown))}; accepted: "
                             f"{', '.join(METHODS[script])}")
        methods = [m for m in methods if m in METHODS[script]]  # several scripts: each takes the methods it has
        if not methods:
            raise SystemExit(f"error: --methods: none of {b.methods} is a method of {script} "
                             f"({', '.join(METHODS[script])})")
        for method in methods:
            for env_id in b.env_ids:
                check_env_id(script, METHODS[script][method], env_id)
                for seed in b.seeds:
                    cwd = Path(b.out) / script / env_id / method / f"seed{seed}"
                    cmd = [sys.executable, str(REPO / f"{script}.py"), "--env-id", env_id, "--seed", str(seed),
                           "--exp-name", method, *METHODS[script][method], *shlex.split(b.extra)]
                    run_dirs = sorted(cwd.glob("runs/*"), key=os.path.getmtime)
                    if any((d / "summary.json").exists() for d in run_dirs):
                        action = "skip"
                    elif any((d / "checkpoint.pt").exists() for d in run_dirs):
                        action = "resume"
                        last = [d for d in run_dirs if (d / "checkpoint.pt").exists()][-1]
                        cmd = [*cmd[:2], "--resume", str(last.relative_to(cwd)), *shlex.split(b.extra)]
                    else:
                        action = "start"
                    runs.append({"script": script, "method": method, "env_id": env_id, "seed": seed,
                                 "cwd": cwd, "cmd": cmd, "action": action})
    return runs


def run_in(cmd: list[str], cwd: str, env: dict) -> tuple[int, float]:
    """One run (a Ray task): the script in its own directory, its output appended to log.txt; (exit code, seconds)."""
    start = time.time()
    os.makedirs(cwd, exist_ok=True)
    with open(os.path.join(cwd, "log.txt"), "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        code = subprocess.run(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}).returncode
    return code, time.time() - start


def connect(b) -> None:
    """A local Ray, or the cluster at --address; a clear message when it does not answer."""
    import ray

    if b.address and b.address != "auto":
        hostport = b.address.split("://")[-1]
        host, _, port = hostport.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=b.connect_timeout).close()
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --address {b.address}: no Ray cluster answers there ({e}); give the head "
                             "node's address (ray://host:10001 or host:6379), or leave --address out for a local "
                             "Ray. Nothing was started.") from None
    try:
        if b.address:
            ray.init(address=b.address, log_to_driver=False)
        else:
            ray.init(num_cpus=b.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SystemExit(f"error: could not start or reach Ray ({'--address ' + b.address if b.address else 'local'}):"
                         f" {e}. Nothing was started.") from None


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scripts", nargs="+", required=True, help=f"scripts to run: {', '.join(METHODS)}")
    p.add_argument("--methods", nargs="+", help="methods (names in METHODS; default: each script's paper method)")
    p.add_argument("--env-ids", nargs="+", required=True, help="environment ids, as the scripts take them")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--out", default="sweeps/sweep", help="the sweep's directory (one subdirectory per run)")
    p.add_argument("--extra", default="", help="flags added to every run, as one string")
    p.add_argument("--address", help="an existing Ray cluster (ray://host:10001, host:6379 or auto); default: local")
    p.add_argument("--num-cpus", type=int, help="CPUs of the local Ray (default: every core)")
    p.add_argument("--cpus-per-task", type=float, default=1.0, help="CPUs each run reserves (and its thread count)")
    p.add_argument("--gpus-per-task", type=float, default=0.0, help="GPUs each run reserves (0: it runs on the CPU)")
    p.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to wait for --address to answer")
    p.add_argument("--dry-run", action="store_true", help="print what would be skipped, resumed and started; stop")
    b = p.parse_args(argv)
    if b.cpus_per_task <= 0 or b.gpus_per_task < 0 or (b.num_cpus is not None and b.num_cpus <= 0):
        raise SystemExit("error: --cpus-per-task and --num-cpus must be positive, --gpus-per-task 0 or more")
    if any(s < 0 for s in b.seeds):
        raise SystemExit(f"error: --seeds must be non-negative integers, got {b.seeds}")

    runs = plan(b)
    counts = {a: sum(r["action"] == a for r in runs) for a in ("skip", "resume", "start")}
    print(f"sweep {b.out}: {len(runs)} runs: {counts['skip']} finished (skipped), {counts['resume']} to resume, "
          f"{counts['start']} to start", flush=True)
    for r in runs:
        print(f"  {r['action']:6s} {r['script']} {r['method']} {r['env_id']} seed {r['seed']}", flush=True)
    todo = [r for r in runs if r["action"] != "skip"]
    if b.dry_run or not todo:
        return runs

    import ray

    connect(b)
    threads = str(max(1, int(b.cpus_per_task)))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    if b.gpus_per_task == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the runs use the CPU (a GPU node's devices stay free for GPU tasks)
    if run_in.__module__ != "__main__":  # imported (as by the tests): ship the function itself, not its module name
        ray.cloudpickle.register_pickle_by_value(sys.modules[run_in.__module__])
    task = ray.remote(num_cpus=b.cpus_per_task, num_gpus=b.gpus_per_task, max_retries=0)(run_in)
    pending = {task.remote(r["cmd"], str(r["cwd"]), env): r for r in todo}
    failed, start = [], time.time()
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        r = pending.pop(done)
        code, seconds = ray.get(done)
        r["exit_code"] = code
        if code != 0:
            failed.append(r)
        print(f"[{len(todo) - len(pending)}/{len(todo)}, {time.time() - start:.0f} s] {r['script']} {r['method']} "
              f"{r['env_id']} seed {r['seed']}: {'done' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s"
              + (f", see {r['cwd'] / 'log.txt'}" if code else ""), flush=True)
    ray.shutdown()
    if failed:
        raise SystemExit(f"error: {len(failed)} of {len(todo)} runs failed (their log.txt says why); run the sweep "
                         "again to resume them from their last checkpoint")
    print(f"sweep {b.out}: all {len(runs)} runs finished; plot them with: python benchmarks/plot.py {b.out}",
          flush=True)
    return runs


if __name__ == "__main__":
    main()
