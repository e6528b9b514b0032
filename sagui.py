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
- guide: reward-free constrained RL + eq. 4         -> `SACLagrangian.update()` with omega = 0, alpha fixed
- eq. 5, KL-regularised student objective           -> `kl_regularised_target()` (critic),
                                                       `SACLagrangian.update()` (actor)
- omega = beta                                      -> `kl_weight()`
- composite sampling, control-switch / linear-decay -> `control_switch()`, `linear_decay()`, the student loop
- importance sampling for guide actions             -> `importance_weight()`
- the algorithm (guide, then student)               -> the two loops under `if __name__ == "__main__":`

Deviations (see docs/sagui.md for the full list and the reasons)
- Source task: Safety-Gymnasium cannot remove the goal from a Goal task, so the source task is the target task
  with `goal_lidar` dropped from the observation and the task reward replaced by eq. 4 (the hidden goal still
  exists and is resampled when touched; it gives no reward and no cost). The authors' source env has no goal.
- Boundary: as in the authors' guide code, leaving the placement extents ends the guide's episode with r = 0.
  The student's target task has no boundary (as in the authors' student code).
- The KL term follows the paper by default (omega = beta, log pi_guide of the next action and an extra
  omega-weighted entropy in the soft value, and the KL in the actor loss); `--kl-variant code` gives the
  authors' code: omega = 0.1 beta + 0.01, log pi_guide of the *executed* action added to the reward, no KL in
  the actor loss; the code's other choices are separate flags (`--beta-damp 10`, `--is-squared`).
- Importance weights are computed when the transition is collected (as in the authors' code), with the
  student of that moment, and multiply the critic and actor losses (`--is-squared` squares them in the
  critic loss as the code does).
- Update order: critics, actor, alpha, beta, then Polyak (the code updates the actor first); beta's loss uses
  Qc(s, a ~ pi) (the Lagrangian of the paper), the code uses Qc at the buffer's action.
- Evaluation: 10 episodes of the student alone (stochastic actions, as the code) every `--eval-every` steps
  (the code runs 100 episodes per 30k-step epoch).
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
    ReplayBuffer,
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
from common.envs import EpisodeStatistics


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
    """not supported by this script (kept for CleanRL's common block); setting it is an error"""
    save_model: bool = False
    """save the student to runs/<run>/student.pt (the guide is always saved to runs/<run>/guide.pt)"""

    # Algorithm specific arguments
    env_id: str = "SafetyPointGoal1"
    """target task: a Safety-Gymnasium Goal/Button/Push id (state observations with a goal part)"""
    total_timesteps: int = 4_500_000
    """student (target task) environment steps (paper, Dynamic: 4.5M)"""
    guide_total_timesteps: int = 9_000_000
    """guide (source task) environment steps (authors' code default; not in the paper)"""
    guide_path: Optional[str] = None
    """reuse a saved guide (runs/<run>/guide.pt) and skip the guide phase"""
    use_guide: bool = True
    """False (--no-use-guide): the SAC-Lagrangian baseline from scratch: no guide phase, no KL, student acts"""
    sampling: str = "control-switch"
    """composite sampling of the behaviour policy: control-switch, linear-decay or student"""
    ld_mode: str = "step"
    """linear-decay only: draw guide-or-student each step ("step") or once per episode ("trajectory")"""
    kl_variant: str = "paper"
    """KL regularisation toward the guide: "paper" (eq. 5, omega = beta) or "code" (omega = 0.1 beta + 0.01)"""
    fixed_omega: Optional[float] = None
    """ablation: a constant KL weight omega instead of the adaptive one (0 disables the KL term)"""
    displacement_reward: bool = True
    """guide: add the displacement reward of eq. 4; False (--no-displacement-reward) is the MaxEnt ablation"""
    displacement_scale: float = 1.0
    """guide: weight of the displacement reward (authors' code: 1.0)"""
    cost_limit: float = 25.0
    """student: cost limit d per 1000-step episode (paper, Dynamic: 25)"""
    guide_cost_limit: float = 20.0
    """guide: cost limit per episode in the source task (authors' code: 20)"""
    guide_alpha: float = 1.0
    """guide: fixed entropy weight (authors' code: 1.0)"""
    max_episode_steps: int = 1000
    """episode length T used to turn d into the per-step target d_bar (Safety-Gymnasium's horizon)"""
    hidden_size: int = 256
    """width of the two hidden layers of every network (paper, Dynamic: 256)"""
    batch_size: int = 256
    """minibatch size (paper, Dynamic: 256)"""
    buffer_size: int = 1_000_000
    """replay capacity (for control-switch: split in half between student and guide buffers, as the code)"""
    gamma: float = 0.99
    """discount factor for reward and cost"""
    tau: float = 0.005
    """Polyak coefficient of the target networks"""
    lr: float = 1e-3
    """learning rate of the actor, the critics and alpha"""
    beta_lr: float = 5e-2
    """learning rate of the cost multiplier beta"""
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
    beta_damp: float = 0.0
    """proportional damping of beta in the actor loss, damp = this * mean(d_bar - Qc) (authors' code: 10)"""
    random_steps: int = 500
    """uniform random actions at the start of the guide phase and of the SAC-Lag baseline"""
    learning_starts: int = 500
    """no gradient updates before this many steps of a phase"""
    update_every: int = 100
    """do this many gradient steps every this many environment steps"""
    eval_every: int = 30_000
    """evaluate the student alone every this many steps (and at the end)"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1000
    """console line and multiplier/loss scalars every this many steps"""


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
            f"to hide; this environment observes {list(slices)}. Use a Goal, Button or Push task, e.g. "
            "SafetyPointGoal1 (the paper's Dynamic), SafetyCarGoal1, SafetyPointButton1, SafetyPointPush1."
        )
    kept = [k for k in slices if k != GOAL_KEY]
    return np.concatenate([np.arange(slices[k].start, slices[k].stop) for k in kept]), kept


def displacement(pos_before: np.ndarray, pos_after: np.ndarray) -> float:
    """eq. 4: r_delta = || (x, y)_{t+1} - (x, y)_t ||_2, the robot's planar displacement in one step."""
    return float(np.linalg.norm(np.asarray(pos_after)[:2] - np.asarray(pos_before)[:2]))


class SourceTask(gym.Wrapper):
    """The source task: no task reward, eq. 4's displacement reward, and a boundary at the placement extents.

    Wraps an env built with `drop_obs_keys=("goal_lidar",)`. Leaving the extents ends the episode with r = 0,
    as the walls of the authors' source environment did.
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
        env = make_safety_env(env_id, seed=seed, drop_obs_keys=(GOAL_KEY,))
        # statistics again on top, so that the episode return is the eq. 4 return and the boundary ends it
        return EpisodeStatistics(SourceTask(env, displacement_scale))

    return thunk


def make_target_env(env_id: str, seed: int):
    return lambda: make_safety_env(env_id, seed=seed)


def per_step_cost_target(cost_limit: float, gamma: float, horizon: int) -> float:
    """d_bar = d (1 - gamma^T) / ((1 - gamma) T): the per-episode limit as a bound on the discounted Qc."""
    return cost_limit * (1 - gamma**horizon) / ((1 - gamma) * horizon)


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
        mean, std = self.dist(obs)
        u = mean if deterministic else mean + std * torch.randn_like(mean)
        return torch.tanh(u) * self.scale + self.bias, self._squash_log_prob(u, mean, std)

    def log_prob(self, obs, action):
        """log pi(action | obs) of a given (e.g. the other policy's) action."""
        mean, std = self.dist(obs)
        y = ((action - self.bias) / self.scale).clamp(-1 + 1e-6, 1 - 1e-6)
        return self._squash_log_prob(torch.atanh(y), mean, std)


class QNet(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_dim + act_dim, [hidden, hidden], 1)

    def forward(self, obs, action):
        return self.net(torch.cat([obs, action], -1)).squeeze(-1)


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


def kl_weight(beta: float, variant: str, fixed: Optional[float] = None) -> float:
    """omega: the paper sets omega = beta; the authors' code uses 0.1 beta + 0.01; an ablation uses a constant."""
    if fixed is not None:
        return fixed
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

    The guide: fixed alpha, omega = 0, no guide to imitate. The student: learned alpha, omega from `kl_weight`,
    KL toward `guide` (a frozen Actor on Xi(s)), importance weights rho on guide actions.
    """

    def __init__(self, obs_dim, act_dim, args: Args, action_space, cost_limit, device, fixed_alpha=None):
        h = args.hidden_size
        self.actor = Actor(obs_dim, act_dim, h, action_space.low, action_space.high).to(device)
        self.qr1, self.qr2, self.qc = (QNet(obs_dim, act_dim, h).to(device) for _ in range(3))
        self.qr1_t, self.qr2_t, self.qc_t = (QNet(obs_dim, act_dim, h).to(device) for _ in range(3))
        for q, q_t in self.critic_pairs():
            q_t.load_state_dict(q.state_dict())
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.lr)
        critic_params = [*self.qr1.parameters(), *self.qr2.parameters(), *self.qc.parameters()]
        self.q_opt = torch.optim.Adam(critic_params, lr=args.lr)
        # alpha = softplus(.) and beta = softplus(.), both starting from softplus(0) = log 2 (authors' code)
        self.fixed_alpha = fixed_alpha
        self.soft_alpha = torch.zeros((), device=device, requires_grad=True)
        self.soft_beta = torch.zeros((), device=device, requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.soft_alpha], lr=args.lr)
        self.beta_opt = torch.optim.Adam([self.soft_beta], lr=args.beta_lr)
        self.target_entropy = args.target_entropy_scale * act_dim
        self.d_bar = per_step_cost_target(cost_limit, args.gamma, args.max_episode_steps)
        self.args = args

    def critic_pairs(self):
        return [(self.qr1, self.qr1_t), (self.qr2, self.qr2_t), (self.qc, self.qc_t)]

    @property
    def alpha(self) -> float:
        return self.fixed_alpha if self.fixed_alpha is not None else F.softplus(self.soft_alpha).item()

    @property
    def beta(self) -> float:
        return F.softplus(self.soft_beta).item()

    def update(self, batch, omega=0.0, guide=None, xi_index=None, variant="paper"):
        """One gradient step of the critics, actor, alpha and beta, then Polyak averaging. Returns losses."""
        args = self.args
        obs, act, next_obs = batch["obs"], batch["action"], batch["next_obs"]
        rew, cost, done, rho = batch["reward"], batch["cost"], batch["done"], batch["rho"]
        # detached tensors, not floats: reading them with .item() would wait for the device at every gradient step
        alpha = self.fixed_alpha if self.fixed_alpha is not None else F.softplus(self.soft_alpha).detach()
        beta = F.softplus(self.soft_beta).detach()
        use_kl = guide is not None and omega != 0.0

        with torch.no_grad():
            next_act, next_logp = self.actor.sample(next_obs)
            min_q_next = torch.min(self.qr1_t(next_obs, next_act), self.qr2_t(next_obs, next_act))
            logp_g_next = guide.log_prob(next_obs[:, xi_index], next_act) if use_kl else torch.zeros_like(next_logp)
            y_r = kl_regularised_target(rew, done, args.gamma, min_q_next, next_logp, logp_g_next, alpha,
                                        omega if use_kl else 0.0, variant, batch["logp_guide"])
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
        damp = args.beta_damp * (self.d_bar - qc_values.detach()).mean() if args.beta_damp else 0.0
        if use_kl and variant == "paper":
            # eq. 5: (alpha + omega) log pi - omega log pi_guide = alpha log pi + omega KL(pi || pi_guide) per sample
            logp_g = guide.log_prob(obs[:, xi_index], new_act)
            per_sample = (alpha + omega) * logp - omega * logp_g - min_q + (beta - damp) * qc_pi
        else:
            per_sample = alpha * logp - min_q + (beta - damp) * qc_pi
        actor_loss = (rho * per_sample).mean()
        self.actor_opt.zero_grad()
        actor_loss.backward()
        self.actor_opt.step()

        # alpha (student only): keep the entropy near the target
        alpha_loss = torch.zeros(())
        if self.fixed_alpha is None:
            alpha_loss = -F.softplus(self.soft_alpha) * (self.target_entropy + logp.detach().mean())
            self.alpha_opt.zero_grad()
            alpha_loss.backward()
            self.alpha_opt.step()

        # beta: grows while the discounted cost Qc(s, a ~ pi) exceeds d_bar
        beta_loss = F.softplus(self.soft_beta) * (self.d_bar - qc_pi.detach()).mean()
        self.beta_opt.zero_grad()
        beta_loss.backward()
        self.beta_opt.step()

        with torch.no_grad():
            for q, q_t in self.critic_pairs():
                for p, p_t in zip(q.parameters(), q_t.parameters()):
                    p_t.mul_(1 - args.tau).add_(args.tau * p)
        # detached tensors: read (and checked for NaNs) once per round, not after every step (no GPU syncs)
        return {"qr_loss": (qr1_loss + qr2_loss).detach() / 2, "qc_loss": qc_loss.detach(),
                "actor_loss": actor_loss.detach(), "alpha_loss": alpha_loss.detach(), "beta_loss": beta_loss.detach(),
                "qc_values": qc_values.mean().detach()}


def replay_fields(obs_dim, act_dim):
    f32 = np.float32
    return {"obs": ((obs_dim,), f32), "action": ((act_dim,), f32), "next_obs": ((obs_dim,), f32), "reward": ((), f32),
            "cost": ((), f32), "done": ((), f32), "rho": ((), f32), "logp_guide": ((), f32)}


def real_next_obs(next_obs, truncated, terminated, info):
    """The observation that followed the action, also for sub-envs that were just auto-reset."""
    real = next_obs.copy()
    for i in np.flatnonzero(np.logical_or(terminated, truncated)):
        real[i] = info["final_observation"][i]
    return real


@torch.no_grad()
def evaluate(actor: Actor, env_fn, episodes: int, seed: int, device, obs_index=None) -> list[tuple[float, float]]:
    """One policy alone in the target task: a list of (return, cost) per episode.

    The student sees the whole observation; the guide (`obs_index` = Xi's indices) sees Xi(s).
    """
    env, results = env_fn(), []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done = False
        while not done:
            obs = obs if obs_index is None else obs[obs_index]
            action, _ = actor.sample(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])
            obs, _, terminated, truncated, info = env.step(action[0].cpu().numpy())
            done = terminated or truncated
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
    if args.capture_video:
        raise SystemExit("error: --capture-video is not supported by sagui.py (state observations only)")
    check_positive(args, "total_timesteps", "cost_limit", "guide_cost_limit", "max_episode_steps", "hidden_size",
                   "batch_size", "buffer_size", "lr", "beta_lr", "tau", "update_every", "eval_every", "eval_episodes",
                   "log_every", "is_clip_low", "is_clip_high")
    if args.use_guide and args.guide_path is None:
        check_positive(args, "guide_total_timesteps", "guide_alpha")
    check_choice(args, "sampling", ["control-switch", "linear-decay", "student"])
    check_choice(args, "ld_mode", ["step", "trajectory"])
    check_choice(args, "kl_variant", ["paper", "code"])
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
    if args.random_steps < 0 or args.learning_starts < 0:
        raise SystemExit("error: --random-steps and --learning-starts must be >= 0")
    if args.guide_path is not None and not os.path.isfile(args.guide_path):
        raise SystemExit(f"error: --guide-path {args.guide_path!r} is not a file (expected runs/<run>/guide.pt)")
    if args.guide_path is not None and not args.use_guide:
        raise SystemExit("error: --guide-path and --no-use-guide contradict each other")
    try:
        _, vision = normalize_env_id(args.env_id)
    except ValueError as e:
        raise SystemExit(f"error: --env-id: {e}")
    if vision:
        raise SystemExit(f"error: --env-id {args.env_id!r}: SaGui works on state observations; drop 'Vision'")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    logger = Logger(run_name, args)
    seed_everything(args.seed, args.torch_deterministic)
    device = get_device(args.cuda)

    # target task (student) and the abstraction Xi that gives the guide's view of it
    envs = SafeVectorEnv(gym.vector.SyncVectorEnv([make_target_env(args.env_id, args.seed)]))
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

    # ============================================================================================
    # Phase 1: the guide, reward-free with eq. 4, in the source task
    # ============================================================================================
    guide = None
    if args.use_guide and args.guide_path is not None:
        guide = load_guide(args.guide_path, args.env_id, kept_keys, len(xi_index), act_dim, action_space, device)
        print(f"loaded the guide from {args.guide_path}", flush=True)
    elif args.use_guide:
        glog = Logger(f"{run_name}/guide", args)  # runs/<run>/guide/: the same tags, a second curve in TensorBoard
        genvs = SafeVectorEnv(gym.vector.SyncVectorEnv([make_source_env(
            args.env_id, args.seed, args.displacement_scale if args.displacement_reward else 0.0)]))
        genvs.single_action_space.seed(args.seed)
        g_obs_dim = genvs.single_observation_space.shape[0]
        assert g_obs_dim == len(xi_index), "source observation and Xi(target observation) differ in size"
        g_agent = SACLagrangian(g_obs_dim, act_dim, args, action_space, args.guide_cost_limit, device,
                                fixed_alpha=args.guide_alpha)
        g_rb = ReplayBuffer(args.buffer_size, replay_fields(g_obs_dim, act_dim), device, seed=args.seed)
        obs, _ = genvs.reset(seed=args.seed)
        losses = {}
        for global_step in range(1, args.guide_total_timesteps + 1):
            if global_step <= args.random_steps:
                actions = np.stack([genvs.single_action_space.sample() for _ in range(genvs.num_envs)])
            else:
                with torch.no_grad():
                    actions, _ = g_agent.actor.sample(torch.as_tensor(obs, dtype=torch.float32, device=device))
                actions = actions.cpu().numpy()
            next_obs, rewards, costs, terminations, truncations, infos = genvs.step(actions)
            glog.log_costs(global_step, costs)
            for _, ep in finished_episodes(infos):
                glog.log_episode(global_step, ep["r"], ep["c"], ep["l"])
            ones = np.ones(genvs.num_envs, np.float32)
            g_rb.add(obs=obs, action=actions, next_obs=real_next_obs(next_obs, truncations, terminations, infos),
                     reward=rewards, cost=costs, done=terminations, rho=ones, logp_guide=0 * ones)  # time limit masked
            obs = next_obs

            if global_step >= args.learning_starts and global_step % args.update_every == 0:
                for _ in range(args.update_every):
                    losses = g_agent.update(g_rb.sample(args.batch_size))  # omega = 0: plain SAC-Lagrangian
                check_finite("guide losses", *losses.values())
            if global_step % args.log_every == 0:
                for k, v in losses.items():
                    glog.scalar(f"losses/{k}", v, global_step)
                glog.scalar("charts/lagrange_multiplier", g_agent.beta, global_step)
                glog.scalar("charts/alpha", g_agent.alpha, global_step)
                glog.console(global_step, f"beta={g_agent.beta:.3f} [guide]")
        genvs.close()
        guide = g_agent.actor
        del g_rb, g_agent  # free the guide's replay memory before the student's
        torch.save({"actor": guide.state_dict(), "hidden_size": args.hidden_size, "kept_keys": kept_keys,
                    "act_dim": act_dim, "env_id": args.env_id, "args": vars(args)},
                   os.path.join(logger.run_dir, "guide.pt"))
        # the guide alone in the target task: the safety it brings before the student has learnt anything
        results = evaluate(guide, make_target_env(args.env_id, args.seed + 10_000), args.eval_episodes,
                           args.seed + 10_000, device, obs_index=xi_index)
        for ret, cost in results:
            glog.log_episode(args.guide_total_timesteps, ret, cost, 0, prefix="eval")
        print(f"guide alone in the target task: return={np.mean([r for r, _ in results]):.2f} "
              f"cost={np.mean([c for _, c in results]):.2f}", flush=True)
        glog.close()
        print(f"guide saved to {os.path.join(logger.run_dir, 'guide.pt')}", flush=True)
    if guide is not None:
        guide.requires_grad_(False)

    # ============================================================================================
    # Phase 2: the student in the target task, under the guide
    # ============================================================================================
    sampling = args.sampling if guide is not None else "student"
    variant = args.kl_variant
    student = SACLagrangian(obs_dim, act_dim, args, action_space, args.cost_limit, device)
    two_buffers = sampling == "control-switch"
    capacity = args.buffer_size // 2 if two_buffers else args.buffer_size
    rb = ReplayBuffer(capacity, replay_fields(obs_dim, act_dim), device, seed=args.seed)
    rb_guide = None
    if two_buffers:
        rb_guide = ReplayBuffer(capacity, replay_fields(obs_dim, act_dim), device, seed=args.seed + 1)
    n_guide_batch = int(round(args.guide_batch_fraction * args.batch_size))
    eval_env = make_target_env(args.env_id, args.seed + 10_000)

    rng = np.random.default_rng(args.seed)
    guide_acts = np.zeros(envs.num_envs, dtype=bool)  # who acts at the next step, per env (True = guide)
    if sampling == "linear-decay":
        guide_acts = rng.random(envs.num_envs) < 1.0
    random_steps = args.random_steps if guide is None else 0  # SaGui students never act at random (authors' code)
    steps_by_guide, window_steps, losses = 0, 0, {}
    obs, _ = envs.reset(seed=args.seed)
    envs.single_action_space.seed(args.seed)
    logger.restart_clock(0, args.total_timesteps)  # SPS and ETA of the student phase only
    start_time = logger.start_time
    for global_step in range(1, args.total_timesteps + 1):
        # composite sampling: who acts is decided per env in guide_acts
        obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
        with torch.no_grad():
            if global_step <= random_steps:
                actions = torch.as_tensor(np.stack([envs.single_action_space.sample() for _ in range(envs.num_envs)]),
                                          dtype=torch.float32, device=device)
            else:
                actions, _ = student.actor.sample(obs_t)
            rho = torch.ones(envs.num_envs, device=device)
            logp_guide = torch.zeros(envs.num_envs, device=device)
            if guide is not None:
                g_actions, _ = guide.sample(obs_t[:, xi_index_t])
                gi = torch.as_tensor(guide_acts, device=device)
                actions = torch.where(gi[:, None], g_actions, actions)
                logp_guide = guide.log_prob(obs_t[:, xi_index_t], actions)
                rho_guide = importance_weight(student.actor.log_prob(obs_t, actions), logp_guide,
                                              args.is_clip_low, args.is_clip_high)
                rho = torch.where(gi, rho_guide, rho)
        packed = torch.cat([actions, rho[:, None], logp_guide[:, None]], 1).cpu().numpy()  # one device->host copy
        actions_np, rho_np, logp_guide_np = packed[:, :act_dim], packed[:, act_dim], packed[:, act_dim + 1]
        next_obs, rewards, costs, terminations, truncations, infos = envs.step(actions_np)
        logger.log_costs(global_step, costs)  # the behaviour policy's cost (paper Fig. 6)
        for _, ep in finished_episodes(infos):
            logger.log_episode(global_step, ep["r"], ep["c"], ep["l"])
        steps_by_guide += int(guide_acts.sum())
        window_steps += envs.num_envs

        row = dict(obs=obs, action=actions_np, next_obs=real_next_obs(next_obs, truncations, terminations, infos),
                   reward=rewards, cost=costs, done=terminations, rho=rho_np, logp_guide=logp_guide_np)
        if two_buffers:  # separate student and guide buffers
            for buffer, mask in ((rb, ~guide_acts), (rb_guide, guide_acts)):
                if mask.any():
                    buffer.add(**{k: np.asarray(v)[mask] for k, v in row.items()})
        else:
            rb.add(**row)
        obs = next_obs

        # who acts next
        episode_over = np.logical_or(terminations, truncations)
        if sampling == "control-switch":
            guide_acts = control_switch(guide_acts, costs, episode_over)
        elif sampling == "linear-decay":
            p_guide = linear_decay(global_step, args.total_timesteps)
            draw = rng.random(envs.num_envs) < p_guide
            guide_acts = draw if args.ld_mode == "step" else np.where(episode_over, draw, guide_acts)

        # updates: 75/25 student/guide minibatches for control-switch
        if global_step >= args.learning_starts and global_step % args.update_every == 0:
            beta_now = student.beta
            omega = kl_weight(beta_now, variant, args.fixed_omega) if guide is not None else 0.0
            for _ in range(args.update_every):
                if two_buffers and len(rb_guide) > 0 and n_guide_batch > 0:
                    b_s, b_g = rb.sample(args.batch_size - n_guide_batch), rb_guide.sample(n_guide_batch)
                    batch = {k: torch.cat([b_s[k], b_g[k]]) for k in b_s}
                elif len(rb) > 0:
                    batch = rb.sample(args.batch_size)
                else:
                    batch = rb_guide.sample(args.batch_size)
                losses = student.update(batch, omega, guide, xi_index_t, variant)
            check_finite("student losses", *losses.values())
            losses["importance_weight_mean"] = batch["rho"].mean()

        if global_step % args.log_every == 0:
            for k in ("qr_loss", "qc_loss", "actor_loss", "alpha_loss", "beta_loss", "qc_values"):
                if k in losses:
                    logger.scalar(f"losses/{k}", losses[k], global_step)
            beta_now = student.beta
            logger.scalar("charts/lagrange_multiplier", beta_now, global_step)
            logger.scalar("charts/alpha", student.alpha, global_step)
            if guide is not None:
                logger.scalar("charts/omega", kl_weight(beta_now, variant, args.fixed_omega), global_step)
                logger.scalar("charts/guide_acted_fraction", steps_by_guide / max(window_steps, 1), global_step)
                if sampling == "linear-decay":
                    p_guide = linear_decay(global_step, args.total_timesteps)
                    logger.scalar("charts/guide_probability", p_guide, global_step)
                if "importance_weight_mean" in losses:
                    logger.scalar("charts/importance_weight_mean", losses["importance_weight_mean"], global_step)
            steps_by_guide, window_steps = 0, 0
            logger.console(global_step, f"beta={beta_now:.3f} alpha={student.alpha:.3f}")

        if global_step % args.eval_every == 0 or global_step == args.total_timesteps:
            results = evaluate(student.actor, eval_env, args.eval_episodes, args.seed + 10_000, device)
            for ret, cost in results:  # the student's own cost (paper Fig. 8)
                logger.log_episode(global_step, ret, cost, 0, prefix="eval")
            print(f"eval global_step={global_step} student return={np.mean([r for r, _ in results]):.2f} "
                  f"cost={np.mean([c for _, c in results]):.2f}", flush=True)

    if args.save_model:
        torch.save({"actor": student.actor.state_dict(), "qr1": student.qr1.state_dict(),
                    "qr2": student.qr2.state_dict(), "qc": student.qc.state_dict(), "args": vars(args)},
                   os.path.join(logger.run_dir, "student.pt"))
    print(f"done in {time.time() - start_time:.0f}s; run directory {logger.run_dir}", flush=True)
    envs.close()
    logger.close()
