"""Where actsafe.py's time goes, eager vs compiled, on the GPU when there is one (and on the CPU otherwise).

    python benchmarks/actsafe_gpu.py                              # default Args, all that the machine offers
    python benchmarks/actsafe_gpu.py --modes eager --envs 2 --env-steps 200     # a quick look on a small CPU

Measures, with actsafe.py's own functions (no copy of the algorithm: `update`, `world_model_loss`,
`update_actor_critic` are called as the script calls them) at the default sizes (batch 16 x 50, ensemble of 5 whole
priors, horizon 15 from all 800 posterior states) unless told otherwise:
- the time of one update, broken into the world model alone, the exploration actor-critic, the task actor-critic
  and the full expansion-phase update (world model + both), for each mode: eager; compiled (torch.compile); and on
  CUDA compiled + CUDA graph (`common.capture.CudaGraphUpdate`); the first (compiling) call is timed apart;
- kernels per full update (torch.profiler: CUDA kernels on a GPU; on the CPU, the operator calls the profiler
  records) and, on a GPU, the share of the update's wall time the GPU is busy;
- environment steps/s of N 64x64 vision envs (action repeat 2, random actions), in this process vs in worker
  processes (`common.make_vector_env(..., asynchronous=True)`).
Prints markdown tables with the machine's description, for docs/actsafe.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import actsafe  # noqa: E402
from actsafe import ActorCritic, Args, WorldModel, safety_budget  # noqa: E402
from common import make_vector_env  # noqa: E402
from common.capture import CudaGraphUpdate  # noqa: E402
from timing import fake_batch, kernels_and_busy, machine, time_calls  # noqa: E402




def build(args: Args, device: torch.device, capturable: bool):
    """The script's models, optimisers and constraint states (as its main block builds them)."""
    wm = WorldModel(2, args).to(device)
    acs = {"explore": ActorCritic(wm.rssm.feature_dim, 2, args).to(device),
           "task": ActorCritic(wm.rssm.feature_dim, 2, args).to(device)}
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, eps=args.adam_eps, capturable=capturable)  # noqa: E731
    model_opt = adam(wm.parameters(), args.model_lr)
    actor_opts = {k: adam(ac.actor.parameters(), args.actor_lr) for k, ac in acs.items()}
    critic_opts = {k: adam([*ac.critic.parameters(), *ac.cost_critic.parameters()], args.critic_lr)
                   for k, ac in acs.items()}
    states = {k: {"lagrange": torch.tensor(args.initial_lagrangian, device=device),
                  "penalty": torch.tensor(args.initial_penalty, device=device),
                  "eta": torch.tensor(args.lbsgd_eta, device=device)} for k in acs}
    return wm, acs, model_opt, actor_opts, critic_opts, states




def updates(args: Args, device: torch.device, capturable: bool) -> dict:
    """The pieces to time, each a function of a batch: the script's `update` with the actor-critics it trains."""
    wm, acs, model_opt, actor_opts, critic_opts, states = build(args, device, capturable)
    budget = safety_budget(args.cost_limit, args.episode_length, args.gamma)
    full = functools.partial(actsafe.update, wm, model_opt, acs, actor_opts, critic_opts, states, args=args,
                             budget=budget)
    model_only = functools.partial(actsafe.update, wm, model_opt, {}, actor_opts, critic_opts, states, args=args,
                                   budget=budget)
    with torch.no_grad():  # fixed imagination start states: the posterior states of one batch
        _, posts, _ = actsafe.world_model_loss(wm, fake_batch(args, device), args)
    start = {k: posts[k].reshape(-1, posts[k].shape[-1]).contiguous() for k in ("deter", "stoch")}

    def one_ac(name):
        def step(batch):  # the batch is unused: imagination starts from fixed posterior states
            return actsafe.update_actor_critic(wm, acs[name], actor_opts[name], critic_opts[name], states[name], start,
                                               args, intrinsic=(name == "explore"), budget=budget, prefix="")
        return step

    return {"world model": model_only, "exploration actor-critic": one_ac("explore"),
            "task actor-critic": one_ac("task"), "full update (expansion phase)": full}








def env_speed(num_envs: int, steps: int, asynchronous: bool) -> float:
    envs = make_vector_env("SafetyPointGoal1", num_envs, 0, asynchronous=asynchronous, vision=True, image_size=64,
                           action_repeat=2)
    envs.reset(seed=0)
    rng = np.random.default_rng(0)
    envs.step(rng.uniform(-1, 1, (num_envs, 2)))  # the workers' first render happens here
    t0 = time.perf_counter()
    for _ in range(steps):
        envs.step(rng.uniform(-1, 1, (num_envs, 2)))
    rate = steps * num_envs * 2 / (time.perf_counter() - t0)  # env steps count the action repeat
    envs.close()
    return rate


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["eager", "compiled", "compiled+cudagraph"],
                   help="eager, compiled, compiled+cudagraph (the last needs CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per piece after the first one")
    p.add_argument("--envs", type=int, default=10, help="vision envs for the env-speed table (0: skip it)")
    p.add_argument("--env-steps", type=int, default=300, help="vector steps per env-speed reading")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--batch-size", type=int, default=Args.batch_size)
    p.add_argument("--sequence-length", type=int, default=Args.sequence_length)
    cli = p.parse_args()
    if cli.threads > 0:
        torch.set_num_threads(cli.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = dataclasses.replace(Args(), batch_size=cli.batch_size, sequence_length=cli.sequence_length)
    print(f"machine: {machine(device)}")
    print(f"sizes: batch {args.batch_size} x {args.sequence_length}, ensemble {args.ensemble_size}, horizon "
          f"{args.imag_horizon}, cnn depth {args.cnn_depth}, units {args.actor_units}\n", flush=True)

    rows, kernel_rows = [], []
    for mode in cli.modes:
        if mode == "compiled+cudagraph" and device.type != "cuda":
            print("compiled+cudagraph: skipped (needs CUDA)", flush=True)
            continue
        torch.manual_seed(0)
        pieces = updates(args, device, capturable=(mode == "compiled+cudagraph"))
        batch = fake_batch(args, device)
        for name, fn in pieces.items():
            if mode != "eager":
                fn = torch.compile(fn)
            if mode == "compiled+cudagraph":
                fn = CudaGraphUpdate(fn, warmup=2, name=name)
            try:
                first, median = time_calls(fn, batch, device, cli.repeats)
            except Exception as e:  # one failing mode (e.g. a compiler error) must not lose the other rows
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                rows.append(f"| {name} | {mode} | failed: {reason} | - |")
                print(rows[-1], flush=True)
                continue
            rows.append(f"| {name} | {mode} | {1000 * median:.1f} | {first:.1f} |")
            print(rows[-1], flush=True)
            if name.startswith("full"):
                kernels, busy = kernels_and_busy(fn, batch, device)
                kernel_rows.append(f"| {mode} | {kernels} | {'-' if busy is None else f'{100 * busy:.0f}%'} |")
    print("\n| piece | mode | ms per update (median) | first call, s (compiling) |\n|---|---|---|---|")
    print("\n".join(rows))
    unit = "CUDA kernels" if device.type == "cuda" else "operator calls (CPU profiler)"
    print(f"\n| full update, mode | {unit} per update | GPU busy share of the update's wall time |\n|---|---|---|")
    print("\n".join(kernel_rows))
    if cli.envs > 0:
        print(f"\n| {cli.envs} vision envs (64x64, action repeat 2) | env steps/s |\n|---|---|", flush=True)
        for asynchronous in (False, True):
            rate = env_speed(cli.envs, cli.env_steps, asynchronous)
            print(f"| {'worker processes (async)' if asynchronous else 'this process (sync)'} | {rate:.0f} |",
                  flush=True)
