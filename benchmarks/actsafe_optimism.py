"""Does the optimism do something? The exploration actor vs the task actor on the same world model, on the CPU.

    python benchmarks/actsafe_optimism.py --updates 600 --out docs/img/actsafe_optimism.png

A controlled version of ActSafe's expansion phase: ONE world model with the default RSSM (5 whole-prior members,
the authors' jitter; frozen at its initialisation, as at the start of a run), two actor-critics that start from the
SAME parameters, and the script's own `update_actor_critic` (no copy of the algorithm) applied to both from the
same start states: the exploration one with the intrinsic reward 10 u_t, the task one with the model's extrinsic
reward, both under the default augmented-Lagrangian constraint. Every `--eval-every` updates, each actor's mean
u_t over imagined rollouts from held-out start states is measured. If the optimism works, the exploration
actor's u_t rises above the task actor's. Default Args except the sizes of the MLPs (`--units`) and the number of
start states (`--starts`), both smaller than the script's so that the run fits a CPU.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import actsafe  # noqa: E402
from actsafe import ActorCritic, Args, WorldModel, epistemic_uncertainty, safety_budget  # noqa: E402
from plot import plot_band  # noqa: E402  (benchmarks/plot.py)


def imagined_uncertainty(wm, actor, start, horizon) -> float:
    with torch.no_grad():
        traj = actsafe.imagine(wm, actor, start, horizon)
        return epistemic_uncertainty(traj["ens_mean"].transpose(0, 1), traj["ens_std"].transpose(0, 1)).mean().item()


def random_starts(n: int, args: Args, generator: torch.Generator) -> dict:
    """Start states spread like a GRU state (in [-1, 1]) and a unit Gaussian stochastic state."""
    return {"deter": torch.tanh(torch.randn(n, args.deter_dim, generator=generator)),
            "stoch": torch.randn(n, args.stoch_dim, generator=generator)}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--starts", type=int, default=128, help="imagination start states per update (the script: 800)")
    p.add_argument("--units", type=int, default=200, help="units of the actor, critics and heads (the script: 400)")
    p.add_argument("--actor-lr", type=float, default=Args.actor_lr)
    p.add_argument("--critic-lr", type=float, default=Args.critic_lr)
    p.add_argument("--optimism-gradient", action="store_true", help="actsafe.py's --optimism-gradient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="PNG of u_t under both actors over the updates")
    cli = p.parse_args()
    torch.set_num_threads(cli.threads)
    args = dataclasses.replace(Args(), actor_units=cli.units, critic_units=cli.units, head_units=cli.units,
                               actor_lr=cli.actor_lr, critic_lr=cli.critic_lr,
                               optimism_gradient=cli.optimism_gradient)
    torch.manual_seed(cli.seed)
    wm = WorldModel(2, args)
    explore = ActorCritic(wm.rssm.feature_dim, 2, args)
    task = copy.deepcopy(explore)  # the same starting actor and critics: only the objective differs
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, eps=args.adam_eps)  # noqa: E731
    opts = {name: (adam(ac.actor.parameters(), args.actor_lr),
                   adam([*ac.critic.parameters(), *ac.cost_critic.parameters()], args.critic_lr))
            for name, ac in (("explore", explore), ("task", task))}
    states = {name: {"lagrange": torch.tensor(args.initial_lagrangian), "penalty": torch.tensor(args.initial_penalty),
                     "eta": torch.tensor(args.lbsgd_eta)} for name in opts}
    budget = safety_budget(args.cost_limit, args.episode_length, args.gamma)
    g = torch.Generator().manual_seed(cli.seed + 1)
    held_out = random_starts(512, args, g)
    print(f"python benchmarks/actsafe_optimism.py {' '.join(sys.argv[1:])}")
    print(f"world model: default RSSM, jitter {wm.rssm.init_jitter:.4f}; units {cli.units}, {cli.starts} starts, "
          f"actor lr {args.actor_lr}, critic lr {args.critic_lr}, optimism gradient {args.optimism_gradient}",
          flush=True)
    history, t0 = [], time.time()
    for k in range(cli.updates + 1):
        if k % cli.eval_every == 0:
            torch.manual_seed(10_000 + k)  # the same member draws and noise for both actors' evaluation
            u_explore = imagined_uncertainty(wm, explore.actor, held_out, args.imag_horizon)
            torch.manual_seed(10_000 + k)
            u_task = imagined_uncertainty(wm, task.actor, held_out, args.imag_horizon)
            history.append((k, u_explore, u_task))
            print(f"update {k}: u_t under the exploration actor {u_explore:.5f}, under the task actor {u_task:.5f} "
                  f"(ratio {u_explore / u_task:.3f}); {time.time() - t0:.0f}s", flush=True)
        if k == cli.updates:
            break
        start = random_starts(cli.starts, args, g)
        for name, ac in (("explore", explore), ("task", task)):
            actsafe.update_actor_critic(wm, ac, *opts[name], states[name], start, args, intrinsic=(name == "explore"),
                                        budget=budget, prefix="")
    if cli.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, ue, ut = zip(*history)
        fig, ax = plt.subplots(figsize=(6, 3.6))
        plot_band(ax, steps, [ue], label="exploration actor (reward 10 u_t)", marker="o")
        plot_band(ax, steps, [ut], label="task actor (extrinsic reward)", marker="s")
        ax.set_xlabel("actor-critic updates (world model frozen at its initialisation)")
        ax.set_ylabel("mean u_t in imagination (held-out starts)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        cli.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(cli.out, dpi=90)
        print(f"figure: {cli.out}")
