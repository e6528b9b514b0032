"""SafePendulum-v0: pendulum swing-up with a limit on the angular speed (the GP variant of ActSafe).

The dynamics are Gymnasium's Pendulum-v1 (a rod of mass m and length l, torque at the pivot, semi-implicit Euler with
dt = 0.05, speed clipped at 8 rad/s) with g = 9.81 as in the ActSafe co-authors' pendulum; the episode starts hanging
down at rest and lasts 100 environment steps (50 agent steps with the action repeat of 2). On top of it:

- the reward of a swing-up, taken on the state before the step:  r = -(angle^2 + 0.1 theta_dot^2 + 0.02 (u / 2)^2)
  (angle = 0 upright, u the torque in [-2, 2]; the co-authors' "gym" reward with their control cost on the
  normalised action);
- the cost of the new state:  c = max(|theta_dot| - speed_limit, 0), in `info["cost"]`, with speed_limit = 5.9
  rad/s. A swing-up from rest needs about 7.7 rad/s at the bottom without torque, so the greedy swing-up breaks the
  limit; with the full torque applied on the way up, about 4.6 rad/s suffice, so a safe swing-up exists.

Observation [cos theta, sin theta, theta_dot] (float32); action: the torque in [-2, 2].
`reset(options={"state": (theta, theta_dot)})` starts from any state (used to draw the initial safe data).
`swing_up_reward` and `speed_cost` work on floats, NumPy arrays and torch tensors alike, so that a planner can
score imagined states with the very formulas the environment uses.

    from common.pendulum import make_safe_pendulum  # importing the module registers SafePendulum-v0
    env = make_safe_pendulum()                       # = gymnasium.make("SafePendulum-v0")
"""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np

ENV_ID = "SafePendulum-v0"
PENDULUM_IDS = ("SafePendulum", ENV_ID)  # what a user may type for --env-id
MAX_EPISODE_STEPS = 100
SPEED_LIMIT = 5.9  # rad/s, the constraint (actsafe-notes.md, "GP variant")
MAX_SPEED = 8.0  # rad/s, Gymnasium's clip of the simulated speed
MAX_TORQUE = 2.0
DT, G, M, L = 0.05, 9.81, 1.0, 1.0


def angle_normalize(x):
    """An angle in [-pi, pi) (0 = upright)."""
    return ((x + math.pi) % (2 * math.pi)) - math.pi


def swing_up_reward(theta, theta_dot, u):
    """Reward of the state (theta, theta_dot) and the action u in [-1, 1] (the torque over MAX_TORQUE)."""
    return -(angle_normalize(theta) ** 2 + 0.1 * theta_dot**2 + 0.02 * u**2)


def speed_cost(theta_dot, limit: float = SPEED_LIMIT):
    """How far the angular speed exceeds the limit: max(|theta_dot| - limit, 0)."""
    excess = abs(theta_dot) - limit
    return excess * (excess > 0)


def pendulum_step(theta: float, theta_dot: float, torque: float) -> tuple[float, float]:
    """One step of Gymnasium's Pendulum-v1 integrator (semi-implicit Euler): speed first, then angle."""
    torque = min(max(torque, -MAX_TORQUE), MAX_TORQUE)
    theta_dot = theta_dot + (3 * G / (2 * L) * math.sin(theta) + 3.0 / (M * L**2) * torque) * DT
    theta_dot = min(max(theta_dot, -MAX_SPEED), MAX_SPEED)
    return theta + theta_dot * DT, theta_dot


class SafePendulumEnv(gym.Env):
    """Pendulum swing-up from hanging down, with a cost for angular speeds over `speed_limit`."""

    metadata = {"render_modes": []}

    def __init__(self, speed_limit: float = SPEED_LIMIT):
        self.speed_limit = speed_limit
        high = np.array([1.0, 1.0, MAX_SPEED], dtype=np.float32)
        self.observation_space = gym.spaces.Box(-high, high, dtype=np.float32)
        self.action_space = gym.spaces.Box(-MAX_TORQUE, MAX_TORQUE, shape=(1,), dtype=np.float32)
        self.theta, self.theta_dot = math.pi, 0.0

    def _obs(self) -> np.ndarray:
        return np.array([math.cos(self.theta), math.sin(self.theta), self.theta_dot], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        state = (options or {}).get("state", (math.pi, 0.0))  # hanging down, at rest
        self.theta, self.theta_dot = float(state[0]), float(state[1])
        return self._obs(), {}

    def step(self, action):
        torque = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -MAX_TORQUE, MAX_TORQUE))
        reward = swing_up_reward(self.theta, self.theta_dot, torque / MAX_TORQUE)
        self.theta, self.theta_dot = pendulum_step(self.theta, self.theta_dot, torque)
        cost = speed_cost(self.theta_dot, self.speed_limit)
        return self._obs(), float(reward), False, False, {"cost": float(cost)}


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point=SafePendulumEnv, max_episode_steps=MAX_EPISODE_STEPS)


def make_safe_pendulum(**kwargs) -> gym.Env:
    """`gym.make("SafePendulum-v0", **kwargs)`: the env with Gymnasium's time limit of 100 steps."""
    return gym.make(ENV_ID, **kwargs)
