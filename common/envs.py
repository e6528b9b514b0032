"""Safety-Gymnasium environments for Python 3.11+, in the CleanRL style.

What this module adds on top of `safety_gymnasium.make`:
- `import_safety_gymnasium()`: the import fix for Python >= 3.11 (see `_ndarray_defaults_as_factories`).
- `normalize_env_id()`: "SafetyPointGoal1", "SafetyPointGoal1-v0", "SafetyPointGoal1Vision" all accepted;
  an unknown id fails at once with the closest valid ids.
- `make_env()`: a thunk for `gym.vector.SyncVectorEnv` that builds one environment with the gymnasium
  5-tuple API plus `info["cost"]`, optional action repeat (reward and cost summed), pixel observations
  (channel-first uint8 from the robot's `vision` camera) or a flat state vector with some observation keys
  dropped, and `info["episode"] = {"r", "c", "l"}` at the end of each episode.
- `SafeVectorEnv`: wraps a gymnasium vector env so that `step` returns
  `obs, reward, cost, terminated, truncated, info` (cost taken from the right place at auto-reset).

Headless rendering: `MUJOCO_GL=egl` is set when unset and libEGL exists, before MuJoCo is imported.
"""

from __future__ import annotations

import ctypes.util
import dataclasses
import difflib
import os
import re
import warnings
from collections import OrderedDict
from typing import Callable, Sequence

import numpy as np

_RENDER_PACKAGES = {
    "egl": "the Debian packages libegl1 and libgl1-mesa-dri (apt-get install libegl1 libgl1-mesa-dri; "
    "MUJOCO_GL=egl is then chosen automatically), or an NVIDIA driver with EGL",
    "osmesa": "the Debian package libosmesa6 (apt-get install libosmesa6)",
    "glfw": "a display (DISPLAY set) and the Debian package libglfw3, or EGL: the Debian packages libegl1 "
    "and libgl1-mesa-dri (MUJOCO_GL=egl is then chosen automatically)",
}


def _render_help() -> str:
    backend = os.environ.get("MUJOCO_GL", "") or "glfw"
    return _RENDER_PACKAGES.get(backend, "MUJOCO_GL set to one of egl, osmesa, glfw")


# Headless rendering: MuJoCo picks its OpenGL backend when it is first imported (gymnasium imports it
# through its plugins), so MUJOCO_GL must be set before that. EGL is chosen only where libEGL exists:
# without it, `import mujoco` would fail even for state-only environments.
if "MUJOCO_GL" not in os.environ and ctypes.util.find_library("EGL"):
    os.environ["MUJOCO_GL"] = "egl"
try:  # gymnasium-robotics prints a notice about its Adroit tasks (which we never use) when gymnasium loads it
    from farama_notifications import notifications

    notifications.pop("gymnasium_robotics", None)
except ImportError:
    pass
try:
    import gymnasium as gym
except (ImportError, AttributeError, OSError) as e:
    raise ImportError(
        f"MuJoCo could not load its OpenGL backend MUJOCO_GL={os.environ.get('MUJOCO_GL')!r} ({type(e).__name__}: "
        f"{e}). Install {_render_help()}; or unset MUJOCO_GL to run state-only environments."
    ) from e

# --------------------------------------------------------------------------------------------------
# Import fix and id normalisation
# --------------------------------------------------------------------------------------------------

_SAFETY_GYMNASIUM = None


def _ndarray_defaults_as_factories(dataclass_fn):
    """Wrap `dataclasses.dataclass` so that an np.ndarray class default becomes a default_factory.

    safety-gymnasium 1.0.0 declares about two dozen asset dataclasses with `color = np.array(...)`
    class defaults; Python >= 3.11 rejects mutable (unhashable) defaults with a ValueError.
    """

    def patched(cls=None, /, **kwargs):
        def wrap(c):
            for name, value in list(vars(c).items()):
                if isinstance(value, np.ndarray) and name in getattr(c, "__annotations__", {}):
                    setattr(c, name, dataclasses.field(default_factory=value.copy))
            return dataclass_fn(c, **kwargs)

        return wrap if cls is None else wrap(cls)

    return patched


def import_safety_gymnasium():
    """Import safety_gymnasium on any Python >= 3.10, applying the dataclass fix while it imports."""
    global _SAFETY_GYMNASIUM
    if _SAFETY_GYMNASIUM is not None:
        return _SAFETY_GYMNASIUM
    original = dataclasses.dataclass
    dataclasses.dataclass = _ndarray_defaults_as_factories(original)
    try:
        with warnings.catch_warnings():  # gymnasium-robotics warns about Adroit envs we never use
            warnings.simplefilter("ignore")
            import safety_gymnasium
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"{e}. Safety-Gymnasium environments need the packages of requirements.txt and "
            "requirements-nodeps.txt: run the README's set-up command."
        ) from e
    finally:
        dataclasses.dataclass = original
    _SAFETY_GYMNASIUM = safety_gymnasium
    return safety_gymnasium


def safety_env_ids() -> list[str]:
    """All single-agent Safety-Gymnasium ids, without version suffix (e.g. 'SafetyPointGoal1')."""
    sg = import_safety_gymnasium()
    from safety_gymnasium.utils.registration import safe_registry

    del sg
    return sorted({i.rsplit("-", 1)[0] for i in safe_registry if i.startswith("Safety")})


def normalize_env_id(env_id: str, vision: bool | None = None) -> tuple[str, bool]:
    """Return (registered id, vision) for a user-given id.

    Accepts 'SafetyPointGoal1', 'SafetyPointGoal1-v0', 'SafetyPointGoal1Vision' and
    'SafetyPointGoal1Vision-v0'. `vision=True` asks for pixels even if the id does not say "Vision";
    `vision=None` takes it from the id. Unknown ids raise a ValueError naming the closest valid ids.
    """
    base = re.sub(r"-v\d+$", "", env_id.strip())
    id_says_vision = base.endswith("Vision")
    if id_says_vision:
        base = base[: -len("Vision")]
    known = safety_env_ids()
    if base not in known or base.endswith("Debug"):
        candidates = [k for k in known if not k.endswith("Debug") and not k.endswith("Vision")]
        close = difflib.get_close_matches(base, candidates, n=5, cutoff=0.6)
        hint = f" Closest valid ids: {', '.join(close)}." if close else ""
        raise ValueError(
            f"Unknown environment id {env_id!r}.{hint} Ids look like 'SafetyPointGoal1' "
            "(robots Point, Car, Doggo, Racecar, Ant; tasks Goal, Button, Push, Circle 0-2, Run0, "
            "Velocity); add 'Vision' for pixel observations."
        )
    if vision is None:
        vision = id_says_vision
    elif id_says_vision and not vision:
        raise ValueError(f"{env_id!r} names a Vision environment but vision=False was asked for.")
    return f"{base}-v0", vision


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


class CostInInfo(gym.Wrapper):
    """Safety-Gymnasium's 6-tuple step -> gymnasium's 5-tuple with the cost in `info["cost"]`."""

    def step(self, action):
        obs, reward, cost, terminated, truncated, info = self.env.step(action)
        info["cost"] = float(cost)
        return obs, float(reward), terminated, truncated, info


class ActionRepeat(gym.Wrapper):
    """Repeat each action `repeat` times; reward and cost are SUMMED over the executed sub-steps.

    Stops early when the episode ends inside the repeat.
    """

    def __init__(self, env: gym.Env, repeat: int):
        super().__init__(env)
        if repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {repeat}")
        self.repeat = repeat

    def step(self, action):
        total_reward, total_cost = 0.0, 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total_reward += reward
            total_cost += info.get("cost", 0.0)
            if terminated or truncated:
                break
        info["cost"] = total_cost
        return obs, total_reward, terminated, truncated, info


class EpisodeStatistics(gym.Wrapper):
    """At the end of an episode, `info["episode"] = {"r": return, "c": cost, "l": length}`.

    Return and cost are the sums of the per-step reward and `info["cost"]` seen by the agent;
    the length counts agent steps (calls to `step`, so sub-steps of an action repeat count once).
    """

    def reset(self, **kwargs):
        self._ret, self._cost, self._len = 0.0, 0.0, 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._ret += reward
        self._cost += info.get("cost", 0.0)
        self._len += 1
        if terminated or truncated:
            info["episode"] = {"r": self._ret, "c": self._cost, "l": self._len}
        return obs, reward, terminated, truncated, info


def observation_slices(obs_space_dict) -> "OrderedDict[str, slice]":
    """Where each observation key lives in Safety-Gymnasium's flat observation vector.

    The flat vector is `gymnasium.spaces.flatten` of `obs_space_dict`, which keeps its order
    (agent sensors, then e.g. goal_lidar, hazards_lidar, vases_lidar).
    """
    slices, start = OrderedDict(), 0
    for key, space in obs_space_dict.spaces.items():
        size = int(np.prod(space.shape))
        slices[key] = slice(start, start + size)
        start += size
    return slices


class DropObservationKeys(gym.ObservationWrapper):
    """Flat state observation without some keys (e.g. `goal_lidar`, as SaGui's abstraction needs)."""

    def __init__(self, env: gym.Env, drop: Sequence[str]):
        super().__init__(env)
        slices = observation_slices(env.unwrapped.obs_space_dict)
        unknown = [k for k in drop if k not in slices]
        if unknown:
            raise ValueError(f"Observation keys {unknown} not in this environment; it has {list(slices)}.")
        self.kept = [k for k in slices if k not in drop]
        self.index = np.concatenate([np.arange(slices[k].start, slices[k].stop) for k in self.kept])
        low, high = env.observation_space.low[self.index], env.observation_space.high[self.index]
        self.observation_space = gym.spaces.Box(low, high, dtype=env.observation_space.dtype)

    def observation(self, obs):
        return obs[self.index]


class VisionObservation(gym.ObservationWrapper):
    """Dict observation of a Vision task -> its `vision` image as channel-first uint8 (3, H, W)."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        h, w, c = env.observation_space["vision"].shape
        self.observation_space = gym.spaces.Box(0, 255, (c, h, w), dtype=np.uint8)

    def observation(self, obs):
        return np.ascontiguousarray(obs["vision"].transpose(2, 0, 1))

    def reset(self, **kwargs):
        try:
            return super().reset(**kwargs)
        except Exception as e:  # the first render creates the OpenGL context
            raise RuntimeError(
                f"Vision observations need headless OpenGL, and rendering with "
                f"MUJOCO_GL={os.environ.get('MUJOCO_GL', '')!r} could not start ({type(e).__name__}: {e}). "
                f"Install {_render_help()}."
            ) from e


# --------------------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------------------


def make_safety_env(
    env_id: str,
    seed: int | None = None,
    vision: bool | None = None,
    image_size: int = 64,
    action_repeat: int = 1,
    drop_obs_keys: Sequence[str] = (),
    render_mode: str | None = None,
    render_size: int = 256,
) -> gym.Env:
    """One Safety-Gymnasium environment with the gymnasium API, `info["cost"]` and episode statistics.

    vision: pixels from the robot's `vision` camera, (3, image_size, image_size) uint8; None = as the id says.
    drop_obs_keys: state observation keys to remove from the flat vector (state tasks only).
    render_mode: "rgb_array" makes `env.render()` return a (render_size, render_size, 3) uint8 frame (state tasks:
    Safety-Gymnasium refuses `render()` on Vision tasks, whose observations are the frames).
    """
    if image_size <= 0 or action_repeat <= 0:
        raise ValueError(f"image_size and action_repeat must be positive, got {image_size}, {action_repeat}")
    sg = import_safety_gymnasium()
    registered_id, vision = normalize_env_id(env_id, vision)
    if vision:
        if drop_obs_keys:
            raise ValueError("drop_obs_keys applies to state observations, not to Vision tasks")
        robot = re.match(r"Safety(Point|Car|Doggo|Racecar|Ant)", registered_id)
        if robot is None:
            raise ValueError(f"{env_id!r} has no vision camera: Vision works for the Point, Car, Doggo, Racecar "
                             "and Ant navigation tasks (Goal, Button, Push, Circle, Run).")
        # A config passed to make() REPLACES the registered one, so it names the robot again.
        config = {"agent_name": robot.group(1), "observe_vision": True, "observation_flatten": False,
                  "vision_env_conf.vision_size": (image_size, image_size)}
        if render_mode is not None:
            raise ValueError("Vision tasks cannot render(): their observations are the frames (record those)")
        env = sg.make(registered_id, config=config)
    elif render_mode is not None:
        env = sg.make(registered_id, render_mode=render_mode, width=render_size, height=render_size)
    else:
        env = sg.make(registered_id)
    env = CostInInfo(env)
    if vision:
        env = VisionObservation(env)
    elif drop_obs_keys:
        env = DropObservationKeys(env, drop_obs_keys)
    if action_repeat > 1:
        env = ActionRepeat(env, action_repeat)
    env = EpisodeStatistics(env)
    if seed is not None:
        env.action_space.seed(seed)
    return env


def make_env(env_id: str, seed: int, **kwargs) -> Callable[[], gym.Env]:
    """A thunk for `gym.vector.SyncVectorEnv([...])`, CleanRL style; kwargs go to `make_safety_env`."""

    def thunk():
        return make_safety_env(env_id, seed=seed, **kwargs)

    return thunk


class SafeVectorEnv(gym.vector.VectorEnvWrapper):
    """A gymnasium vector env whose `step` returns `obs, reward, cost, terminated, truncated, info`.

    Gymnasium's auto-reset replaces the info of a finished sub-env with the reset info and keeps the
    last step's info in `info["final_info"]`; the cost of that last step is read from there.
    """

    def __init__(self, env: gym.vector.VectorEnv):
        super().__init__(env)
        self.num_envs = env.num_envs
        self.observation_space, self.action_space = env.observation_space, env.action_space
        self.single_observation_space = env.single_observation_space
        self.single_action_space = env.single_action_space

    def step(self, actions):
        obs, reward, terminated, truncated, info = self.env.step(actions)
        cost = np.asarray(info.get("cost", np.zeros(self.num_envs)), dtype=np.float64).copy()
        if "final_info" in info:
            for i in np.flatnonzero(info["_final_info"]):
                cost[i] = info["final_info"][i]["cost"]
        return obs, reward, cost, terminated, truncated, info


def default_async(num_envs: int) -> bool:
    """Worker processes pay off when there are cores to run them on: with 4 or more cores and 2 or more envs."""
    return num_envs > 1 and (os.cpu_count() or 1) >= 4


def make_vector_env(env_id: str, num_envs: int, seed: int, asynchronous: bool = False, **kwargs) -> SafeVectorEnv:
    """`num_envs` environments seeded `seed, seed + 1, ...`; reset them with `reset(seed=seed)`.

    asynchronous=False: all in this process (gymnasium's SyncVectorEnv). True: one worker process each
    (AsyncVectorEnv), started with "forkserver" (or "spawn" where there is no forkserver), never "fork": each
    worker builds its environment, and so its OpenGL context, itself (an EGL context does not survive a fork:
    "Offscreen framebuffer is not complete"). Both give the same observations, rewards and costs for the same
    seeds and actions.
    """
    if num_envs <= 0:
        raise ValueError(f"num_envs must be positive, got {num_envs}")
    thunks = [make_env(env_id, seed + i, **kwargs) for i in range(num_envs)]
    if not asynchronous:
        return SafeVectorEnv(gym.vector.SyncVectorEnv(thunks))
    import multiprocessing

    context = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return SafeVectorEnv(gym.vector.AsyncVectorEnv(thunks, context=context))


def finished_episodes(info: dict):
    """Yield (index, {"r", "c", "l"}) for every sub-env of a vector env whose episode just ended."""
    if "final_info" in info:
        for i in np.flatnonzero(info["_final_info"]):
            episode = info["final_info"][i].get("episode")
            if episode is not None:
                yield int(i), episode
