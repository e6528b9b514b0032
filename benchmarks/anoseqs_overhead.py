"""Benchmark: the wall-time cost of AnoSeqs' per-step scoring relative to a plain TD3 step, measured side by side.

Times, interleaved in one process (so that the load of a shared machine hits all of them alike):
  scoring  = `WindowScorer.step` of anoseqs.py (roll the ring of windows, score them, shape the reward, reset
             finished windows) with a freshly initialised detector of the default size, plus the read-back of the
             shaped reward;
  td3      = one TD3 gradient step (both critics; the actor and targets every 2nd step) on a filled replay buffer,
             with Adam's foreach implementation as anoseqs.py uses it, and beside it the same step with the default
             (single-tensor on the CPU) Adam;
  env      = one vector-env step of the task with random actions.
Overhead = scoring / (td3 + env), the fraction by which AnoSeqs slows a TD3 step.

    nice -n 10 python benchmarks/anoseqs_overhead.py                       # anoseqs.py defaults (256 units, batch 256)
    nice -n 10 python benchmarks/anoseqs_overhead.py --hidden-size 64 --batch-size 128   # the claim benchmark's set-up
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import anoseqs  # noqa: E402
from common import make_vector_env  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env-id", default="SafetyPointRun0")
    p.add_argument("--num-envs", type=int, default=1)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=1000, help="timed repetitions of each part")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    args = anoseqs.Args()
    envs = make_vector_env(a.env_id, a.num_envs, 0)
    obs, _ = envs.reset(seed=0)
    envs.action_space.seed(0)
    D, A = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    W = args.window_length
    detector = anoseqs.TransformerAutoencoder(D, W, args.detector_d_model, args.detector_heads, args.detector_layers,
                                              args.detector_latent_dim).eval()
    scorer = anoseqs.WindowScorer(detector, 0.1, obs, 1.0, "proportional", torch.device("cpu"), a.steps * a.num_envs)
    low, high = -torch.ones(A), torch.ones(A)

    def learner(foreach):
        """Actor, critics, targets and Adam optimisers of one TD3 learner (foreach=True: as anoseqs.run_td3)."""
        torch.manual_seed(0)
        nets = [anoseqs.Actor(D, A, a.hidden_size, -np.ones(A), np.ones(A)) for _ in range(2)]
        nets += [anoseqs.QNetwork(D, A, a.hidden_size) for _ in range(4)]
        actor, actor_t, qf1, qf2, qf1_t, qf2_t = nets
        q_opt = torch.optim.Adam(list(qf1.parameters()) + list(qf2.parameters()), lr=3e-4, foreach=foreach)
        a_opt = torch.optim.Adam(actor.parameters(), lr=3e-4, foreach=foreach)
        online = [p_ for net in (actor, qf1, qf2) for p_ in net.parameters()]
        target = [p_ for net in (actor_t, qf1_t, qf2_t) for p_ in net.parameters()]
        return actor, actor_t, qf1, qf2, qf1_t, qf2_t, q_opt, a_opt, online, target

    def td3_update(m, d, step):  # the update block of anoseqs.run_td3
        actor, actor_t, qf1, qf2, qf1_t, qf2_t, q_opt, a_opt, online, target_params = m
        with torch.no_grad():
            na = (actor_t(d["next_obs"]) + (torch.randn_like(d["action"]) * 0.2).clamp(-0.5, 0.5)).clamp(low, high)
            target = d["reward"] + 0.99 * (1 - d["done"]) * torch.min(qf1_t(d["next_obs"], na), qf2_t(d["next_obs"], na))
        loss = F.mse_loss(qf1(d["obs"], d["action"]), target) + F.mse_loss(qf2(d["obs"], d["action"]), target)
        q_opt.zero_grad()
        loss.backward()
        q_opt.step()
        if step % 2 == 0:
            actor_loss = -qf1(d["obs"], actor(d["obs"])).mean()
            a_opt.zero_grad()
            actor_loss.backward()
            a_opt.step()
            with torch.no_grad():  # Polyak averaging as in anoseqs.run_td3
                torch._foreach_lerp_(target_params, online, 0.005)

    learners = {"td3": learner(True), "td3 (Adam without foreach)": learner(False)}
    rb = {"obs": torch.randn(10_000, D), "action": torch.rand(10_000, A) * 2 - 1, "reward": torch.randn(10_000),
          "next_obs": torch.randn(10_000, D), "done": torch.zeros(10_000)}
    times = {"scoring": [], "env": [], **{k: [] for k in learners}}
    for step in range(a.steps):
        t0 = time.perf_counter()
        next_obs, rewards, costs, term, trunc, info = envs.step(envs.action_space.sample())
        t1 = time.perf_counter()
        done = np.logical_or(term, trunc)
        r = scorer.step(rewards, next_obs, next_obs, done)  # the stage-3 scoring path of anoseqs.run_td3
        r.numpy()
        t2 = time.perf_counter()
        idx = torch.randint(10_000, (a.batch_size,))
        d = {k: v[idx] for k, v in rb.items()}
        for name, m in learners.items():
            t3 = time.perf_counter()
            td3_update(m, d, step)
            if step >= 50:
                times[name].append(time.perf_counter() - t3)
        if step >= 50:  # warm-up excluded
            times["env"].append(t1 - t0)
            times["scoring"].append(t2 - t1)
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    mean = {k: float(np.mean(v)) * 1e3 for k, v in times.items()}
    print(f"{a.env_id}, {a.num_envs} env(s), TD3 hidden {a.hidden_size}, batch {a.batch_size}, detector d_model "
          f"{args.detector_d_model}, W {W}, {a.threads} torch thread(s), {a.steps - 50} timed steps")
    for k in times:
        print(f"  {k:28s} median {med[k]:.3f} ms   mean {mean[k]:.3f} ms")
    print(f"overhead of scoring on a TD3 step (env + update): median {med['scoring'] / (med['td3'] + med['env']):.1%}, "
          f"mean {mean['scoring'] / (mean['td3'] + mean['env']):.1%}")


if __name__ == "__main__":
    main()
