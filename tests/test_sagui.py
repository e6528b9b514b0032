"""Tests of sagui.py: the paper's pieces on hand-made numbers, and smoke runs of both phases."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sagui
from common import make_safety_env, observation_slices
from common.sagui_tasks import env_ids, paper_cost_limit, source_id
from conftest import REPO, read_scalars, run_dirs, run_script, run_until_killed

# ------------------------------------------------------------------------------------------------
# Unit tests
# ------------------------------------------------------------------------------------------------


def test_abstraction_drops_goal_lidar_and_matches_the_source_task():
    target = make_safety_env("SafetyPointGoal1", seed=3)
    index, kept = sagui.abstraction_index(target.unwrapped.obs_space_dict)
    slices = observation_slices(target.unwrapped.obs_space_dict)
    assert "goal_lidar" not in kept and len(kept) == len(slices) - 1
    assert len(index) == 44  # 60 - 16 lidar bins (the notes: student obs 60, guide obs 44)
    goal = slices["goal_lidar"]
    assert set(index.tolist()) == set(range(60)) - set(range(goal.start, goal.stop))
    source = sagui.make_source_env("SafetyPointGoal1", seed=3, displacement_scale=1.0)()
    obs_t, _ = target.reset(seed=3)
    obs_s, _ = source.reset(seed=3)
    np.testing.assert_allclose(obs_t[index], obs_s, rtol=0, atol=1e-6)
    for _ in range(5):  # the same world: stepping both with the same action keeps Xi(target obs) == source obs
        action = np.array([0.7, -0.3])
        obs_t, *_ = target.step(action)
        obs_s, *_ = source.step(action)
    np.testing.assert_allclose(obs_t[index], obs_s, rtol=0, atol=1e-6)


def test_abstraction_refuses_an_env_without_goal_observation():
    env = make_safety_env("SafetyPointCircle1", seed=0)
    with pytest.raises(ValueError, match="goal_lidar"):
        sagui.abstraction_index(env.unwrapped.obs_space_dict)


def test_displacement_reward_and_boundary():
    assert sagui.displacement(np.array([1.0, 2.0, 0.1]), np.array([4.0, 6.0, 0.3])) == pytest.approx(5.0)
    env = sagui.make_source_env("SafetyPointGoal1", seed=0, displacement_scale=2.0)()
    env.reset(seed=0)
    task = env.unwrapped.task
    before = task.agent.pos.copy()
    _, reward, terminated, _, _ = env.step(np.array([1.0, 0.0]))
    assert reward == pytest.approx(2.0 * np.linalg.norm(task.agent.pos[:2] - before[:2]), rel=1e-6)
    assert not terminated
    # teleport the robot outside the placement extents (1.5): the next step ends the episode with r = 0
    import mujoco

    task.data.qpos[:2] = [1.9, 0.0]
    mujoco.mj_forward(task.model, task.data)
    _, reward, terminated, _, info = env.step(np.array([0.0, 0.0]))
    assert terminated and reward == 0.0 and "episode" in info


def test_importance_weight_and_its_clipping():
    logp_s = torch.log(torch.tensor([0.3, 0.01, 5.0]))
    logp_g = torch.log(torch.tensor([0.6, 1.0, 1.0]))
    rho = sagui.importance_weight(logp_s, logp_g, 0.1, 2.0)
    torch.testing.assert_close(rho, torch.tensor([0.5, 0.1, 2.0]))


def test_log_prob_of_a_given_action_matches_the_sampled_one():
    torch.manual_seed(0)
    actor = sagui.Actor(5, 2, 16, np.array([-1.0, -2.0]), np.array([1.0, 2.0]))
    obs = torch.randn(64, 5)
    action, logp = actor.sample(obs)
    torch.testing.assert_close(actor.log_prob(obs, action), logp, atol=1e-3, rtol=1e-4)
    # and against torch's own TransformedDistribution (tanh then affine)
    mean, std = actor.dist(obs)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, std),
        [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(actor.bias, actor.scale)])
    torch.testing.assert_close(actor.log_prob(obs, action), dist.log_prob(action).sum(-1), atol=1e-3, rtol=1e-4)


def test_control_switch_guide_takes_over_after_the_first_cost():
    who = np.zeros(2, dtype=bool)  # every episode starts with the student
    costs = [np.array([0.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([0.0, 0.0])]
    expected = [[False, False], [False, True], [True, True], [True, True]]
    for c, e in zip(costs, expected):
        who = sagui.control_switch(who, c, np.array([False, False]))
        assert who.tolist() == e
    # the end of an episode hands control back to the student, even if that last step had a cost
    who = sagui.control_switch(who, np.array([1.0, 0.0]), np.array([True, False]))
    assert who.tolist() == [False, True]


def test_linear_decay_schedule():
    assert sagui.linear_decay(0, 1000) == 1.0
    assert sagui.linear_decay(250, 1000) == pytest.approx(0.75)
    assert sagui.linear_decay(1000, 1000) == 0.0
    assert sagui.linear_decay(1500, 1000) == 0.0


def test_kl_weight_variants():
    assert sagui.kl_weight(0.8, "paper") == pytest.approx(0.8)
    assert sagui.kl_weight(0.8, "code") == pytest.approx(0.09)
    assert sagui.kl_weight(0.8, "paper", fixed=0.3) == pytest.approx(0.3)


def test_kl_regularised_target_on_hand_made_numbers():
    t = lambda *v: torch.tensor(v)  # noqa: E731
    # r=1, gamma=0.9, min Q'=2, log pi(a'|s')=-1, log pi_g(a'|Xi(s'))=-3, alpha=0.2, omega=0.5:
    # V(s') = 2 - 0.7 * (-1) + 0.5 * (-3) = 1.2 and y = 1 + 0.9 * 1.2 = 2.08; a terminal transition gives y = r
    y = sagui.kl_regularised_target(t(1.0, 1.0), t(0.0, 1.0), 0.9, t(2.0, 2.0), t(-1.0, -1.0), t(-3.0, -3.0), 0.2, 0.5)
    torch.testing.assert_close(y, t(2.08, 1.0))
    # omega = 0 is SAC's soft target: 1 + 0.9 (2 + 0.2)
    y0 = sagui.kl_regularised_target(t(1.0), t(0.0), 0.9, t(2.0), t(-1.0), t(-3.0), 0.2, 0.0)
    torch.testing.assert_close(y0, t(2.98))
    # code variant: r + omega log pi_g(a|Xi(s)) of the executed action (-2) + 0.9 (2 + 0.2) = 1 - 1 + 1.98
    yc = sagui.kl_regularised_target(t(1.0), t(0.0), 0.9, t(2.0), t(-1.0), t(-3.0), 0.2, 0.5, "code", t(-2.0))
    torch.testing.assert_close(yc, t(1.98))


def test_kl_target_equals_entropy_minus_kl_for_gaussians():
    """Independent check of eq. 5: E_a~pi[-(alpha+omega) log pi + omega log pi_g] = alpha H(pi) - omega KL(pi||pi_g)."""
    torch.manual_seed(0)
    pi, pi_g = torch.distributions.Normal(0.3, 0.5), torch.distributions.Normal(-0.2, 0.8)
    a = pi.sample((400_000,))
    alpha, omega = 0.2, 0.7
    zeros = torch.zeros_like(a)
    # with Q = 0, r = 0, gamma = 1, the target is the sample of the soft value
    v = sagui.kl_regularised_target(zeros, zeros, 1.0, zeros, pi.log_prob(a), pi_g.log_prob(a), alpha, omega).mean()
    closed_form = alpha * pi.entropy() - omega * torch.distributions.kl_divergence(pi, pi_g)
    assert v.item() == pytest.approx(closed_form.item(), abs=5e-3)


def test_per_step_cost_target():
    assert sagui.per_step_cost_target(25, 0.99, 1000) == pytest.approx(25 * (1 - 0.99**1000) / 10)
    assert sagui.per_step_cost_target(25, 0.99, 1000) == pytest.approx(2.5, abs=1e-3)  # "about 0.1 d"


def test_discounted_cost_to_go_on_hand_made_numbers():
    # costs 0, 1, 0, 1 with gamma 0.5: to-go 0.5 + 0.125, 1 + 0.25, 0.5, 1 -> mean (0.625 + 1.25 + 0.5 + 1) / 4
    assert sagui.discounted_cost_to_go(np.array([0.0, 1.0, 0.0, 1.0]), 0.5) == pytest.approx(3.375 / 4)
    # a cost of d/T at every step of a T-step episode: the mean to-go is d_bar's conversion minus the truncation
    T, gamma, d = 1000, 0.99, 25.0
    mc = sagui.discounted_cost_to_go(np.full(T, d / T), gamma)
    expected = np.mean([(d / T) * (1 - gamma ** (T - t)) / (1 - gamma) for t in range(T)])
    assert mc == pytest.approx(expected) and mc < sagui.per_step_cost_target(d, gamma, T)


def test_control_switch_never_hands_back_within_an_episode():
    """Random cost sequences: once the guide has control it keeps it until the episode ends, and it takes it
    exactly at the step after the first cost."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        costs = (rng.random(200) < 0.05).astype(float)
        ends = rng.random(200) < 0.02
        who, first_cost_seen = np.zeros(1, dtype=bool), False
        for c, end in zip(costs, ends):
            before = who.copy()
            who = sagui.control_switch(who, np.array([c]), np.array([end]))
            first_cost_seen = (first_cost_seen or c > 0) and not end
            assert who[0] == first_cost_seen
            if before[0] and not end:
                assert who[0], "the guide handed control back inside an episode"
            if end:
                first_cost_seen = False


def _agent(args, with_guide=True, obs_dim=6, seed=0):
    torch.manual_seed(seed)
    space = make_safety_env("SafetyPointGoal1", seed=0).action_space
    guide = sagui.Actor(4, 2, args.hidden_size, space.low, space.high).requires_grad_(False) if with_guide else None
    return sagui.SACLagrangian(obs_dim, 2, args, space, 25.0, "cpu", guide=guide)


def _batch(n=4, obs_dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"obs": torch.randn(n, obs_dim, generator=g), "action": torch.rand(n, 2, generator=g) * 1.8 - 0.9,
            "next_obs": torch.randn(n, obs_dim, generator=g), "reward": torch.randn(n, generator=g),
            "cost": (torch.rand(n, generator=g) < 0.3).float(), "done": torch.zeros(n),
            "rho": torch.rand(n, generator=g) * 1.9 + 0.1, "logp_guide": -torch.rand(n, generator=g),
            "guide_mean": torch.randn(n, 2, generator=g), "guide_std": torch.rand(n, 2, generator=g) + 0.1,
            "guide_next_mean": torch.randn(n, 2, generator=g), "guide_next_std": torch.rand(n, 2, generator=g) + 0.1}


def test_behaviour_policy_packs_action_rho_and_the_guide_gaussian():
    """One row per env: who acts, rho (1 for the student's own actions), log pi_guide of the executed action, and
    the guide's Gaussian at Xi(s), which the update uses for the KL instead of a guide forward pass."""
    torch.manual_seed(0)
    space = make_safety_env("SafetyPointGoal1", seed=0).action_space
    student = sagui.Actor(6, 2, 8, space.low, space.high)
    guide = sagui.Actor(4, 2, 8, space.low, space.high)
    xi, obs = torch.tensor([5, 0, 2, 3]), torch.randn(64, 6)
    who = torch.arange(64) % 2 == 0  # even rows: the guide acts
    with torch.no_grad():
        packed = sagui.behaviour_policy(student, guide, xi, obs, who, 0.1, 2.0)
        action, rho, logp_g, g_mean, g_std = packed[:, :2], packed[:, 2], packed[:, 3], packed[:, 4:6], packed[:, 6:]
        mean, std = guide.dist(obs[:, xi])
        torch.testing.assert_close(g_mean, mean)
        torch.testing.assert_close(g_std, std)
        torch.testing.assert_close(logp_g, guide.log_prob(obs[:, xi], action), atol=1e-4, rtol=1e-4)
        expected_rho = torch.clamp(torch.exp(student.log_prob(obs, action) - logp_g), 0.1, 2.0)
        torch.testing.assert_close(rho[who], expected_rho[who], atol=1e-4, rtol=1e-4)
        assert (rho[~who] == 1).all()
        # the guide's actions come from the guide's Gaussian: their guide log-prob is, on average, the higher one
        assert logp_g[who].mean() > logp_g[~who].mean()
        torch.testing.assert_close(sagui.guide_gaussian(guide, xi, obs, 2), torch.cat([mean, std], 1))


def test_omega_is_the_live_beta_at_every_gradient_step():
    """omega = beta inside each gradient step (not a value frozen per round): the issue saw omega/beta = 13.7."""
    student = _agent(sagui.Args(hidden_size=8, batch_size=4))
    student.qc.net[-1].bias.data.fill_(-5.0)  # Qc far below d_bar: beta falls at every step, as in the issue
    betas = []
    for step in range(100):
        beta_before = student.beta
        out = student.update(_batch(seed=step))
        assert float(out["beta"]) == pytest.approx(beta_before, rel=1e-6)
        assert float(out["omega"]) == pytest.approx(beta_before, rel=1e-6)  # omega = beta of this step
        betas.append(beta_before)
    assert betas[-1] < betas[0] / 10  # beta moved a lot, and omega followed it step by step
    # code variant: omega = 0.1 beta + 0.01 of the live beta
    student = _agent(sagui.Args(hidden_size=8, batch_size=4, kl_variant="code"))
    for step in range(3):
        out = student.update(_batch(seed=step))
        assert float(out["omega"]) == pytest.approx(0.1 * float(out["beta"]) + 0.01, rel=1e-6)


@pytest.mark.parametrize("beta_update", ["paper", "code"])
def test_beta_rises_when_the_cost_estimate_exceeds_the_target_and_falls_otherwise(beta_update):
    args = sagui.Args(hidden_size=8, batch_size=4, beta_update=beta_update)
    for bias, direction in ((+10.0, +1), (-10.0, -1)):  # Qc about 10 or -10, against d_bar = 2.5
        student = _agent(args)
        student.qc.net[-1].bias.data.fill_(bias)
        beta_before = student.beta
        out = student.update(_batch())
        assert (float(out["qc_pi"]) > student.d_bar) == (direction > 0)
        assert np.sign(student.beta - beta_before) == direction


def test_episodic_beta_follows_the_measured_cost():
    student = _agent(sagui.Args(hidden_size=8, batch_size=4, beta_update="episodic"))
    beta0 = student.beta
    student.update(_batch())  # gradient steps leave beta alone in this mode
    assert student.beta == beta0
    student.update_beta_from_episodes(100.0)  # over the limit d = 25
    assert student.beta > beta0
    student = _agent(sagui.Args(hidden_size=8, batch_size=4, beta_update="episodic"))
    student.update_beta_from_episodes(3.0)  # under it
    assert student.beta < beta0


def test_compiled_update_equals_the_eager_one(monkeypatch):
    """torch.compile wraps the same update: on a fixed batch both give the same losses and parameters."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "fallback_random", True)  # compiled code draws torch's eager numbers
    args = sagui.Args(hidden_size=8, batch_size=4)
    eager, compiled = _agent(args), _agent(args)
    compiled_update = sagui.maybe_compile(compiled.update, True)
    for step in range(2):
        torch.manual_seed(100 + step)
        out_e = eager.update(_batch(seed=step))
        torch.manual_seed(100 + step)
        out_c = compiled_update(_batch(seed=step))
        for k in out_e:
            torch.testing.assert_close(out_c[k], out_e[k], rtol=1e-4, atol=1e-5, msg=k)
    for name in ("actor", "qr1", "qr2", "qc", "qr1_t", "qc_t"):
        for p_e, p_c in zip(getattr(eager, name).parameters(), getattr(compiled, name).parameters()):
            torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5)
    assert eager.beta == pytest.approx(compiled.beta, rel=1e-5) and eager.alpha == pytest.approx(compiled.alpha)


def test_device_replay_round_trip_and_sampling():
    rb = sagui.DeviceReplay(5, {"obs": (3,), "reward": (), "done": ()}, "cpu")
    rb.add(obs=np.arange(6).reshape(2, 3), reward=np.array([1.0, 2.0]), done=np.array([False, True]))
    assert len(rb) == 2
    torch.manual_seed(0)
    batch = rb.sample(50)
    assert batch["obs"].shape == (50, 3) and batch["reward"].shape == (50,)
    rows = {tuple(o.tolist()) + (r.item(), d.item()) for o, r, d in zip(batch["obs"], batch["reward"], batch["done"])}
    assert rows == {(0.0, 1.0, 2.0, 1.0, 0.0), (3.0, 4.0, 5.0, 2.0, 1.0)}  # fields stay together, both rows drawn
    for i in range(5):  # the ring overwrites the oldest rows
        rb.add(obs=np.full((1, 3), 10.0 + i), reward=np.array([0.0]), done=np.array([0.0]))
    assert len(rb) == 5 and set(rb.sample(200)["obs"][:, 0].tolist()) == {10.0, 11.0, 12.0, 13.0, 14.0}


# ------------------------------------------------------------------------------------------------
# The paper's Static and Semi-Dynamic layouts (common/sagui_tasks.py)
# ------------------------------------------------------------------------------------------------


def test_static_layout_places_its_objects_where_the_paper_says():
    for seed in (0, 1, 2):
        env = make_safety_env("SafetyPointSaguiStatic", seed=seed)
        env.reset(seed=seed)
        task = env.unwrapped.task
        assert type(task.agent).__name__ == "Point" and task.placements_conf.extents == [-1.5, -1.5, 1.5, 1.5]
        assert task.hazards.num == 1 and task.hazards.size == 0.7
        np.testing.assert_allclose(task.hazards.pos[0][:2], [0.0, 0.0], atol=1e-6)  # one big hazard at the origin
        np.testing.assert_allclose(task.goal.pos[:2], [1.1, 1.1], atol=1e-6)  # the fixed goal
        assert task.goal.size == 0.3 and not hasattr(task, "vases")
        assert np.linalg.norm(task.agent.pos[:2]) > 0.7  # the robot starts outside the hazard
    assert paper_cost_limit("SafetyPointSaguiStatic") == 5.0


def test_semi_dynamic_layout_places_its_objects_where_the_paper_says():
    goals = []
    for seed in (0, 1):
        env = make_safety_env("SafetyCarSaguiSemiDynamic", seed=seed)
        env.reset(seed=seed)
        task = env.unwrapped.task
        assert type(task.agent).__name__ == "Car" and task.placements_conf.extents == [-2.0, -2.0, 2.0, 2.0]
        np.testing.assert_allclose([p[:2] for p in task.hazards.pos],
                                   [(1.0, 1.0), (1.0, -1.0), (-0.2, 0.2), (-1.4, -1.4)], atol=1e-6)
        np.testing.assert_allclose([p[:2] for p in task.vases.pos],
                                   [(-1.0, -1.0), (-1.0, 1.0), (0.2, -0.2), (1.4, 1.4)], atol=1e-6)
        assert task.hazards.size == 0.2 and task.vases.size == 0.2 and task.vases.is_constrained
        goals.append(task.goal.pos[:2].copy())
    assert not np.allclose(goals[0], goals[1])  # the goal is random
    assert paper_cost_limit("SafetyCarSaguiSemiDynamic-v0") == 8.0


@pytest.mark.parametrize("target", ["SafetyPointSaguiStatic", "SafetyCarSaguiSemiDynamic"])
def test_layout_source_task_is_the_world_without_goal(target):
    source = source_id(target)
    assert source is not None and source in env_ids()
    t_env, s_env = make_safety_env(target, seed=0), make_safety_env(source, seed=0)
    t_env.reset(seed=0)
    s_env.reset(seed=0)
    index, kept = sagui.abstraction_index(t_env.unwrapped.obs_space_dict)
    assert kept == list(observation_slices(s_env.unwrapped.obs_space_dict))  # Xi(target) = source observation
    assert s_env.observation_space.shape == (len(index),)
    task = s_env.unwrapped.task
    assert not hasattr(task, "goal")
    np.testing.assert_allclose([p[:2] for p in task.hazards.pos],
                               [p[:2] for p in t_env.unwrapped.task.hazards.pos], atol=1e-6)
    _, reward, *_ = s_env.step(s_env.action_space.sample())
    assert reward == 0.0  # no task reward in the source task (eq. 4 is added by SourceTask)


# ------------------------------------------------------------------------------------------------
# Smoke tests: the real script with tiny budgets (one 1000-step episode per phase plus a little)
# ------------------------------------------------------------------------------------------------

TINY = ["--hidden-size", "8", "--batch-size", "16", "--buffer-size", "5000", "--learning-starts", "900",
        "--random-steps", "100", "--eval-every", "100000", "--eval-episodes", "1", "--log-every", "200",
        "--total-timesteps", "1100"]


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # 2 shared cores: thread oversubscription is much slower


@pytest.fixture(scope="module")
def guide_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("sagui_both")
    os.environ["OMP_NUM_THREADS"] = "1"  # module-scoped: monkeypatch is not available here
    proc = run_script("sagui.py", "--guide-total-timesteps", "1100", "--save-model", "--capture-video",
                      "--video-frame-stride", "100", *TINY, cwd=cwd)
    # the plan first: the guide phase's own budget is announced, --total-timesteps bounds only the student
    assert ("plan: guide: 1100 steps, reward-free, in the source task (--guide-total-timesteps; --guide-path reuses "
            "a saved guide); then student: 1100 steps in SafetyPointGoal1 with control-switch sampling") in proc.stdout
    (run_dir,) = run_dirs(cwd)
    return run_dir


def test_smoke_both_phases(guide_run):
    assert (guide_run / "guide.pt").is_file() and (guide_run / "student.pt").is_file()
    saved = torch.load(guide_run / "student.pt")  # everything needed to resume, not only the networks
    for key in ("actor", "qr1", "qr2", "qc", "qr1_t", "qr2_t", "qc_t", "actor_opt", "q_opt", "alpha_opt", "beta_opt",
                "soft_alpha", "soft_beta", "args"):
        assert key in saved, key
    scalars = read_scalars(guide_run)
    for tag in ["charts/episodic_return", "charts/episodic_cost", "charts/episodic_length", "charts/cost_rate",
                "charts/SPS", "eval/episodic_return", "eval/episodic_cost", "losses/qr_loss", "losses/qc_loss",
                "losses/actor_loss", "losses/alpha_loss", "losses/beta_loss", "charts/lagrange_multiplier",
                "charts/alpha", "charts/omega", "charts/guide_acted_fraction", "charts/importance_weight_mean",
                # the guide phase, in runs/<run>/guide/
                "charts/cost_critic_estimate", "charts/cost_target_d_bar", "charts/discounted_cost_to_go",
                "charts/cost_critic_estimate_student_buffer", "charts/kl_to_guide",
                "guide/charts/episodic_return", "guide/charts/episodic_cost", "guide/charts/cost_rate",
                "guide/losses/qc_loss", "guide/charts/lagrange_multiplier",
                # the guide alone in the target task, deterministic (authors' test) and stochastic (as it acts)
                "guide/eval_deterministic/episodic_cost", "guide/eval_stochastic/episodic_cost"]:
        assert tag in scalars, f"missing {tag}; have {sorted(scalars)}"
    assert [s for s, _ in scalars["eval/episodic_return"]] == [1100]
    # charts/cost_rate once per log interval (200 steps), not at every env step
    assert len(scalars["charts/cost_rate"]) <= 1100 // 200 and len(scalars["guide/charts/cost_rate"]) <= 1100 // 200
    # the logged omega is the applied one: within 1.5x of beta at every log point (it was 13.7x)
    beta = dict(scalars["charts/lagrange_multiplier"])
    for step, omega in scalars["charts/omega"]:
        if step >= 900:  # updates start at --learning-starts 900
            assert beta[step] / 1.5 <= omega <= beta[step] * 1.5, (step, omega, beta[step])
    assert len(scalars["guide/eval_deterministic/episodic_cost"]) == 1  # --eval-episodes 1
    assert all(v == pytest.approx(1.0) for _, v in scalars["guide/charts/alpha"])  # the guide's alpha is fixed
    # the guide's return is eq. 4's displacement: positive, and no more than ~ a few metres per episode
    assert 0 < scalars["guide/charts/episodic_return"][0][1] < 100
    rho = [v for _, v in scalars["charts/importance_weight_mean"]]
    assert all(0.1 - 1e-6 <= v <= 2.0 + 1e-6 for v in rho)


def test_summary_json_and_video_of_a_finished_run(guide_run):
    from common.summary import REQUIRED

    summary = json.loads((guide_run / "summary.json").read_text())
    assert all(k in summary for k in REQUIRED) and summary["script"] == "sagui" and summary["method"] == "sagui"
    scalars = read_scalars(guide_run)
    episodes = scalars["charts/episodic_cost"]  # the student's training episodes
    assert summary["total_steps"] == 1100 and summary["train_episodes"] == len(episodes) == 1
    assert summary["train_cost"] == pytest.approx(episodes[0][1])
    assert summary["train_violating_episodes"] == int(episodes[0][1] > 25.0) and summary["cost_limit"] == 25.0
    assert summary["eval_cost"] == pytest.approx(scalars["eval/episodic_cost"][0][1])
    assert summary["eval_return"] == pytest.approx(scalars["eval/episodic_return"][0][1], rel=1e-5)
    # the fraction of the 1100 steps with a cost: a whole number of steps, at least those of the last log (1000)
    (last_step, last_rate), = scalars["charts/cost_rate"][-1:]
    cost_steps = summary["cost_rate"] * 1100
    assert cost_steps == pytest.approx(round(cost_steps)) and round(cost_steps) >= round(last_rate * last_step)
    assert summary["sps"] > 0 and summary["guide_steps"] == 1100
    assert summary["guide_train_episodes"] == len(scalars["guide/charts/episodic_cost"])
    assert summary["guide_eval_deterministic_cost"] == scalars["guide/eval_deterministic/episodic_cost"][0][1]
    # --capture-video: the student's evaluation at the last step, as an mp4 of 1000 / 100 + 1 frames
    import imageio.v2 as imageio

    (video,) = (guide_run / "videos").glob("*.mp4")
    assert video.name == "eval-1100-episode-0.mp4"
    frames = imageio.mimread(video)
    assert len(frames) == 11 and frames[0].shape == (256, 256, 3)


def test_smoke_guide_path_linear_decay_code_variant(guide_run, tmp_path):
    run_script("sagui.py", "--guide-path", str(guide_run / "guide.pt"), "--sampling", "linear-decay", "--ld-mode",
               "trajectory", "--kl-variant", "code", "--is-squared", "--beta-damp", "10", *TINY, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    scalars = read_scalars(run_dir)
    assert not any(t.startswith("guide/") for t in scalars), "the guide phase must be skipped"
    probs = scalars["charts/guide_probability"]
    assert probs[0][1] == pytest.approx(1 - 200 / 1100) and probs[-1][1] < probs[0][1]
    # trajectory-wise: the first episode (1000 steps) is all guide, since P(guide) = 1 at its start
    assert scalars["charts/guide_acted_fraction"][0][1] == pytest.approx(1.0)
    assert "eval/episodic_cost" in scalars


SHORT = ["--hidden-size", "8", "--batch-size", "16", "--buffer-size", "5000", "--learning-starts", "100",
         "--random-steps", "50", "--update-every", "50", "--eval-every", "100000", "--eval-episodes", "1",
         "--log-every", "100"]


@pytest.mark.parametrize("env_id, d, flags", [
    # Static, also with two envs per phase, the authors' linear-decay mix and beta driven by episodic costs
    ("SafetyPointSaguiStatic", 5.0, ["--num-envs", "2", "--sampling", "linear-decay", "--ld-mode", "mixed",
                                     "--beta-update", "episodic"]),
    ("SafetyCarSaguiSemiDynamic", 8.0, []),
])
def test_smoke_paper_layouts(env_id, d, flags, tmp_path):
    """The paper's Static and Semi-Dynamic environments by env id: guide in the goal-less source, then student."""
    run_script("sagui.py", "--env-id", env_id, "--guide-total-timesteps", "200", "--total-timesteps", "200", *SHORT,
               *flags, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    scalars = read_scalars(run_dir)
    d_bar = sagui.per_step_cost_target(d, 0.99, 1000)  # the paper's cost limit of the layout, by default
    assert scalars["charts/cost_target_d_bar"][0][1] == pytest.approx(d_bar, rel=1e-5)
    assert [s for s, _ in scalars["losses/qr_loss"]] == [100, 200]  # with --num-envs 2: steps count both envs
    assert [s for s, _ in scalars["guide/losses/qr_loss"]] == [100, 200] and "eval/episodic_cost" in scalars
    if "episodic" in flags:  # no episode finished in 200 steps: gradient steps leave beta alone
        assert [v for _, v in scalars["charts/lagrange_multiplier"]] == [pytest.approx(np.log(2))] * 2
        assert 0 < scalars["charts/guide_acted_fraction"][0][1] <= 1


def test_smoke_sac_lag_baseline(tmp_path):
    run_script("sagui.py", "--no-use-guide", *TINY, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    assert not (run_dir / "guide.pt").exists()
    scalars = read_scalars(run_dir)
    assert "charts/episodic_cost" in scalars and "charts/lagrange_multiplier" in scalars
    assert "charts/omega" not in scalars


@pytest.mark.parametrize("flags, message", [
    (["--cost-limit", "0"], "--cost-limit must be positive"),
    (["--sampling", "greedy"], "control-switch, linear-decay, student"),
    (["--env-id", "SafetyPointCircle1"], "goal_lidar"),
    # control-switch halves the buffer: 1 gave two empty buffers and a ValueError traceback after the guide phase
    (["--buffer-size", "1"], "--buffer-size must be at least 2 with --sampling control-switch"),
    # Button costs depend on the hidden goal: the paper's Assumption 3 fails
    (["--env-id", "SafetyPointButton1"], "Assumption 3"),
    (["--num-envs", "3"], "--update-every (100) must be a multiple of --num-envs (3)"),
    (["--compile", "yes"], "--compile must be one of auto, on, off"),
    (["--env-id", "SafetyPointSaguiStaticSource"], "source task"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0"),
])
def test_bad_input_is_refused_clearly(flags, message, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "sagui.py"), *flags], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_smoke_same_seed_reproduces_on_cpu(guide_run, tmp_path):
    flags = ["--guide-path", str(guide_run / "guide.pt"), *TINY[:-1], "250", "--learning-starts", "200"]
    for name in ("a", "b"):
        run_script("sagui.py", "--exp-name", name, *flags, cwd=tmp_path)
    first, second = (read_scalars(d) for d in run_dirs(tmp_path))
    for tag in ("losses/qr_loss", "losses/actor_loss", "charts/lagrange_multiplier", "eval/episodic_return"):
        assert first[tag] == second[tag], tag


def test_guide_path_to_a_file_that_is_no_guide_is_refused_clearly(tmp_path):
    """A student.pt, a text file or a guide of another size must end in a message, not a KeyError traceback."""
    target = make_safety_env("SafetyPointGoal1", seed=0)
    _, kept = sagui.abstraction_index(target.unwrapped.obs_space_dict)
    space = target.action_space
    student_file, text_file, guide_file = tmp_path / "student.pt", tmp_path / "notes.txt", tmp_path / "guide.pt"
    torch.save({"actor": {}, "qr1": {}, "args": {}}, student_file)
    text_file.write_text("not a checkpoint")
    actor = sagui.Actor(40, 2, 8, space.low, space.high)  # 40 inputs, not the 44 of Xi(SafetyPointGoal1)
    torch.save({"actor": actor.state_dict(), "hidden_size": 8, "kept_keys": kept, "act_dim": 2,
                "env_id": "SafetyPointGoal1"}, guide_file)
    for path, message in ((student_file, "holds ['actor', 'args', 'qr1']"), (text_file, "cannot read it"),
                          (guide_file, "does not fit")):
        with pytest.raises(SystemExit, match="is not a guide|does not fit") as info:
            sagui.load_guide(str(path), "SafetyPointGoal1", kept, 44, 2, space, "cpu")
        assert message in str(info.value)
    # a matching guide loads, with its own hidden size
    good = sagui.Actor(44, 2, 8, space.low, space.high)
    torch.save({"actor": good.state_dict(), "hidden_size": 8, "kept_keys": kept, "act_dim": 2,
                "env_id": "SafetyPointGoal1"}, guide_file)
    loaded = sagui.load_guide(str(guide_file), "SafetyPointGoal1", kept, 44, 2, space, "cpu")
    obs = torch.randn(3, 44)
    torch.testing.assert_close(loaded.dist(obs)[0], good.dist(obs)[0])
    # and as a user runs it
    proc = subprocess.run([sys.executable, str(REPO / "sagui.py"), "--guide-path", str(student_file)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "is not a guide saved by sagui.py" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_update_reads_nothing_back_from_the_device(monkeypatch):
    """The gradient step must not call .item() (a host/device sync per step on a GPU); losses stay tensors."""
    real_item = torch.Tensor.item

    def no_item(self):  # torch's CPU Adam reads its step counter with .item(); only sagui.py's own calls count
        if sys._getframe(1).f_code.co_filename == sagui.__file__:
            raise AssertionError("Tensor.item() called inside SACLagrangian.update")
        return real_item(self)

    for variant in ("paper", "code"):
        student = _agent(sagui.Args(hidden_size=8, batch_size=4, kl_variant=variant))
        beta_before = student.beta
        monkeypatch.setattr(torch.Tensor, "item", no_item)
        losses = student.update(_batch())
        monkeypatch.undo()
        assert all(isinstance(v, torch.Tensor) for v in losses.values())
        assert student.beta != beta_before  # the multiplier was still updated


# ------------------------------------------------------------------------------------------------
# Resume, summary.json, video (issue 15)
# ------------------------------------------------------------------------------------------------

RESUME = ["--hidden-size", "8", "--batch-size", "16", "--buffer-size", "5000", "--learning-starts", "100",
          "--random-steps", "50", "--eval-every", "100000", "--eval-episodes", "1", "--total-timesteps", "300"]


def test_a_run_killed_in_each_stage_resumes_there_with_the_saved_state(tmp_path):
    """Killed in the guide stage, resumed there; killed again in the student stage, resumed there without training
    the guide again. The run reaches its 300 student steps with every step's row in its buffers, the curves go on
    without a gap or a doubled stretch, and the first gradient step after resuming gives the losses that the
    checkpoint gives on the same batch."""
    from common.checkpoint import load_checkpoint, pack_array, set_rng_state, unpack_array

    flags = [*RESUME, "--guide-total-timesteps", "300", "--update-every", "1", "--log-every", "1",
             "--checkpoint-every", "200"]  # a gradient step and a log line at every env step: step 101 is logged
    run_dir = run_until_killed("sagui.py", *flags, cwd=tmp_path)  # killed at step 200 of the guide stage
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", SAFERL_KILL_AFTER_CHECKPOINT="2")
    proc = subprocess.run([sys.executable, str(REPO / "sagui.py"), "--resume", str(run_dir)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    # its checkpoints: the end of the guide stage (run step 300), then run step 400 = student step 100: killed
    assert proc.returncode == -9, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"resuming {run_dir} at step 200 (stage guide, the student follows" in proc.stdout
    guide_lines = [line.split()[0] for line in proc.stdout.splitlines() if "[guide]" in line]
    assert guide_lines[0] == "global_step=201/300" and guide_lines[-1] == "global_step=300/300"
    saved = load_checkpoint(run_dir / "checkpoint.pt")
    assert saved["stage"] == "student" and (saved["step"], saved["stage_step"]) == (400, 100)
    guide_file = (run_dir / "guide.pt").stat()
    proc = run_script("sagui.py", "--resume", str(run_dir), cwd=tmp_path)
    assert f"resuming {run_dir} at step 100 (stage student" in proc.stdout
    assert "[guide]" not in proc.stdout and "guide alone" not in proc.stdout  # the guide is not trained again
    assert (run_dir / "guide.pt").stat().st_mtime_ns == guide_file.st_mtime_ns
    final = load_checkpoint(run_dir / "checkpoint.pt")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert final["stage_step"] == summary["total_steps"] == 300 and summary["guide_steps"] == 300
    assert sum(final["buffers"][k]["size"] for k in ("rb", "rb_guide")) == 300  # the 100 restored rows kept
    scalars = read_scalars(run_dir)
    assert [s for s, _ in scalars["guide/losses/qr_loss"]] == list(range(100, 301))
    assert [s for s, _ in scalars["losses/qr_loss"]] == list(range(100, 301))
    assert len(scalars["guide/eval_deterministic/episodic_cost"]) == 1

    # the first gradient step after resuming, redone from the checkpoint: same networks, multipliers and buffers,
    # the same RNG draws (one behaviour-policy step, which draws the student's and the guide's noise, then the batch)
    args = sagui.Args(**saved["args"])
    space = make_safety_env("SafetyPointGoal1", seed=0).action_space
    guide = sagui.Actor(44, 2, saved["guide"]["hidden_size"], space.low, space.high)
    guide.load_state_dict(saved["guide"]["actor"])
    student = sagui.SACLagrangian(60, 2, args, space, args.cost_limit, "cpu", guide=guide.requires_grad_(False))
    student.load_state_dict(saved["agent"])
    fields = sagui.replay_fields(60, 2)
    rb, rb_guide = (sagui.DeviceReplay(args.buffer_size // 2, fields, "cpu") for _ in range(2))
    rb_guide.load_state_dict(saved["buffers"]["rb_guide"])
    size = saved["buffers"]["rb"]["size"] + 1  # step 101, a new episode: the student acts, its row goes to rb
    rows = unpack_array(final["buffers"]["rb"]["rows"])[:size]
    np.testing.assert_array_equal(rows[:-1], unpack_array(saved["buffers"]["rb"]["rows"]))
    rb.load_state_dict({"rows": pack_array(rows), "pos": size, "size": size, "capacity": args.buffer_size // 2})
    set_rng_state(saved["rng"])
    xi = torch.as_tensor(sagui.abstraction_index(make_safety_env("SafetyPointGoal1").unwrapped.obs_space_dict)[0])
    with torch.no_grad():
        sagui.behaviour_policy(student.actor, guide, xi, torch.zeros(1, 60), torch.zeros(1, dtype=torch.bool), 0.1, 2.0)
    n_guide = int(round(args.guide_batch_fraction * args.batch_size))
    if len(rb_guide) >= args.batch_size:  # the 75/25 minibatch of control-switch, as the script draws it
        b_s, b_g = rb.sample(args.batch_size - n_guide), rb_guide.sample(n_guide)
        out = student.update({k: torch.cat([b_s[k], b_g[k]]) for k in b_s})
    else:
        out = student.update(rb.sample(args.batch_size))
    for k in ("qr_loss", "qc_loss", "actor_loss", "alpha_loss", "beta_loss"):
        assert float(out[k]) == pytest.approx(dict(scalars[f"losses/{k}"])[101], rel=1e-4, abs=1e-6), k
    assert dict(scalars["charts/lagrange_multiplier"])[101] == pytest.approx(student.beta, rel=1e-5)


def test_resume_of_a_missing_foreign_or_damaged_run_is_refused_clearly(guide_run, tmp_path):
    """SystemExit with a message: the user sees it and no traceback (in-process: each subprocess costs seconds)."""
    import shutil

    from common.checkpoint import resume_run

    with pytest.raises(SystemExit, match="no such run directory"):
        resume_run(sagui.Args(resume=str(tmp_path / "runs" / "nothing")), "sagui")
    with pytest.raises(SystemExit, match="--env-id: the run has 'SafetyPointGoal1', given 'SafetyCarGoal1'"):
        resume_run(sagui.Args(resume=str(guide_run), env_id="SafetyCarGoal1"), "sagui")
    args, resumed = resume_run(sagui.Args(resume=str(guide_run), total_timesteps=5000), "sagui")
    assert args.total_timesteps == 5000 and args.hidden_size == 8 and resumed["state"]["stage"] == "student"
    # a checkpoint cut short on disk is refused, not loaded
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    data = (guide_run / "checkpoint.pt").read_bytes()
    (damaged / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="is truncated or corrupt"):
        resume_run(sagui.Args(resume=str(damaged)), "sagui")


def test_checkpoint_state_round_trip_with_and_without_the_replay(tmp_path):
    """The stage's agent and buffers come back exactly; --no-checkpoint-buffer leaves the rows out (and says so)."""
    from common import Logger

    args = sagui.Args(hidden_size=8, batch_size=4)
    agent, fresh = _agent(args, seed=0), _agent(args, seed=1)
    agent.update(_batch())
    buffer = sagui.DeviceReplay(10, sagui.replay_fields(6, 2), "cpu")
    for i in range(13):  # wraps around: pos 3, size 10
        buffer.add(**{k: v[:1].numpy() + i for k, v in _batch(n=1, seed=i).items()})
    logger = Logger("run", args, root=str(tmp_path), quiet=True)
    logger.log_costs(0, np.array([0.0, 1.0, 1.0]))
    state = sagui.checkpoint_state("student", agent, {"rb": buffer}, logger, args, stage_step=7)
    bytes_ = io.BytesIO()
    torch.save(state, bytes_)  # through bytes, as a checkpoint file: no tensor shared with the live agent
    state = torch.load(io.BytesIO(bytes_.getvalue()), weights_only=False)
    restored = sagui.DeviceReplay(10, sagui.replay_fields(6, 2), "cpu")
    logger2 = Logger("run2", args, root=str(tmp_path), quiet=True)
    assert sagui.load_checkpoint_state(state, fresh, {"rb": restored}, logger2)
    torch.testing.assert_close(restored.data, buffer.data)
    assert (restored.pos, restored.size) == (3, 10) and logger2.cost_rate == pytest.approx(2 / 3)
    for name in ("actor", "qr1", "qc_t"):
        for p, q in zip(getattr(agent, name).parameters(), getattr(fresh, name).parameters()):
            torch.testing.assert_close(q, p)
    assert fresh.beta == agent.beta and fresh.alpha == agent.alpha
    assert fresh.q_opt.state_dict()["state"][0]["step"] == 1  # the optimisers' moments and counters too
    batch = _batch(seed=5)
    torch.manual_seed(3)
    out_a = agent.update(batch)
    torch.manual_seed(3)
    out_f = fresh.update(batch)
    for k in ("qr_loss", "qc_loss", "actor_loss", "beta_loss"):
        torch.testing.assert_close(out_f[k], out_a[k])
    args.checkpoint_buffer = False
    state = sagui.checkpoint_state("student", agent, {"rb": buffer}, logger, args)
    assert state["buffers"] is None
    assert not sagui.load_checkpoint_state(state, fresh, {"rb": sagui.DeviceReplay(10, sagui.replay_fields(6, 2),
                                                                                    "cpu")}, logger2)
    with pytest.raises(SystemExit, match="does not fit"):  # a replay of another width
        sagui.DeviceReplay(10, sagui.replay_fields(5, 2), "cpu").load_state_dict(buffer.state_dict())


def test_help_says_what_total_timesteps_bounds(capsys, monkeypatch):
    """The issue's example: `--total-timesteps 3000` first ran a 9M-step guide with no word of it."""
    import tyro

    monkeypatch.setenv("COLUMNS", "400")  # one line per flag help: the sentence is not wrapped
    with pytest.raises(SystemExit):
        tyro.cli(sagui.Args, args=["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "bounds the STUDENT stage only" in text and "the guide stage runs --guide-total-timesteps (9M" in text
    assert "--resume" in text and "--checkpoint-every" in text and "--no-checkpoint-buffer" in text
