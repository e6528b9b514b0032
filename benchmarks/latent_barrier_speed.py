"""Where latent_barrier.py's time goes, eager vs compiled (vs CUDA graph on a GPU), and how fast pixels are collected.

    python benchmarks/latent_barrier_speed.py                          # default Args, all that the machine offers
    nice -n 10 python benchmarks/latent_barrier_speed.py --modes eager --repeats 2 --envs 2 --env-steps 150   # a CPU

Measures, with latent_barrier.py's own functions (`world_model_loss`, `apply_gradients`, `update_policy`, `update`
are called as the script calls them; nothing of the algorithm is copied) at the default sizes (batch 32 x 50 rows,
horizon 30 from all 1600 posterior states) unless told otherwise:
- the time of one update, broken into the world model alone, the barrier + actor + value step alone (from fixed
  imagination start states) and the full update, for each mode: eager; compiled (torch.compile); and on CUDA
  compiled + CUDA graph (`common.capture.CudaGraphUpdate`); the first (compiling) call is timed apart;
- kernels per full update (torch.profiler: CUDA kernels on a GPU; on the CPU, the top-level operator calls) and, on
  a GPU, the share of the update's wall time the GPU is busy;
- environment steps/s of N 64x64 vision envs (action repeat 2): random actions in this process vs in worker
  processes, and with the agent acting (encode, filter, actor) in this process.
Prints markdown tables with the machine's description, for docs/latent_barrier.md.
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

import latent_barrier as lb  # noqa: E402
from latent_barrier import Agent, Args, WorldModel  # noqa: E402
from common import make_vector_env  # noqa: E402
from common.capture import CudaGraphUpdate  # noqa: E402
from timing import fake_batch, kernels_and_busy, machine, time_calls  # noqa: E402






def pieces(args: Args, device: torch.device, capturable: bool) -> dict:
    """The pieces to time, each a function of a batch, built as the script's main block builds its models."""
    wm, agent = WorldModel(2, args).to(device), Agent(args.stoch_dim, 2, args).to(device)
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, eps=args.adam_eps, capturable=capturable)  # noqa: E731
    model_opt = adam(wm.parameters(), args.model_lr)
    policy_opt = adam(agent.policy_parameters(), args.actor_lr)
    value_opt = adam(agent.value_parameters(), args.value_lr)
    state = {"lagrange": torch.tensor(args.initial_lagrangian, device=device),
             "penalty": torch.tensor(args.initial_penalty, device=device)}
    full = functools.partial(lb.update, wm, agent, model_opt, policy_opt, value_opt, state, args=args, budget=10.0)

    def model_only(batch):
        params = list(wm.parameters())
        loss, _, metrics = lb.world_model_loss(wm, batch, args)
        lb.apply_gradients(params, torch.autograd.grad(loss, params), model_opt, args.grad_clip)
        return metrics

    with torch.no_grad():  # fixed imagination start states: the posterior states of one batch
        _, posts, _ = lb.world_model_loss(wm, fake_batch(args, device), args)
    start = {k: posts[k].reshape(-1, posts[k].shape[-1]).contiguous() for k in ("deter", "stoch")}

    def policy_only(batch):  # the batch is unused: imagination starts from fixed posterior states
        return lb.update_policy(wm, agent, policy_opt, value_opt, state, start, args, 10.0)

    return {"world model": model_only, "barrier + actor + value": policy_only, "full update": full}








def env_speed(num_envs: int, steps: int, asynchronous: bool, agent_acts: bool, args: Args, device) -> float:
    """Env steps/s (action repeat counted) of random actions, or of the script's acting step."""
    envs = make_vector_env("SafetyPointGoal1", num_envs, 0, asynchronous=asynchronous, vision=True, image_size=64,
                           action_repeat=2)
    obs, _ = envs.reset(seed=0)
    rng = np.random.default_rng(0)
    wm, agent = WorldModel(2, args).to(device), Agent(args.stoch_dim, 2, args).to(device)
    state, prev = wm.rssm.initial(num_envs, device), torch.zeros(num_envs, 2, device=device)
    envs.step(rng.uniform(-1, 1, (num_envs, 2)))  # the workers' first render happens here
    t0 = time.perf_counter()
    for _ in range(steps):
        if agent_acts:  # as the script's loop: encode, filter, the policy's mode plus noise
            with torch.no_grad():
                embed = wm.encoder(wm.preprocess(torch.as_tensor(obs, device=device)))
                state, _ = wm.rssm.obs_step(state, prev, embed)
                prev = (agent.actor(state["stoch"], deterministic=True) + 0.1 * torch.randn_like(prev)).clamp(-1, 1)
            obs, *_ = envs.step(prev.cpu().numpy())
        else:
            obs, *_ = envs.step(rng.uniform(-1, 1, (num_envs, 2)))
    rate = steps * num_envs * 2 / (time.perf_counter() - t0)
    envs.close()
    return rate


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["eager", "compiled", "compiled+cudagraph"],
                   help="eager, compiled, compiled+cudagraph (the last needs CUDA)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per piece after the first one")
    p.add_argument("--envs", type=int, default=4, help="vision envs for the env-speed table (0: skip it)")
    p.add_argument("--env-steps", type=int, default=300, help="vector steps per env-speed reading")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the script's default 1; 0: torch's)")
    p.add_argument("--batch-size", type=int, default=Args.batch_size)
    p.add_argument("--sequence-length", type=int, default=Args.sequence_length)
    p.add_argument("--imag-horizon", type=int, default=Args.imag_horizon)
    cli = p.parse_args()
    if cli.threads > 0:
        torch.set_num_threads(cli.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args = dataclasses.replace(Args(), batch_size=cli.batch_size, sequence_length=cli.sequence_length,
                               imag_horizon=cli.imag_horizon)
    print(f"machine: {machine(device)}")
    print(f"sizes: batch {args.batch_size} x {args.sequence_length}, horizon {args.imag_horizon} from "
          f"{args.batch_size * args.sequence_length} states, cnn depth {args.cnn_depth}, z {args.stoch_dim}, "
          f"h {args.deter_dim}\n", flush=True)

    rows, kernel_rows = [], []
    for mode in cli.modes:
        if mode == "compiled+cudagraph" and device.type != "cuda":
            print("compiled+cudagraph: skipped (needs CUDA)", flush=True)
            continue
        torch.manual_seed(0)
        fns = pieces(args, device, capturable=(mode == "compiled+cudagraph"))
        batch = fake_batch(args, device)
        for name, fn in fns.items():
            if mode != "eager":
                fn = torch.compile(fn)
            if mode == "compiled+cudagraph":
                fn = CudaGraphUpdate(fn, warmup=2, name=name)
            first, median = time_calls(fn, batch, device, cli.repeats)
            rows.append(f"| {name} | {mode} | {1000 * median:.0f} | {1 / median:.3g} | {first:.1f} |")
            print(rows[-1], flush=True)
            if name.startswith("full"):
                kernels, busy = kernels_and_busy(fn, batch, device)
                kernel_rows.append(f"| {mode} | {kernels} | {'-' if busy is None else f'{100 * busy:.0f}%'} |")
    print("\n| piece | mode | ms per update (median) | updates/s | first call, s (compiling) |\n|---|---|---|---|---|")
    print("\n".join(rows))
    unit = "CUDA kernels" if device.type == "cuda" else "top-level operator calls (CPU profiler)"
    print(f"\n| full update, mode | {unit} per update | GPU busy share of the update's wall time |\n|---|---|---|")
    print("\n".join(kernel_rows))
    if cli.envs > 0:
        print(f"\n| {cli.envs} vision envs (64x64, action repeat 2) | env steps/s |\n|---|---|", flush=True)
        for label, asynchronous, acts in (("random actions, this process (sync)", False, False),
                                          ("random actions, worker processes (async)", True, False),
                                          ("agent acting (encode, filter, actor), sync", False, True)):
            rate = env_speed(cli.envs, cli.env_steps, asynchronous, acts, args, device)
            print(f"| {label} | {rate:.0f} |", flush=True)
