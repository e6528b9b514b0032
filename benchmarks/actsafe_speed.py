"""Speed of actsafe.py's pieces at the default sizes: world-model updates/s, full updates/s, env steps/s.

    nice -n 10 python benchmarks/actsafe_speed.py --threads 1 2 --updates 5 --iterations 50

Measures, with actsafe.py's own classes and default Args (batch 16 x 50, ensemble 5, horizon 15):
- world-model updates/s (encoder, RSSM filtering with the ensemble prior, decoder, heads, balanced KL, Adam step);
- full updates/s (the world-model update plus the task and exploration actor-critic updates in imagination, as in
  the expansion phase);
- environment steps/s of the vector env (10 envs, action repeat 2, 64x64 pixels) with random actions, and with the
  agent acting (encode, filter, actor) - env steps count the action repeat, as `global_step` does.
Prints a markdown table; the numbers go into docs/actsafe.md with the machine's description.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actsafe import ActorCritic, Args, WorldModel, actor_critic_losses, safety_budget  # noqa: E402
from common import make_vector_env  # noqa: E402
from common.rssm import RSSM, balanced_kl_loss  # noqa: E402


def fake_batch(args: Args, action_dim: int, device) -> dict:
    b, t = args.batch_size, args.sequence_length
    return {"obs": torch.randint(0, 256, (b, t, 3, 64, 64), dtype=torch.uint8, device=device),
            "action": torch.rand(b, t, action_dim, device=device) * 2 - 1,
            "reward": torch.randn(b, t, device=device), "cost": (torch.rand(b, t, device=device) < 0.1).float()}


def model_update(wm, opt, batch, args):
    """The world-model update of actsafe.py's loop (same losses, same order)."""
    embeds = wm.encoder(wm.preprocess(batch["obs"]))
    posts, priors = wm.rssm.observe(embeds, batch["action"])
    feats = RSSM.features(posts)
    recon, heads = wm.decoder(feats), wm.heads(feats)
    image_loss = 0.5 * (recon - wm.preprocess(batch["obs"])).pow(2).sum((-3, -2, -1)).mean()
    reward_loss = 0.5 * (heads[..., 0] - batch["reward"]).pow(2).mean()
    cost_loss = 0.5 * (heads[..., 1] - batch["cost"]).pow(2).mean()
    kl_loss, _ = balanced_kl_loss(posts, priors, args.kl_balance, args.free_nats)
    loss = image_loss + reward_loss + cost_loss + args.kl_scale * kl_loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(wm.parameters(), args.grad_clip)
    opt.step()
    return posts


def ac_update(wm, ac, opts, start, args, intrinsic, state, budget):
    actor_loss, critic_loss, _ = actor_critic_losses(wm, ac, start, args, intrinsic, state, budget)
    opts[0].zero_grad(set_to_none=True)
    actor_loss.backward()
    opts[0].step()
    opts[1].zero_grad(set_to_none=True)
    critic_loss.backward()
    opts[1].step()


def bench_updates(args: Args, n_updates: int) -> tuple[float, float]:
    device = torch.device("cpu")
    wm = WorldModel(2, args).to(device)
    acs = [ActorCritic(wm.rssm.feature_dim, 2, args) for _ in range(2)]
    opt = torch.optim.Adam(wm.parameters(), lr=args.model_lr, eps=args.adam_eps)
    ac_opts = [(torch.optim.Adam(ac.actor.parameters(), lr=args.actor_lr),
                torch.optim.Adam([*ac.critic.parameters(), *ac.cost_critic.parameters()], lr=args.critic_lr)) for ac in acs]
    state = {"lagrange": torch.tensor(1e-4), "penalty": torch.tensor(5e-8), "eta": torch.tensor(0.1)}
    budget = safety_budget(args.cost_limit, args.episode_length, args.gamma)
    batch = fake_batch(args, 2, device)
    model_update(wm, opt, batch, args)  # warm-up
    t0 = time.perf_counter()
    for _ in range(n_updates):
        model_update(wm, opt, batch, args)
    wm_rate = n_updates / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(n_updates):
        posts = model_update(wm, opt, batch, args)
        start = {k: posts[k].detach().reshape(-1, posts[k].shape[-1]) for k in ("deter", "stoch")}
        for ac, opts, intrinsic in zip(acs, ac_opts, (True, False)):
            ac_update(wm, ac, opts, start, args, intrinsic, state, budget)
    full_rate = n_updates / (time.perf_counter() - t0)
    return wm_rate, full_rate


def bench_env(args: Args, iterations: int) -> tuple[float, float]:
    envs = make_vector_env(args.env_id, args.num_envs, 0, vision=True, image_size=64, action_repeat=args.action_repeat)
    obs, _ = envs.reset(seed=0)
    per_iter = args.num_envs * args.action_repeat
    t0 = time.perf_counter()
    for _ in range(iterations):
        obs, *_ = envs.step(envs.action_space.sample())
    random_rate = iterations * per_iter / (time.perf_counter() - t0)
    wm, ac = WorldModel(2, args), ActorCritic(args.deter_dim + args.stoch_dim, 2, args)
    state, prev = wm.rssm.initial(args.num_envs), torch.zeros(args.num_envs, 2)
    t0 = time.perf_counter()
    for _ in range(iterations):
        with torch.no_grad():
            embed = wm.encoder(wm.preprocess(torch.as_tensor(obs)))
            state, _ = wm.rssm.obs_step(state, prev, embed)
            prev = ac.actor(RSSM.features(state))
        obs, *_ = envs.step(prev.numpy())
    agent_rate = iterations * per_iter / (time.perf_counter() - t0)
    envs.close()
    return random_rate, agent_rate


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to compare")
    p.add_argument("--updates", type=int, default=5, help="timed updates per measurement")
    p.add_argument("--iterations", type=int, default=50, help="timed vector-env iterations (x 10 envs x 2 repeats)")
    cli = p.parse_args()
    args = Args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU only, default Args: batch {args.batch_size}x{args.sequence_length}, "
          f"ensemble {args.ensemble_size}, horizon {args.imag_horizon}, {args.num_envs} envs, repeat {args.action_repeat}")
    print("| torch threads | world-model updates/s | full updates/s (model + 2 actor-critics) | env steps/s random | env steps/s agent |")
    print("|---|---|---|---|---|")
    for n in cli.threads:
        torch.set_num_threads(n)
        wm_rate, full_rate = bench_updates(args, cli.updates)
        random_rate, agent_rate = bench_env(args, cli.iterations)
        print(f"| {n} | {wm_rate:.3f} | {full_rate:.3f} | {random_rate:.0f} | {agent_rate:.0f} |", flush=True)

