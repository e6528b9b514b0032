"""Benchmark (run by hand, not a test): how fast SACLagrangian's cost critic learns, and what beta does meanwhile.

A constant cost of 1 at every step (no termination), so the true Qc is 1 / (1 - gamma) = 100 everywhere, on fixed
random states and actions; no environment. It isolates why beta dies at the start of a run (docs/sagui.md, "Why
beta dies"): the critic starts near 0 and bootstraps through a Polyak target (tau), so early on it grows by about
tau * c per gradient step for a per-step cost c, and stays under d_bar = 2.5 for about d_bar / (tau c) steps,
while Adam at beta's learning rate drives beta toward 0 in a few hundred steps.

    OMP_NUM_THREADS=1 python benchmarks/sagui_cost_critic_lag.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sagui  # noqa: E402
from common import make_safety_env  # noqa: E402

if __name__ == "__main__":
    torch.manual_seed(0)
    args = sagui.Args(hidden_size=64, batch_size=64, beta_update="paper")
    space = make_safety_env("SafetyPointGoal1", seed=0).action_space
    agent = sagui.SACLagrangian(6, 2, args, space, 25.0, "cpu")
    g = torch.Generator().manual_seed(0)
    obs = torch.randn(10_000, 6, generator=g)
    n = args.batch_size
    for step in range(1, 5001):
        idx, next_idx = torch.randint(0, 10_000, (n,), generator=g), torch.randint(0, 10_000, (n,), generator=g)
        batch = {"obs": obs[idx], "action": torch.rand(n, 2, generator=g) * 1.8 - 0.9, "next_obs": obs[next_idx],
                 "reward": torch.zeros(n), "cost": torch.ones(n), "done": torch.zeros(n), "rho": torch.ones(n),
                 "logp_guide": torch.zeros(n), "guide_mean": torch.zeros(n, 2), "guide_std": torch.ones(n, 2),
                 "guide_next_mean": torch.zeros(n, 2), "guide_next_std": torch.ones(n, 2)}
        out = agent.update(batch)
        if step in (100, 200, 500, 1000, 2000, 3000, 5000):
            print(f"gradient step {step}: Qc(s, a~pi) = {float(out['qc_pi']):.2f} (true 100, d_bar "
                  f"{agent.d_bar:.2f}), beta = {agent.beta:.4f}", flush=True)
