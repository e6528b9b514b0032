"""Tests of sagui.py: the paper's pieces on hand-made numbers, and smoke runs of both phases."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sagui
from common import make_safety_env, observation_slices
from conftest import REPO, read_scalars, run_dirs, run_script

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
    run_script("sagui.py", "--guide-total-timesteps", "1100", "--save-model", *TINY, cwd=cwd)
    (run_dir,) = run_dirs(cwd)
    return run_dir


def test_smoke_both_phases(guide_run):
    assert (guide_run / "guide.pt").is_file() and (guide_run / "student.pt").is_file()
    scalars = read_scalars(guide_run)
    for tag in ["charts/episodic_return", "charts/episodic_cost", "charts/episodic_length", "charts/cost_rate",
                "charts/SPS", "eval/episodic_return", "eval/episodic_cost", "losses/qr_loss", "losses/qc_loss",
                "losses/actor_loss", "losses/alpha_loss", "losses/beta_loss", "charts/lagrange_multiplier",
                "charts/alpha", "charts/omega", "charts/guide_acted_fraction", "charts/importance_weight_mean",
                # the guide phase, in runs/<run>/guide/
                "guide/charts/episodic_return", "guide/charts/episodic_cost", "guide/charts/cost_rate",
                "guide/losses/qc_loss", "guide/charts/lagrange_multiplier",
                "guide/eval/episodic_return", "guide/eval/episodic_cost"]:  # the guide alone in the target task
        assert tag in scalars, f"missing {tag}; have {sorted(scalars)}"
    assert [s for s, _ in scalars["eval/episodic_return"]] == [1100]
    assert all(v == pytest.approx(1.0) for _, v in scalars["guide/charts/alpha"])  # the guide's alpha is fixed
    # the guide's return is eq. 4's displacement: positive, and no more than ~ a few metres per episode
    assert 0 < scalars["guide/charts/episodic_return"][0][1] < 100
    rho = [v for _, v in scalars["charts/importance_weight_mean"]]
    assert all(0.1 - 1e-6 <= v <= 2.0 + 1e-6 for v in rho)


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
    torch.manual_seed(0)
    args = sagui.Args(hidden_size=8, batch_size=4)
    space = make_safety_env("SafetyPointGoal1", seed=0).action_space
    student = sagui.SACLagrangian(6, 2, args, space, 25.0, "cpu")
    guide = sagui.Actor(4, 2, 8, space.low, space.high).requires_grad_(False)
    batch = {"obs": torch.randn(4, 6), "action": torch.rand(4, 2) * 1.8 - 0.9, "next_obs": torch.randn(4, 6),
             "reward": torch.randn(4), "cost": torch.tensor([0.0, 1.0, 0.0, 0.0]), "done": torch.zeros(4),
             "rho": torch.ones(4), "logp_guide": torch.zeros(4)}
    xi = torch.tensor([0, 1, 2, 3])
    beta_before = student.beta

    real_item = torch.Tensor.item

    def no_item(self):  # torch's CPU Adam reads its step counter with .item(); only sagui.py's own calls count
        if sys._getframe(1).f_code.co_filename == sagui.__file__:
            raise AssertionError("Tensor.item() called inside SACLagrangian.update")
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", no_item)
    for variant in ("paper", "code"):
        losses = student.update(batch, 0.5, guide, xi, variant)
        assert all(isinstance(v, torch.Tensor) for v in losses.values())
    monkeypatch.undo()
    assert student.beta != beta_before  # the multiplier was still updated
