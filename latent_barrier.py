"""State-Wise Safe Reinforcement Learning With Pixel Observations: a barrier function in a world model's latent space.

Simon Sinong Zhan, Yixuan Wang, Qingyuan Wu, Ruochen Jiao, Chao Huang, Qi Zhu. L4DC 2024 (PMLR 242).
arXiv: https://arxiv.org/abs/2311.02227

A PlaNet/Dreamer-style agent learns from 64x64 pixels. Its world model (an RSSM with reward and cost heads) compresses
each observation into a latent state; a barrier network B(z) on the stochastic latent z is trained to be positive on
safe latents, negative on unsafe ones, and never to let B fall along a transition (a discrete-time barrier condition),
with "unsafe" read off the world model's own cost head on imagined states. The policy is trained by backpropagating
lambda-returns through imagined trajectories (Dreamer) AND the barrier's loss on those trajectories: the actor is
pushed towards transitions that keep the barrier condition, i.e. that stay inside the learned safe set. Barrier and
actor are updated together by one optimiser. No cost budget and no Lagrange multiplier: state-wise safety.

Paper -> code (see docs/latent_barrier.md; the paper's text was not at hand, equation numbers follow the team's summary:
eq. 3 the barrier conditions, eq. 4 the barrier loss, eq. 5 the policy loss):
- latent dynamics model (RSSM, reward and cost heads)     -> `WorldModel`, `common.rssm.RSSM` (one member: a plain RSSM)
- its loss: image + reward + cost MSE + max(KL, free nats) -> `world_model_loss()`         (eq. world-model loss)
- 5-bit images in [-0.5, 0.5]                              -> `WorldModel.preprocess()`
- labels: unsafe if the cost head's c_hat > threshold      -> `label_states()`             (eq. labels)
- the barrier B(z) on the stochastic state z               -> `BarrierNet`
- the three barrier losses (safe, unsafe, derivative)      -> `barrier_losses()`           (eqs. 3-4)
- imagined trajectories from every posterior state         -> `imagine()`
- lambda-returns, value V(z)                               -> `lambda_returns()`, `policy_and_value_losses()`
- policy loss -R^lambda + beta * barrier loss              -> `policy_and_value_losses()` (eq. 5)
- Algorithm 1 (collect, fit the model, barrier and policy) -> `update()` and the main loop
- baselines: beta 0 (unconstrained Dreamer); `--constraint lagrangian` (LAMBDA-like augmented Lagrangian on the cost
  return, without LAMBDA's posterior sampling)             -> `augmented_lagrangian()`, `update_penalty()`

As the authors' code (github.com/SimonZhan-code/Step-Wise_SafeRL_Pixel, `bc.py`), by default: PlaNet's RSSM sizes
(h 200, z 30, hidden 200, min std 0.1, ELU) and loss (MSE sums, free nats 3 per element, no KL balancing), ReLU conv
encoder/decoder, reward and cost heads 2 x 200 ELU on [z, h]; actor 4 x 200 ELU tanh-Gaussian (mean scale 2, initial
std 2), value 3 x 200 ELU and barrier 3 x 200 ReLU on z only; horizon 30 (29 imagined steps) from all 32 x 50
posterior states; alpha(B) = alpha * B on the newer state; margin eta 0.01; threshold 0.01; beta 1; actor + barrier
in one Adam (lr 8e-5), value lr 8e-5, Adam eps 1e-7, gradient clip 100; 8 random seed episodes, then 1000 updates
per 1000 env steps; collection with the policy's mode plus N(0, 0.1) noise.

Deviations (reasons and the other side's flag in docs/latent_barrier.md):
- The paper's barrier losses by default; the authors' code's variants behind flags: `--derivative-weight 100`,
  `--derivative-dt 0.02` (the difference divided by dt), `--sign-only-hinges` (safe/unsafe hinges only where B has
  the wrong sign). The cost of an agent step is the SUM over the repeated sub-steps (LAMBDA, SafeDreamer); the
  authors' code keeps the last sub-step's cost only: `--repeat-cost last`.
- Model learning rate 1e-4 (LAMBDA's, in the same pixel Safety-Gym setting); the authors' code has 1e-5.
- The start (posterior) state of each imagined trajectory is part of the barrier's training set and of its first
  transition; the authors' code drops it (their 29 states start one step later).
- Means over imagined steps instead of the authors' sums over time (the same up to a factor 29 that Adam removes;
  beta balances the same two terms); the return pairs v(s_{t+1}) with the reward received on reaching s_{t+1}
  (the replay's row convention; the authors pair it with the reward predicted at s_t).
- The policy's mode for collection is tanh(mean) (the authors: a 100-sample estimate); evaluation uses it too.
- With `--store-chunk N > 0` an unfinished episode is stored once it holds N rows (tiny runs only; default 0).

Resume, video, summary (docs/latent_barrier.md, "Resume, video, summary"):
- `runs/<run>/checkpoint.pt` every `--checkpoint-every` env steps and at the end of training (before the final
  evaluation; written atomically): world model, actor, barrier, value (and cost value), the three optimisers, the
  Lagrangian baseline's multiplier and penalty, the replay episodes (uint8 frames zlib-compressed;
  `--no-checkpoint-buffer` leaves them out), the counters (steps, updates, next training round and console line,
  training episodes), the logger's state and every RNG. `--resume runs/<run>` continues that run directory and its
  TensorBoard curves; the environments are reset, so the episodes in progress at the checkpoint are lost (and so is
  the unfinished episode's part not yet stored in the buffer).
- `--capture-video` records the final evaluation episodes as mp4 under `runs/<run>/videos/`: the agent's own 64x64
  camera frames (what the world model sees), enlarged 4x by pixel repetition; nothing extra is rendered.
- `runs/<run>/summary.json` at the very end. This method has no cost budget (state-wise safety): the summary's
  `cost_limit` and its count of violating training episodes use `--cost-limit` (25 per episode, the Lagrangian
  baseline's budget d, Safety-Gymnasium's usual limit) for every method.
"""

from __future__ import annotations

import functools
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import (
    ConvDecoder,
    ConvEncoder,
    EpisodeBuffer,
    Logger,
    SafeVectorEnv,
    check_choice,
    check_finite,
    check_positive,
    finished_episodes,
    get_device,
    make_safety_env,
    make_vector_env,
    mlp,
    normalize_env_id,
    seed_everything,
)
from common.capture import resolve_speed_flags, speed_up
from common.checkpoint import Checkpointer, check_identity, resume_run, set_rng_state
from common.envs import default_async
from common.rssm import RSSM, gaussian_kl
from common.summary import write_summary
from common.video import save_video, video_path


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be used when available (the CPU otherwise, with a message)"""
    capture_video: bool = False
    """record the final evaluation episodes as mp4 under `runs/{run_name}/videos/`: the agent's own 64x64 camera
    frames, enlarged 4x (256x256) by pixel repetition (no extra rendering)"""
    save_model: bool = False
    """whether to save the world model, barrier, actor and value into `runs/{run_name}`"""

    # Algorithm specific arguments
    env_id: str = "SafetyPointGoal1"
    """the Safety-Gymnasium task of a robot with a camera; observations are always its 64x64 `vision` pixels"""
    total_timesteps: int = 1_000_000
    """total environment steps (action repeat included), the random warm-up included; the final evaluation's steps
    are not counted"""
    num_envs: int = 1
    """the number of parallel environments (the authors collect one episode at a time)"""
    action_repeat: int = 2
    """each action is repeated this many environment steps; rewards are summed"""
    repeat_cost: Literal["sum", "last"] = "sum"
    """the cost of an agent step: 'sum' over the repeated sub-steps (LAMBDA, SafeDreamer) or the 'last' sub-step's
    only (the authors' code); logged episodic costs always count every sub-step"""
    warmup_steps: int = 8000
    """environment steps of uniform random actions first (the authors' 8 seed episodes of 1000 steps)"""
    action_noise: float = 0.1
    """std of the Gaussian noise added to the policy's mode when collecting (the authors' 0.1)"""

    # world model
    train_every: int = 1000
    """environment steps between two rounds of updates"""
    train_steps: int = 1000
    """updates (world model, then barrier + actor and value) per round (the authors: 1000 per 1000-step episode)"""
    buffer_capacity: int = 1_000_000
    """replay capacity in agent steps"""
    store_chunk: int = 0
    """if > 0, store an unfinished episode as a sequence of its own once it holds this many rows (0: whole episodes)"""
    batch_size: int = 32
    """sequences per update"""
    sequence_length: int = 50
    """agent steps per sequence"""
    deter_dim: int = 200
    """size of the deterministic (GRU) state h"""
    stoch_dim: int = 30
    """size of the stochastic (Gaussian) state z, the barrier's, actor's and value's input"""
    hidden_dim: int = 200
    """hidden size inside the RSSM"""
    cnn_depth: int = 32
    """channels of the first conv layer (encoder output 32 * depth = 1024)"""
    head_units: int = 200
    """units of the reward and cost heads (2 layers each)"""
    bit_depth: int = 5
    """images are quantised to this many bits per channel (PlaNet's 5), with uniform dequantisation noise"""
    free_nats: float = 3.0
    """free nats: the KL of each state counts as max(KL, free nats)"""
    model_lr: float = 1e-4
    """learning rate of the world model (LAMBDA's; the authors' code has 1e-5, see docs/latent_barrier.md)"""

    # the barrier (eqs. 3-5)
    constraint: Literal["barrier", "lagrangian"] = "barrier"
    """'barrier': the paper's latent barrier (--beta 0: the unconstrained Dreamer); 'lagrangian': the LAMBDA-like
    baseline, an augmented Lagrangian on the imagined cost return instead of the barrier"""
    beta: float = 1.0
    """weight of the barrier loss in the policy loss (0: no barrier, the unconstrained Dreamer)"""
    eta: float = 0.01
    """margin eta of the three barrier conditions"""
    alpha: float = 0.02
    """the class-K function alpha(B) = alpha * B of the derivative condition, applied to the newer state"""
    cost_threshold: float = 0.01
    """an imagined state is unsafe if the cost head predicts more than this, safe if less"""
    derivative_weight: float = 1.0
    """weight of the derivative term in the barrier loss (the paper: 1; the authors' code: 100)"""
    derivative_dt: float = 1.0
    """the derivative term's (B(z_t) - B(z_{t-1}) + alpha B(z_t)) is divided by this (the paper: 1; the code: 0.02)"""
    sign_only_hinges: bool = False
    """the authors' code: the safe/unsafe hinges act only where B already has the wrong sign (the paper: wherever the
    margin is not met)"""
    barrier_units: int = 200
    """units of the barrier network (3 ReLU layers)"""

    # the Lagrangian baseline (--constraint lagrangian; LAMBDA's values)
    cost_limit: float = 25.0
    """the cost budget d per episode"""
    episode_length: int = 1000
    """environment steps per episode T, to turn d into a budget on the discounted cost return of agent steps"""
    cost_gamma: float = 0.995
    """discount of the cost return (LAMBDA's safety discount)"""
    initial_lagrangian: float = 1e-6
    """initial Lagrange multiplier (LAMBDA)"""
    initial_penalty: float = 5e-9
    """initial penalty multiplier c (LAMBDA)"""
    penalty_power_factor: float = 1e-5
    """c grows by (1 + this) every update, up to 1 (LAMBDA)"""
    cost_value_lr: float = 2e-4
    """learning rate of the cost value (LAMBDA's safety critic)"""

    # actor, value
    actor_units: int = 200
    """units of the actor (4 ELU layers)"""
    value_units: int = 200
    """units of the value (3 ELU layers)"""
    actor_lr: float = 8e-5
    """learning rate of the one optimiser of the actor and the barrier"""
    value_lr: float = 8e-5
    """learning rate of the value"""
    adam_eps: float = 1e-7
    """epsilon of every Adam optimiser"""
    grad_clip: float = 100.0
    """gradient-norm clipping of the model, of actor + barrier together, and of the values"""
    imag_horizon: int = 30
    """length of an imagined trajectory, its start state included (the paper's 30: 29 imagined steps)"""
    gamma: float = 0.99
    """discount factor"""
    lambda_: float = 0.95
    """lambda of the lambda-returns"""

    # run-time
    torch_threads: int = 1
    """torch CPU threads (1: no contention with the software renderer on a busy CPU; 0: torch's default)"""
    compile: bool | None = None
    """torch.compile the update (None: on with CUDA, off on the CPU)"""
    cudagraphs: bool | None = None
    """capture the whole update as one CUDA graph and replay it (None: on with CUDA; needs CUDA)"""
    async_envs: bool | None = None
    """step the envs in worker processes (None: with 2+ envs and 4+ cores); False: in this process"""
    eval_episodes: int = 1
    """evaluation episodes at the end with the policy's deterministic action (0: none)"""
    log_every: int = 5000
    """environment steps between console lines"""
    checkpoint_every: int = 50_000
    """environment steps between checkpoints (`runs/{run_name}/checkpoint.pt`, also written at the end of training;
    0: only then). At the default sizes (measured): 63 MiB of networks and optimisers plus 3.1 MiB per 1,000 replay
    rows (one row per 2 env steps), 0.7 s to write with 1,000 rows; so 63 + 25 x 3.1 = 141 MiB at 50,000 env steps"""
    checkpoint_buffer: bool = True
    """save the replay episodes in the checkpoint (uint8 frames, zlib-compressed); --no-checkpoint-buffer leaves them
    out: much smaller files, and a resumed run refills the replay from scratch"""
    resume: str | None = None
    """a run directory runs/<run> to continue; its flags are used, only --total-timesteps/--checkpoint-every/... may
    change (the environments are reset: the episodes in progress at the checkpoint are lost)"""


# ------------------------------------------------------------------------------------------------------------------
# The paper's pieces
# ------------------------------------------------------------------------------------------------------------------


def label_states(cost: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(unsafe, safe) masks as floats from the cost head's predictions: unsafe above the threshold, safe below it
    (a prediction exactly at the threshold is neither). No gradient flows through a label."""
    cost = cost.detach()
    # eq. labels: z unsafe if c_hat(z) > threshold, safe if c_hat(z) < threshold
    return (cost > threshold).float(), (cost < threshold).float()


def barrier_losses(b: torch.Tensor, unsafe: torch.Tensor, safe: torch.Tensor, eta: float, alpha: float,
                   dt: float = 1.0, derivative_weight: float = 1.0, sign_only: bool = False) -> dict:
    """The three barrier losses on a trajectory of barrier values b (T, N) with labels (T, N).

    safe:       mean over all states of  safe * ReLU(eta - B(z))                     (B >= eta on safe states)
    unsafe:     mean over all states of  unsafe * ReLU(eta + B(z))                   (B <= -eta on unsafe states)
    derivative: weight * mean over the T-1 transitions of ReLU(eta - (B(z_t) - B(z_{t-1}) + alpha B(z_t)) / dt)
    `sign_only` (the authors' code): the safe and unsafe hinges count only where B has the wrong sign (B < 0 on a
    safe state, B > 0 on an unsafe one). Also returns the fraction of transitions violating the derivative condition
    itself (no margin), detached.
    """
    if sign_only:
        safe_hinge = torch.where(b < 0, eta - b, torch.zeros_like(b))
        unsafe_hinge = torch.where(b > 0, eta + b, torch.zeros_like(b))
    else:
        safe_hinge, unsafe_hinge = F.relu(eta - b), F.relu(eta + b)
    # eq. 4 (safe term): ReLU(eta - B(z)) on states labelled safe
    safe_loss = (safe * safe_hinge).mean()
    # eq. 4 (unsafe term): ReLU(eta + B(z)) on states labelled unsafe
    unsafe_loss = (unsafe * unsafe_hinge).mean()
    # eq. 3: the discrete-time condition B(z_t) - B(z_{t-1}) + alpha B(z_t) >= 0, alpha on the newer state
    condition = (b[1:] - b[:-1] + alpha * b[1:]) / dt
    # eq. 4 (derivative term): ReLU(eta - (B(z_t) - B(z_{t-1}) + alpha B(z_t)))
    derivative_loss = derivative_weight * F.relu(eta - condition).mean()
    return {"safe": safe_loss, "unsafe": unsafe_loss, "derivative": derivative_loss,
            "violation_fraction": (condition < 0).float().mean().detach()}


def misclassified(wrong_side: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The fraction of the states with `label` whose barrier value is on the wrong side (0 when there are none)."""
    return (wrong_side.float() * label).sum() / label.sum().clamp(min=1)


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) returns of an imagined trajectory; rewards (H, N) received on reaching states 1..H, values (H+1, N) of
    states 0..H -> returns (H, N) of states 0..H-1, bootstrapped with the value of the last state."""
    returns, last = [], values[-1]
    for t in reversed(range(rewards.shape[0])):
        # eq. lambda-return: R_t = r_{t+1} + gamma * ((1 - lambda) v(s_{t+1}) + lambda R_{t+1}),  R_H = v(s_H)
        last = rewards[t] + gamma * ((1 - lam) * values[t + 1] + lam * last)
        returns.append(last)
    return torch.stack(returns[::-1])


def safety_budget(cost_limit: float, episode_length: int, action_repeat: int, repeat_cost: str, gamma: float) -> float:
    """The per-episode cost budget d as a budget on the discounted return of agent-step costs (Lagrangian baseline).

    An episode has T / R agent steps; an agent step's cost is the sum over its R sub-steps (or one sub-step's with
    `--repeat-cost last`), so the budget per agent step is d R / T (or d / T), and discounted: that / (1 - gamma).
    """
    per_step = cost_limit / episode_length * (action_repeat if repeat_cost == "sum" else 1)
    return per_step / (1 - gamma)  # eq. budget: (d / agent steps per episode) / (1 - gamma_c)


def augmented_lagrangian(slack: torch.Tensor, lagrange: torch.Tensor, penalty: torch.Tensor):
    """Augmented Lagrangian for the constraint slack >= 0 (Nocedal & Wright 2006, eq. 17.65; LAMBDA's `penalize`).

    Returns (psi, new_lagrange): psi is added to the actor's loss; the multiplier update uses the current slack.
    """
    g = -slack  # the constraint as g <= 0
    # eq. 17.65: psi = lambda g + c/2 g^2 if lambda + c g > 0, else -lambda^2 / (2c)
    psi = torch.where(lagrange + penalty * g > 0, lagrange * g + 0.5 * penalty * g**2, -(lagrange**2) / (2 * penalty))
    # eq. 17.65, multiplier update: lambda <- max(0, lambda + c g)
    return psi, torch.clamp(lagrange + penalty * g.detach(), min=0.0)


def update_penalty(penalty: torch.Tensor, power_factor: float) -> torch.Tensor:
    """c <- min(c (1 + factor), 1)."""
    return torch.clamp(penalty * (1 + power_factor), max=1.0)  # eq. penalty schedule: c <- min(c (1 + f), 1)


# ------------------------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------------------------


class WorldModel(nn.Module):
    """PlaNet's latent dynamics model: conv encoder -> RSSM (one member: a plain RSSM) -> conv decoder; reward and cost
    heads on the features [z, h]."""

    def __init__(self, action_dim: int, args: Args):
        super().__init__()
        self.encoder = ConvEncoder(3, args.cnn_depth, activation=nn.ReLU, final_activation=True)
        self.rssm = RSSM(action_dim, self.encoder.out_dim, args.deter_dim, args.stoch_dim, args.hidden_dim,
                         ensemble_size=1, min_std=0.1, activation=nn.ELU)
        feat = self.rssm.feature_dim
        self.decoder = ConvDecoder(feat, 3, args.cnn_depth, activation=nn.ReLU)
        self.reward_head = mlp(feat, [args.head_units] * 2, 1, activation=nn.ELU)
        self.cost_head = mlp(feat, [args.head_units] * 2, 1, activation=nn.ELU)
        self.bit_depth = args.bit_depth

    def preprocess(self, obs: torch.Tensor) -> torch.Tensor:
        """uint8 images -> `bit_depth`-bit images in [-0.5, 0.5) plus uniform dequantisation noise (PlaNet), on the
        device (the noise is drawn there too)."""
        bins = 2**self.bit_depth
        x = torch.floor(obs.float() / 2 ** (8 - self.bit_depth)) / bins - 0.5
        return x + torch.rand_like(x) / bins


class BarrierNet(nn.Module):
    """The latent barrier B(z): 3 x 200 ReLU on the stochastic state z, one scalar. B > 0: safe, B < 0: unsafe."""

    def __init__(self, stoch_dim: int, units: int):
        super().__init__()
        self.net = mlp(stoch_dim, [units] * 3, 1, activation=nn.ReLU)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(-1)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy on z (the authors': 4 x 200 ELU, mean 2 tanh(mu / 2), std softplus(. + c) + 1e-4
    with softplus(c) = 2)."""

    def __init__(self, stoch_dim: int, action_dim: int, units: int, mean_scale=2.0, init_std=2.0, min_std=1e-4):
        super().__init__()
        self.net = mlp(stoch_dim, [units] * 4, 2 * action_dim, activation=nn.ELU)
        self.mean_scale, self.min_std = mean_scale, min_std
        self.raw_init_std = math.log(math.exp(init_std) - 1)

    def forward(self, z: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        mean, std = self.net(z).chunk(2, -1)
        mean = self.mean_scale * torch.tanh(mean / self.mean_scale)
        if deterministic:
            return torch.tanh(mean)  # the mode of the pre-tanh Gaussian, squashed
        std = F.softplus(std + self.raw_init_std) + self.min_std
        return torch.tanh(mean + std * torch.randn_like(std))  # reparameterised sample


class Agent(nn.Module):
    """What the policy update trains: the actor and the barrier (one optimiser), the value V(z); for the Lagrangian
    baseline the actor, the value and a cost value V_c(z) (no barrier). All on the stochastic state z."""

    def __init__(self, stoch_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.actor = Actor(stoch_dim, action_dim, args.actor_units)
        self.barrier = BarrierNet(stoch_dim, args.barrier_units) if args.constraint == "barrier" else None
        self.value = mlp(stoch_dim, [args.value_units] * 3, 1, activation=nn.ELU)
        self.cost_value = (mlp(stoch_dim, [args.value_units] * 3, 1, activation=nn.ELU)
                           if args.constraint == "lagrangian" else None)

    def policy_parameters(self) -> list[nn.Parameter]:
        return [*self.actor.parameters(), *([] if self.barrier is None else self.barrier.parameters())]

    def value_parameters(self) -> list[nn.Parameter]:
        return [*self.value.parameters(), *([] if self.cost_value is None else self.cost_value.parameters())]


# ------------------------------------------------------------------------------------------------------------------
# Losses and the update
# ------------------------------------------------------------------------------------------------------------------


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """PlaNet's loss on a replayed batch of (B, T, ...) rows (o_t, a_{t-1}, r_t, c_t): image MSE summed over pixels,
    reward and cost MSE, and KL(posterior || prior) counted as at least `free_nats` for each state.

    Returns (loss, posterior states, metrics).
    """
    images = wm.preprocess(batch["obs"])
    posts, priors = wm.rssm.observe(wm.encoder(images), batch["action"])
    feats = RSSM.features(posts)
    image_loss = (wm.decoder(feats) - images).pow(2).sum((-3, -2, -1)).mean()
    reward_loss = (wm.reward_head(feats).squeeze(-1) - batch["reward"]).pow(2).mean()
    cost_loss = (wm.cost_head(feats).squeeze(-1) - batch["cost"]).pow(2).mean()
    kl = gaussian_kl(posts["mean"], posts["std"], priors["mean"], priors["std"])  # (B, T)
    kl_loss = kl.clamp(min=args.free_nats).mean()
    # eq. world-model loss: ||o - o_hat||^2 + (r - r_hat)^2 + (c - c_hat)^2 + max(KL(q || p), free nats)
    loss = image_loss + reward_loss + cost_loss + kl_loss
    metrics = {"losses/model_loss": loss.detach(), "losses/image_loss": image_loss.detach(),
               "losses/reward_loss": reward_loss.detach(), "losses/cost_loss": cost_loss.detach(),
               "losses/kl": kl.mean().detach(), "charts/real_cost": batch["cost"].mean()}
    return loss, posts, metrics


def imagine(wm: WorldModel, actor: Actor, start: dict, horizon: int) -> dict:
    """Roll the policy out in the model from the (detached) start states: `horizon` states, the start included.

    The actor sees z only, detached (Dreamer); the gradient of later states with respect to the actions flows through
    the model's dynamics. Returns {"stoch": (H, N, S), "deter": (H, N, D)}.
    """
    state = {"deter": start["deter"], "stoch": start["stoch"]}
    stochs, deters = [state["stoch"]], [state["deter"]]
    for _ in range(horizon - 1):
        action = actor(state["stoch"].detach())
        state = wm.rssm.img_step(state, action)  # one member: a plain RSSM prior step, no member draw
        stochs.append(state["stoch"])
        deters.append(state["deter"])
    return {"stoch": torch.stack(stochs), "deter": torch.stack(deters)}


def policy_and_value_losses(wm: WorldModel, agent: Agent, start: dict, args: Args, lagrange_state: dict,
                            budget: float):
    """The policy loss (eq. 5: -lambda-return + beta * barrier loss, or + the augmented Lagrangian's psi) and the value
    losses, from imagined trajectories.

    The policy loss depends on the world model and the value too (gradients flow THROUGH the imagined dynamics);
    `update` differentiates it with respect to the actor's and the barrier's parameters only. The value losses see
    detached states and targets. Returns (policy_loss, value_loss, info) with detached statistics in info.
    """
    traj = imagine(wm, agent.actor, start, args.imag_horizon)
    z, feats = traj["stoch"], torch.cat([traj["stoch"], traj["deter"]], -1)  # (H, N, S), (H, N, S + D)
    reward = wm.reward_head(feats).squeeze(-1)  # reward received on reaching each state
    cost = wm.cost_head(feats).squeeze(-1)
    values = agent.value(z).squeeze(-1)
    returns = lambda_returns(reward[1:], values, args.gamma, args.lambda_)  # (H - 1, N)
    objective = returns.mean()
    info = {"imagined_return": objective.detach(), "imagined_cost": cost.mean().detach()}
    if args.constraint == "barrier":
        unsafe, safe = label_states(cost, args.cost_threshold)
        b = agent.barrier(z)  # (H, N)
        terms = barrier_losses(b, unsafe, safe, args.eta, args.alpha, args.derivative_dt, args.derivative_weight,
                               args.sign_only_hinges)
        barrier_loss = terms["safe"] + terms["unsafe"] + terms["derivative"]
        # eq. 5: L_pi = -E[sum_t R_t^lambda] + beta * L_barrier (barrier and actor trained together)
        policy_loss = -objective + args.beta * barrier_loss
        b_d = b.detach()
        info.update(barrier_loss=barrier_loss.detach(), barrier_safe=terms["safe"].detach(),
                    barrier_unsafe=terms["unsafe"].detach(), barrier_derivative=terms["derivative"].detach(),
                    unsafe_fraction=unsafe.mean(), violation_fraction=terms["violation_fraction"],
                    safe_misclassified=misclassified(b_d <= 0, safe), unsafe_misclassified=misclassified(b_d >= 0, unsafe),
                    barrier_mean=b_d.mean())
    else:  # the LAMBDA-like baseline: an augmented Lagrangian on the mean imagined cost return
        cost_values = agent.cost_value(z).squeeze(-1)
        cost_returns = lambda_returns(cost[1:], cost_values, args.cost_gamma, args.lambda_)
        # eq. constraint: slack = budget - mean_t,n C_t^lambda (>= 0 within budget)
        slack = budget - cost_returns.mean()
        psi, new_lagrange = augmented_lagrangian(slack, lagrange_state["lagrange"], lagrange_state["penalty"])
        policy_loss = -objective + psi
        info.update(slack=slack.detach(), constraint_term=psi.detach(), new_lagrange=new_lagrange.detach(),
                    imagined_cost_return=cost_returns.mean().detach())
    z_d = z[:-1].detach()
    value_loss = 0.5 * (agent.value(z_d).squeeze(-1) - returns.detach()).pow(2).mean()
    if args.constraint == "lagrangian":
        value_loss = value_loss + 0.5 * (agent.cost_value(z_d).squeeze(-1) - cost_returns.detach()).pow(2).mean()
    return policy_loss, value_loss, info


def apply_gradients(params: list, grads, opt: torch.optim.Optimizer, clip: float) -> None:
    """Hand gradients taken with autograd.grad to an optimiser, clipped by their joint norm, and step."""
    for p, g in zip(params, grads):
        p.grad = g
    nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def update_policy(wm: WorldModel, agent: Agent, policy_opt, value_opt, lagrange_state: dict, start: dict, args: Args,
                  budget: float) -> dict:
    """One step of the barrier and the actor together (one optimiser, the gradient of the policy loss with respect to
    their parameters only: it flows THROUGH the world model and the value without changing them), of the value(s),
    and of the Lagrangian baseline's multipliers (in place, on the device). All gradients are taken before any
    parameter changes. Returns detached metrics."""
    policy_loss, value_loss, info = policy_and_value_losses(wm, agent, start, args, lagrange_state, budget)
    policy_params, value_params = agent.policy_parameters(), agent.value_parameters()
    # retain_graph: under torch.compile the policy and value losses leave one compiled forward
    policy_grads = torch.autograd.grad(policy_loss, policy_params, retain_graph=True)
    value_grads = torch.autograd.grad(value_loss, value_params)
    # only now, with every gradient taken, do parameters and the multipliers change (in place)
    apply_gradients(policy_params, policy_grads, policy_opt, args.grad_clip)
    apply_gradients(value_params, value_grads, value_opt, args.grad_clip)
    metrics = {"losses/policy_loss": policy_loss.detach(), "losses/value_loss": value_loss.detach(),
               "charts/imagined_return": info["imagined_return"], "charts/imagined_cost": info["imagined_cost"]}
    if args.constraint == "barrier":
        metrics.update({
            "losses/barrier_loss": info["barrier_loss"], "losses/barrier_safe": info["barrier_safe"],
            "losses/barrier_unsafe": info["barrier_unsafe"], "losses/barrier_derivative": info["barrier_derivative"],
            "charts/unsafe_fraction": info["unsafe_fraction"], "charts/violation_fraction": info["violation_fraction"],
            "charts/safe_misclassified": info["safe_misclassified"],
            "charts/unsafe_misclassified": info["unsafe_misclassified"], "charts/barrier_mean": info["barrier_mean"]})
    else:
        lagrange_state["lagrange"].copy_(info["new_lagrange"])
        lagrange_state["penalty"].copy_(update_penalty(lagrange_state["penalty"], args.penalty_power_factor))
        metrics.update({"charts/lagrange_multiplier": lagrange_state["lagrange"],
                        "charts/penalty_multiplier": lagrange_state["penalty"], "charts/slack": info["slack"],
                        "charts/imagined_cost_return": info["imagined_cost_return"]})
    return metrics


def update(wm: WorldModel, agent: Agent, model_opt, policy_opt, value_opt, lagrange_state: dict, batch: dict,
           args: Args, budget: float) -> dict:
    """One full update (Algorithm 1's inner step): the world model on a replayed batch, then the barrier and actor
    together and the value, in imagination from every posterior state of the batch (`update_policy`).

    Free of host syncs and host-side randomness, so that it can be compiled and captured as one CUDA graph
    (`common.capture.speed_up`). Returns detached metric tensors, read once per round for logging.
    """
    model_params = list(wm.parameters())
    model_loss, posts, metrics = world_model_loss(wm, batch, args)
    apply_gradients(model_params, torch.autograd.grad(model_loss, model_params), model_opt, args.grad_clip)
    if agent.barrier is not None:  # the barrier on the batch's real posterior latents, labelled by the REAL cost
        with torch.no_grad():  # (a check of the separation on real data, not a loss)
            b_real = agent.barrier(posts["stoch"].detach())
            real_unsafe, real_safe = label_states(batch["cost"], args.cost_threshold)
            metrics["charts/real_unsafe_fraction"] = real_unsafe.mean()
            metrics["charts/real_safe_misclassified"] = misclassified(b_real <= 0, real_safe)
            metrics["charts/real_unsafe_misclassified"] = misclassified(b_real >= 0, real_unsafe)
    # imagination starts from every posterior state of the batch (computed before the model's step, detached)
    start = {k: posts[k].detach().reshape(-1, posts[k].shape[-1]) for k in ("deter", "stoch")}
    metrics.update(update_policy(wm, agent, policy_opt, value_opt, lagrange_state, start, args, budget))
    return metrics


# ------------------------------------------------------------------------------------------------------------------
# Environments: common's vision envs; the authors' "last sub-step's cost" needs its own action repeat
# ------------------------------------------------------------------------------------------------------------------


class RepeatKeepingLastCost(gym.Wrapper):
    """An action repeat (reward and cost summed, as common's) that also reports the LAST sub-step's cost in
    `info["last_substep_cost"]` (the authors' code's cost of an agent step), around a make_safety_env env built with
    action_repeat=1; the episode length it reports counts agent steps, as common's does."""

    def __init__(self, env: gym.Env, repeat: int):
        super().__init__(env)
        self.repeat, self.steps = repeat, 0

    def reset(self, **kwargs):
        self.steps = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        total_reward, total_cost = 0.0, 0.0
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total_reward += reward
            total_cost += info["cost"]
            if terminated or truncated:
                break
        self.steps += 1
        info["last_substep_cost"], info["cost"] = info["cost"], total_cost
        if "episode" in info:
            info["episode"] = {**info["episode"], "l": self.steps}
        return obs, total_reward, terminated, truncated, info


def _last_cost_env(env_id: str, seed: int, repeat: int) -> gym.Env:
    return RepeatKeepingLastCost(make_safety_env(env_id, seed=seed, vision=True, image_size=64, action_repeat=1), repeat)


def make_envs(args: Args, asynchronous: bool) -> SafeVectorEnv:
    """64x64 pixel envs through `common`; with `--repeat-cost last`, built so that each step also reports the last
    sub-step's cost (`last_substep_costs`)."""
    if args.repeat_cost == "sum":
        return make_vector_env(args.env_id, args.num_envs, args.seed, asynchronous=asynchronous, vision=True,
                               image_size=64, action_repeat=args.action_repeat)
    thunks = [functools.partial(_last_cost_env, args.env_id, args.seed + i, args.action_repeat)
              for i in range(args.num_envs)]
    if not asynchronous:
        return SafeVectorEnv(gym.vector.SyncVectorEnv(thunks))
    import multiprocessing

    context = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return SafeVectorEnv(gym.vector.AsyncVectorEnv(thunks, context=context))


def last_substep_costs(info: dict, num_envs: int) -> np.ndarray:
    """Each env's last sub-step cost of this step (from the final info where an episode just ended)."""
    costs = np.asarray(info.get("last_substep_cost", np.zeros(num_envs)), dtype=np.float64).copy()
    if "final_info" in info:
        for i in np.flatnonzero(info["_final_info"]):
            costs[i] = info["final_info"][i]["last_substep_cost"]
    return costs


# ------------------------------------------------------------------------------------------------------------------
# Acting, checkpoints, evaluation video: the main loop's helpers
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def policy_step(wm: WorldModel, agent: Agent, obs: torch.Tensor, state: dict, prev_action: torch.Tensor, mode: str,
                noise: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Filter the new observation with the posterior, then act: mode 'random' (uniform actions, the warm-up),
    'explore' (the policy's mode plus N(0, noise), the authors' collection rule) or 'eval' (the mode). Returns
    (action in [-1, 1], the new filter state)."""
    embed = wm.encoder(wm.preprocess(obs))
    state, _ = wm.rssm.obs_step(state, prev_action, embed)
    if mode == "random":
        return torch.rand_like(prev_action) * 2 - 1, state
    action = agent.actor(state["stoch"], deterministic=True)
    if mode == "explore":
        action = (action + noise * torch.randn_like(action)).clamp(-1, 1)
    return action, state


def checkpoint_identity(args: Args, env_id: str) -> dict:
    """What a checkpoint must agree on to be loaded: the env, the tensor shapes, what the stored rows mean."""
    return {"script": "latent_barrier", "env_id": env_id, "constraint": args.constraint,
            "action_repeat": args.action_repeat, "repeat_cost": args.repeat_cost,
            **{k: getattr(args, k) for k in ("deter_dim", "stoch_dim", "hidden_dim", "cnn_depth", "head_units",
                                             "barrier_units", "actor_units", "value_units")}}


def checkpoint_state(wm: WorldModel, agent: Agent, optimisers: dict, lagrange_state: dict, buffer: EpisodeBuffer,
                     logger: Logger, counters: dict, with_buffer: bool) -> dict:
    """Everything a resumed run continues from (the step and the RNG states are added by `Checkpointer.save`)."""
    return {"world_model": wm.state_dict(), "agent": agent.state_dict(),
            "optimisers": {name: opt.state_dict() for name, opt in optimisers.items()},
            "lagrange_state": {k: v.detach().cpu() for k, v in lagrange_state.items()},
            # without the episodes: the sampling RNG only (a resumed run refills the replay)
            "buffer": buffer.state_dict() if with_buffer else {"episodes": [], "rng": buffer.rng.bit_generator.state},
            "logger": logger.state_dict(), "counters": counters}


def load_checkpoint_state(state: dict, wm: WorldModel, agent: Agent, optimisers: dict, lagrange_state: dict,
                          buffer: EpisodeBuffer, logger: Logger) -> dict:
    """Load `checkpoint_state`'s dict into the built modules, in place; returns the counters."""
    wm.load_state_dict(state["world_model"])
    agent.load_state_dict(state["agent"])
    for name, opt in optimisers.items():
        opt.load_state_dict(state["optimisers"][name])
    for k, v in lagrange_state.items():
        v.copy_(state["lagrange_state"][k])  # in place: the (compiled / captured) update holds these tensors
    buffer.load_state_dict(state["buffer"])
    logger.load_state_dict(state["logger"])
    return state["counters"]


def video_frame(obs: np.ndarray, scale: int = 4) -> np.ndarray:
    """A channel-first 64x64 camera image as an (H, W, 3) video frame, enlarged `scale` times by pixel repetition."""
    return np.asarray(obs).transpose(1, 2, 0).repeat(scale, 0).repeat(scale, 1)


def require_sequences(buffer: EpisodeBuffer, length: int) -> None:
    """Stop with a message (not a traceback from `EpisodeBuffer.sample`) when episodes are stored but none holds
    `length` rows (--sequence-length longer than the task's episodes)."""
    lengths = [len(ep["reward"]) for ep in buffer.episodes]
    if lengths and max(lengths) < length:
        raise SystemExit(f"error: --sequence-length {length} is longer than every stored episode ({max(lengths)} rows "
                         f"= agent steps + 1, action repeat included); use --sequence-length <= {max(lengths)}")


def validate(args: Args) -> None:
    """Reject bad input with a message naming the flag and what is accepted."""
    check_positive(args, "total_timesteps", "num_envs", "action_repeat", "train_every", "train_steps",
                   "buffer_capacity", "batch_size", "sequence_length", "deter_dim", "stoch_dim", "hidden_dim",
                   "cnn_depth", "head_units", "model_lr", "eta", "alpha", "derivative_dt", "barrier_units",
                   "cost_limit", "episode_length", "initial_penalty", "cost_value_lr", "actor_units", "value_units",
                   "actor_lr", "value_lr", "adam_eps", "grad_clip", "log_every")
    check_choice(args, "constraint", ["barrier", "lagrangian"])
    check_choice(args, "repeat_cost", ["sum", "last"])
    for name in ("warmup_steps", "action_noise", "free_nats", "beta", "derivative_weight", "initial_lagrangian",
                 "penalty_power_factor", "eval_episodes", "torch_threads", "checkpoint_every"):
        if getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)!r}")
    if args.imag_horizon < 2:
        raise SystemExit(f"error: --imag-horizon must be >= 2 (the trajectory's length, its start state included: "
                         f"at least one imagined step), got {args.imag_horizon!r}")
    if not 0 < args.cost_threshold < 1:
        raise SystemExit(f"error: --cost-threshold must be in (0, 1) (a predicted per-step cost above it labels a "
                         f"state unsafe), got {args.cost_threshold!r}")
    if not 1 <= args.bit_depth <= 8:
        raise SystemExit(f"error: --bit-depth must be in 1..8, got {args.bit_depth!r}")
    for name in ("gamma", "cost_gamma"):
        if not 0 < getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be in (0, 1), got {getattr(args, name)!r}")
    if not 0 <= args.lambda_ <= 1:
        raise SystemExit(f"error: --lambda_ must be in [0, 1], got {args.lambda_!r}")  # tyro keeps lambda_'s "_"
    if args.store_chunk < 0 or 0 < args.store_chunk < args.sequence_length:
        raise SystemExit(f"error: --store-chunk ({args.store_chunk}) must be 0 (whole episodes) "
                         f"or >= --sequence-length ({args.sequence_length})")
    if args.capture_video and args.eval_episodes == 0:
        raise SystemExit("error: --capture-video records the final evaluation episodes, and --eval-episodes is 0: "
                         "give --eval-episodes 1 or more")
    try:
        registered, _ = normalize_env_id(args.env_id, vision=True)
    except ValueError as e:
        raise SystemExit(f"error: --env-id: {e}") from None
    if not re.match(r"Safety(Point|Car|Doggo|Racecar|Ant)", registered):
        raise SystemExit(f"error: --env-id {args.env_id!r} has no vision camera; latent_barrier.py learns from pixels: "
                         "use a Point, Car, Doggo, Racecar or Ant task (Goal, Button, Push, Circle, Run), "
                         "e.g. SafetyPointGoal1")


if __name__ == "__main__":
    start_time = time.time()
    args, resumed = resume_run(tyro.cli(Args), "latent_barrier")  # --resume runs/<run>: that run's flags
    validate(args)
    env_id, _ = normalize_env_id(args.env_id, vision=True)
    if resumed:  # the same run directory, the same TensorBoard curves from the checkpoint's step on
        logger = Logger(os.path.basename(resumed["run_dir"]), args, root=os.path.dirname(resumed["run_dir"]),
                        resume_step=resumed["state"]["step"])
    else:
        logger = Logger(f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}", args)
    seed_everything(args.seed, args.torch_deterministic)
    device = get_device(args.cuda)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    compile_update, cudagraphs = resolve_speed_flags(args.compile, args.cudagraphs, device)

    # environments: 64x64 pixels from the robot's camera, whatever id the user typed
    async_envs = default_async(args.num_envs) if args.async_envs is None else args.async_envs
    envs = make_envs(args, async_envs)
    action_dim = envs.single_action_space.shape[0]
    act_low = envs.single_action_space.low.astype(np.float32)
    act_high = envs.single_action_space.high.astype(np.float32)
    to_env = lambda a: act_low + (a + 1.0) * 0.5 * (act_high - act_low)  # noqa: E731  [-1, 1] -> the env's box

    # models and optimisers; every state an update changes lives on the device and is updated in place
    wm = WorldModel(action_dim, args).to(device)
    agent = Agent(args.stoch_dim, action_dim, args).to(device)
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, eps=args.adam_eps, capturable=cudagraphs)  # noqa: E731
    model_opt = adam(wm.parameters(), args.model_lr)
    policy_opt = adam(agent.policy_parameters(), args.actor_lr)  # the barrier and the actor: ONE optimiser (paper)
    value_opt = adam([{"params": list(agent.value.parameters()), "lr": args.value_lr}]
                     + ([{"params": list(agent.cost_value.parameters()), "lr": args.cost_value_lr}]
                        if agent.cost_value is not None else []), args.value_lr)
    optimisers = {"model": model_opt, "policy": policy_opt, "value": value_opt}
    lagrange_state = {"lagrange": torch.tensor(args.initial_lagrangian, device=device),
                      "penalty": torch.tensor(args.initial_penalty, device=device)}
    budget = safety_budget(args.cost_limit, args.episode_length, args.action_repeat, args.repeat_cost, args.cost_gamma)
    buffer = EpisodeBuffer(args.buffer_capacity, device, seed=args.seed)
    # the eager `update` above, or the same function compiled and/or captured as one CUDA graph
    update_step = speed_up(functools.partial(update, wm, agent, model_opt, policy_opt, value_opt, lagrange_state,
                                             args=args, budget=budget), compile_update, cudagraphs, name="the update")
    safety = ("no barrier (beta 0: the unconstrained Dreamer)" if args.constraint == "barrier" and args.beta == 0
              else f"latent barrier, beta {args.beta}" if args.constraint == "barrier"
              else f"augmented Lagrangian, discounted budget {budget:.3g}")
    print(f"plan: {args.total_timesteps} env steps on {device}, {args.num_envs} envs "
          f"({'worker processes' if async_envs else 'in this process'}), update "
          f"{'compiled' if compile_update else 'eager'}{' + CUDA graph' if cudagraphs else ''}: "
          f"{min(args.warmup_steps, args.total_timesteps)} random-action warm-up steps, then the policy; "
          f"{args.train_steps} updates every {args.train_every} env steps; {safety}; then {args.eval_episodes} "
          f"evaluation episodes{' (recorded)' if args.capture_video else ''}; checkpoints "
          + (f"every {args.checkpoint_every} env steps and " if args.checkpoint_every else "")
          + "at the end of training", flush=True)

    # counters (all in the checkpoint); a resumed run continues them, with its models, optimisers and replay
    global_step, updates, next_train, next_log = 0, 0, args.warmup_steps, args.log_every
    train_episodes, train_violating_episodes, train_cost_sum, train_seconds, wall_seconds = 0, 0, 0.0, 0.0, 0.0
    identity = checkpoint_identity(args, env_id)
    if resumed:
        check_identity(resumed["identity"], identity, resumed["path"])
        counters = load_checkpoint_state(resumed["state"], wm, agent, optimisers, lagrange_state, buffer, logger)
        global_step = resumed["state"]["step"]
        logger.restart_clock(global_step, args.total_timesteps)  # the logger's saved total is the old run's length
        (updates, next_train, next_log, train_episodes, train_violating_episodes, train_cost_sum, train_seconds,
         wall_seconds) = (counters[k] for k in ("updates", "next_train", "next_log", "train_episodes",
                                                "train_violating_episodes", "train_cost_sum", "train_seconds",
                                                "wall_seconds"))
        print(f"resuming {resumed['run_dir']} at step {global_step} "
              f"({'random warm-up' if global_step < args.warmup_steps else 'training'}, {updates} updates, "
              f"{len(buffer)} replayed rows{'' if buffer.episodes else ': the replay refills from now on'}); "
              "environments reset: the episodes in progress at the checkpoint are lost", flush=True)
    checkpointer = Checkpointer(logger.run_dir, args.checkpoint_every, identity, start_step=global_step)
    first_update_after_resume = updates + 1 if resumed else None

    # the start: every env's first row (Dreamer's convention: row t = o_t, a_{t-1}, r_t, c_t)
    obs, _ = envs.reset(seed=args.seed + global_step)  # a resumed run: new episodes, seeded by the step
    zero_action = np.zeros(action_dim, np.float32)
    for i in range(args.num_envs):
        buffer.add({"obs": obs[i], "action": zero_action, "reward": np.float32(0), "cost": np.float32(0)}, i)
    filter_state = wm.rssm.initial(args.num_envs, device)
    prev_action = torch.zeros(args.num_envs, action_dim, device=device)
    if resumed:
        set_rng_state(resumed["state"]["rng"])  # last: everything is built; the run draws on from the checkpoint

    steps_per_iteration = args.num_envs * args.action_repeat
    updates_per_s, last_round = 0.0, {}
    loop_start = time.time()
    while global_step < args.total_timesteps:
        # ---- act: filter the new observation, then the policy's mode plus exploration noise (the authors')
        mode = "random" if global_step < args.warmup_steps else "explore"
        action, filter_state = policy_step(wm, agent, torch.as_tensor(obs, device=device), filter_state, prev_action,
                                           mode, args.action_noise)
        action_np = action.cpu().numpy()
        next_obs, reward, cost, terminated, truncated, info = envs.step(to_env(action_np))
        global_step += steps_per_iteration
        logger.log_costs(global_step, cost)
        for _, episode in finished_episodes(info):
            logger.log_episode(global_step, episode["r"], episode["c"], episode["l"])
            train_episodes, train_cost_sum = train_episodes + 1, train_cost_sum + float(episode["c"])
            train_violating_episodes += int(episode["c"] > args.cost_limit)
        label_cost = cost if args.repeat_cost == "sum" else last_substep_costs(info, args.num_envs)

        # ---- store: the step's row; a finished episode's last row holds its final observation
        done = np.logical_or(terminated, truncated)
        for i in range(args.num_envs):
            last_obs = info["final_observation"][i] if done[i] else next_obs[i]
            row = {"obs": last_obs, "action": action_np[i], "reward": np.float32(reward[i]),
                   "cost": np.float32(label_cost[i])}
            full = args.store_chunk > 0 and len(buffer.open.get(i, [])) + 1 >= args.store_chunk
            buffer.add(row, i, done=bool(done[i]) or full)
            if done[i]:
                first = {"obs": next_obs[i], "action": zero_action, "reward": np.float32(0), "cost": np.float32(0)}
                buffer.add(first, i)  # the new episode's first row
        keep = torch.as_tensor(~done, device=device, dtype=torch.float32)[:, None]
        filter_state = {k: v * keep for k, v in filter_state.items()}
        prev_action = action * keep
        obs = next_obs

        # ---- learn: `train_steps` updates every `train_every` environment steps once warm (a round that falls while
        # no episode is stored yet is skipped)
        if global_step >= next_train and not buffer.episodes:
            next_train += args.train_every * ((global_step - next_train) // args.train_every + 1)
        if global_step >= next_train and buffer.episodes:
            require_sequences(buffer, args.sequence_length)
            next_train += args.train_every
            round_start = time.time()
            for _ in range(args.train_steps):
                # the next batch is sampled on the host while the device still runs the previous update
                metrics = update_step(buffer.sample(args.batch_size, args.sequence_length))
                updates += 1
                if updates == first_update_after_resume:  # logged once, to check a resume against its checkpoint
                    for tag in ("model_loss", "policy_loss", "value_loss"):
                        logger.scalar(f"resume/first_{tag}", metrics[f"losses/{tag}"].item(), global_step)
            # once per round: NaN guard and logging (the only host syncs of the learning step)
            check_finite("world-model loss", metrics["losses/model_loss"])
            check_finite("policy loss", metrics["losses/policy_loss"])
            last_round = {tag: value.item() for tag, value in metrics.items()}  # .item() syncs: the round is done
            for tag, value in last_round.items():
                logger.scalar(tag, value, global_step)
            updates_per_s = args.train_steps / (time.time() - round_start)
            logger.scalar("charts/updates_per_s", updates_per_s, global_step)
            logger.scalar("charts/updates", updates, global_step)
        if global_step >= next_log or global_step >= args.total_timesteps:
            next_log += args.log_every
            extra = f"updates/s={updates_per_s:.2f} updates={updates}"
            if "charts/violation_fraction" in last_round:  # the barrier's state after the last round
                extra += (f" unsafe={last_round['charts/unsafe_fraction']:.3f} "
                          f"violations={last_round['charts/violation_fraction']:.3f}")
            logger.console(global_step, extra)

        # ---- checkpoint: at the end of the iteration (after its logging), every `checkpoint_every` steps and the last
        if checkpointer.due(global_step) or global_step >= args.total_timesteps:
            counters = {"updates": updates, "next_train": next_train, "next_log": next_log,
                        "train_episodes": train_episodes, "train_violating_episodes": train_violating_episodes,
                        "train_cost_sum": train_cost_sum, "train_seconds": train_seconds + time.time() - loop_start,
                        "wall_seconds": wall_seconds + time.time() - start_time}
            checkpointer.save(global_step, checkpoint_state(wm, agent, optimisers, lagrange_state, buffer, logger,
                                                            counters, args.checkpoint_buffer), args)
    train_seconds += time.time() - loop_start
    if args.save_model:
        path = os.path.join(logger.run_dir, f"{args.exp_name}.cleanrl_model")
        torch.save({"world_model": wm.state_dict(), "agent": agent.state_dict(), "args": vars(args)}, path)
        print(f"model saved to {path}", flush=True)

    # final evaluation: the policy's deterministic action (no noise), filtering its own observations, on the training
    # environments reset with a new seed (building Vision environments costs seconds each on a CPU); with
    # --capture-video each counted episode's camera frames are written as an mp4
    eval_returns, eval_costs = [], []
    obs, _ = envs.reset(seed=args.seed + 10_000)
    state = wm.rssm.initial(args.num_envs, device)
    prev = torch.zeros(args.num_envs, action_dim, device=device)
    frames = [[video_frame(obs[i])] if args.capture_video else [] for i in range(args.num_envs)]
    while len(eval_returns) < args.eval_episodes:
        prev, state = policy_step(wm, agent, torch.as_tensor(obs, device=device), state, prev, "eval")
        obs, _, _, terminated, truncated, info = envs.step(to_env(prev.cpu().numpy()))
        done = np.logical_or(terminated, truncated)
        keep = torch.as_tensor(~done, device=device, dtype=torch.float32)[:, None]
        state, prev = {k: v * keep for k, v in state.items()}, prev * keep
        if args.capture_video:
            for i in range(args.num_envs):
                frames[i].append(video_frame(info["final_observation"][i] if done[i] else obs[i]))
        for i, episode in finished_episodes(info):
            if len(eval_returns) < args.eval_episodes:
                eval_returns.append(float(episode["r"]))
                eval_costs.append(float(episode["c"]))
                logger.log_episode(global_step, episode["r"], episode["c"], episode["l"], prefix="eval")
                if args.capture_video:  # real time: Safety-Gymnasium's 30 frames/s over the action repeat
                    save_video(frames[i], video_path(logger.run_dir, "eval", len(eval_returns) - 1),
                               fps=max(1, round(30 / args.action_repeat)))
            frames[i] = [video_frame(obs[i])] if args.capture_video else []  # the next episode's first frame
    if eval_returns:
        print(f"eval: {len(eval_returns)} episodes, return {np.mean(eval_returns):.2f}, cost {np.mean(eval_costs):.2f}"
              + (f"; videos in {os.path.join(logger.run_dir, 'videos')}" if args.capture_video else ""), flush=True)
    envs.close()

    # summary.json: what a sweep compares (sps over the training loop of every segment of a resumed run)
    extras = {"lagrange_multiplier": lagrange_state["lagrange"].item(), "penalty": lagrange_state["penalty"].item()} \
        if args.constraint == "lagrangian" else {}
    path = write_summary(
        logger.run_dir, args, script="latent_barrier", start_time=start_time - wall_seconds, env_id=env_id,
        total_steps=global_step, eval_return=float(np.mean(eval_returns)) if eval_returns else None,
        eval_cost=float(np.mean(eval_costs)) if eval_returns else None,
        train_cost=train_cost_sum / train_episodes if train_episodes else None, train_episodes=train_episodes,
        train_violating_episodes=train_violating_episodes, cost_limit=args.cost_limit, cost_rate=logger.cost_rate,
        sps=global_step / max(train_seconds, 1e-9), eval_returns=eval_returns, eval_costs=eval_costs, updates=updates,
        constraint=args.constraint, beta=args.beta, resumed=resumed is not None, **extras)
    print(f"summary: {path}", flush=True)
    logger.close()
