"""common/envs.py: ids, the import fix, action repeat, episode statistics, cost at auto-reset, pixels, key slicing."""

import dataclasses
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest

from common import envs as E
from common import finished_episodes, make_safety_env, make_vector_env, normalize_env_id, observation_slices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- ids and import fix
@pytest.mark.parametrize(
    "given, expected",
    [
        ("SafetyPointGoal1", ("SafetyPointGoal1-v0", False)),
        ("SafetyPointGoal1-v0", ("SafetyPointGoal1-v0", False)),
        ("SafetyPointGoal1Vision", ("SafetyPointGoal1-v0", True)),
        ("SafetyPointGoal1Vision-v0", ("SafetyPointGoal1-v0", True)),
        ("SafetyAntRun0", ("SafetyAntRun0-v0", False)),
    ],
)
def test_normalize_env_id(given, expected):
    assert normalize_env_id(given) == expected


def test_vision_flag_overrides_id():
    assert normalize_env_id("SafetyPointGoal1", vision=True) == ("SafetyPointGoal1-v0", True)
    with pytest.raises(ValueError, match="Vision"):
        normalize_env_id("SafetyPointGoal1Vision", vision=False)


def test_unknown_id_names_closest_matches():
    with pytest.raises(ValueError) as err:
        normalize_env_id("SafetyPointGaol1")
    msg = str(err.value)
    assert "Unknown environment id 'SafetyPointGaol1'" in msg
    assert "SafetyPointGoal1" in msg.split("Closest valid ids:")[1]
    with pytest.raises(ValueError, match="Unknown environment id"):
        normalize_env_id("CartPole-v1")


def test_ndarray_dataclass_defaults_become_factories():
    @E._ndarray_defaults_as_factories(dataclasses.dataclass)
    class Asset:
        color: np.ndarray = np.array([1.0, 0.0, 0.0])
        size: float = 0.3

    a, b = Asset(), Asset()
    np.testing.assert_array_equal(a.color, [1.0, 0.0, 0.0])
    a.color[0] = 5.0  # each instance owns a copy of the default
    assert b.color[0] == 1.0 and a.size == 0.3
    with pytest.raises(ValueError, match="mutable default"):  # what Python >= 3.11 does without the fix

        @dataclasses.dataclass
        class Broken:
            color: np.ndarray = np.array([1.0])


# ---------------------------------------------------------------- wrappers on a hand-made env
class ScriptedEnv(gym.Env):
    """Step t gives reward t + 1 and cost 10 * (t + 1); the episode terminates after `length` steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (1,))
    action_space = gym.spaces.Box(-1, 1, (1,))

    def __init__(self, length=5):
        self.length = length

    def reset(self, seed=None, options=None):
        self.t = 0
        return np.zeros(1, np.float32), {}

    def step(self, action):
        self.t += 1
        info = {"cost": 10.0 * self.t}
        return np.full(1, self.t, np.float32), float(self.t), self.t >= self.length, False, info


def test_action_repeat_sums_reward_and_cost_and_stops_at_episode_end():
    env = E.ActionRepeat(ScriptedEnv(length=5), repeat=2)
    env.reset()
    _, r, term, _, info = env.step(np.zeros(1))
    assert (r, info["cost"], term) == (1 + 2, 10 + 20, False)
    env.step(np.zeros(1))
    _, r, term, _, info = env.step(np.zeros(1))  # only step 5 remains: the repeat stops there
    assert (r, info["cost"], term) == (5, 50, True)
    with pytest.raises(ValueError):
        E.ActionRepeat(ScriptedEnv(), repeat=0)


def test_episode_statistics_equal_per_step_sums():
    env = E.EpisodeStatistics(E.ActionRepeat(ScriptedEnv(length=5), repeat=2))
    env.reset()
    rets, costs, n = 0.0, 0.0, 0
    while True:
        _, r, term, trunc, info = env.step(np.zeros(1))
        rets, costs, n = rets + r, costs + info["cost"], n + 1
        if term or trunc:
            break
    assert info["episode"] == {"r": 15.0, "c": 150.0, "l": 3}
    assert (rets, costs, n) == (15.0, 150.0, 3)


def test_vector_env_reports_cost_of_the_last_step_despite_auto_reset():
    envs = E.SafeVectorEnv(gym.vector.SyncVectorEnv([lambda: E.EpisodeStatistics(ScriptedEnv(3))] * 2))
    envs.reset(seed=0)
    seen = []
    for _ in range(3):
        _, reward, cost, term, _, info = envs.step(np.zeros((2, 1)))
        seen.append(cost.copy())
    np.testing.assert_array_equal(seen[-1], [30.0, 30.0])  # the final step's cost, not the reset info's
    assert term.all()
    episodes = dict(finished_episodes(info))
    assert episodes[0] == {"r": 6.0, "c": 60.0, "l": 3} and set(episodes) == {0, 1}


# ---------------------------------------------------------------- the real Safety-Gymnasium envs
def test_action_repeat_on_safety_gymnasium_matches_hand_stepped_env():
    """Seed 2 with a constant action drives the Point robot through hazards (cost > 0) within 1000 steps."""
    action = np.array([1.0, 0.3])
    raw = make_safety_env("SafetyPointGoal1", seed=2)
    rep = make_safety_env("SafetyPointGoal1", seed=2, action_repeat=4)
    raw.reset(seed=2)
    rep.reset(seed=2)
    total_cost = 0.0
    for _ in range(120):
        hand_r, hand_c = 0.0, 0.0
        for _ in range(4):
            _, r, _, _, info = raw.step(action)
            hand_r, hand_c = hand_r + r, hand_c + info["cost"]
        _, r, _, _, info = rep.step(action)
        assert r == pytest.approx(hand_r, abs=1e-9) and info["cost"] == hand_c
        total_cost += hand_c
    assert total_cost > 0, "the test lost its power: no cost was incurred, pick a seed/action that hits a hazard"


def test_vector_episode_statistics_equal_sums_of_steps():
    envs = make_vector_env("SafetyPointGoal1", num_envs=2, seed=2, action_repeat=4)
    envs.reset(seed=2)
    sums = np.zeros((2, 3))
    action = np.tile([1.0, 0.3], (2, 1))
    done_episodes = []
    for _ in range(250):  # 1000 simulator steps = one episode at action repeat 4
        _, r, c, term, trunc, info = envs.step(action)
        sums += np.stack([r, c, np.ones(2)], 1)
        for i, ep in finished_episodes(info):
            done_episodes.append((i, ep, sums[i].copy()))
            sums[i] = 0
    assert len(done_episodes) == 2
    for i, ep, s in done_episodes:
        assert ep["r"] == pytest.approx(s[0]) and ep["c"] == s[1] and ep["l"] == s[2] == 250
    assert sum(ep["c"] for _, ep, _ in done_episodes) > 0


def test_observation_slices_follow_flatten_order():
    env = make_safety_env("SafetyPointGoal1")
    space = env.unwrapped.obs_space_dict
    sample = space.sample()
    flat = gym.spaces.flatten(space, sample)
    slices = observation_slices(space)
    assert list(slices)[-3:] == ["goal_lidar", "hazards_lidar", "vases_lidar"]
    assert sum(s.stop - s.start for s in slices.values()) == flat.size == 60
    for key, sl in slices.items():
        np.testing.assert_array_equal(flat[sl], gym.spaces.flatten(space[key], sample[key]))


def test_drop_observation_keys_removes_goal_lidar():
    full = make_safety_env("SafetyPointGoal1", seed=0)
    part = make_safety_env("SafetyPointGoal1", seed=0, drop_obs_keys=("goal_lidar",))
    of, _ = full.reset(seed=0)
    op, _ = part.reset(seed=0)
    assert part.observation_space.shape == (44,) and op.shape == (44,)
    np.testing.assert_array_equal(op, np.concatenate([of[:12], of[28:]]))
    with pytest.raises(ValueError, match="not in this environment"):
        make_safety_env("SafetyPointGoal1", drop_obs_keys=("buttons_lidar",))


@pytest.mark.parametrize("size", [64, 32])
def test_vision_observation_shape_dtype_range(size):
    env = make_safety_env("SafetyPointGoal1", vision=True, image_size=size, seed=0)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.shape == obs.shape == (3, size, size)
    assert obs.dtype == np.uint8 and obs.flags["C_CONTIGUOUS"]
    obs2, _, _, _, info = env.step(env.action_space.sample())
    assert obs2.shape == (3, size, size) and "cost" in info
    assert obs.max() > obs.min() + 50  # a real picture, not a blank frame
    env.close()


def test_rendering_failure_names_the_missing_system_package():
    """With a backend whose library is missing (OSMesa is not installed here), the error says what to install."""
    code = "import common"
    env = {k: v for k, v in os.environ.items() if k != "PYOPENGL_PLATFORM"}
    env["MUJOCO_GL"] = "osmesa"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:  # OSMesa present on this machine: the backend loads and there is nothing to report
        pytest.fail("OSMesa loaded: this test needs a machine without libosmesa6 (Debian 12 default)")
    assert "libosmesa6" in proc.stderr.splitlines()[-1]


def test_vision_without_egl_explains_what_to_install():
    code = (
        "import ctypes.util; f = ctypes.util.find_library\n"
        "ctypes.util.find_library = lambda n: None if n == 'EGL' else f(n)\n"  # as on a machine without libEGL
        "from common import make_safety_env\n"
        "s = make_safety_env('SafetyPointGoal1'); s.reset(seed=0); s.step(s.action_space.sample())\n"
        "print('state env ok', flush=True)\n"
        "make_safety_env('SafetyPointGoal1Vision').reset(seed=0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert "state env ok" in proc.stdout  # state envs still work without EGL
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("RuntimeError: Vision observations need headless OpenGL") and "libegl1" in last


def test_bad_sizes_are_rejected():
    with pytest.raises(ValueError, match="num_envs must be positive"):
        make_vector_env("SafetyPointGoal1", num_envs=0, seed=0)
    with pytest.raises(ValueError, match="must be positive"):
        make_safety_env("SafetyPointGoal1", action_repeat=0)


@pytest.mark.parametrize("vision, steps", [(True, 20), (False, 505)])
def test_async_vector_env_equals_the_sync_one_for_the_same_seeds_and_actions(vision, steps):
    # worker processes (forkserver/spawn, each building its own GL context) must not change what the agent sees:
    # pixel observations (a few steps: rendering is slow on a CPU), and on state observations through the end of the
    # first episodes (500 agent steps): rewards, costs, the auto-reset's final observation and episode statistics
    def rollout(asynchronous):
        envs = make_vector_env("SafetyPointGoal1", 2, 3, asynchronous=asynchronous, vision=vision, image_size=16,
                               action_repeat=2)
        obs, _ = envs.reset(seed=3)
        rng = np.random.default_rng(0)
        out, resets = [obs], 0
        for _ in range(steps):
            obs, reward, cost, terminated, truncated, info = envs.step(rng.uniform(-1, 1, (2, 2)))
            out += [obs, reward, cost, terminated, truncated]
            if "final_observation" in info:
                resets += 1
                out += [np.stack(info["final_observation"][info["_final_observation"]])]
                out += [[(ep["r"], ep["c"], ep["l"]) for _, ep in finished_episodes(info)]]
        envs.close()
        return out, resets

    (sync, sync_resets), (asyn, async_resets) = rollout(False), rollout(True)
    assert sync_resets == async_resets == (0 if vision else 1)
    assert len(sync) == len(asyn)
    for a, b in zip(sync, asyn):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert E.default_async(1) is False
