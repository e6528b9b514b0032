"""Tests of latent_barrier.py: the barrier losses and labels on hand-made values, the lambda-return, the world-model
loss, gradient routing, the one-member RSSM against a plain RSSM, input checks, the update as one capturable program,
and smoke runs of the real script."""

import dataclasses
import json
import runpy
import shutil
import subprocess
import sys
import types
import unittest.mock
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import latent_barrier as lb
from latent_barrier import (
    Agent,
    Args,
    RepeatKeepingLastCost,
    WorldModel,
    augmented_lagrangian,
    barrier_losses,
    label_states,
    lambda_returns,
    policy_and_value_losses,
    require_sequences,
    safety_budget,
    update_policy,
    validate,
    world_model_loss,
)
from common.checkpoint import read_checkpoint, save_checkpoint, set_rng_state, unpack_array
from common.summary import REQUIRED
from conftest import REPO, forbid_host_syncs, read_scalars, run_dirs, run_script, run_until_killed

TINY = dict(deter_dim=16, stoch_dim=4, hidden_dim=16, cnn_depth=4, head_units=16, actor_units=16, value_units=16,
            barrier_units=16, imag_horizon=4)


# ---- labels and the three barrier losses (eqs. 3-4) on hand-made B values ------------------------------------------

def test_labels_threshold_the_predicted_cost():
    cost = torch.tensor([0.0, 0.005, 0.01, 0.02, 1.0, -0.3])
    unsafe, safe = label_states(cost, 0.01)
    assert unsafe.tolist() == [0, 0, 0, 1, 1, 0]
    assert safe.tolist() == [1, 1, 0, 0, 0, 1]  # exactly at the threshold: neither
    cost = cost.clone().requires_grad_()
    assert not label_states(cost, 0.01)[0].requires_grad  # no gradient through a label


def grad_of(loss_fn, b_values):
    b = torch.tensor(b_values, requires_grad=True)
    loss = loss_fn(b)
    loss.backward()
    return loss.item(), b.grad


def test_safe_term_is_zero_with_margin_and_pulls_b_up_when_violated():
    eta, safe, unsafe = 0.1, torch.ones(2, 2), torch.zeros(2, 2)
    term = lambda b: barrier_losses(b, unsafe, safe, eta, alpha=0.5)["safe"]  # noqa: E731
    value, grad = grad_of(term, [[0.5, 0.1], [0.3, 2.0]])  # all >= eta
    assert value == 0 and torch.all(grad == 0)
    # violated: B = 0.05 (inside the margin) and B = -1 (wrong sign); mean over the 4 states
    value, grad = grad_of(term, [[0.05, 0.5], [-1.0, 0.2]])
    assert value == pytest.approx((0.05 + 1.1) / 4)
    assert grad[0, 0] == pytest.approx(-0.25) and grad[1, 0] == pytest.approx(-0.25)  # descent raises B
    assert grad[0, 1] == 0 and grad[1, 1] == 0
    # the same values on states labelled unsafe do not enter the safe term
    assert barrier_losses(torch.tensor([[-1.0]]), torch.ones(1, 1), torch.zeros(1, 1), eta, 0.5)["safe"] == 0


def test_unsafe_term_is_zero_with_margin_and_pushes_b_down_when_violated():
    eta, safe, unsafe = 0.1, torch.zeros(1, 3), torch.ones(1, 3)
    term = lambda b: barrier_losses(b, unsafe, safe, eta, alpha=0.5)["unsafe"]  # noqa: E731
    value, grad = grad_of(term, [[-0.1, -3.0, -0.5]])
    assert value == 0 and torch.all(grad == 0)
    value, grad = grad_of(term, [[-0.05, 2.0, -1.0]])
    assert value == pytest.approx((0.05 + 2.1) / 3)
    assert grad[0].tolist() == pytest.approx([1 / 3, 1 / 3, 0.0])  # descent lowers B


def test_derivative_term_by_hand():
    eta, alpha = 0.1, 0.5
    no_labels = torch.zeros(3, 1)
    term = lambda b, **kw: barrier_losses(b, no_labels, no_labels, eta, alpha, **kw)  # noqa: E731
    # condition_t = B_t - B_{t-1} + alpha B_t (alpha on the NEWER state): 1 -> 1 gives 0.5, 1 -> 2 gives 2: held
    out = term(torch.tensor([[1.0], [1.0], [2.0]]))
    assert out["derivative"].item() == 0 and out["violation_fraction"].item() == 0
    # 1 -> 0.2: 0.2 - 1 + 0.1 = -0.7 (violated); 0.2 -> 0.2: 0.1 (held, and not inside the margin: 0.1 >= eta)
    b = torch.tensor([[1.0], [0.2], [0.2]], requires_grad=True)
    out = term(b)
    assert out["derivative"].item() == pytest.approx((0.1 + 0.7) / 2)  # mean over the 2 transitions
    assert out["violation_fraction"].item() == pytest.approx(0.5)
    out["derivative"].backward()
    # d/dB: -(1 + alpha) / 2 on the newer state, +1/2 on the older one: descent raises B_t, lowers B_{t-1}
    assert b.grad[:, 0].tolist() == pytest.approx([0.5, -0.75, 0.0])
    # inside the margin but not violated: condition 0.05 < eta -> loss, no violation counted
    out = term(torch.tensor([[1.0], [0.7], [0.7]]))  # 0.7 - 1 + 0.35 = 0.05; 0.35
    assert out["derivative"].item() == pytest.approx(0.05 / 2) and out["violation_fraction"].item() == 0
    # the authors' variant: divided by dt, weighted: 100 * ReLU(eta - condition / 0.02)
    out = term(torch.tensor([[1.0], [0.2], [0.2]]), dt=0.02, derivative_weight=100.0)
    assert out["derivative"].item() == pytest.approx(100 * (0.1 + 0.7 / 0.02 + 0.0) / 2)


def test_sign_only_hinges_act_only_on_the_wrong_sign():
    eta = 0.1
    b = torch.tensor([[0.05, -0.2], [-0.05, 0.3]])  # row 0 safe states, row 1 unsafe states
    safe, unsafe = torch.tensor([[1.0, 1.0], [0, 0]]), torch.tensor([[0.0, 0.0], [1, 1]])
    paper = barrier_losses(b, unsafe, safe, eta, 0.5)
    code = barrier_losses(b, unsafe, safe, eta, 0.5, sign_only=True)
    # the paper's hinges: safe ReLU(0.1 - 0.05) + ReLU(0.1 + 0.2); unsafe ReLU(0.1 - 0.05) + ReLU(0.1 + 0.3)
    assert paper["safe"].item() == pytest.approx((0.05 + 0.3) / 4)
    assert paper["unsafe"].item() == pytest.approx((0.05 + 0.4) / 4)
    # the authors' code: only B = -0.2 (safe, wrong sign) and B = 0.3 (unsafe, wrong sign) count, with eta added
    assert code["safe"].item() == pytest.approx(0.3 / 4)
    assert code["unsafe"].item() == pytest.approx(0.4 / 4)
    assert code["derivative"].item() == pytest.approx(paper["derivative"].item())  # not a hinge on a sign


def test_defaults_follow_the_paper_and_the_notes():
    args = Args()
    assert (args.stoch_dim, args.deter_dim, args.free_nats, args.bit_depth, args.imag_horizon) == (30, 200, 3.0, 5, 30)
    assert (args.derivative_weight, args.derivative_dt, args.sign_only_hinges) == (1.0, 1.0, False)
    assert (args.cost_threshold, args.beta, args.actor_lr, args.adam_eps) == (0.01, 1.0, 8e-5, 1e-7)


# ---- lambda-returns and the Lagrangian baseline ---------------------------------------------------------------------

def slow_lambda_return(r, v, gamma, lam, t):
    """The lambda-return as the lambda-weighted average of n-step returns (Sutton & Barto 12.1, truncated at H);
    r[k] is the reward received on reaching state k + 1."""
    H = len(r)

    def n_step(n):
        return sum(gamma**k * r[t + k] for k in range(n)) + gamma**n * v[t + n]

    last = H - t
    return (1 - lam) * sum(lam ** (n - 1) * n_step(n) for n in range(1, last)) + lam ** (last - 1) * n_step(last)


def test_lambda_returns_match_a_slow_reference():
    rng = np.random.default_rng(0)
    H, N, gamma, lam = 6, 3, 0.9, 0.8
    r, v = rng.normal(size=(H, N)), rng.normal(size=(H + 1, N))
    fast = lambda_returns(torch.tensor(r), torch.tensor(v), gamma, lam).numpy()
    for n in range(N):
        for t in range(H):
            assert fast[t, n] == pytest.approx(slow_lambda_return(r[:, n], v[:, n], gamma, lam, t), rel=1e-10)
    td = lambda_returns(torch.tensor(r), torch.tensor(v), gamma, 0.0).numpy()
    np.testing.assert_allclose(td, r + gamma * v[1:])


def test_budget_and_augmented_lagrangian_by_hand():
    # 25 per 1000 env steps, agent-step costs summed over 2 sub-steps: 0.05 per agent step, / (1 - 0.995) = 10
    assert safety_budget(25, 1000, 2, "sum", 0.995) == pytest.approx(10.0)
    assert safety_budget(25, 1000, 2, "last", 0.995) == pytest.approx(5.0)
    psi, new = augmented_lagrangian(torch.tensor(-1.0), torch.tensor(0.5), torch.tensor(2.0))
    assert psi.item() == pytest.approx(1.5) and new.item() == pytest.approx(2.5)  # lambda g + c/2 g^2; lambda + c g
    psi, new = augmented_lagrangian(torch.tensor(1.0), torch.tensor(0.5), torch.tensor(2.0))
    assert psi.item() == pytest.approx(-0.0625) and new.item() == 0.0  # -lambda^2 / (2c); max(0, .)


# ---- the world model --------------------------------------------------------------------------------------------------

def test_one_member_rssm_is_a_plain_rssm_step():
    # the script's RSSM (one member, ELU, min std 0.1) against PlaNet's transition written with torch's own layers
    torch.manual_seed(0)
    args = Args(**TINY)
    rssm = WorldModel(2, args).rssm
    S, D, H = args.stoch_dim, args.deter_dim, args.hidden_dim
    embed_dim = rssm.post_net[0].in_features - D
    fc_in, gru = torch.nn.Linear(S + 2, H), torch.nn.GRUCell(H, D)
    fc_prior, fc_prior_out = torch.nn.Linear(D, H), torch.nn.Linear(H, 2 * S)
    p = rssm.prior
    with torch.no_grad():  # one member's weights, stored (E, in, out), into torch's (out, in) layers
        for layer, ens in ((fc_in, p.img_in), (fc_prior, p.hidden), (fc_prior_out, p.out)):
            layer.weight.copy_(ens.weight[0].t())
            layer.bias.copy_(ens.bias[0])
        gru.weight_ih.copy_(p.gru.weight_ih[0].t())
        gru.weight_hh.copy_(p.gru.weight_hh[0].t())
        gru.bias_ih.copy_(p.gru.bias_ih[0])
        gru.bias_hh.copy_(p.gru.bias_hh[0])
    h0, z0, a, embed = torch.tanh(torch.randn(5, D)), torch.randn(5, S), torch.rand(5, 2) * 2 - 1, torch.randn(5, embed_dim)
    with torch.no_grad():
        h = gru(F.elu(fc_in(torch.cat([z0, a], -1))), h0)
        mean, std = fc_prior_out(F.elu(fc_prior(h))).chunk(2, -1)
        std = F.softplus(std) + 0.1
        post_mean, post_std = rssm.post_net(torch.cat([h, embed], -1)).chunk(2, -1)
        post_std = F.softplus(post_std) + 0.1
        torch.manual_seed(3)
        eps_prior, eps_post = torch.randn(5, S), torch.randn(5, S)
        torch.manual_seed(3)  # one member draws no member index: the prior noise is the generator's first draw
        post, prior = rssm.obs_step({"deter": h0, "stoch": z0}, a, embed)
    torch.testing.assert_close(prior["deter"], h)
    torch.testing.assert_close(prior["mean"], mean)
    torch.testing.assert_close(prior["std"], std)
    torch.testing.assert_close(prior["stoch"], mean + std * eps_prior)
    torch.testing.assert_close(post["mean"], post_mean)
    torch.testing.assert_close(post["stoch"], post_mean + post_std * eps_post)


def test_preprocess_quantises_to_five_bits_with_dequantisation_noise():
    wm = WorldModel(2, Args(**TINY))
    obs = torch.arange(256, dtype=torch.uint8).repeat(48)[: 3 * 64 * 64].reshape(3, 64, 64)
    x = wm.preprocess(obs)
    grid = torch.floor(obs.float() / 8) / 32 - 0.5  # 32 levels in [-0.5, 0.5)
    assert ((x - grid) >= 0).all() and ((x - grid) < 1 / 32).all()
    assert grid.unique().numel() == 32 and x.min() >= -0.5 and x.max() < 0.5


def test_world_model_loss_by_hand():
    # PlaNet's loss: summed-pixel image MSE + reward and cost MSE + mean over states of max(KL, free nats)
    torch.manual_seed(0)
    args = Args(**TINY, free_nats=0.28)  # inside the spread of these states' KLs (0.24-0.30)
    wm = WorldModel(2, args)
    batch = {"obs": torch.randint(0, 256, (2, 3, 3, 64, 64), dtype=torch.uint8), "action": torch.rand(2, 3, 2),
             "reward": torch.rand(2, 3), "cost": (torch.rand(2, 3) < 0.5).float()}
    torch.manual_seed(1)
    loss, _, metrics = world_model_loss(wm, batch, args)
    torch.manual_seed(1)  # the same draws, the loss written out with torch.distributions
    images = wm.preprocess(batch["obs"])
    posts, priors = wm.rssm.observe(wm.encoder(images), batch["action"])
    feats = torch.cat([posts["stoch"], posts["deter"]], -1)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(posts["mean"], posts["std"]),
                                           torch.distributions.Normal(priors["mean"], priors["std"])).sum(-1)
    expected = (F.mse_loss(wm.decoder(feats), images, reduction="none").sum((-3, -2, -1)).mean()
                + F.mse_loss(wm.reward_head(feats).squeeze(-1), batch["reward"])
                + F.mse_loss(wm.cost_head(feats).squeeze(-1), batch["cost"])
                + torch.maximum(kl, torch.tensor(0.28)).mean())
    torch.testing.assert_close(loss, expected)
    assert (kl < 0.28).any() and (kl > 0.28).any()  # free nats per state: some states are clamped, some not
    batch_clamp = expected - torch.maximum(kl, torch.tensor(0.28)).mean() + torch.clamp(kl.mean(), min=0.28)
    assert (loss - batch_clamp).abs() > 1e-4  # not the free nats of the batch mean (DreamerV2's)
    torch.testing.assert_close(metrics["losses/kl"], kl.mean())


# ---- gradient routing in the policy update --------------------------------------------------------------------------

def tiny_models(seed=0, **kw):
    torch.manual_seed(seed)
    args = Args(**{**TINY, **kw})
    wm, agent = WorldModel(2, args), Agent(args.stoch_dim, 2, args)
    start = {"deter": torch.tanh(torch.randn(8, args.deter_dim)), "stoch": torch.randn(8, args.stoch_dim)}
    state = {"lagrange": torch.tensor(0.1), "penalty": torch.tensor(0.5)}
    return args, wm, agent, start, state


def test_policy_update_reaches_barrier_and_actor_never_the_world_model():
    args, wm, agent, start, state = tiny_models(cost_threshold=0.05)
    with torch.no_grad():  # a cost head that labels about half of the states unsafe
        wm.cost_head[-1].bias.fill_(0.05)
    policy_opt = torch.optim.Adam(agent.policy_parameters(), lr=1e-3)
    value_opt = torch.optim.Adam(agent.value_parameters(), lr=1e-3)
    snapshot = lambda m: [p.detach().clone() for p in m.parameters()]  # noqa: E731
    before = {m: snapshot(m) for m in (wm, agent.actor, agent.barrier, agent.value)}
    rng = torch.get_rng_state()
    policy_loss, value_loss, info = policy_and_value_losses(wm, agent, start, args, state, 0.0)
    expected = torch.autograd.grad(policy_loss, agent.policy_parameters(), retain_graph=True)
    expected_value = torch.autograd.grad(value_loss, agent.value_parameters())
    assert 0 < info["unsafe_fraction"] < 1
    torch.set_rng_state(rng)  # the same imagined trajectories
    metrics = update_policy(wm, agent, policy_opt, value_opt, state, start, args, 0.0)
    changed = lambda m: any(not torch.equal(a, p) for a, p in zip(before[m], m.parameters()))  # noqa: E731
    assert not changed(wm) and all(p.grad is None for p in wm.parameters())  # through the model, never into it
    assert changed(agent.actor) and changed(agent.barrier) and changed(agent.value)
    for g, p in zip(expected, agent.policy_parameters()):  # the policy loss's gradient (norm under the clip of 100)
        torch.testing.assert_close(p.grad, g)
    for g, p in zip(expected_value, agent.value_parameters()):  # the value's own loss only
        torch.testing.assert_close(p.grad, g)
    assert metrics["losses/barrier_loss"] > 0

    # the barrier loss reaches the ACTOR too (through the imagined states): its gradient differs with beta 0
    def actor_grads(beta):
        a2 = dataclasses.replace(args, beta=beta)
        torch.set_rng_state(rng)
        loss, _, _ = policy_and_value_losses(wm, agent, start, a2, state, 0.0)
        return torch.autograd.grad(loss, list(agent.actor.parameters()) + list(agent.barrier.parameters()),
                                   allow_unused=True)

    with_barrier, without = actor_grads(1.0), actor_grads(0.0)
    n_actor = len(list(agent.actor.parameters()))
    assert any((a - b).abs().max() > 1e-7 for a, b in zip(with_barrier[:n_actor], without[:n_actor]))
    assert all(g is None or g.abs().max() == 0 for g in without[n_actor:])  # beta 0: the barrier learns nothing


def test_lagrangian_baseline_updates_its_multipliers_in_place_and_has_no_barrier():
    args, wm, agent, start, state = tiny_models(constraint="lagrangian")
    assert agent.barrier is None and agent.cost_value is not None
    lagrange = state["lagrange"]
    policy_opt = torch.optim.Adam(agent.policy_parameters(), lr=1e-3)
    value_opt = torch.optim.Adam(agent.value_parameters(), lr=1e-3)
    metrics = update_policy(wm, agent, policy_opt, value_opt, state, start, args, budget=-10.0)  # infeasible
    assert state["lagrange"] is lagrange and lagrange.item() > 0.1  # slack < 0: lambda <- lambda + c g grows
    assert state["penalty"].item() == pytest.approx(0.5 * (1 + args.penalty_power_factor))
    assert metrics["charts/slack"] < 0 and "losses/barrier_loss" not in metrics


# ---- the authors' cost of an agent step ---------------------------------------------------------------------------------

class CostSequenceEnv(gym.Env):
    """A fake env whose sub-step costs are 1, 0, 0, 1, 0, 1 and whose episodes last these 6 sub-steps."""

    observation_space = gym.spaces.Box(0, 1, (1,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        cost = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0][self.t]
        self.t += 1
        return np.zeros(1, np.float32), 1.0, False, self.t == 6, {"cost": cost}


def test_repeat_keeping_last_cost_reports_sum_and_last_sub_step():
    from common.envs import EpisodeStatistics

    env = RepeatKeepingLastCost(EpisodeStatistics(CostSequenceEnv()), repeat=2)
    env.reset()
    infos = [env.step(np.zeros(1))[-1] for _ in range(3)]
    assert [i["cost"] for i in infos] == [1.0, 1.0, 1.0]  # sums of (1, 0), (0, 1), (0, 1)
    assert [i["last_substep_cost"] for i in infos] == [0.0, 1.0, 1.0]  # the authors' cost
    assert infos[-1]["episode"] == {"r": 6.0, "c": 3.0, "l": 3}  # every sub-step's cost; agent steps


def test_last_substep_costs_read_through_a_vector_env_and_its_auto_reset():
    from common import SafeVectorEnv
    from common.envs import EpisodeStatistics

    envs = SafeVectorEnv(gym.vector.SyncVectorEnv(
        [lambda: RepeatKeepingLastCost(EpisodeStatistics(CostSequenceEnv()), repeat=2)] * 2))
    envs.reset(seed=0)
    seen = []
    for _ in range(3):  # the third agent step ends both episodes (6 sub-steps): read from the final info
        _, _, cost, _, truncated, info = envs.step(np.zeros((2, 1)))
        seen.append((cost.tolist(), lb.last_substep_costs(info, 2).tolist()))
    assert seen == [([1.0, 1.0], [0.0, 0.0]), ([1.0, 1.0], [1.0, 1.0]), ([1.0, 1.0], [1.0, 1.0])]
    assert truncated.all()


# ---- bad input ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(eta=0.0), "--eta must be positive"),
    (dict(eta=-0.1), "--eta must be positive"),
    (dict(imag_horizon=1), "--imag-horizon must be >= 2"),
    (dict(imag_horizon=0), "--imag-horizon must be >= 2"),
    (dict(total_timesteps=0), "--total-timesteps must be positive"),
    (dict(cost_limit=-1.0), "--cost-limit must be positive"),
    (dict(cost_threshold=0.0), r"--cost-threshold must be in \(0, 1\)"),
    (dict(cost_threshold=1.0), r"--cost-threshold must be in \(0, 1\)"),
    (dict(alpha=0.0), "--alpha must be positive"),
    (dict(beta=-1.0), "--beta must be >= 0"),
    (dict(derivative_dt=0.0), "--derivative-dt must be positive"),
    (dict(constraint="cbf"), "--constraint must be one of barrier, lagrangian"),
    (dict(repeat_cost="max"), "--repeat-cost must be one of sum, last"),
    (dict(gamma=1.0), r"--gamma must be in \(0, 1\)"),
    (dict(lambda_=1.5), "--lambda_ must be in"),
    (dict(bit_depth=9), "--bit-depth must be in 1..8"),
    (dict(store_chunk=10), "--store-chunk"),
    (dict(checkpoint_every=-1), "--checkpoint-every must be >= 0"),
    (dict(capture_video=True, eval_episodes=0), "--capture-video records the final evaluation episodes"),
    (dict(env_id="SafetyPointGaol1"), "Closest valid ids: SafetyPointGoal1"),
    (dict(env_id="SafetyHalfCheetahVelocity"), "has no vision camera"),
])
def test_bad_input_is_rejected_with_a_message(change, message):
    with pytest.raises(SystemExit, match=message):
        validate(dataclasses.replace(Args(), **change))


def test_the_paper_tasks_are_accepted():
    for env_id in ("SafetyPointGoal1", "SafetyPointGoal2", "SafetyCarGoal1-v0", "SafetyPointPush1",
                   "SafetyPointButton1", "SafetyDoggoGoal1Vision"):
        validate(dataclasses.replace(Args(), env_id=env_id))


def test_sequence_longer_than_the_episodes_is_a_message_not_a_traceback():
    from common import EpisodeBuffer

    buffer = EpisodeBuffer(1000)
    buffer.add_episode({"reward": np.zeros(501, np.float32), "cost": np.zeros(501, np.float32)})
    require_sequences(buffer, 501)
    with pytest.raises(SystemExit, match=r"--sequence-length 600 is longer than every stored episode"):
        require_sequences(buffer, 600)


# ---- the update as one capturable program (compiled == eager, no host sync, seeds) -----------------------------------

def full_update_setup(seed: int, constraint: str = "barrier"):
    """Tiny models, optimisers, multipliers and replay-like batches, all from `seed`."""
    args, wm, agent, _, state = tiny_models(seed, constraint=constraint, imag_horizon=3)
    opts = [torch.optim.Adam(params, lr=1e-3, eps=1e-7)
            for params in (list(wm.parameters()), agent.policy_parameters(), agent.value_parameters())]
    g = torch.Generator().manual_seed(seed)
    batches = [{"obs": torch.randint(0, 256, (2, 4, 3, 64, 64), generator=g, dtype=torch.uint8),
                "action": torch.rand(2, 4, 2, generator=g) * 2 - 1, "reward": torch.rand(2, 4, generator=g),
                "cost": (torch.rand(2, 4, generator=g) < 0.3).float()} for _ in range(3)]
    step = lambda batch: lb.update(wm, agent, *opts, state, batch, args=args, budget=0.5)  # noqa: E731
    return step, batches, [wm, agent], state


def test_compiled_update_equals_the_eager_update():
    # the same function under torch.compile (backend aot_eager: AOTAutograd's joint graphs without inductor's codegen,
    # to keep the test fast on a CPU; random numbers are torch's in both), three full updates
    import torch._inductor.config as inductor_config

    eager, batches, eager_models, _ = full_update_setup(0)
    torch.manual_seed(1)
    eager_metrics = [{k: v.clone() for k, v in eager(b).items()} for b in batches]
    step, batches, models, _ = full_update_setup(0)
    compiled = torch.compile(step, backend="aot_eager")
    torch.manual_seed(1)
    with unittest.mock.patch.object(inductor_config, "fallback_random", True):
        metrics = [compiled(b) for b in batches]
    for m_eager, m in zip(eager_metrics, metrics):
        assert m_eager.keys() == m.keys()
        for k in m:
            torch.testing.assert_close(m[k], m_eager[k], rtol=1e-4, atol=1e-4, msg=k)
    for a, b in zip(eager_models, models):
        for pa, pb in zip(a.parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("constraint", ["barrier", "lagrangian"])
def test_a_full_update_makes_no_host_sync(monkeypatch, constraint):
    step, batches, _, _ = full_update_setup(0, constraint)

    forbid_host_syncs(monkeypatch)
    metrics = step(batches[0])
    monkeypatch.undo()
    assert "losses/model_loss" in metrics and all(v.dim() == 0 for v in metrics.values())


def test_same_seed_same_update_on_cpu():
    def losses(seed):
        step, batches, _, _ = full_update_setup(0)
        torch.manual_seed(seed)
        m = step(batches[0])
        return m["losses/model_loss"].item(), m["losses/policy_loss"].item()

    assert losses(3) == losses(3)
    assert losses(3) != losses(4)


# ---- smoke tests: the real script, as a user runs it -------------------------------------------------------------------

def tiny_flags(**kw):
    flags = dict(num_envs=1, batch_size=2, sequence_length=8, store_chunk=50, train_steps=2, log_every=200, **TINY)
    flags.update(kw)
    out = []
    for k, v in flags.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def test_smoke_latent_barrier_with_eval_video_summary_and_save(tmp_path):
    run_script("latent_barrier.py", "--env-id", "SafetyPointGoal1", "--save-model", "--capture-video", *tiny_flags(
        total_timesteps=200, warmup_steps=100, train_every=50, store_chunk=30, eval_episodes=1), cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    assert run.name.startswith("SafetyPointGoal1-v0__latent_barrier__1__")
    s = read_scalars(run)
    for tag in ["charts/cost_rate", "charts/SPS", "losses/model_loss", "losses/image_loss", "losses/reward_loss",
                "losses/cost_loss", "losses/kl", "losses/policy_loss", "losses/value_loss", "losses/barrier_loss",
                "losses/barrier_safe", "losses/barrier_unsafe", "losses/barrier_derivative", "charts/unsafe_fraction",
                "charts/violation_fraction", "charts/safe_misclassified", "charts/unsafe_misclassified",
                "charts/real_unsafe_misclassified", "charts/imagined_return", "charts/updates_per_s",
                "eval/episodic_return", "eval/episodic_cost"]:
        assert tag in s, f"{tag} missing; logged: {sorted(s)}"
        assert all(np.isfinite(v) for _, v in s[tag]), tag
    assert s["charts/updates"][-1][1] == 6  # rounds at env steps 100, 150, 200 (first stored chunk at ~58): 2 each
    assert (run / "latent_barrier.cleanrl_model").exists()
    # --capture-video: the evaluation episode (1,000 env steps = 500 agent steps, its first frame too) as an mp4 of
    # the agent's 64x64 camera enlarged 4x
    import imageio.v2 as imageio

    reader = imageio.get_reader(run / "videos" / "eval-episode-0.mp4")
    assert reader.count_frames() == 501 and reader.get_data(0).shape == (256, 256, 3)
    reader.close()
    # summary.json: the required keys, and the values the run logged
    summary = json.loads((run / "summary.json").read_text())
    assert set(REQUIRED) <= set(summary) and summary["method"] == "latent_barrier" and summary["seed"] == 1
    assert summary["env_id"] == "SafetyPointGoal1-v0" and summary["total_steps"] == 200 and summary["updates"] == 6
    assert summary["eval_returns"] == pytest.approx([v for _, v in s["eval/episodic_return"]], rel=1e-6)
    assert summary["eval_return"] == pytest.approx(s["eval/episodic_return"][0][1], rel=1e-6)
    assert summary["eval_cost"] == pytest.approx(s["eval/episodic_cost"][0][1], rel=1e-6)
    # no training episode ends in 200 env steps (episodes are 1,000): none counted, no mean cost
    assert summary["train_episodes"] == len(s.get("charts/episodic_return", [])) == 0 and summary["train_cost"] is None
    assert summary["cost_limit"] == 25.0 and summary["cost_rate"] == pytest.approx(s["charts/cost_rate"][-1][1])
    assert summary["sps"] > 0 and summary["git_commit"] and summary["args"]["capture_video"] is True


def test_smoke_lagrangian_baseline_with_the_authors_cost(tmp_path):
    proc = run_script("latent_barrier.py", "--env-id", "SafetyPointGoal1-v0", "--constraint", "lagrangian",
                      "--repeat-cost", "last", *tiny_flags(total_timesteps=100, warmup_steps=50, train_every=50,
                                                           store_chunk=20, eval_episodes=0), cwd=tmp_path)
    assert "augmented Lagrangian" in proc.stdout
    (run,) = run_dirs(tmp_path)
    s = read_scalars(run)
    assert "charts/lagrange_multiplier" in s and "charts/slack" in s and s["charts/updates"][-1][1] == 4
    assert not any(tag.startswith("losses/barrier") for tag in s)


# ---- resume (issue 15): a run killed after its checkpoint continues from it -----------------------------------------

# 200 env steps (action repeat 2), a checkpoint at 100; chunks of 30 rows are stored at env steps 58, 118, 178 in an
# uninterrupted run; update rounds (2 updates each) at 100 (the first with a stored chunk), 150 and 200
RESUME_FLAGS = tiny_flags(total_timesteps=200, warmup_steps=50, train_every=50, store_chunk=30, eval_episodes=0,
                          checkpoint_every=100)


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A tiny run SIGKILLed right after its checkpoint at env step 100 (read-only: tests copy it)."""
    cwd = tmp_path_factory.mktemp("killed")
    return run_until_killed("latent_barrier.py", "--env-id", "SafetyPointGoal1", *RESUME_FLAGS, cwd=cwd)


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / run.name
    shutil.copytree(run, target)
    return target


def script_optimisers(args: Args, wm: WorldModel, agent: Agent) -> dict:
    """The three Adams as the script builds them (the value's with a second group for the cost value)."""
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, eps=args.adam_eps)  # noqa: E731
    return {"model": adam(wm.parameters(), args.model_lr), "policy": adam(agent.policy_parameters(), args.actor_lr),
            "value": adam([{"params": list(agent.value.parameters()), "lr": args.value_lr}]
                          + ([{"params": list(agent.cost_value.parameters()), "lr": args.cost_value_lr}]
                             if agent.cost_value is not None else []), args.value_lr)}


def models_from_checkpoint(state: dict):
    """The script's models, optimisers, multipliers and replay, built as the script builds them, loaded from a
    checkpoint's state."""
    args = Args(**state["args"])
    wm, agent = WorldModel(2, args), Agent(args.stoch_dim, 2, args)  # the Point robot: 2 actions
    optimisers = script_optimisers(args, wm, agent)
    lagrange = {"lagrange": torch.tensor(args.initial_lagrangian), "penalty": torch.tensor(args.initial_penalty)}
    buffer = lb.EpisodeBuffer(args.buffer_capacity, seed=args.seed)
    logger = types.SimpleNamespace(load_state_dict=lambda s: None)
    counters = lb.load_checkpoint_state(state, wm, agent, optimisers, lagrange, buffer, logger)
    return args, wm, agent, optimisers, lagrange, buffer, counters


def test_kill_and_resume_reaches_the_end_and_its_first_update_is_the_checkpoints(killed_run, tmp_path):
    run = copy_run(killed_run, tmp_path)
    saved = read_checkpoint(run / "checkpoint.pt")
    state = saved["state"]
    assert saved["identity"]["script"] == "latent_barrier" and saved["identity"]["env_id"] == "SafetyPointGoal1-v0"
    assert state["step"] == 100 and state["counters"]["updates"] == 2 and state["counters"]["next_train"] == 150
    # resumed with a longer run (a flag a resume may change): 250 env steps instead of 200
    proc = run_script("latent_barrier.py", "--resume", str(run), "--total-timesteps", "250", cwd=tmp_path)
    assert "resuming" in proc.stdout and "at step 100 (training, 2 updates, 30 replayed rows)" in proc.stdout
    assert "global_step=250/250 (100%)" in proc.stdout

    # the run reaches its end, in the same directory and on the same curves (no doubled stretch)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_steps"] == 250 and summary["updates"] == 8 and summary["resumed"] is True
    s = read_scalars(run)
    assert s["charts/updates"] == [(100, 2.0), (150, 4.0), (200, 6.0), (250, 8.0)]
    final = read_checkpoint(run / "checkpoint.pt")["state"]
    assert final["step"] == 250 and final["counters"]["updates"] == 8
    # the replay: the checkpoint's chunk, then the chunks stored after the reset (30 rows each, at env steps 158 and
    # 218; an uninterrupted run stores its chunks at 58, 118, 178, 238)
    episodes = final["buffer"]["episodes"]
    assert [len(unpack_array(e["reward"])) for e in episodes] == [30, 30, 30]
    assert np.array_equal(unpack_array(episodes[0]["obs"]), unpack_array(state["buffer"]["episodes"][0]["obs"]))

    # the first update after resuming (env step 150) equals the update the checkpoint's state gives on the batch its
    # restored replay samples, after the same random draws: 25 acting steps (filter noise, exploration noise)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the script's --torch-threads 1: the same float reductions
    try:
        args, wm, agent, optimisers, lagrange, buffer, _ = models_from_checkpoint(state)
        set_rng_state(state["rng"])
        obs, filt, prev = torch.zeros(1, 3, 64, 64, dtype=torch.uint8), wm.rssm.initial(1, "cpu"), torch.zeros(1, 2)
        for _ in range((150 - 100) // 2):
            prev, filt = lb.policy_step(wm, agent, obs, filt, prev, "explore", args.action_noise)
        budget = safety_budget(args.cost_limit, args.episode_length, args.action_repeat, args.repeat_cost,
                               args.cost_gamma)
        metrics = lb.update(wm, agent, *optimisers.values(), lagrange, buffer.sample(args.batch_size,
                            args.sequence_length), args=args, budget=budget)
    finally:
        torch.set_num_threads(threads)
    # the policy loss follows the model's first Adam step: 1e-4 apart if the Adam moments were not restored
    for tag in ("model_loss", "policy_loss", "value_loss"):
        ((step, logged),) = s[f"resume/first_{tag}"]
        assert step == 150 and logged == pytest.approx(metrics[f"losses/{tag}"].item(), rel=1e-6), tag


def test_checkpoint_state_round_trip_with_multipliers_and_without_the_replay(tmp_path):
    args, wm, agent, _, lagrange = tiny_models(0, constraint="lagrangian")
    optimisers = script_optimisers(args, wm, agent)
    for p in [*wm.parameters(), *agent.parameters()]:
        p.grad = torch.rand_like(p)
    for opt in optimisers.values():
        opt.step()  # Adam moments to restore
    lagrange["lagrange"].fill_(0.25)
    lagrange["penalty"].fill_(3e-3)
    buffer = lb.EpisodeBuffer(1000, seed=0)
    buffer.add_episode({"obs": np.full((12, 3, 64, 64), 7, np.uint8), "reward": np.arange(12, dtype=np.float32)})
    buffer.sample(2, 4)  # advance the sampling RNG
    logger = types.SimpleNamespace(state_dict=lambda: {"steps_seen": 10})
    for with_buffer in (True, False):
        state = lb.checkpoint_state(wm, agent, optimisers, lagrange, buffer, logger, {"updates": 3}, with_buffer)
        save_checkpoint(tmp_path / "c.pt", {**state, "args": dataclasses.asdict(args)}, {})
        restored = models_from_checkpoint(read_checkpoint(tmp_path / "c.pt")["state"])
        _, wm2, agent2, opts2, lagrange2, buffer2, counters = restored
        assert counters == {"updates": 3}
        assert lagrange2["lagrange"].item() == 0.25 and lagrange2["penalty"].item() == pytest.approx(3e-3)
        for a, b in zip([*wm.parameters(), *agent.parameters()], [*wm2.parameters(), *agent2.parameters()]):
            assert torch.equal(a, b)
        for name, opt in optimisers.items():
            ours, theirs = opt.state_dict()["state"], opts2[name].state_dict()["state"]
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k]["exp_avg_sq"], theirs[k]["exp_avg_sq"])
                                                        for k in ours)
        # the replay (with --no-checkpoint-buffer: empty, refilled by the resumed run) and its sampling RNG
        assert len(buffer2) == (12 if with_buffer else 0)
        assert buffer2.rng.bit_generator.state == buffer.rng.bit_generator.state
        if with_buffer:
            assert torch.equal(buffer2.sample(3, 4)["reward"], buffer.sample(3, 4)["reward"])  # the same windows


def run_main(monkeypatch, cwd, *argv):
    """The script's main block in this process (its input checks stop before anything is built)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["latent_barrier.py", *argv])
    runpy.run_path(str(REPO / "latent_barrier.py"), run_name="__main__")


def test_resume_of_a_missing_or_foreign_run_is_a_message(killed_run, tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="--resume runs/nope: no such run directory"):
        run_main(monkeypatch, tmp_path, "--resume", "runs/nope")
    (tmp_path / "runs" / "empty").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no checkpoint.pt in it"):
        run_main(monkeypatch, tmp_path, "--resume", "runs/empty")
    with pytest.raises(SystemExit, match="flags differ from the run's .*--env-id: the run has 'SafetyPointGoal1', "
                                         "given 'SafetyCarGoal1'"):
        run_main(monkeypatch, tmp_path, "--resume", str(killed_run), "--env-id", "SafetyCarGoal1")
    # a checkpoint whose identity is another env's (e.g. a file copied between runs): refused, naming the entry
    run = copy_run(killed_run, tmp_path)
    saved = read_checkpoint(run / "checkpoint.pt")
    save_checkpoint(run / "checkpoint.pt", saved["state"], {**saved["identity"], "env_id": "SafetyCarGoal1-v0"})
    with pytest.raises(SystemExit, match="env_id: checkpoint 'SafetyCarGoal1-v0', now 'SafetyPointGoal1-v0'"):
        run_main(monkeypatch, tmp_path, "--resume", str(run))


def test_a_truncated_checkpoint_is_refused_not_loaded(killed_run, tmp_path):
    run = copy_run(killed_run, tmp_path)
    data = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # cut short on disk
    proc = subprocess.run([sys.executable, str(REPO / "latent_barrier.py"), "--resume", str(run)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "truncated or corrupt" in proc.stderr and "it was not loaded" in proc.stderr
    assert "Traceback" not in proc.stderr
