"""Tests of `actsafe.py --dynamics gp`: the pendulum against a hand-stepped integrator, the GP against gpytorch and
its defining properties, the planner on a toy problem, the intrinsic reward and the pessimism by hand, the input
checks, a two-episode smoke run of the real script, and its kill-and-resume."""

import json
import math
import subprocess
import sys

import gpytorch
import numpy as np
import pytest
import torch

from actsafe import (
    Args,
    GPDynamics,
    cem_plan,
    gp_plan_objective,
    gp_rollout,
    intrinsic_reward,
    offline_safe_data,
    pessimistic_trajectory_cost,
    validate,
)
import actsafe
from common.checkpoint import read_checkpoint, resume_run
from common.pendulum import MAX_EPISODE_STEPS, SPEED_LIMIT, make_safe_pendulum, speed_cost, swing_up_reward
from conftest import REPO, read_scalars, run_dirs, run_script, run_until_killed

F64 = dict(dtype=torch.float64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small float64 ops: torch's worker threads cost far more than they give on a busy 2-core machine (25x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the environment -------------------------------------------------------------------------------------------

def test_pendulum_matches_hand_stepped_integrator():
    env = make_safe_pendulum()
    obs, _ = env.reset(seed=0)
    np.testing.assert_allclose(obs, [-1.0, 0.0, 0.0], atol=1e-7)  # hanging down, at rest
    # first step by hand from (pi, 0) with the full torque 2: speed 0 + (14.715 sin(pi) + 3 * 2) * 0.05 = 0.3
    obs, reward, terminated, truncated, info = env.step(np.array([2.0]))
    assert obs[2] == pytest.approx(0.3, abs=1e-6)
    assert math.atan2(obs[1], obs[0]) == pytest.approx(-math.pi + 0.3 * 0.05, abs=1e-6)
    assert reward == pytest.approx(-(math.pi**2 + 0.02), abs=1e-9)  # reward of the state before the step
    assert info["cost"] == 0.0 and not terminated and not truncated
    # then a sequence, against semi-implicit Euler written out here (torques beyond 2 are clipped)
    theta, speed = math.pi - 0.3, 1.0
    env.reset(options={"state": (theta, speed)})
    for torque in [2.0, -2.0, 0.5, 3.0, -7.0, 0.0, 1.3]:
        u = max(-2.0, min(2.0, torque))
        expected_reward = -(((theta + math.pi) % (2 * math.pi) - math.pi) ** 2 + 0.1 * speed**2 + 0.02 * (u / 2) ** 2)
        speed = min(8.0, max(-8.0, speed + (3 * 9.81 / 2 * math.sin(theta) + 3.0 * u) * 0.05))
        theta = theta + speed * 0.05
        obs, reward, _, _, info = env.step(np.array([torque], dtype=np.float32))
        np.testing.assert_allclose(obs, [math.cos(theta), math.sin(theta), speed], rtol=1e-6, atol=1e-6)
        assert reward == pytest.approx(expected_reward, rel=1e-9)
        assert info["cost"] == pytest.approx(max(abs(speed) - 5.9, 0.0), abs=1e-12)


def test_pendulum_cost_speed_clip_and_time_limit():
    env = make_safe_pendulum()
    env.reset(seed=0, options={"state": (math.pi, 5.8)})  # at the bottom gravity does not act: 5.8 + 0.3 = 6.1
    obs, _, _, _, info = env.step(np.array([2.0]))
    assert obs[2] == pytest.approx(6.1, abs=1e-6)
    assert info["cost"] == pytest.approx(6.1 - SPEED_LIMIT, abs=1e-9)
    env.reset(options={"state": (math.pi, 7.9)})
    obs, _, _, _, info = env.step(np.array([2.0]))
    assert obs[2] == pytest.approx(8.0) and info["cost"] == pytest.approx(8.0 - SPEED_LIMIT)  # Gymnasium's clip
    env.reset()
    steps, truncated = 0, False
    while not truncated:
        _, _, terminated, truncated, _ = env.step(np.array([0.0]))
        steps += 1
        assert not terminated
    assert steps == MAX_EPISODE_STEPS == 100


def test_reward_and_cost_formulas_on_tensors_match_floats():
    theta, speed, u = torch.tensor([0.3, -3.0, 7.0], **F64), torch.tensor([-6.5, 2.0, 5.9], **F64), torch.tensor(
        [0.5, -1.0, 0.0], **F64)
    r = swing_up_reward(theta, speed, u)
    c = speed_cost(speed)
    for i in range(3):
        assert r[i].item() == pytest.approx(swing_up_reward(theta[i].item(), speed[i].item(), u[i].item()))
        assert c[i].item() == pytest.approx(max(abs(speed[i].item()) - SPEED_LIMIT, 0.0))
    assert c.tolist()[1:] == [0.0, 0.0]


# ---- the GP ------------------------------------------------------------------------------------------------------

def pendulum_data(n: int, seed: int = 0):
    env = make_safe_pendulum()
    env.reset(seed=0)
    x, y = offline_safe_data(env, n, 2, np.random.default_rng(seed))
    return torch.tensor(x), torch.tensor(y)


@pytest.fixture(scope="module")
def fitted_gp():
    torch.manual_seed(0)
    x, y = pendulum_data(60)
    gp = GPDynamics(4, 3, noise_std=1e-3, max_points=200, device=torch.device("cpu"))
    gp.fit(x, y, steps=30, lr=0.05)
    return gp, x, y


def test_gp_mean_interpolates_and_variance_shrinks_near_data(fitted_gp):
    gp, x, y = fitted_gp
    mean, var = gp.predict(x)
    # noise std 1e-3 on targets of std 0.1-1: the posterior mean goes through the data
    np.testing.assert_allclose(mean.numpy(), y.numpy(), atol=5e-3)
    prior = gp.outputscale  # the variance far from any data
    assert torch.all(var <= 1e-6)  # at a training input: at most the noise variance
    _, far = gp.predict(x + torch.tensor([0.0, 0.0, 100.0, 0.0], **F64))
    v01, v1, v3 = [gp.predict(x + s * torch.tensor([0.0, 0.0, 1.0, 0.0], **F64))[1].mean(0) for s in (0.1, 1.0, 3.0)]
    assert torch.all(v01 < v1) and torch.all(v1 < v3)  # the further from the data (in speed), the larger
    np.testing.assert_allclose(far.numpy(), prior.expand_as(far).numpy(), rtol=1e-6)


def test_gp_predict_matches_gpytorch_posterior(fitted_gp):
    gp, x, _ = fitted_gp
    z = torch.cat([x[:10] + 0.05, torch.randn(10, 4, **F64)])
    mean, var = gp.predict(z)
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False), gpytorch.settings.max_cholesky_size(10**6):
        f = gp.model(z.expand(3, -1, -1))  # gpytorch's own predictive distribution of the latent f
    np.testing.assert_allclose(mean.numpy(), f.mean.T.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(var.numpy(), f.variance.T.numpy(), rtol=1e-3, atol=1e-9)


def test_greedy_subset_never_lowers_the_variance(fitted_gp):
    gp, x, y = fitted_gp
    picked = gp.greedy_subset(x, 20)
    assert picked.shape == (3, 20)
    assert all(len(set(row.tolist())) == 20 for row in picked)  # no point twice
    assert sorted(gp.greedy_subset(x, len(x))[0].tolist()) == list(range(len(x)))  # m = N: all of them
    z = torch.randn(50, 4, **F64)
    _, var_full = gp.predict(z)
    sub = GPDynamics(4, 3, 1e-3, 20, torch.device("cpu"))
    sub.model.load_state_dict(gp.model.state_dict())
    sub.fits = 1  # keep these hyperparameters
    sub.fit(x, y, steps=0, lr=0.0)  # 60 points > 20: the greedy subset
    assert sub.train_x.shape == (3, 20, 4)
    _, var_sub = sub.predict(z)
    assert torch.all(var_sub >= var_full - 1e-12)
    assert (var_sub > var_full + 1e-9).any()


def test_greedy_subset_picks_the_most_uncertain_point():
    gp = GPDynamics(4, 1, 1e-3, 10, torch.device("cpu"))
    x = torch.tensor([[0.0, 0, 0, 0], [0.01, 0, 0, 0], [5.0, 0, 0, 0]], **F64)
    picked = gp.greedy_subset(x, 2)[0].tolist()
    assert picked == [0, 2]  # after point 0, its near twin is almost known: the far point comes next


# ---- the paper's formulas ----------------------------------------------------------------------------------------

def test_intrinsic_reward_by_hand():
    var = torch.tensor([[3e-6, 1e-6, 0.0]], **F64)
    noise = torch.tensor(1e-6, **F64)
    assert intrinsic_reward(var, noise).item() == pytest.approx(math.log(4) + math.log(2) + 0.0, rel=1e-12)


def test_pessimistic_cost_is_the_max_and_never_below_the_mean():
    assert pessimistic_trajectory_cost(torch.tensor([[1.0, 3.0, 2.0]])).tolist() == [3.0]
    costs = torch.rand(7, 5) * (torch.rand(7, 5) > 0.5)
    assert torch.all(pessimistic_trajectory_cost(costs) >= costs.mean(-1))


def test_rollout_is_the_particle_recursion(fitted_gp):
    gp, _, _ = fitted_gp
    x0 = torch.tensor([-1.0, 0.0, 0.5], **F64)
    actions = torch.rand(4, 3, 1, **F64) * 2 - 1
    eps = torch.randn(2, 3, 3, **F64)
    states, var = gp_rollout(gp, x0, actions, eps, beta=3.0)
    assert states.shape == var.shape == (4, 2, 3, 3)
    for s in (0, 3):
        for p in (0, 1):
            x = x0
            for t in range(3):
                mu, v = gp.predict(torch.cat([x, actions[s, t]])[None])
                x = x + mu[0] + 3.0 * v[0].sqrt() * eps[p, t]  # x' = x + mu + beta sigma eps
                np.testing.assert_allclose(states[s, p, t].numpy(), x.numpy(), rtol=1e-9, atol=1e-12)
                np.testing.assert_allclose(var[s, p, t].numpy(), v[0].numpy(), rtol=1e-9, atol=1e-15)


def test_objective_by_hand_and_common_random_numbers(fitted_gp):
    gp, _, _ = fitted_gp
    x0 = torch.tensor([-1.0, 0.0, 5.5], **F64)  # near the limit: some particles break it
    seq = torch.ones(1, 4, 1, **F64)
    eps = torch.randn(5, 4, 3, generator=torch.Generator().manual_seed(0), **F64)
    args = Args(dynamics="gp", env_id="SafePendulum", gp_lambda=10.0)
    score, value, cost = gp_plan_objective(gp, x0, seq.expand(3, -1, -1), eps, args, explore=False)
    torch.testing.assert_close(score, score[:1].expand(3), rtol=1e-12, atol=0)  # same candidates, particles: scores
    states, var = gp_rollout(gp, x0, seq, eps, args.gp_beta)
    prev = torch.cat([x0.expand(1, 5, 1, 3), states[:, :, :-1]], 2)
    rewards = [[swing_up_reward(math.atan2(prev[0, p, t, 1].item(), prev[0, p, t, 0].item()), prev[0, p, t, 2].item(),
                                1.0) for t in range(4)] for p in range(5)]
    costs = [sum(max(abs(states[0, p, t, 2].item()) - (SPEED_LIMIT - args.gp_speed_margin), 0) for t in range(4))
             for p in range(5)]
    assert value[0].item() == pytest.approx(np.mean(np.sum(rewards, 1)), rel=1e-9)  # mean over particles
    assert cost[0].item() == pytest.approx(max(costs), rel=1e-9) and max(costs) > 0  # max over particles
    assert score[0].item() == pytest.approx(value[0].item() - 10.0 * max(costs), rel=1e-9)
    _, explore_value, _ = gp_plan_objective(gp, x0, seq, eps, args, explore=True)
    info_gain = np.log1p(var.numpy() / 1e-6).sum(-1).sum(-1).mean()  # sum_d log(1 + sigma^2 / sigma_al^2)
    assert explore_value.item() == pytest.approx(info_gain, rel=1e-9)


# ---- the planner ---------------------------------------------------------------------------------------------------

def test_cem_finds_the_optimum_of_a_quadratic():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(10, 2, generator=gen, **F64) * 1.6 - 0.8
    objective = lambda a: -(a - target).pow(2).sum((1, 2))  # noqa: E731
    best, score = cem_plan(objective, torch.zeros(10, 2, **F64), num_samples=200, num_elites=20, iterations=30,
                           generator=gen)
    assert (best - target).abs().max().item() < 0.05
    assert score.item() == pytest.approx(objective(best[None]).item())
    # the same seed, the same plan
    gen2 = torch.Generator().manual_seed(0)
    torch.rand(10, 2, generator=gen2, **F64)  # the draw of the target above
    again, _ = cem_plan(objective, torch.zeros(10, 2, **F64), 200, 20, 30, gen2)
    assert torch.equal(again, best)


def test_cem_respects_the_action_bounds():
    objective = lambda a: a.sum((1, 2))  # noqa: E731  the optimum lies on the bound 1
    best, _ = cem_plan(objective, torch.zeros(5, 1, **F64), 50, 5, 10, torch.Generator().manual_seed(1))
    assert best.max().item() <= 1.0 and best.min().item() > 0.9


# ---- input checks ---------------------------------------------------------------------------------------------------

def gp_args(**kw):
    return Args(**{"dynamics": "gp", "env_id": "SafePendulum", **kw})


@pytest.mark.parametrize("kwargs, message", [
    (dict(dynamics="gp", env_id="SafetyPointGoal1"), "--env-id accepted: SafePendulum, SafePendulum-v0"),
    (dict(dynamics="gp", env_id="SafePendulum", num_envs=4), "--num-envs: pixel-variant flag"),
    (dict(dynamics="gp", env_id="SafePendulum", checkpoint_buffer=False), "--no-checkpoint-buffer: pixel-variant"),
    (dict(dynamics="gp", env_id="SafePendulum", constraint="lbsgd", imag_horizon=3), "--constraint, --imag-horizon"),
    (dict(gp_beta=1.0), "--gp-beta: flag(s) of the GP variant; add --dynamics gp"),
    (dict(dynamics="sde"), "--dynamics must be one of rssm, gp"),
])
def test_variant_checks(kwargs, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(Args(**kwargs))


@pytest.mark.parametrize("name, value, message", [
    ("gp_samples", 0, "--gp-samples must be positive, got 0"),
    ("gp_particles", -1, "--gp-particles must be positive"),
    ("gp_elites", 0, "--gp-elites must be positive"),
    ("gp_iterations", 0, "--gp-iterations must be positive"),
    ("gp_horizon", 0, "--gp-horizon must be positive"),
    ("gp_episodes", 0, "--gp-episodes must be positive"),
    ("gp_max_points", 0, "--gp-max-points must be positive"),
    ("gp_beta", -1.0, "--gp-beta must be >= 0"),
    ("gp_lambda", -1.0, "--gp-lambda must be >= 0"),
    ("gp_elites", 500, r"--gp-elites \(500\) must be <= --gp-samples \(100\)"),
    ("gp_expansion_episodes", 11, r"--gp-expansion-episodes \(11\) must be <= --gp-episodes \(10\)"),
    ("gp_speed_margin", 6.0, "--gp-speed-margin must be below the speed limit"),
    ("checkpoint_every", -100, "--checkpoint-every must be >= 0"),
])
def test_gp_flag_checks(name, value, message):
    with pytest.raises(SystemExit, match=message):
        validate(gp_args(**{name: value}))


def test_gp_defaults_and_shared_flags_validate():
    validate(gp_args())
    validate(gp_args(seed=3, action_repeat=1, torch_threads=0, eval_episodes=0, save_model=True, cuda=False,
                     env_id="SafePendulum-v0"))


def test_unknown_dynamics_on_the_command_line_is_a_message():
    proc = subprocess.run([sys.executable, str(REPO / "actsafe.py"), "--dynamics", "sde"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "dynamics" in proc.stderr + proc.stdout


# ---- smoke ------------------------------------------------------------------------------------------------------------

SMOKE_FLAGS = ("--dynamics", "gp", "--env-id", "SafePendulum", "--gp-episodes", "2", "--gp-expansion-episodes", "1",
               "--gp-samples", "16", "--gp-elites", "4", "--gp-particles", "3", "--gp-iterations", "2", "--gp-horizon",
               "5", "--gp-offline-transitions", "30", "--gp-max-points", "40", "--gp-fit-steps", "5",
               "--eval-episodes", "1", "--save-model", "--capture-video", "--torch-threads", "1")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The two-episode run, uninterrupted (also the reference of the kill-and-resume test)."""
    cwd = tmp_path_factory.mktemp("smoke")
    run_script("actsafe.py", *SMOKE_FLAGS, cwd=cwd)
    (run,) = run_dirs(cwd)
    return run


def test_smoke_two_episodes(smoke_run):
    run = smoke_run
    assert run.name.startswith("SafePendulum-v0__actsafe__1__")
    scalars = read_scalars(run)
    assert [s for s, _ in scalars["charts/episodic_return"]] == [100, 200]
    assert [v for _, v in scalars["charts/phase"]] == [0.0, 1.0]  # expansion, then the task
    assert len(scalars["charts/episodic_violations"]) == 2 and len(scalars["charts/episodic_cost"]) == 2
    assert [v for _, v in scalars["charts/gp_points"]] == [40.0, 40.0]  # 80 and 130 transitions: the subset
    assert len(scalars["losses/gp_nmll"]) == 3  # the initial fit and one per episode
    for tag in ["eval/episodic_return", "eval/episodic_cost", "eval/episodic_violations", "charts/gp_rmse",
                "charts/gp_within_3std", "charts/intrinsic_return", "charts/plan_seconds_per_step",
                "charts/planned_pessimistic_cost", "charts/upright_fraction", "eval/upright_fraction",
                "charts/cost_rate", "charts/SPS"]:
        assert tag in scalars, tag
    assert all(math.isfinite(v) for tag in scalars for _, v in scalars[tag])
    assert (run / "actsafe.cleanrl_model").exists()
    # issue 15: the evaluation episode drawn as a video (one frame per env step), summary.json
    import imageio.v2 as imageio

    frames = [f for f in imageio.get_reader(run / "videos" / "eval-episode-0.mp4")]  # list() asks len(): inf
    assert len(frames) == MAX_EPISODE_STEPS + 1 and frames[0].shape == (128, 128, 3)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_steps"] == 200 and summary["train_episodes"] == len(scalars["charts/episodic_return"]) == 2
    assert summary["train_violating_episodes"] == sum(v > 0 for _, v in scalars["charts/episodic_violations"])
    assert summary["train_cost"] == pytest.approx(np.mean([v for _, v in scalars["charts/episodic_cost"]]), abs=1e-6)
    assert summary["eval_return"] == pytest.approx(scalars["eval/episodic_return"][0][1], rel=1e-6)
    assert summary["cost_limit"] == 0.0 and summary["sps"] > 0 and summary["env_id"] == "SafePendulum-v0"


def test_draw_pendulum():
    down = actsafe.draw_pendulum(np.array([-1.0, 0.0, 0.0]), size=64)  # hanging down, at rest
    assert down.shape == (64, 64, 3) and down.dtype == np.uint8
    rod = (down != 255).any(-1)
    assert rod[50, 32] and not rod[14, 32]  # the rod below the pivot, nothing above it
    fast_up = actsafe.draw_pendulum(np.array([1.0, 0.0, -7.0]), size=64)  # upright, over the speed limit: red
    assert fast_up[14, 32].tolist() == [220, 30, 30] and not (fast_up[50, 32] != 255).any()


# ---- resume (issue 15) ----------------------------------------------------------------------------------------------

def test_kill_and_resume_is_the_uninterrupted_run(smoke_run, tmp_path):
    # killed right after the checkpoint of episode 1, resumed: episode 2 and the evaluation are those of the
    # uninterrupted run (the data, the GP, the planner's generator and the pendulum's start are all restored)
    run_dir = run_until_killed("actsafe.py", *SMOKE_FLAGS, cwd=tmp_path)
    state = read_checkpoint(run_dir / "checkpoint.pt")["state"]
    assert state["step"] == 100 and state["episodes"] == 1 and len(state["inputs"]) == 30 + 50
    proc = run_script("actsafe.py", "--resume", str(run_dir), cwd=tmp_path)
    assert f"resuming {run_dir} at step 100 (episode 2 of 2, phase task)" in proc.stdout
    assert "plan: 2 episodes of 100 env steps on cpu with 1 torch thread, the first 1 for" in proc.stdout
    resumed, reference = read_scalars(run_dir), read_scalars(smoke_run)
    for tag in ("charts/episodic_return", "charts/episodic_cost", "losses/gp_nmll", "charts/gp_rmse",
                "charts/cost_rate", "eval/episodic_return", "eval/upright_fraction"):
        assert resumed[tag] == reference[tag], tag
    end = read_checkpoint(run_dir / "checkpoint.pt")["state"]
    assert end["step"] == 200 and end["episodes"] == 2 and len(end["inputs"]) == 30 + 2 * 50
    assert json.loads((run_dir / "summary.json").read_text())["eval_return"] == pytest.approx(
        json.loads((smoke_run / "summary.json").read_text())["eval_return"], rel=1e-12)
    # a longer run from the same checkpoint: --gp-episodes may change; another env id may not
    args, _ = resume_run(Args(resume=str(run_dir), gp_episodes=4), "actsafe", actsafe.MAY_CHANGE_ON_RESUME)
    assert args.gp_episodes == 4 and args.dynamics == "gp" and args.gp_samples == 16
    with pytest.raises(SystemExit, match="--env-id: the run has 'SafePendulum', given 'SafetyCarGoal1'"):
        resume_run(Args(resume=str(run_dir), env_id="SafetyCarGoal1"), "actsafe", actsafe.MAY_CHANGE_ON_RESUME)


def test_keep_freed_memory_reuses_freed_planner_sized_tensors():
    """After `keep_freed_memory` (glibc), a freed 8 MiB tensor's memory is reused by the next one instead of being
    unmapped and page-faulted in again (up to 2,048 minor faults per 8 MiB tensor with glibc's defaults)."""
    import resource

    def faults_of(n: int) -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            torch.empty(2**20, dtype=torch.float64).fill_(1.0)  # 8 MiB, written, freed at once
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    actsafe.keep_freed_memory()
    faults_of(2)  # the first one maps its pages
    # measured on this machine's glibc 2.36: 2,048 faults for the 20 with it, 14,336 without it (a fresh process)
    assert faults_of(20) < 2 * 2048
