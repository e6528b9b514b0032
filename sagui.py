"""Guided Safe Exploration (SaGui): a reward-free safe guide trained in a source task teaches a student.

Paper: Qisong Yang, Thiago D. Simão, Nils Jansen, Simon H. Tindemans, Matthijs T. J. Spaan,
"Reinforcement Learning by Guided Safe Exploration", ECAI 2023. https://arxiv.org/abs/2307.14316
Authors' code (TensorFlow, read for facts only): github.com/qisong-yang/SaGui (`train-guide.py`, `sagui-cs.py`).

The idea. Phase 1: in a controlled *source* task (the same world seen through an abstraction Xi that hides
the goal, no task reward) a *guide* learns to move around safely: SAC-Lagrangian with a fixed entropy weight
and an auxiliary reward for the robot's displacement, under a cost limit. Phase 2: in the *target* task
(the real one, with reward) a *student* SAC-Lagrangian learns the reward while (a) a KL term pulls it towards
the guide, more strongly while it is unsafe (omega = beta, its cost multiplier), and (b) the behaviour policy
is composed of guide and student: with control-switch, the student acts until the first cost of an episode
and the guide acts from then on; guide actions are corrected by clipped importance weights.

Paper -> code
- Xi, the abstraction (Assumption 3)                -> `abstraction_index()`: drop `goal_lidar`
- eq. 4, auxiliary displacement reward              -> `SourceTask.step()`
- cost limit d -> per-step discounted target d_bar  -> `per_step_cost_target()`
- guide: reward-free constrained RL + eq. 4         -> `SACLagrangian.update()` without a guide, alpha fixed
- eq. 5, KL-regularised student objective           -> `kl_regularised_target()` (critic),
                                                       `SACLagrangian.update()` (actor)
- omega = beta, at every gradient step              -> `kl_weight()`, called inside `SACLagrangian.update()`
- the Lagrange multiplier beta                      -> `SACLagrangian.update()` (`--beta-update paper`/`code`),
                                                       `SACLagrangian.update_beta_from_episodes()` (`episodic`)
- composite sampling, control-switch / linear-decay -> `control_switch()`, `linear_decay()`, the student loop
- importance sampling for guide actions             -> `importance_weight()`
- the algorithm (guide, then student)               -> the two loops under `if __name__ == "__main__":`
- the paper's Static and Semi-Dynamic environments  -> `common/sagui_tasks.py` (ids SafetyPointSaguiStatic,
                                                       SafetyCarSaguiSemiDynamic); Dynamic = SafetyPointGoal1

Deviations (see docs/sagui.md for the full list and the reasons)
- Source task: for Safety-Gymnasium's own Goal/Push tasks the source task is the target task with `goal_lidar`
  dropped from the observation and the task reward replaced by eq. 4 (the hidden goal still exists and is
  resampled when touched; it gives no reward and no cost). For the paper's Static and Semi-Dynamic layouts the
  source task is the layout without a goal, as the authors' source environments.
- Boundary: as in the authors' guide code, leaving the placement extents ends the guide's episode with r = 0.
  The student's target task has no boundary (as in the authors' student code).
- The KL term follows the paper by default (omega = beta, log pi_guide of the next action and an extra
  omega-weighted entropy in the soft value, and the KL in the actor loss); `--kl-variant code` gives the
  authors' code: omega = 0.1 beta + 0.01, log pi_guide of the *executed* action added to the reward, no KL in
  the actor loss. In both, omega is computed from the live beta inside every gradient step (as the code).
- beta: by default its loss uses Qc(s, a ~ pi) (the Lagrangian of the paper); `--beta-update code` uses Qc at
  the buffer's action (the code); `--beta-update episodic` drives beta from the measured episodic cost of the
  behaviour policy (as OmniSafe's SAC-Lag), which keeps omega = beta alive while episodes are over the limit.
  `--beta-damp 10` / `--guide-beta-damp 10` add the code's proportional term.
- Importance weights are computed when the transition is collected (as in the authors' code), with the
  student of that moment, and multiply the critic and actor losses (`--is-squared` squares them in the
  critic loss as the code does).
- Control-switch minibatches take their guide quarter only once the guide buffer holds a whole batch
  (all-student batches before); `--cs-wait-for-both-buffers` does no update at all until then (the code).
- Update order: critics, actor, alpha, beta, then Polyak (the code updates the actor first).
- Evaluation: `--eval-episodes` (10) episodes of the student alone (stochastic actions, as the code) every
  `--eval-every` steps; the guide alone in the target task after its training, deterministic (as the code's
  guide test) and stochastic (as it acts for the student).
- Speed: replay lives on the device (one copy per env step, one gather per minibatch); `--compile` wraps the
  same update and acting functions in torch.compile (LeanRL's way); `--num-envs` steps several environments
  per iteration and keeps one gradient step per environment step.

Budgets: `--total-timesteps` bounds the student stage only; the guide stage before it has its own
`--guide-total-timesteps` (9M by default). The plan printed at the start gives each stage's budget.

Resume, video, summary (issue 15)
- `--checkpoint-every N` writes runs/<run>/checkpoint.pt every N env steps of the run (the guide's steps, then
  guide_steps + the student's), at the end of the guide stage (as the student stage's first checkpoint) and at
  the end of the run (after the final evaluation). It holds the stage, that stage's SAC-Lagrangian (networks,
  targets, alpha, beta, optimisers), its replay buffers (not with --no-checkpoint-buffer), the episode counters,
  the logger's counters, the linear-decay and action-space generators and (common/checkpoint.py) all RNG states
  and args; in the student stage also the frozen guide. `--resume runs/<run>` continues in the stage it was in:
  a run killed in the guide stage continues its guide, one killed in the student stage keeps its guide. The
  environments are reset with seed + step (the episodes in progress are lost; control-switch hands the new
  episodes to the student, linear-decay draws who acts as at any episode start). Without the replay in the
  checkpoint a resumed stage collects max(--learning-starts, --batch-size) steps before updating again.
- `--capture-video`: the first episode of every evaluation of the student alone, runs/<run>/videos/.
- runs/<run>/summary.json at the end: the student's final evaluation, its training episodes (behaviour policy)
  against --cost-limit, plus the guide stage's numbers as guide_* entries (a --guide-only run reports the guide
  stage instead: its source-task training episodes against --guide-cost-limit, and its deterministic evaluation
  alone in the target task).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import (
    Logger,
    SafeVectorEnv,
    check_choice,
    check_finite,
    check_positive,
    finished_episodes,
    get_device,
    make_safety_env,
    mlp,
    normalize_env_id,
    observation_slices,
    seed_everything,
)
from common.checkpoint import Checkpointer, check_identity, pack_array, resume_run, set_rng_state, unpack_array
from common.envs import EpisodeStatistics
from common.summary import write_summary
from common.video import save_video, video_path
from common.sagui_tasks import paper_cost_limit, source_id


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    capture_video: bool = False
    """record the student's evaluation episodes as mp4 under runs/<run>/videos/ (the first episode of every
    evaluation, Safety-Gymnasium's default camera, 256x256, every --video-frame-stride-th step); rendering costs
    about 0.1 s per frame on a CPU (2 min per 1000-step episode at stride 1)"""
    save_model: bool = False
    """save the student (networks, alpha, beta, targets, optimisers) to runs/<run>/student.pt; the guide is
    always saved to runs/<run>/guide.pt"""

    # Algorithm specific arguments
    env_id: str = "SafetyPointGoal1"
    """target task: SafetyPointGoal1 (the paper's Dynamic), SafetyPointSaguiStatic, SafetyCarSaguiSemiDynamic,
    or another Safety-Gymnasium Goal/Push id (state observations with a goal part)"""
    total_timesteps: int = 4_500_000
    """bounds the STUDENT stage only: its environment steps in the target task (paper: Static 1.5M, Semi-Dynamic 3M,
    Dynamic 4.5M). Before it, the guide stage runs --guide-total-timesteps (9M by default) steps of its own in the
    source task, unless --guide-path reuses a saved guide or --no-use-guide drops the guide"""
    guide_total_timesteps: int = 9_000_000
    """guide stage: environment steps in the source task, before the student's --total-timesteps (authors' code
    default; not in the paper)"""
    guide_path: Optional[str] = None
    """reuse a saved guide (runs/<run>/guide.pt) and skip the guide phase"""
    guide_only: bool = False
    """train, save and evaluate the guide, then stop (reuse it with --guide-path)"""
    use_guide: bool = True
    """False (--no-use-guide): the SAC-Lagrangian baseline from scratch: no guide phase, no KL, student acts"""
    num_envs: int = 1
    """environments stepped together in each phase; one gradient step per environment step is kept"""
    compile: str = "auto"
    """torch.compile the update and acting functions: on, off, or auto (on with CUDA, off on the CPU)"""
    sampling: str = "control-switch"
    """composite sampling of the behaviour policy: control-switch, linear-decay or student"""
    ld_mode: str = "step"
    """linear-decay: draw guide-or-student each step ("step"), once per episode ("trajectory"), or the authors'
    mix ("mixed": each episode is step-wise with probability 1 - progress, else trajectory-wise)"""
    kl_variant: str = "paper"
    """KL regularisation toward the guide: "paper" (eq. 5, omega = beta) or "code" (omega = 0.1 beta + 0.01)"""
    fixed_omega: Optional[float] = None
    """ablation: a constant KL weight omega instead of the adaptive one (0 disables the KL term)"""
    beta_update: str = "paper"
    """how beta learns: "paper" (Qc(s, a~pi) vs d_bar, every gradient step), "code" (Qc at the buffer's action),
    or "episodic" (the mean episodic cost of the last finished episodes vs d, OmniSafe's SAC-Lag)"""
    beta_damp: float = 0.0
    """student: proportional damping of beta in the actor loss, damp = this * mean(d_bar - Qc) (authors: 10)"""
    guide_beta_damp: float = 0.0
    """guide: the same damping for the guide (authors: 10)"""
    cs_wait_for_both_buffers: bool = False
    """control-switch: no update until both buffers hold a batch (the authors' code)"""
    displacement_reward: bool = True
    """guide: add the displacement reward of eq. 4; False (--no-displacement-reward) is the MaxEnt ablation"""
    displacement_scale: float = 1.0
    """guide: weight of the displacement reward (authors' code: 1.0)"""
    cost_limit: Optional[float] = None
    """student: cost limit d per 1000-step episode; default: the paper's d (Static 5, Semi-Dynamic 8, else 25)"""
    guide_cost_limit: float = 20.0
    """guide: cost limit per episode in the source task (authors' code: 20)"""
    guide_alpha: float = 1.0
    """guide: fixed entropy weight (authors' code: 1.0)"""
    max_episode_steps: int = 1000
    """episode length T used to turn d into the per-step target d_bar (Safety-Gymnasium's horizon)"""
    hidden_size: int = 256
    """width of the two hidden layers of every network (paper: Static 32, Semi-Dynamic 64, Dynamic 256)"""
    batch_size: int = 256
    """minibatch size (paper: Static 32, Semi-Dynamic 64, Dynamic 256)"""
    buffer_size: int = 1_000_000
    """replay capacity (for control-switch: split in half between student and guide buffers, as the code)"""
    gamma: float = 0.99
    """discount factor for reward and cost"""
    tau: float = 0.005
    """Polyak coefficient of the target networks"""
    lr: float = 1e-3
    """learning rate of the actor, the critics and alpha"""
    beta_lr: float = 5e-2
    """learning rate of the cost multiplier beta (per gradient step; per finished episode with `episodic`)"""
    target_entropy_scale: float = -1.0
    """student: target entropy = this * action dimension"""
    guide_batch_fraction: float = 0.25
    """control-switch: fraction of each minibatch drawn from the guide buffer (paper: 75/25)"""
    is_clip_low: float = 0.1
    """lower clip of the importance weight pi_student / pi_guide"""
    is_clip_high: float = 2.0
    """upper clip of the importance weight pi_student / pi_guide"""
    is_squared: bool = False
    """square the importance weight inside the critic loss (authors' code) instead of weighting the MSE"""
    random_steps: int = 500
    """uniform random actions at the start of the guide phase and of the SAC-Lag baseline"""
    learning_starts: int = 500
    """no gradient updates before this many steps of a phase"""
    update_every: int = 100
    """do this many gradient steps every this many environment steps (a multiple of --num-envs)"""
    eval_every: int = 30_000
    """evaluate the student alone every this many steps (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation (also of the guide alone, after its training)"""
    log_every: int = 1000
    """console line and multiplier/loss scalars every this many steps"""
    video_frame_stride: int = 1
    """--capture-video: keep every this many env steps of the recorded episode as a frame (the episode runs whole)"""
    checkpoint_every: int = 50_000
    """write runs/<run>/checkpoint.pt every this many env steps of the run (the guide stage's, then the student's
    counted after them), at the end of the guide stage and of the run (0: only then). At the default sizes a
    checkpoint takes 10-12 MiB and 1.5 s with 50k replay rows, 157-182 MiB and 32-38 s with the full 1M rows (zlib
    on the rows is most of it; 2 shared CPU cores under load), 2-3 MiB and 0.3 s with --no-checkpoint-buffer"""
    checkpoint_buffer: bool = True
    """put the replay buffers in the checkpoint; --no-checkpoint-buffer leaves them out (small files; a resumed
    run refills them for max(--learning-starts, --batch-size) steps before updating again)"""
    resume: Optional[str] = None
    """a run directory runs/<run> to continue; its flags are used, only --total-timesteps/--checkpoint-every/
    --checkpoint-buffer/--cuda/--compile may change. It continues in the stage it was in (a finished guide stage is
    not redone) from its last checkpoint; the environments are reset (the episodes in progress are lost)"""


# --------------------------------------------------------------------------------------------------
# Environments: target task and source task (eq. 4, the abstraction Xi, the boundary)
# --------------------------------------------------------------------------------------------------

GOAL_KEY = "goal_lidar"


def abstraction_index(obs_space_dict) -> tuple[np.ndarray, list[str]]:
    """Xi: indices of the target's flat observation that the guide sees (every key but `goal_lidar`)."""
    slices = observation_slices(obs_space_dict)
    if GOAL_KEY not in slices:
        raise ValueError(
            f"SaGui needs a target task whose observation has a goal part ({GOAL_KEY!r}) for the abstraction "
            f"to hide; this environment observes {list(slices)}. Use a Goal or Push task, e.g. "
            "SafetyPointGoal1 (the paper's Dynamic), SafetyPointSaguiStatic, SafetyCarSaguiSemiDynamic, "
            "SafetyCarGoal1, SafetyPointPush1."
        )
    kept = [k for k in slices if k != GOAL_KEY]
    return np.concatenate([np.arange(slices[k].start, slices[k].stop) for k in kept]), kept


def displacement(pos_before: np.ndarray, pos_after: np.ndarray) -> float:
    """eq. 4: r_delta = || (x, y)_{t+1} - (x, y)_t ||_2, the robot's planar displacement in one step."""
    return float(np.linalg.norm(np.asarray(pos_after)[:2] - np.asarray(pos_before)[:2]))


class SourceTask(gym.Wrapper):
    """The source task: no task reward, eq. 4's displacement reward, and a boundary at the placement extents.

    Wraps a goal-less env (the paper's layouts) or one built with `drop_obs_keys=("goal_lidar",)`. Leaving the
    extents ends the episode with r = 0, as the walls of the authors' source environment did.
    """

    def __init__(self, env: gym.Env, displacement_scale: float):
        super().__init__(env)
        self.scale = displacement_scale
        self.bound = float(np.max(np.abs(env.unwrapped.task.placements_conf.extents)))

    def step(self, action):
        pos_before = self.env.unwrapped.task.agent.pos.copy()
        obs, _task_reward, terminated, truncated, info = self.env.step(action)
        pos_after = self.env.unwrapped.task.agent.pos
        reward = self.scale * displacement(pos_before, pos_after)  # eq. 4 (the task reward is dropped)
        if np.any(np.abs(pos_after[:2]) > self.bound):  # the boundary replacing the original walls
            terminated, reward = True, 0.0
        return obs, reward, terminated, truncated, info


def make_source_env(env_id: str, seed: int, displacement_scale: float):
    def thunk():
        goal_less = source_id(env_id)  # the paper's layouts have a goal-less source task
        if goal_less is not None:
            env = make_safety_env(goal_less, seed=seed)
        else:
            env = make_safety_env(env_id, seed=seed, drop_obs_keys=(GOAL_KEY,))
        # statistics again on top, so that the episode return is the eq. 4 return and the boundary ends it
        return EpisodeStatistics(SourceTask(env, displacement_scale))

    return thunk


def make_target_env(env_id: str, seed: int, render: bool = False):
    return lambda: make_safety_env(env_id, seed=seed, render_mode="rgb_array" if render else None)


def per_step_cost_target(cost_limit: float, gamma: float, horizon: int) -> float:
    """d_bar = d (1 - gamma^T) / ((1 - gamma) T): the per-episode limit as a bound on the discounted Qc."""
    return cost_limit * (1 - gamma**horizon) / ((1 - gamma) * horizon)


def discounted_cost_to_go(costs: np.ndarray, gamma: float) -> float:
    """Mean over an episode's steps t of sum_k gamma^k c_{t+k}: the measured counterpart of Qc (and of d_bar)."""
    to_go, acc = np.zeros(len(costs)), 0.0
    for t in range(len(costs) - 1, -1, -1):
        acc = costs[t] + gamma * acc
        to_go[t] = acc
    return float(to_go.mean()) if len(costs) else 0.0


# --------------------------------------------------------------------------------------------------
# Networks
# --------------------------------------------------------------------------------------------------

LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy, scaled to the action bounds."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, action_low, action_high):
        super().__init__()
        self.trunk = mlp(obs_dim, [hidden], hidden, output_activation=nn.ReLU)
        self.mean, self.log_std = nn.Linear(hidden, act_dim), nn.Linear(hidden, act_dim)
        low, high = torch.as_tensor(action_low, dtype=torch.float32), torch.as_tensor(action_high, dtype=torch.float32)
        self.register_buffer("scale", (high - low) / 2)
        self.register_buffer("bias", (high + low) / 2)

    def dist(self, obs):
        """The Gaussian before squashing: (mean, std)."""
        h = self.trunk(obs)
        log_std = self.log_std(h).clamp(LOG_STD_MIN, LOG_STD_MAX)
        return self.mean(h), log_std.exp()

    def _squash_log_prob(self, u, mean, std):
        # log N(u) - sum log |d a / d u|, with log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))
        log_prob = torch.distributions.Normal(mean, std).log_prob(u)
        log_prob = log_prob - 2 * (math.log(2) - u - F.softplus(-2 * u)) - torch.log(self.scale)
        return log_prob.sum(-1)

    def sample(self, obs, deterministic: bool = False):
        """(action, log pi(action | obs)); reparameterised."""
        return self.sample_from(*self.dist(obs), deterministic)

    def sample_from(self, mean, std, deterministic: bool = False):
        u = mean if deterministic else mean + std * torch.randn_like(mean)
        return torch.tanh(u) * self.scale + self.bias, self._squash_log_prob(u, mean, std)

    def log_prob(self, obs, action):
        """log pi(action | obs) of a given (e.g. the other policy's) action."""
        return self.log_prob_from(*self.dist(obs), action)

    def log_prob_from(self, mean, std, action):
        y = ((action - self.bias) / self.scale).clamp(-1 + 1e-6, 1 - 1e-6)
        return self._squash_log_prob(torch.atanh(y), mean, std)


class QNet(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, [hidden, hidden], 1)

    def forward(self, obs, action):
        return self.net(torch.cat([obs, action], -1)).squeeze(-1)


class DeviceReplay:
    """A replay ring buffer held on the device as one float tensor (one column block per field).

    `add` packs a step's rows into one host array and copies it once; `sample` draws indices with torch on the
    device and gathers once, so a minibatch costs no host->device copy and no host-side random draw.
    Fields are given as name -> shape (`()` for a scalar per row); samples come back as float32 views.
    """

    def __init__(self, capacity: int, fields: dict[str, tuple], device):
        self.columns, width = {}, 0
        for name, shape in fields.items():
            size = int(np.prod(shape)) if shape else 1
            self.columns[name] = (slice(width, width + size), shape)
            width += size
        self.data = torch.zeros(capacity, width, device=device)
        self.capacity, self.pos, self.size = capacity, 0, 0

    def __len__(self) -> int:
        return self.size

    def add(self, **rows) -> None:
        n = len(next(iter(rows.values())))
        packed = np.concatenate([np.asarray(rows[k], np.float32).reshape(n, -1) for k in self.columns], 1)
        idx = (self.pos + np.arange(n)) % self.capacity
        self.data[torch.as_tensor(idx, device=self.data.device)] = torch.as_tensor(packed).to(self.data.device)
        self.pos, self.size = int((self.pos + n) % self.capacity), min(self.size + n, self.capacity)

    def sample(self, batch_size: int) -> dict[str, torch.Tensor]:
        rows = self.data[torch.randint(self.size, (batch_size,), device=self.data.device)]
        return {k: rows[:, s].reshape(batch_size, *shape) for k, (s, shape) in self.columns.items()}

    def state_dict(self) -> dict:
        """The stored rows (zlib-compressed), position and size, for a checkpoint."""
        return {"rows": pack_array(self.data[: self.size].cpu().numpy()), "pos": self.pos, "size": self.size,
                "capacity": self.capacity}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity or state["rows"]["shape"][1:] != tuple(self.data.shape[1:]):
            raise SystemExit(f"error: the checkpoint's replay ({state['capacity']} x {state['rows']['shape'][1:]}) "
                             f"does not fit this run's ({self.capacity} x {tuple(self.data.shape[1:])})")
        self.data[: state["size"]] = torch.from_numpy(unpack_array(state["rows"]).copy()).to(self.data.device)
        self.pos, self.size = state["pos"], state["size"]


def replay_fields(obs_dim, act_dim):
    """A transition, plus what the frozen guide says about it: its log-prob of the executed action (code variant)
    and its Gaussian (mean, std) at Xi(s) and Xi(s'), computed once when stored instead of at every gradient step."""
    return {"obs": (obs_dim,), "action": (act_dim,), "next_obs": (obs_dim,), "reward": (), "cost": (), "done": (),
            "rho": (), "logp_guide": (), "guide_mean": (act_dim,), "guide_std": (act_dim,),
            "guide_next_mean": (act_dim,), "guide_next_std": (act_dim,)}


# --------------------------------------------------------------------------------------------------
# The pieces the paper is about
# --------------------------------------------------------------------------------------------------


def importance_weight(logp_student, logp_guide, low: float = 0.1, high: float = 2.0):
    """rho = clip(pi_student(a|s) / pi_guide(a|Xi(s)), low, high) for an action the guide took."""
    return torch.clamp(torch.exp(logp_student - logp_guide), low, high)


def control_switch(guide_in_control: np.ndarray, cost: np.ndarray, episode_over: np.ndarray) -> np.ndarray:
    """Control-switch: the student acts until the first step with cost > 0, then the guide until the episode ends.

    Returns who acts at the next step (True = guide), per environment.
    """
    return (guide_in_control | (cost > 0)) & ~episode_over


def linear_decay(step: int, total_steps: int) -> float:
    """Linear-decay: the probability that the guide acts, 1 at the start, 0 at the end of training."""
    return max(0.0, 1.0 - step / total_steps)


def kl_weight(beta, variant: str, fixed: Optional[float] = None):
    """omega: the paper sets omega = beta; the authors' code uses 0.1 beta + 0.01; an ablation uses a constant.

    `beta` may be a tensor (the live multiplier inside a gradient step): then so is omega, with no device sync.
    """
    if fixed is not None:
        return beta * 0 + fixed if isinstance(beta, torch.Tensor) else fixed
    return beta if variant == "paper" else 0.1 * beta + 0.01


def kl_regularised_target(reward, done, gamma, min_q_next, logp_next, logp_guide_next, alpha, omega,
                          variant: str = "paper", logp_guide_executed=None):
    """The reward critic's target under the KL-regularised objective.

    eq. 5: max E[sum gamma^t (r + alpha H(pi(.|s)) - omega KL(pi(.|s) || pi_guide(.|Xi(s))))]; since
    -KL = H + E log pi_guide, the soft value is V(s') = E_a'[Q(s',a') - (alpha + omega) log pi(a'|s')
    + omega log pi_guide(a'|Xi(s'))].
    Code variant: y = r + omega log pi_guide(a|Xi(s)) of the executed action + gamma (Q(s',a') - alpha log pi(a'|s')).
    """
    if variant == "paper":
        soft_value = min_q_next - (alpha + omega) * logp_next + omega * logp_guide_next  # eq. 5
        return reward + gamma * (1 - done) * soft_value
    return reward + omega * logp_guide_executed + gamma * (1 - done) * (min_q_next - alpha * logp_next)


class SACLagrangian:
    """SAC-Lagrangian with twin reward critics and one cost critic; used for the guide and for the student.

    The guide: fixed alpha, no guide to imitate (omega = 0). The student: learned alpha, a KL toward `guide`
    (a frozen Actor on Xi(s), whose Gaussians at Xi(s) and Xi(s') come with the batch) weighted by
    omega = kl_weight(beta), importance weights rho on guide actions.
    `update()` is one gradient step of everything and reads nothing back from the device; `--compile` wraps it.
    """

    def __init__(self, obs_dim, act_dim, args: Args, action_space, cost_limit, device, fixed_alpha=None,
                 beta_damp=0.0, guide: Optional[Actor] = None):
        h = args.hidden_size
        self.actor = Actor(obs_dim, act_dim, h, action_space.low, action_space.high).to(device)
        self.qr1, self.qr2, self.qc = (QNet(obs_dim, act_dim, h).to(device) for _ in range(3))
        self.qr1_t, self.qr2_t, self.qc_t = (QNet(obs_dim, act_dim, h).to(device) for _ in range(3))
        for q, q_t in self.critic_pairs():
            q_t.load_state_dict(q.state_dict())
            q_t.requires_grad_(False)
        self.online_params = [p for q, _ in self.critic_pairs() for p in q.parameters()]
        self.target_params = [p for _, q_t in self.critic_pairs() for p in q_t.parameters()]
        adam = lambda params, lr: torch.optim.Adam(params, lr=lr, foreach=True)  # noqa: E731 (fewer, larger ops)
        self.actor_opt = adam(self.actor.parameters(), args.lr)
        self.q_opt = adam(self.online_params, args.lr)
        # alpha = softplus(.) and beta = softplus(.), both starting from softplus(0) = log 2 (authors' code)
        self.fixed_alpha = fixed_alpha
        self.soft_alpha = torch.zeros((), device=device, requires_grad=True)
        self.soft_beta = torch.zeros((), device=device, requires_grad=True)
        self.alpha_opt = adam([self.soft_alpha], args.lr)
        self.beta_opt = adam([self.soft_beta], args.beta_lr)
        self.actor_side_params = [*self.actor.parameters(), self.soft_alpha, self.soft_beta]
        self.target_entropy = args.target_entropy_scale * act_dim
        self.cost_limit = cost_limit
        self.d_bar = per_step_cost_target(cost_limit, args.gamma, args.max_episode_steps)
        self.beta_damp, self.guide = beta_damp, guide
        self.kl_on = guide is not None and args.fixed_omega != 0
        self.args = args

    def critic_pairs(self):
        return [(self.qr1, self.qr1_t), (self.qr2, self.qr2_t), (self.qc, self.qc_t)]

    @property
    def alpha(self) -> float:
        return self.fixed_alpha if self.fixed_alpha is not None else F.softplus(self.soft_alpha).item()

    @property
    def beta(self) -> float:
        return F.softplus(self.soft_beta).item()

    def update(self, batch: dict) -> dict:
        """One gradient step of the critics, actor, alpha and beta, then Polyak averaging. Returns detached tensors."""
        args = self.args
        obs, act, next_obs = batch["obs"], batch["action"], batch["next_obs"]
        rew, cost, done, rho = batch["reward"], batch["cost"], batch["done"], batch["rho"]
        alpha = self.fixed_alpha if self.fixed_alpha is not None else F.softplus(self.soft_alpha).detach()
        beta = F.softplus(self.soft_beta).detach()  # the live multiplier of this very gradient step
        omega = kl_weight(beta, args.kl_variant, args.fixed_omega) if self.kl_on else beta * 0  # omega = beta

        with torch.no_grad():
            next_act, next_logp = self.actor.sample(next_obs)
            min_q_next = torch.min(self.qr1_t(next_obs, next_act), self.qr2_t(next_obs, next_act))
            logp_g_next = torch.zeros_like(next_logp)
            if self.kl_on and args.kl_variant == "paper":  # log pi_guide(a' | Xi(s')) from the stored guide Gaussian
                logp_g_next = self.guide.log_prob_from(batch["guide_next_mean"], batch["guide_next_std"], next_act)
            y_r = kl_regularised_target(rew, done, args.gamma, min_q_next, next_logp, logp_g_next, alpha, omega,
                                        args.kl_variant, batch["logp_guide"])
            y_c = cost + args.gamma * (1 - done) * self.qc_t(next_obs, next_act)  # cost critic: no entropy term

        # critics, weighted by the importance weights of guide actions (1 for the student's own)
        w = rho**2 if args.is_squared else rho
        qr1_loss = 0.5 * (w * (self.qr1(obs, act) - y_r) ** 2).mean()
        qr2_loss = 0.5 * (w * (self.qr2(obs, act) - y_r) ** 2).mean()
        qc_values = self.qc(obs, act)
        qc_loss = 0.5 * (w * (qc_values - y_c) ** 2).mean()
        self.q_opt.zero_grad()
        (qr1_loss + qr2_loss + qc_loss).backward()
        self.q_opt.step()

        # actor: the Lagrangian of the constrained, KL-regularised objective
        new_act, logp = self.actor.sample(obs)
        min_q = torch.min(self.qr1(obs, new_act), self.qr2(obs, new_act))
        qc_pi = self.qc(obs, new_act)
        damp = self.beta_damp * (self.d_bar - qc_values.detach()).mean()  # authors' proportional term (0: paper)
        kl_sample = torch.zeros_like(logp)
        if self.kl_on and args.kl_variant == "paper":
            # eq. 5: (alpha + omega) log pi - omega log pi_guide = alpha log pi + omega KL(pi || pi_guide) per sample
            kl_sample = logp - self.guide.log_prob_from(batch["guide_mean"], batch["guide_std"], new_act)
            per_sample = alpha * logp + omega * kl_sample - min_q + (beta - damp) * qc_pi
        else:
            per_sample = alpha * logp - min_q + (beta - damp) * qc_pi
        actor_loss = (rho * per_sample).mean()

        # alpha (student only): keep the entropy near the target
        alpha_loss = torch.zeros_like(beta)
        if self.fixed_alpha is None:
            alpha_loss = -F.softplus(self.soft_alpha) * (self.target_entropy + logp.detach().mean())
        # beta: grows while the discounted cost estimate exceeds d_bar (the Lagrangian's dual step)
        beta_loss = torch.zeros_like(beta)
        if args.beta_update != "episodic":
            qc_estimate = qc_pi.detach() if args.beta_update == "paper" else qc_values.detach()  # code: buffer's a
            beta_loss = F.softplus(self.soft_beta) * (self.d_bar - qc_estimate.mean())
        # actor, alpha and beta share no parameter (each sees the others detached): one backward for the three,
        # into their parameters only (the critics' weight gradients would be computed and thrown away)
        for opt in (self.actor_opt, self.alpha_opt, self.beta_opt):
            opt.zero_grad()
        (actor_loss + alpha_loss + beta_loss).backward(inputs=self.actor_side_params)
        self.actor_opt.step()
        if self.fixed_alpha is None:
            self.alpha_opt.step()
        if args.beta_update != "episodic":
            self.beta_opt.step()

        with torch.no_grad():  # Polyak averaging: p_t <- (1 - tau) p_t + tau p
            torch._foreach_lerp_(self.target_params, self.online_params, args.tau)
        # detached tensors: read (and checked for NaNs) once per round, not after every step (no device syncs)
        return {"qr_loss": (qr1_loss + qr2_loss).detach() / 2, "qc_loss": qc_loss.detach(),
                "actor_loss": actor_loss.detach(), "alpha_loss": alpha_loss.detach(), "beta_loss": beta_loss.detach(),
                "qc_values": qc_values.detach().mean(), "qc_pi": qc_pi.detach().mean(), "beta": beta,
                "omega": torch.as_tensor(omega).detach(), "kl": kl_sample.detach().mean(),
                "importance_weight_mean": rho.mean()}

    def update_beta_from_episodes(self, mean_episodic_cost: float) -> None:
        """`--beta-update episodic`: one dual step on the measured cost, loss = beta (d - mean episodic cost).

        OmniSafe's SAC-Lag drives its multiplier from the logged episodic cost in the same way; called when
        training episodes finish (host data, so no device sync).
        """
        measured = torch.as_tensor(mean_episodic_cost, dtype=torch.float32, device=self.soft_beta.device)
        beta_loss = F.softplus(self.soft_beta) * (self.cost_limit - measured)
        self.beta_opt.zero_grad()
        beta_loss.backward()
        self.beta_opt.step()

    def state_dict(self) -> dict:
        """Everything needed to resume: networks, targets, alpha, beta and the optimisers."""
        nets = {name: getattr(self, name).state_dict() for name in ("actor", "qr1", "qr2", "qc", "qr1_t", "qr2_t", "qc_t")}
        opts = {name: getattr(self, name).state_dict() for name in ("actor_opt", "q_opt", "alpha_opt", "beta_opt")}
        return {**nets, **opts, "soft_alpha": self.soft_alpha.detach().cpu(), "soft_beta": self.soft_beta.detach().cpu()}

    def load_state_dict(self, state: dict) -> None:
        for name in ("actor", "qr1", "qr2", "qc", "qr1_t", "qr2_t", "qc_t", "actor_opt", "q_opt", "alpha_opt",
                     "beta_opt"):
            getattr(self, name).load_state_dict(state[name])
        with torch.no_grad():  # in place: the optimisers hold these very tensors
            self.soft_alpha.copy_(state["soft_alpha"])
            self.soft_beta.copy_(state["soft_beta"])


def behaviour_policy(student_actor: Actor, guide: Optional[Actor], xi_index, obs, guide_acts, clip_low, clip_high):
    """The composite behaviour policy for one step of every env (guide_acts: who acts, True = the guide).

    Returns one tensor per env row, [action, rho, log pi_guide(action | Xi(s)), guide mean, guide std], so that a
    step costs one device->host copy: the importance weight of guide actions (1 for the student's own), the guide's
    log-prob of the executed action (the code variant's KL), and the guide's Gaussian at Xi(s) (the paper's KL).
    """
    mean, std = student_actor.dist(obs)
    actions, _ = student_actor.sample_from(mean, std)
    rho, logp_guide = torch.ones_like(obs[:, 0]), torch.zeros_like(obs[:, 0])
    g_mean, g_std = torch.zeros_like(actions), torch.ones_like(actions)
    if guide is not None:
        g_mean, g_std = guide.dist(obs[:, xi_index])
        g_actions, _ = guide.sample_from(g_mean, g_std)
        actions = torch.where(guide_acts[:, None], g_actions, actions)
        logp_guide = guide.log_prob_from(g_mean, g_std, actions)
        rho_guide = importance_weight(student_actor.log_prob_from(mean, std, actions), logp_guide, clip_low, clip_high)
        rho = torch.where(guide_acts, rho_guide, rho)
    return torch.cat([actions, rho[:, None], logp_guide[:, None], g_mean, g_std], 1)


def guide_gaussian(guide: Optional[Actor], xi_index, obs, act_dim: int):
    """The frozen guide's (mean, std) at Xi(s), stored with a transition so updates need no guide forward pass."""
    if guide is None:
        return torch.cat([torch.zeros(len(obs), act_dim), torch.ones(len(obs), act_dim)], 1).to(obs.device)
    return torch.cat(guide.dist(obs[:, xi_index]), 1)


def maybe_compile(fn, enabled: bool):
    """LeanRL's way: the eager function is the algorithm; torch.compile only wraps it.

    Dynamo splits the update at each `.backward()` and optimiser step: the forward passes and losses become
    compiled graphs (with compiled backward graphs), the optimiser steps are compiled separately.
    (torch._dynamo.config.trace_autograd_ops, which would trace `.backward()` into the graph, left the critics'
    gradients empty in torch 2.13: the test against the eager update caught it.)
    """
    return torch.compile(fn) if enabled else fn


def real_next_obs(next_obs, truncated, terminated, info):
    """The observation that followed the action, also for sub-envs that were just auto-reset."""
    real = next_obs.copy()
    for i in np.flatnonzero(np.logical_or(terminated, truncated)):
        real[i] = info["final_observation"][i]
    return real


@torch.no_grad()
def evaluate(actor: Actor, env_fn, episodes: int, seed: int, device, obs_index=None,
             deterministic: bool = False, video: Optional[str] = None, frame_stride: int = 1):
    """One policy alone in the target task: a list of (return, cost) per episode.

    The student sees the whole observation; the guide (`obs_index` = Xi's indices) sees Xi(s). With `video` (an mp4
    path; `env_fn` must render rgb_array frames) the first episode is recorded, every `frame_stride`-th step.
    """
    env, results = env_fn(), []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        record = video is not None and ep == 0
        frames = [env.render()] if record else []
        done, t = False, 0
        while not done:
            obs = obs if obs_index is None else obs[obs_index]
            action, _ = actor.sample(torch.as_tensor(obs, dtype=torch.float32, device=device)[None], deterministic)
            obs, _, terminated, truncated, info = env.step(action[0].cpu().numpy())
            done, t = terminated or truncated, t + 1
            if record and (t % frame_stride == 0 or done):
                frames.append(env.render())
        if record:
            save_video(frames, video, fps=max(1, 30 // frame_stride))
        results.append((info["episode"]["r"], info["episode"]["c"]))
    env.close()
    return results


GUIDE_FILE_KEYS = ("actor", "hidden_size", "kept_keys", "act_dim", "env_id")


def load_guide(path: str, env_id: str, kept_keys: list[str], xi_dim: int, act_dim: int, action_space, device) -> Actor:
    """The guide saved by a guide phase (runs/<run>/guide.pt); any other file or another task ends in a clear error."""
    what = f"error: --guide-path {path!r}"
    try:
        saved = torch.load(path, map_location=device)
    except Exception as e:  # not a torch file, or one that holds more than tensors and plain values
        raise SystemExit(f"{what} is not a guide saved by sagui.py (runs/<run>/guide.pt): cannot read it "
                         f"({e})") from None
    if not isinstance(saved, dict) or any(k not in saved for k in GUIDE_FILE_KEYS):
        have = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise SystemExit(f"{what} is not a guide saved by sagui.py (runs/<run>/guide.pt): it holds {have}, a guide "
                         f"holds {list(GUIDE_FILE_KEYS)}") from None
    if saved["kept_keys"] != kept_keys or saved["act_dim"] != act_dim:
        raise SystemExit(f"{what} was trained on {saved['env_id']!r} with observation keys {saved['kept_keys']} and "
                         f"{saved['act_dim']} actions; {env_id!r} gives {kept_keys} and {act_dim}.")
    guide = Actor(xi_dim, act_dim, saved["hidden_size"], action_space.low, action_space.high).to(device)
    try:
        guide.load_state_dict(saved["actor"])
    except RuntimeError as e:  # same keys, other sizes (e.g. a lidar with another number of bins)
        raise SystemExit(f"{what}: its network does not fit {env_id!r}'s observation ({xi_dim} values after Xi): "
                         f"{str(e).splitlines()[0]}") from None
    return guide


def check_args(args: Args) -> None:
    check_positive(args, "total_timesteps", "video_frame_stride", "guide_cost_limit", "max_episode_steps",
                   "hidden_size", "batch_size", "buffer_size", "lr", "beta_lr", "tau", "update_every", "eval_every",
                   "eval_episodes", "log_every", "is_clip_low", "is_clip_high", "num_envs")
    if args.cost_limit is not None:
        check_positive(args, "cost_limit")
    if args.use_guide and args.guide_path is None:
        check_positive(args, "guide_total_timesteps", "guide_alpha")
    check_choice(args, "sampling", ["control-switch", "linear-decay", "student"])
    check_choice(args, "ld_mode", ["step", "trajectory", "mixed"])
    check_choice(args, "kl_variant", ["paper", "code"])
    check_choice(args, "beta_update", ["paper", "code", "episodic"])
    check_choice(args, "compile", ["auto", "on", "off"])
    if args.update_every % args.num_envs:
        raise SystemExit(f"error: --update-every ({args.update_every}) must be a multiple of --num-envs "
                         f"({args.num_envs}), so that every update round follows the same number of env steps")
    if args.use_guide and args.sampling == "control-switch" and args.buffer_size < 2:
        # split in half between the student and guide buffers: 1 would leave them empty, after the guide phase
        raise SystemExit(f"error: --buffer-size must be at least 2 with --sampling control-switch (two buffers of "
                         f"half the size), got {args.buffer_size}")
    if not 0 < args.gamma < 1:
        raise SystemExit(f"error: --gamma must be in (0, 1), got {args.gamma}")
    if not 0 <= args.guide_batch_fraction < 1:
        raise SystemExit(f"error: --guide-batch-fraction must be in [0, 1), got {args.guide_batch_fraction}")
    if args.is_clip_low > args.is_clip_high:
        raise SystemExit(f"error: --is-clip-low ({args.is_clip_low}) must not exceed "
                         f"--is-clip-high ({args.is_clip_high})")
    if args.fixed_omega is not None and args.fixed_omega < 0:
        raise SystemExit(f"error: --fixed-omega must be >= 0, got {args.fixed_omega}")
    if args.beta_damp < 0 or args.guide_beta_damp < 0:
        raise SystemExit("error: --beta-damp and --guide-beta-damp must be >= 0")
    if args.random_steps < 0 or args.learning_starts < 0:
        raise SystemExit("error: --random-steps and --learning-starts must be >= 0")
    if args.checkpoint_every < 0:
        raise SystemExit(f"error: --checkpoint-every must be 0 (only at the end of each stage) or positive, got "
                         f"{args.checkpoint_every}")
    if args.guide_path is not None and not args.resume and not os.path.isfile(args.guide_path):
        # (a resumed run takes its guide from the checkpoint)
        raise SystemExit(f"error: --guide-path {args.guide_path!r} is not a file (expected runs/<run>/guide.pt)")
    if args.guide_path is not None and not args.use_guide:
        raise SystemExit("error: --guide-path and --no-use-guide contradict each other")
    if args.guide_only and (args.guide_path is not None or not args.use_guide):
        raise SystemExit("error: --guide-only trains a guide: it goes with neither --guide-path nor --no-use-guide")
    try:
        registered, vision = normalize_env_id(args.env_id)
    except ValueError as e:
        raise SystemExit(f"error: --env-id: {e}")
    if vision:
        raise SystemExit(f"error: --env-id {args.env_id!r}: SaGui works on state observations; drop 'Vision'")
    if args.use_guide and "Button" in registered:
        # the button cost depends on which button is the goal, which Xi hides: Assumption 3 does not hold
        raise SystemExit(f"error: --env-id {args.env_id!r}: in Button tasks pressing a wrong button costs, so the cost "
                         "depends on the goal that the abstraction Xi hides; the paper's Assumption 3 (a Qc-irrelevant "
                         "abstraction) fails and the guide cannot learn to be safe. Use a Goal or Push task "
                         "(or --no-use-guide for the SAC-Lag baseline).")
    if args.use_guide and registered.split("-")[0].endswith("Source"):
        raise SystemExit(f"error: --env-id {args.env_id!r} is a guide's source task (no goal); give its target task")


# --------------------------------------------------------------------------------------------------
# Checkpoints: what a stage needs to continue (common/checkpoint.py writes them atomically, with args and RNG states)
# --------------------------------------------------------------------------------------------------


def checkpoint_state(stage: str, agent: SACLagrangian, buffers: dict, logger: Logger, args: Args, **extra) -> dict:
    """A checkpoint of `stage` ("guide" or "student"): that stage's SAC-Lagrangian (networks, targets, alpha, beta,
    optimisers), its replay buffers (unless --no-checkpoint-buffer), its logger's counters, and `extra` (episode
    counters, generators, the frozen guide in the student stage). `Checkpointer.save` adds the step, args and RNGs."""
    kept = {k: b.state_dict() for k, b in buffers.items() if b is not None} if args.checkpoint_buffer else None
    return {"stage": stage, "agent": agent.state_dict(), "buffers": kept, "logger": logger.state_dict(), **extra}


def load_checkpoint_state(state: dict, agent: SACLagrangian, buffers: dict, logger: Logger) -> bool:
    """Load a stage's checkpoint into freshly built objects; returns whether the replay buffers were in it."""
    agent.load_state_dict(state["agent"])
    logger.load_state_dict(state["logger"])
    if state["buffers"] is None:
        return False
    for k, buffer in buffers.items():
        if buffer is not None:
            buffer.load_state_dict(state["buffers"][k])
    return True


def new_episode_stats() -> dict:
    """Training episodes of a stage, for summary.json: how many, their summed cost, how many went over the limit."""
    return {"episodes": 0, "cost_sum": 0.0, "violating": 0}


if __name__ == "__main__":
    args = tyro.cli(Args)
    args, resumed = resume_run(args, "sagui")  # --resume runs/<run>: that run's flags and its checkpoint
    check_args(args)
    if args.cost_limit is None:  # the paper's d for its layouts, 25 (SafetyPointGoal1, the Dynamic) otherwise
        args.cost_limit = paper_cost_limit(normalize_env_id(args.env_id)[0]) or 25.0
    state = resumed["state"] if resumed else None
    if resumed:
        run_root, run_name = os.path.split(resumed["run_dir"])
    else:
        run_root, run_name = "runs", f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    # the stage to (re)start in: a run killed in the student stage does not train its guide again
    stage = state["stage"] if resumed else ("guide" if args.use_guide and args.guide_path is None else "student")
    run_start = time.time() - (state["wall_time"] if resumed else 0.0)  # summary.json's wall time spans all resumes
    logger = Logger(run_name, args, root=run_root,
                    resume_step=None if not resumed else (state["stage_step"] if stage == "student" else 0))
    seed_everything(args.seed, args.torch_deterministic)
    device = get_device(args.cuda)
    use_compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    n = args.num_envs

    # target task (student) and the abstraction Xi that gives the guide's view of it
    envs = SafeVectorEnv(gym.vector.SyncVectorEnv([make_target_env(args.env_id, args.seed + i) for i in range(n)]))
    try:
        xi_index, kept_keys = abstraction_index(envs.unwrapped.envs[0].unwrapped.obs_space_dict)
    except ValueError as e:
        if args.use_guide:
            raise SystemExit(f"error: --env-id {args.env_id!r}: {e}")
        xi_index, kept_keys = None, None  # the SAC-Lag baseline needs no abstraction
    obs_dim = envs.single_observation_space.shape[0]
    act_dim = envs.single_action_space.shape[0]
    action_space = envs.single_action_space
    xi_index_t = torch.as_tensor(xi_index, device=device) if xi_index is not None else None
    identity = {"script": "sagui", "env_id": normalize_env_id(args.env_id)[0], "obs_dim": obs_dim, "act_dim": act_dim,
                "hidden_size": args.hidden_size, "use_guide": args.use_guide, "sampling": args.sampling,
                "buffer_size": args.buffer_size}  # what fixes the shapes of the networks and buffers
    if resumed:
        check_identity(resumed["identity"], identity, resumed["path"])
    # one checkpoint every --checkpoint-every env steps of the run, both stages counted: the student's step s is the
    # run's step guide_steps + s (guide_steps: the guide stage's budget when this run trains its guide, else 0)
    guide_steps = args.guide_total_timesteps if args.use_guide and args.guide_path is None else 0
    checkpointer = Checkpointer(os.path.join(run_root, run_name), args.checkpoint_every, identity,
                                start_step=state["step"] if resumed else 0)

    # ============================================================================================
    # Phase 1: the guide, reward-free with eq. 4, in the source task
    # ============================================================================================
    if not args.use_guide:
        plan = [f"SAC-Lagrangian from scratch: {args.total_timesteps} steps in {args.env_id} (--total-timesteps)"]
    else:
        plan = [f"guide: loaded from {args.guide_path}" if args.guide_path is not None else
                f"guide: {args.guide_total_timesteps} steps, reward-free, in the source task (--guide-total-timesteps;"
                f" --guide-path reuses a saved guide)"]
        if not args.guide_only:
            plan.append(f"student: {args.total_timesteps} steps in {args.env_id} with {args.sampling} sampling "
                        f"(--total-timesteps)")
    print("plan: " + "; then ".join(plan), flush=True)  # each phase's budget, before any of them runs
    if resumed:
        print(f"resuming {resumed['run_dir']} at step {state['stage_step']} (stage {stage}"
              f"{'' if stage == 'student' or not args.use_guide else ', the student follows'}; environments reset, "
              "the episodes in progress are lost)", flush=True)
    guide, guide_summary = None, {}
    if args.use_guide and stage == "student" and resumed:  # the guide of the finished guide stage (or --guide-path)
        guide = Actor(len(xi_index), act_dim, state["guide"]["hidden_size"], action_space.low,
                      action_space.high).to(device)
        guide.load_state_dict(state["guide"]["actor"])
        guide_summary = state["guide_summary"]
    elif args.use_guide and args.guide_path is not None:
        guide = load_guide(args.guide_path, args.env_id, kept_keys, len(xi_index), act_dim, action_space, device)
        print(f"loaded the guide from {args.guide_path}", flush=True)
    elif args.use_guide:
        g_start = state["stage_step"] if resumed else 0
        glog = Logger("guide", args, root=logger.run_dir, total_steps=args.guide_total_timesteps,
                      resume_step=g_start if resumed else None)  # runs/<run>/guide/
        scale = args.displacement_scale if args.displacement_reward else 0.0
        genvs = SafeVectorEnv(gym.vector.SyncVectorEnv([make_source_env(args.env_id, args.seed + i, scale)
                                                         for i in range(n)]))
        genvs.single_action_space.seed(args.seed)
        g_obs_dim = genvs.single_observation_space.shape[0]
        if g_obs_dim != len(xi_index):
            raise SystemExit(f"error: the source task observes {g_obs_dim} values, Xi(target) keeps {len(xi_index)}")
        g_agent = SACLagrangian(g_obs_dim, act_dim, args, action_space, args.guide_cost_limit, device,
                                fixed_alpha=args.guide_alpha, beta_damp=args.guide_beta_damp)
        g_update = maybe_compile(g_agent.update, use_compile)
        g_act = maybe_compile(g_agent.actor.sample, use_compile)
        g_rb = DeviceReplay(args.buffer_size, replay_fields(g_obs_dim, act_dim), device)
        out, recent_costs, g_stats, g_learning_starts = {}, [], new_episode_stats(), args.learning_starts
        if resumed:  # the guide stage from its last checkpoint; the source envs start new episodes
            if not load_checkpoint_state(state, g_agent, {"rb": g_rb}, glog):
                g_learning_starts = g_start + max(args.learning_starts, args.batch_size)  # refill the replay first
            recent_costs, g_stats = state["recent_costs"], state["episode_stats"]
            genvs.single_action_space.np_random.bit_generator.state = state["action_space_rng"]
        obs, _ = genvs.reset(seed=args.seed + g_start)
        if resumed:
            set_rng_state(state["rng"])  # after everything is built and loaded
        for global_step in range(g_start + n, args.guide_total_timesteps + 1, n):
            if global_step <= args.random_steps:
                actions = np.stack([genvs.single_action_space.sample() for _ in range(n)])
            else:
                with torch.no_grad():
                    actions = g_act(torch.as_tensor(obs, dtype=torch.float32, device=device))[0].cpu().numpy()
            next_obs, rewards, costs, terminations, truncations, infos = genvs.step(actions)
            glog.log_costs(global_step, costs)
            for _, ep in finished_episodes(infos):
                glog.log_episode(global_step, ep["r"], ep["c"], ep["l"])
                recent_costs.append(ep["c"])
                g_stats["episodes"] += 1
                g_stats["cost_sum"] += float(ep["c"])
                g_stats["violating"] += int(ep["c"] > args.guide_cost_limit)
            ones = np.ones(n, np.float32)
            zeros = np.zeros((n, act_dim), np.float32)
            g_rb.add(obs=obs, action=actions, next_obs=real_next_obs(next_obs, truncations, terminations, infos),
                     reward=rewards, cost=costs, done=terminations, rho=ones, logp_guide=0 * ones,  # time limit masked
                     guide_mean=zeros, guide_std=zeros, guide_next_mean=zeros, guide_next_std=zeros)  # no guide here
            obs = next_obs

            if args.beta_update == "episodic" and recent_costs and global_step % args.update_every == 0:
                g_agent.update_beta_from_episodes(float(np.mean(recent_costs)))
                recent_costs = []
            if global_step >= g_learning_starts and global_step % args.update_every == 0:
                for _ in range(args.update_every):
                    out = g_update(g_rb.sample(args.batch_size))  # no guide to imitate: plain SAC-Lagrangian
                check_finite("guide losses", *out.values())
            if global_step % args.log_every == 0:
                for k in ("qr_loss", "qc_loss", "actor_loss", "beta_loss", "qc_values"):
                    if k in out:
                        glog.scalar(f"losses/{k}", out[k], global_step)
                if out:
                    glog.scalar("charts/cost_critic_estimate", out["qc_pi"], global_step)
                glog.scalar("charts/cost_target_d_bar", g_agent.d_bar, global_step)
                glog.scalar("charts/lagrange_multiplier", g_agent.beta, global_step)
                glog.scalar("charts/alpha", g_agent.alpha, global_step)
                glog.console(global_step, f"beta={g_agent.beta:.3f} [guide]")
            # (the end of a guide stage that a student follows is saved as the student stage's first checkpoint)
            g_last = global_step + n > args.guide_total_timesteps
            if (checkpointer.due(global_step) and not g_last) or (g_last and args.guide_only):
                checkpointer.save(global_step, checkpoint_state(
                    "guide", g_agent, {"rb": g_rb}, glog, args, stage_step=global_step, recent_costs=recent_costs,
                    episode_stats=g_stats,
                    action_space_rng=genvs.single_action_space.np_random.bit_generator.state,
                    wall_time=time.time() - run_start), args)
        genvs.close()
        guide = g_agent.actor
        del g_rb  # free the guide's replay memory before the student's
        guide_file = os.path.join(logger.run_dir, "guide.pt")
        torch.save({"actor": guide.state_dict(), "hidden_size": args.hidden_size, "kept_keys": kept_keys,
                    "act_dim": act_dim, "env_id": args.env_id, "steps": args.guide_total_timesteps,
                    "guide_agent": g_agent.state_dict(), "args": vars(args)}, guide_file)
        # the guide alone in the target task: the safety it brings before the student has learnt anything;
        # deterministic as the authors' guide test, stochastic as it acts for the student
        guide_summary = {"guide_steps": args.guide_total_timesteps, "guide_train_episodes": g_stats["episodes"],
                         "guide_train_violating_episodes": g_stats["violating"],
                         "guide_train_cost": g_stats["cost_sum"] / g_stats["episodes"] if g_stats["episodes"] else None,
                         "guide_cost_rate": glog.cost_rate, "guide_cost_limit": args.guide_cost_limit}
        for mode, deterministic in (("deterministic", True), ("stochastic", False)):
            results = evaluate(guide, make_target_env(args.env_id, args.seed + 10_000), args.eval_episodes,
                               args.seed + 10_000, device, obs_index=xi_index, deterministic=deterministic)
            for ret, cost in results:
                glog.log_episode(args.guide_total_timesteps, ret, cost, 0, prefix=f"eval_{mode}")
            costs_ = [c for _, c in results]
            guide_summary[f"guide_eval_{mode}_return"] = float(np.mean([r for r, _ in results]))
            guide_summary[f"guide_eval_{mode}_cost"] = float(np.mean(costs_))
            print(f"guide alone in the target task ({mode}): return={np.mean([r for r, _ in results]):.2f} "
                  f"cost={np.mean(costs_):.2f} episodes over d={args.cost_limit:g}: "
                  f"{sum(c > args.cost_limit for c in costs_)}/{len(costs_)}", flush=True)
        glog.close()
        print(f"guide saved to {guide_file}", flush=True)
        if args.guide_only:  # summary.json of the guide stage: its training in the source task, its evaluation alone
            write_summary(logger.run_dir, args, script="sagui", start_time=run_start, env_id=args.env_id,
                          total_steps=args.guide_total_timesteps,
                          eval_return=guide_summary["guide_eval_deterministic_return"],
                          eval_cost=guide_summary["guide_eval_deterministic_cost"],
                          train_cost=guide_summary["guide_train_cost"], train_episodes=g_stats["episodes"],
                          train_violating_episodes=g_stats["violating"], cost_limit=args.guide_cost_limit,
                          cost_rate=glog.cost_rate, sps=glog.sps(args.guide_total_timesteps), stage="guide-only",
                          **guide_summary)
            envs.close()
            logger.close()
            raise SystemExit(0)
    if guide is not None:
        guide.requires_grad_(False)

    # ============================================================================================
    # Phase 2: the student in the target task, under the guide
    # ============================================================================================
    sampling = args.sampling if guide is not None else "student"
    student = SACLagrangian(obs_dim, act_dim, args, action_space, args.cost_limit, device, beta_damp=args.beta_damp,
                            guide=guide)
    update = maybe_compile(student.update, use_compile)
    two_buffers = sampling == "control-switch"
    capacity = args.buffer_size // 2 if two_buffers else args.buffer_size
    rb = DeviceReplay(capacity, replay_fields(obs_dim, act_dim), device)
    rb_guide = DeviceReplay(capacity, replay_fields(obs_dim, act_dim), device) if two_buffers else None
    n_guide_batch = int(round(args.guide_batch_fraction * args.batch_size))
    eval_env = make_target_env(args.env_id, args.seed + 10_000, render=args.capture_video)

    act = maybe_compile(behaviour_policy, use_compile)
    next_guide_gaussian = maybe_compile(guide_gaussian, use_compile)
    rng = np.random.default_rng(args.seed)
    guide_acts = np.zeros(n, dtype=bool)  # who acts at the next step, per env (True = guide)
    ld_stepwise, ld_draw = np.ones(n, dtype=bool), np.zeros(n)  # linear-decay "mixed": per-episode mode, draw
    if sampling == "linear-decay":
        guide_acts[:] = True  # P(guide) = 1 at the start
    random_steps = args.random_steps if guide is None else 0  # SaGui students never act at random (authors' code)
    steps_by_guide, window_steps, out, recent_costs, stats = 0, 0, {}, [], new_episode_stats()
    learning_starts, start_step = args.learning_starts, 0
    episode_costs = [[] for _ in range(n)]
    guide_state = None if guide is None else {"actor": guide.state_dict(), "hidden_size": guide.mean.in_features}
    if resumed and stage == "student":  # the student stage from its last checkpoint
        start_step = state["stage_step"]
        if not load_checkpoint_state(state, student, {"rb": rb, "rb_guide": rb_guide}, logger):
            learning_starts = start_step + max(args.learning_starts, args.batch_size)  # refill the replay first
        recent_costs, stats = state["recent_costs"], state["episode_stats"]
        rng.bit_generator.state = state["linear_decay_rng"]
        if sampling == "linear-decay":  # the new episodes draw who acts, as any episode does when it starts
            p_guide = linear_decay(start_step, args.total_timesteps)
            ld_stepwise, ld_draw, guide_acts = rng.random(n) < p_guide, rng.random(n), rng.random(n) < p_guide
            if args.ld_mode == "mixed":
                guide_acts = np.where(ld_stepwise, guide_acts, ld_draw < p_guide)
    elif guide is not None and stage == "guide":  # the guide stage is over: a run killed from now on keeps it
        checkpointer.save(guide_steps, checkpoint_state(
            "student", student, {"rb": rb, "rb_guide": rb_guide}, logger, args, stage_step=0, guide=guide_state,
            guide_summary=guide_summary, recent_costs=recent_costs, episode_stats=stats,
            linear_decay_rng=rng.bit_generator.state,
            action_space_rng=envs.single_action_space.np_random.bit_generator.state, wall_time=time.time() - run_start),
            args)
    if start_step >= args.total_timesteps:
        raise SystemExit(f"{logger.run_dir} is already at step {start_step} of --total-timesteps "
                         f"{args.total_timesteps}; resume with a larger --total-timesteps to continue it")
    obs, _ = envs.reset(seed=args.seed + start_step)  # a resumed run starts new episodes
    if resumed and stage == "student":
        envs.single_action_space.np_random.bit_generator.state = state["action_space_rng"]
        set_rng_state(state["rng"])  # after everything is built and loaded
    else:
        envs.single_action_space.seed(args.seed)
    logger.restart_clock(start_step, args.total_timesteps)  # SPS and ETA of the student phase only
    start_time = logger.start_time
    for global_step in range(start_step + n, args.total_timesteps + 1, n):
        with torch.no_grad():
            packed = act(student.actor, guide, xi_index_t, torch.as_tensor(obs, dtype=torch.float32, device=device),
                         torch.as_tensor(guide_acts, device=device), args.is_clip_low, args.is_clip_high).cpu().numpy()
        actions_np, rho_np, logp_guide_np = packed[:, :act_dim], packed[:, act_dim], packed[:, act_dim + 1]
        g_mean_np, g_std_np = packed[:, act_dim + 2: 2 * act_dim + 2], packed[:, 2 * act_dim + 2:]
        if global_step <= random_steps:  # the SAC-Lag baseline's uniform random start (no guide)
            actions_np = np.stack([envs.single_action_space.sample() for _ in range(n)]).astype(np.float32)
        next_obs, rewards, costs, terminations, truncations, infos = envs.step(actions_np)
        logger.log_costs(global_step, costs)  # the behaviour policy's cost (paper Fig. 6)
        for i in range(n):
            episode_costs[i].append(costs[i])
        for i, ep in finished_episodes(infos):
            logger.log_episode(global_step, ep["r"], ep["c"], ep["l"])
            logger.scalar("charts/discounted_cost_to_go", discounted_cost_to_go(np.array(episode_costs[i]),
                                                                                 args.gamma), global_step)
            recent_costs.append(ep["c"])
            stats["episodes"] += 1
            stats["cost_sum"] += float(ep["c"])
            stats["violating"] += int(ep["c"] > args.cost_limit)
        steps_by_guide += int(guide_acts.sum())
        window_steps += n

        final_obs = real_next_obs(next_obs, truncations, terminations, infos)
        with torch.no_grad():
            g_next = next_guide_gaussian(guide, xi_index_t, torch.as_tensor(final_obs, dtype=torch.float32,
                                                                             device=device), act_dim).cpu().numpy()
        row = dict(obs=obs, action=actions_np, next_obs=final_obs, reward=rewards, cost=costs, done=terminations,
                   rho=rho_np, logp_guide=logp_guide_np, guide_mean=g_mean_np, guide_std=g_std_np,
                   guide_next_mean=g_next[:, :act_dim], guide_next_std=g_next[:, act_dim:])
        if two_buffers:  # separate student and guide buffers
            for buffer, mask in ((rb, ~guide_acts), (rb_guide, guide_acts)):
                if mask.any():
                    buffer.add(**{k: np.asarray(v)[mask] for k, v in row.items()})
        else:
            rb.add(**row)
        obs = next_obs

        # who acts next
        episode_over = np.logical_or(terminations, truncations)
        for i in np.flatnonzero(episode_over):
            episode_costs[i] = []
        if sampling == "control-switch":
            guide_acts = control_switch(guide_acts, costs, episode_over)
        elif sampling == "linear-decay":
            p_guide = linear_decay(global_step, args.total_timesteps)
            if args.ld_mode == "step":  # a draw at every step
                guide_acts = rng.random(n) < p_guide
            elif args.ld_mode == "trajectory":  # one draw per episode, kept until it ends
                guide_acts = np.where(episode_over, rng.random(n) < p_guide, guide_acts)
            else:  # "mixed", the authors' code: a new episode is step-wise with probability P(guide), else it
                # draws one threshold u and the guide acts while P(guide) > u
                ld_stepwise = np.where(episode_over, rng.random(n) < p_guide, ld_stepwise)
                ld_draw = np.where(episode_over, rng.random(n), ld_draw)
                guide_acts = np.where(ld_stepwise, rng.random(n) < p_guide, ld_draw < p_guide)

        if args.beta_update == "episodic" and recent_costs and global_step % args.update_every == 0:
            student.update_beta_from_episodes(float(np.mean(recent_costs)))
            recent_costs = []
        # updates: 75/25 student/guide minibatches for control-switch
        guide_share = two_buffers and n_guide_batch > 0 and len(rb_guide) >= args.batch_size
        can_update = not (two_buffers and args.cs_wait_for_both_buffers and not
                          (guide_share and len(rb) >= args.batch_size))
        if global_step >= learning_starts and global_step % args.update_every == 0 and can_update:
            for _ in range(args.update_every):
                if guide_share:
                    b_s, b_g = rb.sample(args.batch_size - n_guide_batch), rb_guide.sample(n_guide_batch)
                    batch = {k: torch.cat([b_s[k], b_g[k]]) for k in b_s}
                else:
                    batch = (rb if len(rb) > 0 else rb_guide).sample(args.batch_size)
                out = update(batch)
            check_finite("student losses", *out.values())

        if global_step % args.log_every == 0:
            for k in ("qr_loss", "qc_loss", "actor_loss", "alpha_loss", "beta_loss", "qc_values"):
                if k in out:
                    logger.scalar(f"losses/{k}", out[k], global_step)
            beta_now = student.beta
            logger.scalar("charts/lagrange_multiplier", beta_now, global_step)
            logger.scalar("charts/alpha", student.alpha, global_step)
            logger.scalar("charts/cost_target_d_bar", student.d_bar, global_step)
            if out:  # what beta's update compared with d_bar at the last gradient step
                logger.scalar("charts/cost_critic_estimate", out["qc_pi"], global_step)
            omega_now = float(out["omega"]) if out else 0.0
            if guide is not None:
                logger.scalar("charts/omega", omega_now, global_step)  # the omega applied at the last gradient step
                logger.scalar("charts/guide_acted_fraction", steps_by_guide / max(window_steps, 1), global_step)
                if sampling == "linear-decay":
                    logger.scalar("charts/guide_probability", linear_decay(global_step, args.total_timesteps),
                                  global_step)
                if out:
                    logger.scalar("charts/importance_weight_mean", out["importance_weight_mean"], global_step)
                    logger.scalar("charts/kl_to_guide", out["kl"], global_step)
                if two_buffers and out:
                    with torch.no_grad():  # the cost critic on each buffer's states: where is beta's signal?
                        for name, buffer in (("student", rb), ("guide", rb_guide)):
                            if len(buffer):
                                b = buffer.sample(args.batch_size)
                                qc_est = student.qc(b["obs"], student.actor.sample(b["obs"])[0]).mean()
                                logger.scalar(f"charts/cost_critic_estimate_{name}_buffer", qc_est, global_step)
            steps_by_guide, window_steps = 0, 0
            logger.console(global_step, f"beta={beta_now:.3f} omega={omega_now:.3f} alpha={student.alpha:.3f}")

        last_step = global_step + n > args.total_timesteps
        if global_step % args.eval_every == 0 or last_step:
            video = video_path(logger.run_dir, f"eval-{global_step}", 0) if args.capture_video else None
            results = evaluate(student.actor, eval_env, args.eval_episodes, args.seed + 10_000, device, video=video,
                               frame_stride=args.video_frame_stride)
            for ret, cost in results:  # the student's own cost (paper Fig. 8)
                logger.log_episode(global_step, ret, cost, 0, prefix="eval")
            print(f"eval global_step={global_step} student return={np.mean([r for r, _ in results]):.2f} "
                  f"cost={np.mean([c for _, c in results]):.2f}" + (f" (video {video})" if video else ""), flush=True)
        if checkpointer.due(guide_steps + global_step) or last_step:  # and at the end, after the final evaluation
            checkpointer.save(guide_steps + global_step, checkpoint_state(
                "student", student, {"rb": rb, "rb_guide": rb_guide}, logger, args, stage_step=global_step,
                guide=guide_state,
                guide_summary=guide_summary, recent_costs=recent_costs, episode_stats=stats,
                linear_decay_rng=rng.bit_generator.state,
                action_space_rng=envs.single_action_space.np_random.bit_generator.state,
                wall_time=time.time() - run_start), args)

    if args.save_model:
        torch.save({**student.state_dict(), "args": vars(args)}, os.path.join(logger.run_dir, "student.pt"))
    print(f"done in {time.time() - start_time:.0f}s; run directory {logger.run_dir}", flush=True)
    # summary.json: the student in the target task (the guide stage's numbers as guide_* extras)
    write_summary(logger.run_dir, args, script="sagui", start_time=run_start, env_id=args.env_id,
                  total_steps=global_step, eval_return=float(np.mean([r for r, _ in results])),
                  eval_cost=float(np.mean([c for _, c in results])),
                  eval_returns=[float(r) for r, _ in results], eval_costs=[float(c) for _, c in results],
                  train_cost=stats["cost_sum"] / stats["episodes"] if stats["episodes"] else None,
                  train_episodes=stats["episodes"], train_violating_episodes=stats["violating"],
                  cost_limit=args.cost_limit, cost_rate=logger.cost_rate, sps=logger.sps(global_step),
                  stage="student", **guide_summary)
    envs.close()
    logger.close()
