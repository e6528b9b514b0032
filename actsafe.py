"""ActSafe: Active Exploration with Safety Constraints for Reinforcement Learning, from pixels.

Yarden As, Bhavya Sukhija, Lenart Treven, Carmelo Sferrazza, Stelian Coros, Andreas Krause. ICLR 2025.
arXiv: https://arxiv.org/abs/2410.09486

ActSafe learns a world model that knows what it does not know (here: an RSSM whose transition prior is an
ensemble, so the members' disagreement is the epistemic uncertainty) and acts in two phases. Expansion: an
exploration policy maximises the imagined epistemic uncertainty (OPTIMISM: go where the model is unsure) while
keeping a PESSIMISTIC imagined cost (predicted cost plus alpha times the uncertainty) under the budget. After
`--exploration-steps` a hard switch hands control to the task policy, trained all along to maximise the
extrinsic reward under the same pessimistic constraint. Both policies are Dreamer-style actor-critics trained
by backpropagating lambda-returns through imagined latent trajectories; the constraint is handled by an
augmented Lagrangian (default) or a log barrier (LBSGD).

Paper -> code (the practical, pixel-based ActSafe of the paper's Section 5 and its appendix; see docs/actsafe.md):
- the world model (RSSM, ensemble of whole priors)        -> `WorldModel`, `common.rssm.RSSM`; its loss in the loop
- epistemic uncertainty u_t (normalised disagreement)     -> `epistemic_uncertainty()`          (eq. u_t)
- optimism: intrinsic reward r_explore = scale * u_t      -> `imagined_rewards_and_costs()`
- pessimism: c_t + alpha * u_t                            -> `pessimistic_cost()`
- the two phases (expansion, then exploitation)           -> `phase` in the training loop
- lambda-returns (Dreamer, eq. 6 of Hafner et al. 2020)    -> `lambda_returns()`
- actor objective mean_t gamma^t R_t^lambda (Dreamer)      -> `discounted_mean()` (critic losses weighted alike)
- budget per discounted step = d / T / (1 - gamma)         -> `safety_budget()`
- augmented Lagrangian (Nocedal & Wright eq. 17.65)       -> `augmented_lagrangian()`, `update_penalty()`
- log barrier with LBSGD step size (Usmanova et al.)      -> `log_barrier()`, `lbsgd_step_scale()`, `lbsgd_gradients()`
- Algorithm 1 (collect, fit model, plan in the model)     -> the main loop under `if __name__ == "__main__":`

As the authors' code (github.com/yardenas/actsafe), by default: each ensemble member is a whole transition prior
(its own GRU cell) and the drawn member's h and z continue a rollout; members jittered by the std of one prior's
initial parameters; each member's reward and cost from its own next state (mean over members); the pessimism's u_t
with s = 1; LBSGD's m_0 = m_1 = 1.2e4, eta 0.1, eta_rate 8e-6 and backup step 1e-2 * grad(-slack); rounds that
fall before the first stored episode skipped; the actor's output layer scaled by 0.01; no activation after the
encoder's last convolution.

Deviations (reasons and the other side's flag in docs/actsafe.md):
- Safety-Gymnasium (SafetyPointGoal1 from 64x64 first-person pixels) instead of Safe Adaptation Gym.
- PyTorch instead of JAX; Adam applies the LBSGD-scaled gradient (as the authors' code does).
- The augmented Lagrangian is the default constraint handler (as the issue asks); the authors' default is LBSGD.
- The lambda-return pairs the value of s_{t+1} with the reward received on reaching it (DreamerV3's indexing);
  Dreamer v1 and the authors pair it with the reward predicted at s_t. Benign: a one-step shift of the model's
  reward head, which is fitted for the row convention used here.
- With `--store-chunk N > 0` an unfinished episode is stored in the replay as a sequence of its own once it holds N
  rows; this lets tiny runs (the smoke tests) train before a 1000-step episode ends. Default 0: whole episodes.
- Warm-up actions are uniform in [-1, 1] (the authors' code used [0, 1] by mistake).

Resume, video, summary (docs/actsafe.md): `--checkpoint-every N` writes runs/<run>/checkpoint.pt every N env steps
and at the end of training (world model, both actor-critics, every optimiser, the constraint states, the replay
unless --no-checkpoint-buffer, the counters and phase, the logger, every RNG state); `--resume runs/<run>` continues
it in the same directory and curves. The environments are reset on resume: the episodes in progress are lost.
`--capture-video` records the final evaluation episodes as the 64x64 frames the agent sees, upscaled 4x (Vision
tasks cannot render another camera). Every run ends with runs/<run>/summary.json (cost limit: --cost-limit).

GP variant (`--dynamics gp --env-id SafePendulum`; its own section of this file, "ActSafe with Gaussian-process
dynamics"): the paper's GP setting on a pendulum swing-up with a speed limit (`common/pendulum.py`). An exact GP per
state dimension (gpytorch, ARD squared-exponential kernel, fixed aleatoric noise) predicts x' - x and is refit after
every episode; MPC by CEM over particles x' = x + mu + beta sigma eps; expansion episodes, then the task.
- GP posterior mean and variance, ARD kernel, type-II ML    -> `GPDynamics` (`predict`, `kernel`, `fit`)
- intrinsic reward sum_d log(1 + sigma_ep^2 / sigma_al^2)   -> `intrinsic_reward()`                (eq. intrinsic reward)
- particles x' = x + mu + beta sigma eps                    -> `gp_rollout()`                      (eq. particles)
- optimism: mean over particles of the summed reward        -> `gp_plan_objective()`               (eq. optimism)
- pessimism: max over particles of the trajectory cost      -> `pessimistic_trajectory_cost()`     (eq. pessimism)
- penalised objective J - lambda C_pess, CEM                -> `gp_plan_objective()`, `cem_plan()`
- Algorithm 1 (act, refit, repeat)                          -> `run_gp()`, `mpc_episode()`
Deviations of the GP variant (details in docs/actsafe_gp.md): CEM sizes below the notes' (100 samples,
10 particles, 3 iterations, horizon 15) to fit a CPU; the GP conditions on at most 100 points per output (a greedy
subset: its variance is never below the full data's); optimism as the notes' mean over particles (the co-authors'
planner takes the max); the planner keeps the speed 0.12 rad/s under the limit (it sees agent steps only).
The GP variant checkpoints after every episode by default and resumes exactly (docs/actsafe_gp.md); its videos are
drawn pendulums (`draw_pendulum`); its summary.json's cost limit is 0 (no env step over the speed limit).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import time
from dataclasses import dataclass, fields
from typing import Literal

import gpytorch
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
    check_choice,
    check_finite,
    check_positive,
    finished_episodes,
    get_device,
    make_vector_env,
    mlp,
    normalize_env_id,
    seed_everything,
)
from common.capture import resolve_speed_flags, speed_up
from common.checkpoint import RESUMABLE_CHANGES, Checkpointer, check_identity, resume_run, set_rng_state
from common.envs import default_async
from common.pendulum import DT, MAX_SPEED, PENDULUM_IDS, SPEED_LIMIT, make_safe_pendulum, speed_cost, swing_up_reward
from common.rssm import RSSM, balanced_kl_loss
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
    """record the final evaluation episodes as mp4 under `runs/{run_name}/videos/`: the 64x64 camera frames the agent
    sees, upscaled 4x to 256x256 (Vision tasks cannot render another camera); GP variant: a drawn 128x128 pendulum"""
    save_model: bool = False
    """whether to save the world model and policies into `runs/{run_name}`"""

    # Algorithm specific arguments
    env_id: str = "SafetyPointGoal1"
    """the Safety-Gymnasium task; observations are always the 64x64 pixels of its `vision` camera"""
    dynamics: Literal["rssm", "gp"] = "rssm"
    """'rssm': the pixel world model; 'gp': Gaussian-process dynamics and MPC on SafePendulum (the `--gp-*` flags)"""
    total_timesteps: int = 5_000_000
    """total environment steps of training (action repeat included), the random warm-up and the expansion phase
    among them; the final evaluation episodes come on top (not used with --dynamics gp: see --gp-episodes)"""
    num_envs: int = 10
    """the number of parallel environments"""
    action_repeat: int = 2
    """each action is repeated this many environment steps; rewards and costs are summed"""
    warmup_steps: int = 5000
    """environment steps of uniform random actions before the first model update"""
    exploration: Literal["optimistic", "greedy"] = "optimistic"
    """'optimistic': ActSafe's expansion phase (uncertainty as reward); 'greedy': the task policy acts all along"""
    exploration_steps: int = 500_000
    """environment steps of the expansion phase (the exploration policy acts), then the task policy acts"""
    exploration_reward_scale: float = 10.0
    """the intrinsic reward is this scale times u_t"""
    optimism_gradient: bool = False
    """let the intrinsic reward's gradient flow into the exploration actor (False: stopped, as the authors' code,
    so that the exploration actor learns where u_t is high only through its critic)"""
    epistemic_scale: float = 1.0
    """s in the exploration reward's u_t = 0.5 log(1 + s * disagreement / aleatoric variance) (the pessimism's u_t
    always uses s = 1, as the authors' code does)"""
    pessimism: float = 0.001
    """alpha in the pessimistic imagined cost c + alpha * u_t (0: no pessimism)"""
    constraint: Literal["lagrangian", "lbsgd", "none"] = "lagrangian"
    """how the cost constraint is handled: 'lagrangian' (augmented Lagrangian), 'lbsgd' (log barrier), 'none'"""
    cost_limit: float = 25.0
    """the cost budget d per episode"""
    episode_length: int = 1000
    """environment steps per episode T, used to convert the budget: d / T / (1 - gamma)"""

    # world model
    train_every: int = 1000
    """environment steps between two rounds of updates"""
    train_steps: int = 100
    """updates (world model and actor-critics) per round"""
    catch_up: bool = False
    """run the rounds missed while no episode was stored yet (False: skip them, as the authors' code does)"""
    buffer_capacity: int = 500_000
    """replay capacity in agent steps (1000 episodes of 500 agent steps)"""
    store_chunk: int = 0
    """if > 0, store an unfinished episode as a sequence of its own once it holds this many rows (0: whole episodes)"""
    batch_size: int = 16
    """sequences per model update"""
    sequence_length: int = 50
    """agent steps per sequence"""
    deter_dim: int = 200
    """size of the deterministic (GRU) state"""
    stoch_dim: int = 60
    """size of the stochastic (Gaussian) state"""
    hidden_dim: int = 200
    """hidden size inside the RSSM"""
    ensemble_size: int = 5
    """members of the transition-prior ensemble"""
    ensemble_init_jitter: float | None = None
    """std of the Gaussian jitter added to the members' common initialisation (None: the authors' rule, the std of
    one prior's initial parameters, about 0.043 at the default sizes)"""
    cnn_depth: int = 32
    """channels of the first conv layer (encoder output 32 * depth)"""
    head_units: int = 400
    """units of the reward/cost head (3 layers)"""
    model_lr: float = 3e-4
    """learning rate of the world model"""
    kl_scale: float = 1.0
    """weight of the KL term"""
    kl_balance: float = 0.8
    """KL balancing: weight of KL(sg(posterior) || prior)"""
    free_nats: float = 1.0
    """free nats of the KL term"""

    # actor-critic
    actor_units: int = 400
    """units of the actor (5 layers)"""
    actor_init_scale: float = 0.01
    """the actor's output layer starts with its default weights times this and a zero bias (the authors' 0.01;
    1: PyTorch's default initialisation)"""
    critic_units: int = 400
    """units of the critics (3 layers)"""
    actor_lr: float = 8e-5
    """learning rate of the actors"""
    critic_lr: float = 8e-5
    """learning rate of the critics"""
    adam_eps: float = 1e-5
    """epsilon of every Adam optimiser"""
    grad_clip: float = 100.0
    """gradient-norm clipping of every network"""
    imag_horizon: int = 15
    """length of the imagined trajectories"""
    gamma: float = 0.99
    """discount factor (also of the cost)"""
    lambda_: float = 0.95
    """lambda of the lambda-returns"""
    initial_lagrangian: float = 1e-4
    """initial Lagrange multiplier of the augmented Lagrangian"""
    initial_penalty: float = 5e-8
    """initial penalty multiplier c of the augmented Lagrangian"""
    penalty_power_factor: float = 8e-6
    """c grows by (1 + this) every update, up to 1"""
    lbsgd_eta: float = 0.1
    """initial barrier parameter eta of the log barrier"""
    lbsgd_eta_rate: float = 8e-6
    """eta shrinks by (1 + this) every update with positive slack (the authors' lbsgd.yaml)"""
    lbsgd_m0: float = 1.2e4
    """LBSGD smoothness constant m_0 (step size at most 1 / m_0; the authors' lbsgd.yaml)"""
    lbsgd_m1: float = 1.2e4
    """LBSGD smoothness constant m_1 of the constraint (the authors' lbsgd.yaml)"""
    lbsgd_backup_lr: float = 1e-2
    """infeasible (slack <= 0): the actor's gradient is this times the gradient of -slack (the authors' backup_lr)"""

    # run-time
    torch_threads: int | None = None
    """torch CPU threads (None: 1 for the pixel variant, no contention with the software renderer, much faster on a
    busy CPU; torch's default, every core, for --dynamics gp, whose planner is one batched computation; 0: torch's
    default)"""
    compile: bool | None = None
    """torch.compile the update (None: on with CUDA, off on the CPU; see docs/actsafe.md for its effect on a CPU)"""
    cudagraphs: bool | None = None
    """capture the whole update as one CUDA graph and replay it (None: on with CUDA; needs CUDA)"""
    async_envs: bool | None = None
    """step the envs in worker processes (None: when the machine has 4 or more cores); False: in this process"""
    eval_episodes: int = 1
    """evaluation episodes at the end with the task policy's deterministic action (0: none)"""
    log_every: int = 5000
    """environment steps between console lines"""
    checkpoint_every: int | None = None
    """environment steps between checkpoints to `runs/{run_name}/checkpoint.pt`, also written at the end of training
    (0: only at the end; None: every 100000 env steps, or after every episode with --dynamics gp). Cost at the
    default sizes, measured on a 2-core CPU (docs/actsafe.md, "Resume, video, summary"): networks and optimisers
    115 MiB, plus 1.7 MiB and 0.1-0.3 s of compression per stored episode (1000 env steps), at every checkpoint"""
    checkpoint_buffer: bool = True
    """save the replay buffer in the checkpoint (--no-checkpoint-buffer: smaller, faster files; a resumed run then
    refills the replay and skips the rounds that fall before its first stored episode, as at the start)"""
    resume: str | None = None
    """a run directory runs/<run> to continue; its flags are used, only --total-timesteps/--gp-episodes/
    --checkpoint-every/--capture-video/... may change. The environments are reset: the episodes in progress are lost"""

    # GP variant (--dynamics gp): Gaussian-process dynamics, MPC by the cross-entropy method, on --env-id SafePendulum.
    # Shared with the pixel variant: seed, torch_deterministic, cuda, save_model, env_id, action_repeat,
    # torch_threads, eval_episodes. Any other flag of the pixel variant is rejected with --dynamics gp.
    gp_episodes: int = 10
    """episodes (100 env steps = 50 agent steps each); the GP is refit after every episode"""
    gp_expansion_episodes: int = 5
    """the first episodes plan for the intrinsic reward (expansion), the others for the task reward (0: none)"""
    gp_offline_transitions: int = 100
    """the initial safe data: transitions from states drawn uniformly in angle and within the speed limit, with
    uniform random actions (the co-authors' offline data); not counted as episodes"""
    gp_beta: float = 3.0
    """beta of the particles x' = x + mu + beta sigma eps (0: the 'mean' variant, one particle on the mean)"""
    gp_lambda: float = 1e6
    """penalty on the pessimistic (max over particles) trajectory cost (0: unconstrained)"""
    gp_particles: int = 10
    """particles per action sequence (the notes' 30; fewer to fit the CPU)"""
    gp_samples: int = 100
    """action sequences per CEM iteration (the notes' 1000; fewer to fit the CPU)"""
    gp_elites: int = 10
    """elite sequences per CEM iteration (10% of the samples, as the notes' 100 of 1000)"""
    gp_iterations: int = 3
    """CEM iterations per agent step (the notes' 5; fewer to fit the CPU)"""
    gp_horizon: int = 15
    """planning horizon in agent steps (the notes' 20; on the true dynamics 15 swung up as well or better,
    docs/actsafe_gp.md)"""
    gp_speed_margin: float = 0.12
    """the planner keeps the predicted speed this far under the env's limit: it sees agent steps only, and the
    middle step of the action repeat can be up to 0.118 rad/s faster than both ends"""
    gp_noise_std: float = 1e-3
    """aleatoric std of every state dimension (fixed, the notes' value)"""
    gp_max_points: int = 100
    """the GP conditions on at most this many transitions per output, chosen greedily by posterior variance"""
    gp_fit_steps: int = 200
    """Adam steps on the exact marginal likelihood at each refit (warm-started)"""
    gp_lr: float = 1e-2
    """Adam learning rate of the GP's hyperparameters"""


# ------------------------------------------------------------------------------------------------------------------
# The paper's pieces
# ------------------------------------------------------------------------------------------------------------------


def epistemic_uncertainty(ens_mean: torch.Tensor, ens_std: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Normalised ensemble disagreement; ens_mean, ens_std: (E, ..., S) -> (...).

    Zero when all members predict the same mean.
    """
    epistemic = ens_mean.var(0, unbiased=False).mean(-1)  # mean over dims of the variance over members of mu_e
    aleatoric = ens_std.pow(2).mean(0).mean(-1)  # mean over dims and members of sigma_e^2
    # eq. u_t: u_t = 0.5 log(1 + s * mean_d Var_e(mu_e) / (mean_d mean_e sigma_e^2 + 1e-5))
    return 0.5 * torch.log1p(scale * epistemic / (aleatoric + 1e-5))


def pessimistic_cost(ens_costs: torch.Tensor, uncertainty: torch.Tensor, alpha: float) -> torch.Tensor:
    """ens_costs: (E, ...) costs predicted by each member; uncertainty: (...) -> (...)."""
    # eq. pessimism: c_t = mean_e c_e + alpha * u_t
    return ens_costs.mean(0) + alpha * uncertainty


def lambda_returns(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) returns of an imagined trajectory; rewards (H, N) received on steps 1..H, values (H+1, N) of
    states 0..H -> returns (H, N) of states 0..H-1, bootstrapped with the value of the last state."""
    returns, last = [], values[-1]
    for t in reversed(range(rewards.shape[0])):
        # eq. lambda-return: R_t = r_t + gamma * ((1 - lambda) v(s_{t+1}) + lambda R_{t+1}),  R_H = v(s_H)
        last = rewards[t] + gamma * ((1 - lam) * values[t + 1] + lam * last)
        returns.append(last)
    return torch.stack(returns[::-1])


def discounted_mean(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Mean over an imagined trajectory (H, N) with the step t weighted by gamma^t (Dreamer's actor and critic
    losses; the authors' code weights its objective and critics the same way)."""
    weights = gamma ** torch.arange(x.shape[0], device=x.device, dtype=x.dtype)
    return (weights[:, None] * x).mean()  # eq. Dreamer actor objective: mean_t,n gamma^t R_t^lambda


def safety_budget(cost_limit: float, episode_length: int, gamma: float) -> float:
    """The per-episode cost budget as a budget on a discounted return of per-step costs."""
    return cost_limit / episode_length / (1 - gamma)  # eq. budget: d / T / (1 - gamma)


def augmented_lagrangian(slack: torch.Tensor, lagrange: torch.Tensor, penalty: torch.Tensor):
    """Augmented Lagrangian for the constraint slack >= 0 (Nocedal & Wright 2006, eq. 17.65).

    Returns (psi, new_lagrange): psi is added to the actor's loss; the multiplier update uses the current slack.
    """
    g = -slack  # the constraint as g <= 0
    # eq. 17.65: psi = lambda g + c/2 g^2 if lambda + c g > 0, else -lambda^2 / (2c)
    psi = torch.where(lagrange + penalty * g > 0, lagrange * g + 0.5 * penalty * g**2, -(lagrange**2) / (2 * penalty))
    # eq. 17.65, multiplier update: lambda <- max(0, lambda + c g)
    new_lagrange = torch.clamp(lagrange + penalty * g.detach(), min=0.0)
    return psi, new_lagrange


def update_penalty(penalty: torch.Tensor, power_factor: float) -> torch.Tensor:
    """c <- min(c (1 + factor), 1)."""
    return torch.clamp(penalty * (1 + power_factor), max=1.0)  # eq. penalty schedule: c <- min(c (1 + f), 1)


LBSGD_EPS = 1e-8  # the authors' feasibility threshold: the barrier step needs slack > 1e-8


def log_barrier(slack: torch.Tensor, eta: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-eta log(slack) where slack > 1e-8. Returns (barrier term, feasible flag).

    Guard: with a non-positive slack the log is undefined; the barrier term is then 0 and the caller falls
    back to minimising the cost alone (LBSGD's backup step).
    """
    feasible = slack > LBSGD_EPS
    safe_slack = torch.where(feasible, slack, torch.ones_like(slack))  # never take the log of slack <= 0
    # eq. log barrier: B(slack) = -eta log(slack), defined for slack > 0 only
    return torch.where(feasible, -eta * torch.log(safe_slack), torch.zeros_like(slack)), feasible


def lbsgd_step_scale(slack, loss_grad, constraint_grad, eta, m0, m1, base_lr, eps=1e-8) -> torch.Tensor:
    """LBSGD's adaptive step size (Usmanova et al. 2022) relative to the base learning rate.

    loss_grad: flat gradient of the barrier objective; constraint_grad: flat gradient of f_1 = -slack.
    step = min(alpha / (2 |theta| + sqrt(alpha m1)), 1 / m2), theta = <grad f_1, g / |g|>,
    m2 = m0 + 10 eta m1 / alpha + 8 eta (theta / alpha)^2, with alpha the slack.
    """
    theta = constraint_grad.dot(loss_grad / (loss_grad.norm() + eps))
    # eq. LBSGD step: min(alpha / (2 |theta| + sqrt(alpha m1)), 1 / m2)
    lhs = slack / (2 * theta.abs() + torch.sqrt(slack * m1 + eps))
    m2 = m0 + 10 * eta * m1 / (slack + eps) + 8 * eta * (theta / (slack + eps)) ** 2
    return torch.minimum(lhs, 1 / m2) / base_lr


def lbsgd_gradients(barrier_objective, slack, feasible, params, eta, m0, m1, base_lr, backup_lr):
    """The actor's LBSGD gradients without a device->host sync: both branches are computed and `torch.where` picks.

    Feasible (slack > 1e-8): the barrier objective's gradient times the LBSGD step scale (Adam then applies it).
    Infeasible: the backup step, backup_lr times the gradient of f_1 = -slack (descend the cost return alone), as
    the authors' code. Returns (grads, scale) with scale 0 in the infeasible case.
    """
    g = torch.autograd.grad(barrier_objective, params, retain_graph=True)
    f1 = torch.autograd.grad(-slack, params, retain_graph=True)
    flat_g, flat_f1 = torch.cat([x.flatten() for x in g]), torch.cat([x.flatten() for x in f1])
    scale = lbsgd_step_scale(slack.detach(), flat_g, flat_f1, eta, m0, m1, base_lr)
    scale = torch.where(feasible, scale, torch.zeros_like(scale))  # the formula is NaN for slack <= 0: not used then
    # eq. LBSGD backup step (infeasible): backup_lr * grad f_1
    return [torch.where(feasible, gp * scale, backup_lr * fp) for gp, fp in zip(g, f1)], scale


# ------------------------------------------------------------------------------------------------------------------
# Networks
# ------------------------------------------------------------------------------------------------------------------


class WorldModel(nn.Module):
    """Conv encoder -> RSSM (ensemble prior) -> conv decoder, and one MLP head predicting [reward, cost]."""

    def __init__(self, action_dim: int, args: Args):
        super().__init__()
        self.encoder = ConvEncoder(3, args.cnn_depth, activation=nn.ELU, final_activation=False)  # as the authors
        self.rssm = RSSM(action_dim, self.encoder.out_dim, args.deter_dim, args.stoch_dim, args.hidden_dim,
                         args.ensemble_size, init_jitter=args.ensemble_init_jitter)
        feat = self.rssm.feature_dim
        self.decoder = ConvDecoder(feat, 3, args.cnn_depth, activation=nn.ELU)
        self.heads = mlp(feat, [args.head_units] * 3, 2, activation=nn.ELU)  # [reward, cost]

    @staticmethod
    def preprocess(obs: torch.Tensor) -> torch.Tensor:
        return obs.float() / 255.0 - 0.5  # uint8 images -> [-0.5, 0.5]


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy on the latent features (Dreamer v1 parameterisation)."""

    def __init__(self, feat_dim: int, action_dim: int, units: int, mean_scale=5.0, init_std=5.0, min_std=1e-4,
                 init_scale: float = 0.01):
        super().__init__()
        self.net = mlp(feat_dim, [units] * 5, 2 * action_dim, activation=nn.ELU)
        with torch.no_grad():  # the authors' output layer: weights times init_scale, zero bias (near-zero first means)
            self.net[-1].weight.mul_(init_scale)
            self.net[-1].bias.zero_()
        self.mean_scale, self.min_std = mean_scale, min_std
        self.raw_init_std = math.log(math.exp(init_std) - 1)

    def forward(self, feat: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        mean, std = self.net(feat).chunk(2, -1)
        mean = self.mean_scale * torch.tanh(mean / self.mean_scale)
        if deterministic:
            return torch.tanh(mean)
        std = F.softplus(std + self.raw_init_std) + self.min_std
        return torch.tanh(mean + std * torch.randn_like(std))  # reparameterised sample


class ActorCritic(nn.Module):
    """A policy with its reward critic and cost critic (ActSafe has two: exploration and task)."""

    def __init__(self, feat_dim: int, action_dim: int, args: Args):
        super().__init__()
        self.actor = Actor(feat_dim, action_dim, args.actor_units, init_scale=args.actor_init_scale)
        self.critic = mlp(feat_dim, [args.critic_units] * 3, 1, activation=nn.ELU)
        self.cost_critic = mlp(feat_dim, [args.critic_units] * 3, 1, activation=nn.ELU)


def imagine(wm: WorldModel, actor: Actor, start: dict, horizon: int) -> dict:
    """Roll the policy out in the model for `horizon` steps from the (detached) start states.

    All members step from the same state; one member, drawn per step on the device, continues the rollout with its
    own h and z (as the authors' code). Returns feats (H+1, N, F) of the continuing states 0..H, and for states 1..H
    every member's own next-state features (H, E, N, F) and prior means/stds (H, E, N, S).
    """
    state = {"deter": start["deter"], "stoch": start["stoch"]}
    members = wm.rssm.draw_members(horizon, start["deter"].device)
    feats, member_feats, ens_means, ens_stds = [RSSM.features(state)], [], [], []
    for t in range(horizon):
        action = actor(feats[-1].detach())  # no gradient through the policy's input (Dreamer)
        state = wm.rssm.img_step(state, action, members[t])
        feats.append(RSSM.features(state))
        member_feats.append(RSSM.member_features(state))
        ens_means.append(state["ens_mean"])
        ens_stds.append(state["ens_std"])
    return {"feats": torch.stack(feats), "member_feats": torch.stack(member_feats),
            "ens_mean": torch.stack(ens_means), "ens_std": torch.stack(ens_stds)}


def imagined_rewards_and_costs(wm: WorldModel, traj: dict, args: Args, intrinsic: bool) -> dict:
    """Per-step reward (extrinsic, or the scaled uncertainty when `intrinsic`) and pessimistic cost of states 1..H.

    Each member's reward and cost is the head on that member's own next state; the extrinsic reward is their mean
    (the authors' "bayes" sentiment), the cost their mean plus alpha u_t.
    """
    ens_mean, ens_std = traj["ens_mean"].transpose(0, 1), traj["ens_std"].transpose(0, 1)  # (E, H, N, S)
    heads = wm.heads(traj["member_feats"])  # (H, E, N, 2)
    ens_rewards, ens_costs = heads[..., 0].transpose(0, 1), heads[..., 1].transpose(0, 1)  # (E, H, N)
    # pessimism: u_t with s = 1 whatever --epistemic-scale (the authors' UpperConfidenceBound sentiment)
    u = epistemic_uncertainty(ens_mean, ens_std, args.epistemic_scale)  # (H, N)
    u_pessimism = u if args.epistemic_scale == 1.0 else epistemic_uncertainty(ens_mean, ens_std)
    cost = pessimistic_cost(ens_costs, u_pessimism, args.pessimism)
    if intrinsic:
        # eq. optimism: r_explore = scale * u_t (gradient stopped by default, as in the authors' code)
        reward = args.exploration_reward_scale * (u if args.optimism_gradient else u.detach())
    else:
        reward = ens_rewards.mean(0)
    return {"reward": reward, "cost": cost, "uncertainty": u.detach(), "model_cost": ens_costs.mean(0).detach()}


def actor_critic_losses(wm: WorldModel, ac: ActorCritic, start: dict, args: Args, intrinsic: bool,
                        constraint_state: dict, budget: float):
    """Dreamer actor and critic losses of one actor-critic from imagined trajectories, with the constraint term.

    The actor loss depends on the world model and the critics too (gradients flow THROUGH the imagined dynamics);
    `update_actor_critic` differentiates it with respect to the actor's parameters only. The critic losses see
    detached features and targets, so they reach only the critics. Returns (actor_loss, critic_loss, info) where
    info holds detached tensors (slack, constraint term, uncertainty, ...) and what the constraint update needs.
    """
    traj = imagine(wm, ac.actor, start, args.imag_horizon)
    out = imagined_rewards_and_costs(wm, traj, args, intrinsic)
    values = ac.critic(traj["feats"]).squeeze(-1)  # (H+1, N)
    cost_values = ac.cost_critic(traj["feats"]).squeeze(-1)
    returns = lambda_returns(out["reward"], values, args.gamma, args.lambda_)
    cost_returns = lambda_returns(out["cost"], cost_values, args.gamma, args.lambda_)
    objective = discounted_mean(returns, args.gamma)  # later imagined steps weigh less (Dreamer)
    # eq. constraint: slack = budget - mean_t,n C_t^lambda (>= 0 within budget; unweighted, as the authors do)
    slack = budget - cost_returns.mean()
    if args.constraint == "lagrangian":
        psi, new_lagrange = augmented_lagrangian(slack, constraint_state["lagrange"], constraint_state["penalty"])
        actor_loss = -objective + psi
        info = {"constraint_term": psi.detach(), "new_lagrange": new_lagrange.detach()}
    elif args.constraint == "lbsgd":
        barrier, feasible = log_barrier(slack, constraint_state["eta"])
        # infeasible: LBSGD's backup step descends the constraint f_1 = -slack only
        actor_loss = torch.where(feasible, -objective + barrier, -slack)
        info = {"constraint_term": barrier.detach(), "feasible": feasible, "barrier_objective": -objective + barrier}
    else:
        actor_loss = -objective
        info = {"constraint_term": torch.zeros((), device=slack.device)}
    feats = traj["feats"][:-1].detach()
    critic_loss = discounted_mean(0.5 * (ac.critic(feats).squeeze(-1) - returns.detach()).pow(2), args.gamma)
    critic_loss = critic_loss + discounted_mean(
        0.5 * (ac.cost_critic(feats).squeeze(-1) - cost_returns.detach()).pow(2), args.gamma)
    info.update(slack=slack, objective=objective.detach(), returns=returns.detach(),
                cost_return=cost_returns.mean().detach(),
                uncertainty=out["uncertainty"], imagined_cost=out["model_cost"].mean())
    return actor_loss, critic_loss, info


def world_model_loss(wm: WorldModel, batch: dict, args: Args):
    """Reconstruction + reward + cost NLL (unit variances) + balanced KL against one drawn member per step.

    batch: (B, T, ...) tensors, row t = (o_t, a_{t-1}, r_t, c_t). Returns (loss, posterior states, metrics).
    """
    images = wm.preprocess(batch["obs"])
    posts, priors = wm.rssm.observe(wm.encoder(images), batch["action"])
    feats = RSSM.features(posts)
    heads = wm.heads(feats)
    image_loss = 0.5 * (wm.decoder(feats) - images).pow(2).sum((-3, -2, -1)).mean()
    reward_loss = 0.5 * (heads[..., 0] - batch["reward"]).pow(2).mean()
    cost_loss = 0.5 * (heads[..., 1] - batch["cost"]).pow(2).mean()
    kl_loss, kl_value = balanced_kl_loss(posts, priors, args.kl_balance, args.free_nats)
    # eq. world-model loss: -ln p(o|s) - ln p(r|s) - ln p(c|s) + beta KL_balanced(q || p_e), unit variances
    loss = image_loss + reward_loss + cost_loss + args.kl_scale * kl_loss
    metrics = {"losses/model_loss": loss.detach(), "losses/image_loss": image_loss.detach(),
               "losses/reward_loss": reward_loss.detach(), "losses/cost_loss": cost_loss.detach(),
               "losses/kl": kl_value, "charts/real_cost": batch["cost"].mean()}
    return loss, posts, metrics


def update_actor_critic(wm: WorldModel, ac: ActorCritic, actor_opt, critic_opt, cs: dict, start: dict, args: Args,
                        intrinsic: bool, budget: float, prefix: str) -> dict:
    """One step of the actor (the gradient of its loss w.r.t. its own parameters only: it flows through the model and
    the critics without changing them), of the critics, and of the constraint state `cs` (updated in place, on the
    device). All gradients are taken before any parameter changes. Returns detached metrics."""
    actor_loss, critic_loss, info = actor_critic_losses(wm, ac, start, args, intrinsic, cs, budget)
    actor_params = list(ac.actor.parameters())
    critic_params = [*ac.critic.parameters(), *ac.cost_critic.parameters()]
    metrics = {}
    if args.constraint == "lbsgd":
        # LBSGD: the barrier gradient scaled by the adaptive step size relative to the base lr, or the backup step
        # when infeasible; chosen on the device
        actor_grads, scale = lbsgd_gradients(info["barrier_objective"], info["slack"], info["feasible"], actor_params,
                                             cs["eta"], args.lbsgd_m0, args.lbsgd_m1, args.actor_lr,
                                             args.lbsgd_backup_lr)
        metrics[f"charts/{prefix}lbsgd_step_scale"] = scale.detach()
    else:
        # retain_graph: under torch.compile the actor and critic losses leave one compiled forward
        actor_grads = torch.autograd.grad(actor_loss, actor_params, retain_graph=True)
    critic_grads = torch.autograd.grad(critic_loss, critic_params)
    # only now, with every gradient taken, do parameters and constraint states change (in place)
    for params, grads, opt in ((actor_params, actor_grads, actor_opt), (critic_params, critic_grads, critic_opt)):
        for p, g in zip(params, grads):
            p.grad = g
        nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
    if args.constraint == "lbsgd":
        cs["eta"].copy_(torch.where(info["feasible"], cs["eta"] / (1 + args.lbsgd_eta_rate), cs["eta"]))
        metrics[f"charts/{prefix}barrier_eta"] = cs["eta"]
    if args.constraint == "lagrangian":
        cs["lagrange"].copy_(info["new_lagrange"])
        cs["penalty"].copy_(update_penalty(cs["penalty"], args.penalty_power_factor))
        metrics[f"charts/{prefix}lagrange_multiplier"] = cs["lagrange"]
        metrics[f"charts/{prefix}penalty_multiplier"] = cs["penalty"]
    metrics.update({
        f"losses/{prefix}actor_loss": actor_loss.detach(),
        f"losses/{prefix}critic_loss": critic_loss.detach(),
        f"charts/{prefix}slack": info["slack"].detach(),
        f"charts/{prefix}imagined_cost_return": info["cost_return"],
        f"charts/{prefix}imagined_cost": info["imagined_cost"],
        f"charts/{prefix}uncertainty_mean": info["uncertainty"].mean(),
        f"charts/{prefix}uncertainty_max": info["uncertainty"].max(),
    })
    return metrics


def update(wm: WorldModel, model_opt, acs: dict, actor_opts: dict, critic_opts: dict, constraint_states: dict,
           batch: dict, args: Args, budget: float) -> dict:
    """One full update (Algorithm 1's "fit the model, plan in the model"): the world model on a replayed batch, then
    each actor-critic in `acs` in imagination from every posterior state of the batch.

    Free of host syncs and host-side randomness, so that it can be compiled and captured as one CUDA graph
    (`common.capture.speed_up`); returns detached metric tensors, read once per round for logging.
    """
    model_loss, posts, metrics = world_model_loss(wm, batch, args)
    model_opt.zero_grad(set_to_none=True)
    model_loss.backward()
    nn.utils.clip_grad_norm_(wm.parameters(), args.grad_clip)
    model_opt.step()
    start = {k: posts[k].detach().reshape(-1, posts[k].shape[-1]) for k in ("deter", "stoch")}
    for name, ac in acs.items():  # "explore" (during expansion) and "task"
        prefix = "" if name == "task" else "explore_"
        metrics.update(update_actor_critic(wm, ac, actor_opts[name], critic_opts[name], constraint_states[name], start,
                                           args, intrinsic=(name == "explore"), budget=budget, prefix=prefix))
    return metrics


# ==================================================================================================================
# ActSafe with Gaussian-process dynamics (--dynamics gp)
#
# The setting of the paper's guarantees, on a small task (SafePendulum, `common/pendulum.py`): an exact GP per state
# dimension whose posterior std is the epistemic uncertainty, particles x' = x + mu + beta sigma eps that span the
# model's confidence set, and model-predictive control by the cross-entropy method (CEM) over action sequences.
# Expansion: the mean over particles of the intrinsic reward (optimism); always: the max over particles of the
# trajectory cost, penalised by lambda (pessimism); after expansion the task reward. The GP's intrinsic reward and
# pessimism are not the pixel variant's u_t and c + alpha u_t (different formulas), hence their own functions here.
# Nothing above this banner is used by the GP variant, and nothing below it by the pixel variant, apart from
# `validate()` (whose GP block calls `validate_gp`) and the first lines of the `__main__` block (which call `run_gp`).
# ==================================================================================================================

GP_SHARED_FLAGS = ("exp_name", "seed", "torch_deterministic", "cuda", "capture_video", "save_model", "env_id",
                   "dynamics", "action_repeat", "torch_threads", "eval_episodes", "checkpoint_every",
                   "resume")  # the flags both variants read


def intrinsic_reward(epistemic_var: torch.Tensor, aleatoric_var: torch.Tensor) -> torch.Tensor:
    """The GP's exploration reward, the information gain of observing the transition: (..., D) -> (...)."""
    # eq. intrinsic reward (GP): r_explore(z) = sum_d log(1 + sigma_ep,d(z)^2 / sigma_al,d^2)
    return torch.log1p(epistemic_var / aleatoric_var).sum(-1)


def pessimistic_trajectory_cost(particle_costs: torch.Tensor) -> torch.Tensor:
    """(..., P) trajectory costs of one action sequence under P particles -> (...) the worst of them."""
    # eq. pessimism (GP): C_pess = max_p sum_t c(x_t^p)
    return particle_costs.amax(-1)


class ExactGPModel(gpytorch.models.ExactGP):
    """A batch of independent exact GPs, one per output dimension: zero mean, ARD squared-exponential kernel."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, likelihood, input_dim: int):
        super().__init__(train_x, train_y, likelihood)
        batch = torch.Size([train_y.shape[0]])
        self.mean_module = gpytorch.means.ZeroMean(batch_shape=batch)
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(ard_num_dims=input_dim, batch_shape=batch), batch_shape=batch)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class GPDynamics:
    """The dynamics model: x_{t+1} - x_t ~ GP(z_t), z_t = (x_t, u_t), one exact GP per state dimension.

    Fitting (gpytorch): hyperparameters (ARD lengthscales, output scale) by Adam on the exact marginal likelihood; the
    aleatoric noise is fixed (`--gp-noise-std`). Prediction (`predict`, used by the planner): the exact posterior
    written out from cached solves, float64, all queries in one batch. With more than `--gp-max-points` transitions
    each output conditions on a subset of them chosen greedily by posterior variance (`greedy_subset`).
    """

    def __init__(self, input_dim: int, output_dim: int, noise_std: float, max_points: int, device: torch.device):
        self.noise_var, self.max_points, self.fits = noise_std**2, max_points, 0
        self.likelihood = gpytorch.likelihoods.GaussianLikelihood(
            batch_shape=torch.Size([output_dim]), noise_constraint=gpytorch.constraints.GreaterThan(1e-12))
        self.likelihood.noise = self.noise_var
        self.likelihood.raw_noise.requires_grad_(False)  # aleatoric noise fixed, not fitted
        x0 = torch.zeros(output_dim, 1, input_dim, dtype=torch.float64)
        self.model = ExactGPModel(x0, torch.zeros(output_dim, 1, dtype=torch.float64), self.likelihood, input_dim)
        self.model = self.model.to(device=device, dtype=torch.float64)
        self.likelihood = self.likelihood.to(device=device, dtype=torch.float64)

    @property
    def lengthscale(self) -> torch.Tensor:  # (D, 1, I)
        return self.model.covar_module.base_kernel.lengthscale.detach()

    @property
    def outputscale(self) -> torch.Tensor:  # (D,)
        return self.model.covar_module.outputscale.detach()

    def kernel(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """k_d(a, b) for every output d: a (n, I) or (D, n, I), b (m, I) or (D, m, I) -> (D, n, m)."""
        a, b = a / self.lengthscale, b / self.lengthscale
        sq = a.pow(2).sum(-1)[..., :, None] + b.pow(2).sum(-1)[..., None, :]
        sq = sq.baddbmm_(a, b.transpose(-1, -2), alpha=-2)  # |a|^2 + |b|^2 - 2 a.b, a and b now (D, ., I)
        # eq. ARD squared-exponential kernel: k_d(a, b) = o_d exp(-|(a - b) / l_d|^2 / 2)
        return sq.clamp_min_(0).mul_(-0.5).exp_().mul_(self.outputscale[:, None, None])

    def greedy_subset(self, inputs: torch.Tensor, m: int) -> torch.Tensor:
        """Indices (D, m) of the m inputs, per output, picked one at a time as the one whose target is most uncertain
        given those already picked: a partial pivoted Cholesky decomposition of K + sigma_al^2 I (the 'subset of
        data' approximation with greedy selection, Rasmussen & Williams 2006, 8.3.3). Conditioning on fewer points
        never lowers the posterior variance, so the subset's uncertainty is never below the full data's."""
        n, d = inputs.shape[0], self.outputscale.shape[0]
        rows = torch.arange(d, device=inputs.device)
        var = (self.outputscale[:, None] + self.noise_var).expand(d, n).clone()  # Var(y_i | points picked so far)
        factor = inputs.new_zeros(d, m, n)  # rows of the partial Cholesky factor
        picked = torch.empty(d, m, dtype=torch.long, device=inputs.device)
        for j in range(m):
            i = var.argmax(-1)  # (D,)
            picked[:, j] = i
            k_i = self.kernel(inputs[i][:, None, :], inputs)[:, 0]  # (D, n): row i of K_d, for each output
            k_i = k_i + self.noise_var * (torch.arange(n, device=inputs.device) == i[:, None])
            residual = k_i - torch.einsum("dl,dln->dn", factor[rows, :j, i], factor[:, :j])
            factor[:, j] = residual / var[rows, i, None].sqrt()
            var = var - factor[:, j].pow(2)
            var[rows, i] = -math.inf  # never picked twice
        return picked

    def fit(self, inputs: torch.Tensor, targets: torch.Tensor, steps: int, lr: float) -> float:
        """Refit on all transitions so far: inputs (N, I), targets (N, D). Returns the final negative log marginal
        likelihood per point (mean over outputs)."""
        d = targets.shape[1]
        if self.fits == 0:  # first fit: lengthscales at the inputs' spread, output scales at the targets' variance
            self.model.covar_module.base_kernel.lengthscale = inputs.std(0).clamp_min(1e-2).expand(d, 1, -1)
            self.model.covar_module.outputscale = targets.var(0).clamp_min(1e-6)
        if inputs.shape[0] > self.max_points:  # subset of data, chosen with the current hyperparameters
            picked = self.greedy_subset(inputs, self.max_points)
            x, y = inputs[picked], targets.T.gather(1, picked)  # (D, M, I), (D, M)
        else:
            x, y = inputs.expand(d, -1, -1), targets.T.contiguous()
        self.model.set_train_data(x, y, strict=False)
        self.model.train()
        self.likelihood.train()
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(self.likelihood, self.model)
        opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=lr)
        with gpytorch.settings.max_cholesky_size(10**6):  # always the exact Cholesky (never CG)
            for _ in range(steps):
                opt.zero_grad()
                # eq. type-II maximum likelihood: theta = argmax log p(y_d | X, theta) (gpytorch divides by N)
                loss = -mll(self.model(x), y).sum()
                loss.backward()
                opt.step()
            with torch.no_grad():
                loss = -mll(self.model(x), y).mean()
        self.model.eval()
        self.likelihood.eval()
        self.fits += 1
        # the posterior's cache: K_d + sigma_al^2 I = L L^T, alpha = (K_d + sigma_al^2 I)^-1 y_d, and L^-1
        with torch.no_grad():
            eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
            chol = torch.linalg.cholesky(self.kernel(x, x) + self.noise_var * eye)
            self.train_x = x
            self.alpha = torch.cholesky_solve(y[..., None], chol)  # (D, M, 1)
            self.chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)  # (D, M, M)
        return loss.item()

    def state_dict(self) -> dict:
        """The hyperparameters (the next fit starts from them) and the posterior's cache, for a checkpoint."""
        return {"model": self.model.state_dict(), "fits": self.fits, "train_x": self.train_x, "alpha": self.alpha,
                "chol_inv": self.chol_inv}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.model.eval()
        self.likelihood.eval()
        self.fits = state["fits"]
        device = self.outputscale.device
        self.train_x, self.alpha, self.chol_inv = (state[k].to(device) for k in ("train_x", "alpha", "chol_inv"))

    @torch.no_grad()
    def predict(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and epistemic variance of x_{t+1} - x_t at z (B, I): two (B, D) tensors."""
        k = self.kernel(z, self.train_x)  # (D, B, M)
        # eq. GP posterior mean: mu_d(z) = k_d(z, X) (K_d + sigma_al^2 I)^-1 y_d
        mean = (k @ self.alpha).squeeze(-1)
        # eq. GP posterior variance: sigma_d^2(z) = k_d(z, z) - |L_d^-1 k_d(X, z)|^2
        var = self.outputscale[:, None] - (k @ self.chol_inv.transpose(-1, -2)).square_().sum(-1)
        return mean.T, var.clamp_min(1e-12).T


@torch.no_grad()
def cem_plan(objective, mean: torch.Tensor, num_samples: int, num_elites: int, iterations: int,
             generator: torch.Generator, init_std: float = 0.5, momentum: float = 0.2):
    """The cross-entropy method over action sequences in [-1, 1].

    objective: (S, H, A) candidates -> (S,) scores, higher is better, all candidates in one call. mean (H, A): the warm
    start, always among the candidates. Each iteration refits the sampling Gaussian to the elites (with the co-authors'
    momentum 0.2 and initial std 0.5). Returns the best candidate of all iterations and its score.
    """
    std = torch.full_like(mean, init_std)
    best, best_score = mean.clamp(-1, 1), torch.tensor(-math.inf, dtype=mean.dtype, device=mean.device)
    for _ in range(iterations):
        noise = torch.randn((num_samples, *mean.shape), generator=generator, dtype=mean.dtype, device=mean.device)
        samples = (mean + std * noise).clamp(-1, 1)
        samples[0] = mean.clamp(-1, 1)
        scores = objective(samples)
        elite_scores, top = scores.topk(num_elites)
        elites = samples[top]
        # eq. CEM: mean <- m mean + (1 - m) mean(elites), var <- m var + (1 - m) var(elites)
        mean = momentum * mean + (1 - momentum) * elites.mean(0)
        std = (momentum * std**2 + (1 - momentum) * elites.var(0, unbiased=False)).sqrt()
        better = elite_scores[0] > best_score  # no host sync: the choice stays on the device
        best = torch.where(better, elites[0], best)
        best_score = torch.where(better, elite_scores[0], best_score)
    return best, best_score


def gp_rollout(gp: GPDynamics, x0: torch.Tensor, actions: torch.Tensor, eps: torch.Tensor, beta: float):
    """Every action sequence under every particle through the GP, in one batch per step.

    x0 (D,), actions (S, H, A), eps (P, H, D): the particles' standard normal draws, the same for every candidate
    (common random numbers, as the co-authors' planner). Returns the next states (S, P, H, D) and the epistemic
    variances (S, P, H, D) of the transitions taken from x_0 .. x_{H-1}.
    """
    (num_seq, horizon, _), num_particles = actions.shape, eps.shape[0]
    x = x0.expand(num_seq * num_particles, -1)
    states, variances = [], []
    for t in range(horizon):
        z = torch.cat([x, actions[:, t].repeat_interleave(num_particles, 0)], -1)  # row s * P + p
        mean, var = gp.predict(z)
        # eq. particles: x_{t+1} = x_t + mu(z_t) + beta sigma(z_t) eps_t, eps_t ~ N(0, I)
        x = x + mean + beta * var.sqrt() * eps[:, t].repeat(num_seq, 1)
        states.append(x)
        variances.append(var)
    shape = (num_seq, num_particles, horizon, -1)
    return torch.stack(states, 1).reshape(shape), torch.stack(variances, 1).reshape(shape)


def gp_plan_objective(gp: GPDynamics, x0: torch.Tensor, actions: torch.Tensor, eps: torch.Tensor, args: Args,
                      explore: bool):
    """ActSafe's planning objective for candidates (S, H, A): returns (score, value, pessimistic cost), each (S,).

    value = mean over particles of the summed reward (intrinsic during expansion: optimism through the particles that
    span the confidence set; the task's swing-up reward afterwards); the pessimistic cost = the max over particles
    of the summed speed cost; score = value - lambda * pessimistic cost (budget 0: no step over the limit).
    """
    states, var = gp_rollout(gp, x0, actions, eps, args.gp_beta)
    if explore:
        rewards = intrinsic_reward(var, torch.tensor(gp.noise_var, dtype=var.dtype, device=var.device))
    else:  # the known reward of the states the actions are taken in (x_0 .. x_{H-1})
        prev = torch.cat([x0.expand(*states.shape[:2], 1, -1), states[:, :, :-1]], 2)
        theta = torch.atan2(prev[..., 1], prev[..., 0])
        rewards = swing_up_reward(theta, prev[..., 2], actions[:, None, :, 0])
    # eq. optimism (GP): J = mean_p sum_t r(z_t^p) over the hallucinated particles
    value = rewards.sum(-1).mean(-1)
    cost = pessimistic_trajectory_cost(speed_cost(states[..., 2], gp_speed_limit(args)).sum(-1))
    # eq. penalised objective: J - lambda * max(C_pess - d, 0) with the budget d = 0 (costs are >= 0)
    return value - args.gp_lambda * cost, value, cost


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse instead of returning it to the OS (its M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD raised to 1 GiB, as the environment variables MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ would).
    The planner allocates and frees MB-sized tensors about a hundred times per agent step; with glibc's defaults each
    one is mapped, page-faulted in and unmapped again (a third of a run's CPU time, docs/actsafe_gp.md "Speed").
    Memory use stays that of the largest temporaries. Does nothing where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 30)


def gp_speed_limit(args: Args) -> float:
    """The speed the planner keeps under: the env's limit minus the margin for the unseen repeated steps."""
    return SPEED_LIMIT - args.gp_speed_margin


def offline_safe_data(env, n: int, action_repeat: int, rng: np.random.Generator):
    """The initial safe data (the paper's S_0; the co-authors' offline data): n transitions of one agent step from
    states drawn uniformly in angle and with |speed| within the env's limit, under uniform random actions.
    Returns (inputs (n, 4) = (x, u), targets (n, 3) = x' - x) as float64 arrays."""
    inputs, targets = [], []
    for _ in range(n):
        theta, speed = rng.uniform(-math.pi, math.pi), rng.uniform(-1, 1) * env.unwrapped.speed_limit
        action = rng.uniform(-1, 1, size=1)
        obs, _ = env.reset(options={"state": (theta, speed)})
        next_obs = obs
        for _ in range(action_repeat):
            next_obs, *_ = env.step(action * env.action_space.high)
        inputs.append(np.concatenate([obs, action]))
        targets.append(next_obs - obs)
    return np.array(inputs, dtype=np.float64), np.array(targets, dtype=np.float64)


def draw_pendulum(obs: np.ndarray, size: int = 128) -> np.ndarray:
    """A (size, size, 3) uint8 picture of the pendulum state [cos theta, sin theta, theta_dot] (theta = 0 upright):
    the rod from the pivot, blue, red while the speed is over the limit; below it a bar of |theta_dot| (full width:
    8 rad/s) with a black tick at the limit."""
    image = np.full((size, size, 3), 255, np.uint8)
    over = abs(float(obs[2])) > SPEED_LIMIT
    centre, length = size / 2, 0.38 * size
    for t in np.linspace(0, 1, 4 * size):  # the rod, 3 pixels thick
        row, col = int(centre - t * length * obs[0]), int(centre + t * length * obs[1])
        image[row - 1:row + 2, col - 1:col + 2] = (220, 30, 30) if over else (40, 70, 200)
    image[int(centre) - 3:int(centre) + 4, int(centre) - 3:int(centre) + 4] = 0  # the pivot
    bar = int(min(abs(float(obs[2])) / MAX_SPEED, 1.0) * (size - 1))
    image[size - 8:size - 2, :bar] = (220, 30, 30) if over else (120, 120, 120)
    limit = int(SPEED_LIMIT / MAX_SPEED * (size - 1))
    image[size - 10:size, limit] = 0
    return image


def mpc_episode(env, gp: GPDynamics, args: Args, explore: bool, generator: torch.Generator,
                device: torch.device, frames: list | None = None) -> dict:
    """One episode of model-predictive control on the real env.

    At every agent step: new particle draws, CEM over the GP from the observed state, the first action of the best
    sequence applied `--action-repeat` times; the rest of the sequence warm-starts the next step. Returns the
    transitions (inputs, targets as in `offline_safe_data`), the per-env-step costs and the episode's statistics.
    With `frames` (a list), a drawn picture of every env step's state is appended to it (`draw_pendulum`).
    """
    particles = args.gp_particles if args.gp_beta > 0 else 1  # beta = 0: every particle would be the mean
    obs, _ = env.reset()
    if frames is not None:
        frames.append(draw_pendulum(obs))
    plan = torch.zeros(args.gp_horizon, 1, dtype=torch.float64, device=device)
    inputs, targets, costs, values, pess_costs = [], [], [], [], []
    ep_return, plan_time, done, max_speed = 0.0, 0.0, False, 0.0
    while not done:
        start = time.time()
        x0 = torch.as_tensor(obs, dtype=torch.float64, device=device)
        eps = torch.randn((particles, args.gp_horizon, x0.shape[0]), generator=generator, dtype=torch.float64,
                          device=device)
        best, _ = cem_plan(lambda seqs: gp_plan_objective(gp, x0, seqs, eps, args, explore)[0], plan,
                           args.gp_samples, args.gp_elites, args.gp_iterations, generator)
        _, value, pess_cost = gp_plan_objective(gp, x0, best[None], eps, args, explore)
        plan = torch.cat([best[1:], best[-1:]])  # warm start: the rest of the plan, its last action repeated
        action = best[0].cpu().numpy()
        plan_time += time.time() - start
        next_obs, repeats = obs, 0
        while repeats < args.action_repeat and not done:
            next_obs, reward, terminated, truncated, info = env.step(action * env.action_space.high)
            ep_return, repeats, done = ep_return + reward, repeats + 1, terminated or truncated
            costs.append(info["cost"])
            max_speed = max(max_speed, abs(float(next_obs[2])))
            if frames is not None:
                frames.append(draw_pendulum(next_obs))
        if repeats == args.action_repeat:  # a transition cut short by the time limit is not an agent step
            inputs.append(np.concatenate([obs, action]))
            targets.append(next_obs - obs)
        values.append(value)
        pess_costs.append(pess_cost)
        obs = next_obs
    costs = np.array(costs)
    return {"inputs": np.array(inputs, dtype=np.float64), "targets": np.array(targets, dtype=np.float64),
            "costs": costs, "return": ep_return, "cost": costs.sum(), "length": len(costs),
            "violations": int((costs > 0).sum()), "planned_value": torch.cat(values).mean().item(),
            "upright": float(np.mean(np.array(inputs)[:, 0] > 0.95)),  # agent steps within 18 degrees of upright
            "max_speed": max_speed,
            "planned_cost": torch.cat(pess_costs).mean().item(), "plan_seconds_per_step": plan_time / len(values)}


def check_variant_flags(args: Args) -> None:
    """A flag of the other variant (changed from its default) stops the run: the pixel variant's flags with
    --dynamics gp, the --gp-* flags without it."""
    flag = lambda name: "--lambda_" if name == "lambda_" else "--" + name.replace("_", "-")  # noqa: E731
    changed = [f.name for f in fields(Args) if getattr(args, f.name) != f.default]
    if args.dynamics == "gp":
        given = lambda n: "--no-" + flag(n)[2:] if getattr(args, n) is False else flag(n)  # noqa: E731  as typed
        pixel = [given(n) for n in changed if not n.startswith("gp_") and n not in GP_SHARED_FLAGS]
        if pixel:
            raise SystemExit(f"error: {', '.join(pixel)}: pixel-variant flag(s), not used with --dynamics gp; accepted "
                             f"with it: the --gp-* flags and {', '.join(flag(n) for n in GP_SHARED_FLAGS)}")
    else:
        gp_flags = [flag(n) for n in changed if n.startswith("gp_")]
        if gp_flags:
            raise SystemExit(f"error: {', '.join(gp_flags)}: flag(s) of the GP variant; add --dynamics gp "
                             f"(and --env-id SafePendulum) to use them")


def validate_gp(args: Args) -> None:
    """The GP variant's checks (`validate` calls this instead of the pixel checks with --dynamics gp)."""
    if args.env_id not in PENDULUM_IDS:
        raise SystemExit(f"error: --dynamics gp runs on the pendulum: --env-id accepted: {', '.join(PENDULUM_IDS)}; "
                         f"got {args.env_id!r}")
    check_positive(args, "gp_episodes", "gp_offline_transitions", "gp_particles", "gp_samples", "gp_elites",
                   "gp_iterations", "gp_horizon", "gp_noise_std", "gp_max_points", "gp_lr", "action_repeat")
    for name in ("gp_expansion_episodes", "gp_beta", "gp_lambda", "gp_speed_margin", "gp_fit_steps",
                 "eval_episodes", "torch_threads"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)!r}")
    if args.gp_elites > args.gp_samples:
        raise SystemExit(f"error: --gp-elites ({args.gp_elites}) must be <= --gp-samples ({args.gp_samples})")
    if args.gp_expansion_episodes > args.gp_episodes:
        raise SystemExit(f"error: --gp-expansion-episodes ({args.gp_expansion_episodes}) must be <= --gp-episodes "
                         f"({args.gp_episodes})")
    if args.gp_speed_margin >= SPEED_LIMIT:
        raise SystemExit(f"error: --gp-speed-margin must be below the speed limit {SPEED_LIMIT}, "
                         f"got {args.gp_speed_margin!r}")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise SystemExit(f"error: --checkpoint-every must be >= 0 (0: only after the last episode), "
                         f"got {args.checkpoint_every}")


def run_gp(args: Args, resumed: dict | None = None) -> None:
    """ActSafe with GP dynamics on SafePendulum, Algorithm 1 with a GP and MPC: collect an episode with the planner,
    refit the GP on everything so far, repeat; expansion (intrinsic reward) for the first `--gp-expansion-episodes`
    episodes, the task reward afterwards, the pessimistic constraint throughout.

    Checkpoints after episodes (every one by default): the data, the GP's hyperparameters and posterior cache, the
    planner's generator, the counters and the logger, so that a resumed run continues exactly as the uninterrupted
    one (the pendulum starts every episode hanging down at rest). summary.json's cost limit is 0: the constraint is
    "no env step over the speed limit", an episode violates it when its cost is above 0."""
    start_time = time.time()
    env = make_safe_pendulum()
    identity = {"script": "actsafe", "dynamics": "gp", "env_id": env.spec.id}
    total_steps = args.gp_episodes * env.spec.max_episode_steps
    if resumed:  # the same run directory and TensorBoard curves
        check_identity(resumed["identity"], identity, resumed["path"])
        run_dir = resumed["run_dir"]
        logger = Logger(os.path.basename(run_dir), args, root=os.path.dirname(run_dir), total_steps=total_steps,
                        resume_step=resumed["state"]["step"])
    else:
        run_name = f"{env.spec.id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        logger = Logger(run_name, args, total_steps=total_steps)
    checkpoint_every = env.spec.max_episode_steps if args.checkpoint_every is None else args.checkpoint_every
    seed_everything(args.seed, args.torch_deterministic)
    device = get_device(args.cuda)
    if args.torch_threads:  # None or 0: torch's default, every core (the planner is one batched computation)
        torch.set_num_threads(args.torch_threads)
    keep_freed_memory()
    generator = torch.Generator(device).manual_seed(args.seed)
    env.reset(seed=args.seed)
    particles = args.gp_particles if args.gp_beta > 0 else 1
    n = torch.get_num_threads()
    threads = f" with {n} torch thread{'s' if n > 1 else ''}" if device.type == "cpu" else ""
    print(f"plan: {args.gp_episodes} episodes of {env.spec.max_episode_steps} env steps on {device}{threads}, the first "
          f"{args.gp_expansion_episodes} for the intrinsic reward (expansion), then the swing-up; CEM {args.gp_samples} "
          f"samples x {particles} particle(s) (beta {args.gp_beta}), {args.gp_elites} elites, {args.gp_iterations} "
          f"iterations, horizon {args.gp_horizon}; penalty lambda {args.gp_lambda} on the max over particles of the "
          f"cost of speeds over {gp_speed_limit(args):.2f} rad/s (env limit {SPEED_LIMIT}); GP on at most "
          f"{args.gp_max_points} points per output, {args.gp_offline_transitions} initial safe transitions; "
          f"a checkpoint after every episode that reaches a multiple of {checkpoint_every} env steps, and after the "
          f"last", flush=True)

    to_tensor = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    state_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    gp = GPDynamics(state_dim + action_dim, state_dim, args.gp_noise_std, args.gp_max_points, device)
    if resumed:  # the data, the GP as last fitted, the counters, the planner's generator and every other RNG state
        state = resumed["state"]
        inputs, targets = state["inputs"], state["targets"]
        gp.load_state_dict(state["gp"])
        first_episode, global_step = state["episodes"], state["step"]
        violating_episodes, train_cost = state["violating_episodes"], state["train_cost"]
        generator.set_state(state["generator"])
        logger.load_state_dict(state["logger"])
        logger.total_steps = total_steps  # --gp-episodes may have changed
        set_rng_state(state["rng"])
        print(f"resuming {logger.run_dir} at step {global_step} (episode {first_episode + 1} of {args.gp_episodes}, "
              f"phase {'explore' if first_episode < args.gp_expansion_episodes else 'task'})", flush=True)
    else:  # the initial safe data S_0, and the first fit
        inputs, targets = offline_safe_data(env, args.gp_offline_transitions, args.action_repeat,
                                            np.random.default_rng(args.seed))
        nmll = gp.fit(to_tensor(inputs), to_tensor(targets), args.gp_fit_steps, args.gp_lr)
        check_finite("GP negative log marginal likelihood", nmll)
        logger.scalar("losses/gp_nmll", nmll, 0)
        first_episode, global_step, violating_episodes, train_cost = 0, 0, 0, 0.0
    checkpointer = Checkpointer(logger.run_dir, checkpoint_every, identity, start_step=global_step)

    for episode in range(first_episode, args.gp_episodes):
        # ---- act: MPC over the GP (expansion: intrinsic reward; afterwards: the swing-up), pessimistic constraint
        explore = episode < args.gp_expansion_episodes
        ep = mpc_episode(env, gp, args, explore, generator, device)
        global_step += ep["length"]
        violating_episodes, train_cost = violating_episodes + (ep["violations"] > 0), train_cost + ep["cost"]
        logger.log_costs(global_step, ep["costs"])
        logger.log_episode(global_step, ep["return"], ep["cost"], ep["length"])
        logger.scalar("charts/episodic_violations", ep["violations"], global_step)  # env steps with cost > 0
        logger.scalar("charts/phase", 0.0 if explore else 1.0, global_step)  # 0 expansion, 1 task
        logger.scalar("charts/upright_fraction", ep["upright"], global_step)
        logger.scalar("charts/max_abs_speed", ep["max_speed"], global_step)  # over all env steps
        logger.scalar("charts/planned_value", ep["planned_value"], global_step)
        logger.scalar("charts/planned_pessimistic_cost", ep["planned_cost"], global_step)
        logger.scalar("charts/plan_seconds_per_step", ep["plan_seconds_per_step"], global_step)

        # ---- the model that planned, on the new transitions it has not seen: error, calibration, information gain
        mean, var = gp.predict(to_tensor(ep["inputs"]))
        error = to_tensor(ep["targets"]) - mean
        logger.scalar("charts/gp_rmse", error.pow(2).mean().sqrt().item(), global_step)
        within = error.abs() <= 3 * (var + gp.noise_var).sqrt()  # a calibrated GP: nearly all within 3 std
        logger.scalar("charts/gp_within_3std", within.double().mean().item(), global_step)
        noise = torch.tensor(gp.noise_var, dtype=var.dtype, device=device)
        logger.scalar("charts/intrinsic_return", intrinsic_reward(var, noise).sum().item(), global_step)

        # ---- fit: the GP on all transitions so far
        inputs, targets = np.concatenate([inputs, ep["inputs"]]), np.concatenate([targets, ep["targets"]])
        fit_start = time.time()
        nmll = gp.fit(to_tensor(inputs), to_tensor(targets), args.gp_fit_steps, args.gp_lr)
        check_finite("GP negative log marginal likelihood", nmll)
        logger.scalar("losses/gp_nmll", nmll, global_step)
        logger.scalar("charts/gp_points", gp.train_x.shape[1], global_step)
        logger.scalar("charts/gp_fit_seconds", time.time() - fit_start, global_step)
        logger.console(global_step, f"episode={episode + 1}/{args.gp_episodes} phase={'explore' if explore else 'task'} "
                                    f"violations={ep['violations']} max|speed|={ep['max_speed']:.2f} "
                                    f"plan_s/step={ep['plan_seconds_per_step']:.2f}")

        # ---- checkpoint: every --checkpoint-every env steps (default: every episode) and after the last episode
        if checkpointer.due(global_step) or episode + 1 == args.gp_episodes:
            checkpointer.save(global_step, {"gp": gp.state_dict(), "inputs": inputs, "targets": targets,
                                            "episodes": episode + 1, "violating_episodes": violating_episodes,
                                            "train_cost": train_cost, "generator": generator.get_state(),
                                            "logger": logger.state_dict()}, args)
    sps = logger.sps(global_step)
    print(f"episodes with a violation: {violating_episodes}/{args.gp_episodes}", flush=True)
    if args.save_model:
        path = os.path.join(logger.run_dir, f"{args.exp_name}.cleanrl_model")
        torch.save({"gp_state_dict": gp.model.state_dict(), "inputs": inputs, "targets": targets, "args": vars(args)},
                   path)
        print(f"model saved to {path}", flush=True)

    # final evaluation: the task planner (swing-up reward, pessimistic constraint), its data not kept;
    # --capture-video: each episode drawn (`draw_pendulum`, 128x128, one frame per env step, 20 fps = real time)
    eval_returns, eval_costs = [], []
    for i in range(args.eval_episodes):
        frames = [] if args.capture_video else None
        ep = mpc_episode(env, gp, args, False, generator, device, frames)
        eval_returns.append(float(ep["return"]))
        eval_costs.append(float(ep["cost"]))
        logger.log_episode(global_step, ep["return"], ep["cost"], ep["length"], prefix="eval")
        logger.scalar("eval/episodic_violations", ep["violations"], global_step)
        logger.scalar("eval/upright_fraction", ep["upright"], global_step)
        print(f"eval: return {ep['return']:.2f}, cost {ep['cost']:.3f}, violations {ep['violations']}", flush=True)
        if frames:
            path = save_video(frames, video_path(logger.run_dir, "eval", i), fps=round(1 / DT))
            print(f"video of evaluation episode {i}: {path}", flush=True)
    env.close()
    path = write_summary(
        logger.run_dir, args, script="actsafe", start_time=start_time, env_id=env.spec.id, total_steps=global_step,
        eval_return=float(np.mean(eval_returns)) if eval_returns else None,
        eval_cost=float(np.mean(eval_costs)) if eval_returns else None,
        train_cost=train_cost / args.gp_episodes, train_episodes=args.gp_episodes,
        train_violating_episodes=int(violating_episodes), cost_limit=0.0, cost_rate=logger.cost_rate, sps=sps,
        eval_returns=eval_returns, eval_costs=eval_costs)
    print(f"summary: {path}", flush=True)
    logger.close()


def require_sequences(buffer: EpisodeBuffer, length: int) -> None:
    """Stop with a message (not a traceback from `EpisodeBuffer.sample`) when episodes are stored but none holds
    `length` rows, i.e. --sequence-length is longer than the task's episodes (Safety-Gymnasium's do not end early,
    so the first stored episode already has the full length)."""
    lengths = [len(ep["reward"]) for ep in buffer.episodes]
    if lengths and max(lengths) < length:
        raise SystemExit(f"error: --sequence-length {length} is longer than every stored episode ({max(lengths)} rows "
                         f"= agent steps + 1, action repeat included); use --sequence-length <= {max(lengths)}")


def validate(args: Args) -> None:
    """Reject bad input with a message naming the flag and what is accepted."""
    # the variant: a flag of the other variant is an error; the GP variant has its own checks (not the ones below)
    check_choice(args, "dynamics", ["rssm", "gp"])
    check_variant_flags(args)
    if args.dynamics == "gp":
        return validate_gp(args)
    check_positive(args, "total_timesteps", "num_envs", "action_repeat", "train_every", "train_steps",
                   "buffer_capacity", "batch_size", "sequence_length", "deter_dim", "stoch_dim",
                   "hidden_dim", "ensemble_size", "cnn_depth", "head_units", "actor_units", "critic_units",
                   "model_lr", "actor_lr", "critic_lr", "adam_eps", "grad_clip", "imag_horizon", "cost_limit",
                   "episode_length", "initial_penalty", "lbsgd_eta", "lbsgd_m0", "lbsgd_m1", "lbsgd_backup_lr",
                   "actor_init_scale", "log_every")
    check_choice(args, "exploration", ["optimistic", "greedy"])
    check_choice(args, "constraint", ["lagrangian", "lbsgd", "none"])
    for name in ("warmup_steps", "exploration_steps", "pessimism", "exploration_reward_scale", "epistemic_scale",
                 "initial_lagrangian", "penalty_power_factor", "lbsgd_eta_rate", "eval_episodes", "free_nats",
                 "ensemble_init_jitter", "torch_threads", "checkpoint_every"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)!r}")
    if not 0 < args.gamma < 1:
        raise SystemExit(f"error: --gamma must be in (0, 1) (the budget divides by 1 - gamma), got {args.gamma!r}")
    for name in ("lambda_", "kl_balance"):
        if not 0 <= getattr(args, name) <= 1:
            flag = "--lambda_" if name == "lambda_" else "--" + name.replace("_", "-")  # tyro keeps lambda_'s "_"
            raise SystemExit(f"error: {flag} must be in [0, 1], got {getattr(args, name)!r}")
    if args.ensemble_size < 2:
        raise SystemExit(f"error: --ensemble-size must be >= 2 (the uncertainty is a disagreement), "
                         f"got {args.ensemble_size}")
    if args.store_chunk < 0 or 0 < args.store_chunk < args.sequence_length:
        raise SystemExit(f"error: --store-chunk ({args.store_chunk}) must be 0 (whole episodes) "
                         f"or >= --sequence-length ({args.sequence_length})")
    try:
        normalize_env_id(args.env_id, vision=True)
    except ValueError as e:
        raise SystemExit(f"error: --env-id: {e}") from None


# ---- resume (pixel variant): what a checkpoint holds, and how it is put back ----------------------------------------

# flags a resumed run may change (common.checkpoint's list, the GP variant's length, and whether to record the videos)
MAY_CHANGE_ON_RESUME = RESUMABLE_CHANGES + ("gp_episodes",)


def run_identity(args: Args, env_id: str) -> dict:
    """What a checkpoint must agree with to be loaded: the env and everything that shapes the saved tensors."""
    sizes = ("deter_dim", "stoch_dim", "hidden_dim", "ensemble_size", "cnn_depth", "head_units", "actor_units",
             "critic_units", "exploration")
    return {"script": "actsafe", "dynamics": "rssm", "env_id": env_id, **{k: getattr(args, k) for k in sizes}}


def checkpoint_state(wm, acs, model_opt, actor_opts, critic_opts, constraint_states, buffer, logger, counters,
                     args: Args) -> dict:
    """The pixel loop's whole state; `Checkpointer.save` adds the step, every RNG state and the args."""
    return {
        "world_model": wm.state_dict(),
        "actor_critics": {k: ac.state_dict() for k, ac in acs.items()},
        "model_opt": model_opt.state_dict(),
        "actor_opts": {k: opt.state_dict() for k, opt in actor_opts.items()},
        "critic_opts": {k: opt.state_dict() for k, opt in critic_opts.items()},
        "constraint_states": {k: {n: t.detach().clone() for n, t in cs.items()} for k, cs in constraint_states.items()},
        # the stored episodes (compressed) and the sampling RNG; --no-checkpoint-buffer: the RNG only
        "buffer": (buffer.state_dict() if args.checkpoint_buffer
                   else {"episodes": [], "rng": buffer.rng.bit_generator.state}),
        "logger": logger.state_dict(),
        "counters": counters,
    }


def load_optimizer(opt: torch.optim.Optimizer, saved: dict) -> None:
    """Load an optimiser's state whatever the `capturable` setting of the run that saved it: a checkpoint written with
    CUDA graphs (capturable Adam) resumes on the CPU and vice versa (Adam then moves its step counters as it needs)."""
    capturable = opt.param_groups[0]["capturable"]
    opt.load_state_dict({**saved, "param_groups": [{**g, "capturable": capturable} for g in saved["param_groups"]]})


def load_checkpoint_state(state: dict, wm, acs, model_opt, actor_opts, critic_opts, constraint_states,
                          buffer) -> dict:
    """Put a checkpoint back into the freshly built modules, optimisers, constraint states (in place: the compiled or
    captured update holds these tensors) and replay. Returns the loop's counters."""
    wm.load_state_dict(state["world_model"])
    for k, ac in acs.items():
        ac.load_state_dict(state["actor_critics"][k])
        load_optimizer(actor_opts[k], state["actor_opts"][k])
        load_optimizer(critic_opts[k], state["critic_opts"][k])
        for name, tensor in constraint_states[k].items():
            tensor.copy_(state["constraint_states"][k][name])
    load_optimizer(model_opt, state["model_opt"])
    buffer.load_state_dict(state["buffer"])
    return state["counters"]


if __name__ == "__main__":
    args = tyro.cli(Args)
    args, resumed = resume_run(args, "actsafe", MAY_CHANGE_ON_RESUME)  # --resume runs/<run>: that run's flags
    validate(args)
    if args.dynamics == "gp":  # ActSafe with GP dynamics: its own loop, `run_gp` in the GP section above
        run_gp(args, resumed)
        raise SystemExit(0)
    start_time = time.time()
    env_id, _ = normalize_env_id(args.env_id, vision=True)
    identity = run_identity(args, env_id)
    if resumed:  # the same run directory and TensorBoard curves (what was logged after the checkpoint is dropped)
        check_identity(resumed["identity"], identity, resumed["path"])
        run_dir = resumed["run_dir"]
        logger = Logger(os.path.basename(run_dir), args, root=os.path.dirname(run_dir),
                        resume_step=resumed["state"]["step"])
    else:
        run_name = f"{env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
        logger = Logger(run_name, args)
    seed_everything(args.seed, args.torch_deterministic)
    device = get_device(args.cuda)
    torch_threads = 1 if args.torch_threads is None else args.torch_threads
    if torch_threads > 0:
        torch.set_num_threads(torch_threads)
    compile_update, cudagraphs = resolve_speed_flags(args.compile, args.cudagraphs, device)

    # environments: 64x64 pixels from the robot's camera, whatever id the user typed
    async_envs = default_async(args.num_envs) if args.async_envs is None else args.async_envs
    envs = make_vector_env(args.env_id, args.num_envs, args.seed, asynchronous=async_envs, vision=True,
                           image_size=64, action_repeat=args.action_repeat)
    action_dim = envs.single_action_space.shape[0]
    act_low = envs.single_action_space.low.astype(np.float32)
    act_high = envs.single_action_space.high.astype(np.float32)
    to_env = lambda a: act_low + (a + 1.0) * 0.5 * (act_high - act_low)  # noqa: E731  [-1, 1] -> the env's box

    # models and optimisers; every state an update changes lives on the device and is updated in place
    wm = WorldModel(action_dim, args).to(device)
    feat_dim = wm.rssm.feature_dim
    task_ac = ActorCritic(feat_dim, action_dim, args).to(device)
    explore_ac = ActorCritic(feat_dim, action_dim, args).to(device) if args.exploration == "optimistic" else None
    adam = lambda params, lr: torch.optim.Adam(params, lr=lr, eps=args.adam_eps, capturable=cudagraphs)  # noqa: E731
    model_opt = adam(wm.parameters(), args.model_lr)
    acs = {"task": task_ac} if explore_ac is None else {"explore": explore_ac, "task": task_ac}
    actor_opts = {k: adam(ac.actor.parameters(), args.actor_lr) for k, ac in acs.items()}
    critic_opts = {k: adam([*ac.critic.parameters(), *ac.cost_critic.parameters()], args.critic_lr)
                   for k, ac in acs.items()}
    constraint_states = {k: {"lagrange": torch.tensor(args.initial_lagrangian, device=device),
                             "penalty": torch.tensor(args.initial_penalty, device=device),
                             "eta": torch.tensor(args.lbsgd_eta, device=device)} for k in acs}
    budget = safety_budget(args.cost_limit, args.episode_length, args.gamma)
    buffer = EpisodeBuffer(args.buffer_capacity, device, seed=args.seed)
    checkpoint_every = 100_000 if args.checkpoint_every is None else args.checkpoint_every
    # the update of each phase: the eager `update` above, or the same function compiled and/or captured as a CUDA
    # graph; during expansion both actor-critics are trained, afterwards the task one only
    exploration_end = args.exploration_steps if explore_ac is not None else 0
    phases = {"explore": acs, "task": {"task": task_ac}} if explore_ac is not None else {"task": acs}
    updates_of = {phase: speed_up(functools.partial(update, wm, model_opt, phase_acs, actor_opts, critic_opts,
                                                    constraint_states, args=args, budget=budget),
                                  compile_update, cudagraphs, name=f"the {phase}-phase update")
                  for phase, phase_acs in phases.items()}
    print(f"plan: {args.total_timesteps} env steps on {device}, {args.num_envs} envs "
          f"({'worker processes' if async_envs else 'in this process'}), update "
          f"{'compiled' if compile_update else 'eager'}{' + CUDA graph' if cudagraphs else ''}: "
          f"{min(args.warmup_steps, args.total_timesteps)} random-action warm-up steps; "
          + (f"expansion (exploration policy acts) until step {min(exploration_end, args.total_timesteps)}, then "
             if exploration_end > 0 else "") +
          f"the task policy; {args.train_steps} updates every {args.train_every} env steps; "
          f"{'a checkpoint every ' + str(checkpoint_every) + ' env steps and ' if checkpoint_every else ''}"
          f"a checkpoint at the end of training", flush=True)

    global_step, updates, next_train, next_log = 0, 0, args.warmup_steps, args.log_every
    train_episodes, train_cost, violating_episodes = 0, 0.0, 0  # for summary.json
    if resumed:  # networks, optimisers, multipliers, replay, counters and logger as saved, then every RNG state
        c = load_checkpoint_state(resumed["state"], wm, acs, model_opt, actor_opts, critic_opts, constraint_states,
                                  buffer)
        logger.load_state_dict(resumed["state"]["logger"])
        logger.total_steps = args.total_timesteps  # the saved total is the old one; --total-timesteps may change
        global_step, updates, next_train, next_log = c["global_step"], c["updates"], c["next_train"], c["next_log"]
        train_episodes, train_cost, violating_episodes = c["train_episodes"], c["train_cost"], c["violating_episodes"]
        set_rng_state(resumed["state"]["rng"])
        print(f"resuming {logger.run_dir} at step {global_step} (phase {c['phase']}, {updates} updates, "
              f"{len(buffer.episodes)} stored episodes; the environments restart new episodes)", flush=True)
    checkpointer = Checkpointer(logger.run_dir, checkpoint_every, identity, start_step=global_step)

    # the start: every env's first row (Dreamer's convention: row t = o_t, a_{t-1}, r_t, c_t); a resumed run starts
    # new episodes (seeded by the step, so they differ from the run's first ones)
    obs, _ = envs.reset(seed=args.seed + global_step)
    zero_action = np.zeros(action_dim, np.float32)
    for i in range(args.num_envs):
        buffer.add({"obs": obs[i], "action": zero_action, "reward": np.float32(0), "cost": np.float32(0)}, i)
    filter_state = wm.rssm.initial(args.num_envs, device)
    prev_action = torch.zeros(args.num_envs, action_dim, device=device)

    steps_per_iteration = args.num_envs * args.action_repeat
    updates_per_s = 0.0
    while global_step < args.total_timesteps:
        # ---- act: filter the new observation, then the acting policy of the current phase
        phase = "explore" if global_step < exploration_end else "task"
        with torch.no_grad():
            embed = wm.encoder(wm.preprocess(torch.as_tensor(obs, device=device)))
            filter_state, _ = wm.rssm.obs_step(filter_state, prev_action, embed)
            if global_step < args.warmup_steps:
                action = torch.rand(args.num_envs, action_dim, device=device) * 2 - 1
            else:
                action = acs[phase].actor(RSSM.features(filter_state))
        action_np = action.cpu().numpy()
        next_obs, reward, cost, terminated, truncated, info = envs.step(to_env(action_np))
        global_step += steps_per_iteration
        logger.log_costs(global_step, cost)
        for _, episode in finished_episodes(info):
            logger.log_episode(global_step, episode["r"], episode["c"], episode["l"])
            train_episodes, train_cost = train_episodes + 1, train_cost + episode["c"]
            violating_episodes += episode["c"] > args.cost_limit

        # ---- store: the step's row; a finished episode's last row holds its final observation
        done = np.logical_or(terminated, truncated)
        for i in range(args.num_envs):
            last_obs = info["final_observation"][i] if done[i] else next_obs[i]
            row = {"obs": last_obs, "action": action_np[i], "reward": np.float32(reward[i]),
                   "cost": np.float32(cost[i])}
            full = args.store_chunk > 0 and len(buffer.open.get(i, [])) + 1 >= args.store_chunk
            buffer.add(row, i, done=bool(done[i]) or full)
            if done[i]:
                first = {"obs": next_obs[i], "action": zero_action, "reward": np.float32(0), "cost": np.float32(0)}
                buffer.add(first, i)  # the new episode's first row
        keep = torch.as_tensor(~done, device=device, dtype=torch.float32)[:, None]
        filter_state = {k: v * keep for k, v in filter_state.items()}
        prev_action = action * keep
        obs = next_obs

        # ---- learn: `train_steps` updates every `train_every` environment steps once warm. A round that falls while
        # no episode is stored yet is skipped (the authors' code), or with --catch-up run later, one per iteration
        if global_step >= next_train and not buffer.episodes and not args.catch_up:
            next_train += args.train_every * ((global_step - next_train) // args.train_every + 1)
        if global_step >= next_train and buffer.episodes:
            require_sequences(buffer, args.sequence_length)
            next_train += args.train_every
            round_start = time.time()
            for _ in range(args.train_steps):
                # the next batch is sampled on the host while the device still runs the previous update
                metrics = updates_of[phase](buffer.sample(args.batch_size, args.sequence_length))
                updates += 1
            # once per round: NaN guard and logging (the only host syncs of the learning step)
            check_finite("world-model loss", metrics["losses/model_loss"])
            check_finite("actor loss", metrics["losses/actor_loss"])
            for tag, value in metrics.items():
                logger.scalar(tag, value.item(), global_step)  # .item() syncs, so the round's time is complete
            updates_per_s = args.train_steps / (time.time() - round_start)
            logger.scalar("charts/updates_per_s", updates_per_s, global_step)
            logger.scalar("charts/updates", updates, global_step)
            logger.scalar("charts/phase", 0.0 if phase == "explore" else 1.0, global_step)
            logger.scalar("charts/safety_budget", budget, global_step)
        if global_step >= next_log or global_step >= args.total_timesteps:
            next_log += args.log_every
            logger.scalar("charts/phase", 0.0 if phase == "explore" else 1.0, global_step)  # 0 expansion, 1 task
            logger.console(global_step, f"updates/s={updates_per_s:.2f} updates={updates} phase={phase}")

        # ---- checkpoint: every --checkpoint-every env steps and at the end of training (before the evaluation),
        # at the end of the iteration, after its logging: a resumed run continues with the next iteration
        if checkpointer.due(global_step) or global_step >= args.total_timesteps:
            counters = dict(global_step=global_step, updates=updates, next_train=next_train, next_log=next_log,
                            phase="explore" if global_step < exploration_end else "task",
                            train_episodes=train_episodes, train_cost=train_cost, violating_episodes=violating_episodes)
            checkpointer.save(global_step, checkpoint_state(wm, acs, model_opt, actor_opts, critic_opts,
                                                            constraint_states, buffer, logger, counters, args), args)
    sps = logger.sps(global_step)  # of training (the evaluation below is not counted)
    if args.save_model:
        path = os.path.join(logger.run_dir, f"{args.exp_name}.cleanrl_model")
        torch.save({"world_model": wm.state_dict(), **{f"{k}_actor_critic": ac.state_dict() for k, ac in acs.items()},
                    "args": vars(args)}, path)
        print(f"model saved to {path}", flush=True)

    # final evaluation: the task policy's deterministic action, filtering its own observations, on the training
    # environments reset with a new seed (building Vision environments costs seconds each on a CPU).
    # --capture-video: each evaluation episode's camera frames (what the agent sees), upscaled 4x, as an mp4
    eval_returns, eval_costs = [], []
    obs, _ = envs.reset(seed=args.seed + 10_000)
    state = wm.rssm.initial(args.num_envs, device)
    prev = torch.zeros(args.num_envs, action_dim, device=device)
    frames = [[] for _ in range(args.num_envs)]
    while len(eval_returns) < args.eval_episodes:
        if args.capture_video:
            for i in range(args.num_envs):
                frames[i].append(obs[i])
        with torch.no_grad():
            embed = wm.encoder(wm.preprocess(torch.as_tensor(obs, device=device)))
            state, _ = wm.rssm.obs_step(state, prev, embed)
            prev = task_ac.actor(RSSM.features(state), deterministic=True)
        obs, _, _, terminated, truncated, info = envs.step(to_env(prev.cpu().numpy()))
        keep = torch.as_tensor(~np.logical_or(terminated, truncated), device=device, dtype=torch.float32)[:, None]
        state, prev = {k: v * keep for k, v in state.items()}, prev * keep
        for i, episode in finished_episodes(info):
            if len(eval_returns) < args.eval_episodes:
                eval_returns.append(episode["r"])
                eval_costs.append(episode["c"])
                logger.log_episode(global_step, episode["r"], episode["c"], episode["l"], prefix="eval")
                if args.capture_video:  # the frames o_0 .. o_T: CHW -> HWC, each pixel a 4x4 block
                    video = [f.transpose(1, 2, 0).repeat(4, 0).repeat(4, 1) for f in frames[i]]
                    video.append(info["final_observation"][i].transpose(1, 2, 0).repeat(4, 0).repeat(4, 1))
                    path = save_video(video, video_path(logger.run_dir, "eval", len(eval_returns) - 1), fps=25)
                    print(f"video of evaluation episode {len(eval_returns) - 1}: {path}", flush=True)
            frames[i] = []
    if eval_returns:
        print(f"eval: {len(eval_returns)} episodes, return {np.mean(eval_returns):.2f}, cost {np.mean(eval_costs):.2f}",
              flush=True)
    envs.close()
    path = write_summary(
        logger.run_dir, args, script="actsafe", start_time=start_time, env_id=env_id, total_steps=global_step,
        eval_return=float(np.mean(eval_returns)) if eval_returns else None,
        eval_cost=float(np.mean(eval_costs)) if eval_returns else None,
        train_cost=train_cost / train_episodes if train_episodes else None, train_episodes=train_episodes,
        train_violating_episodes=int(violating_episodes), cost_limit=args.cost_limit, cost_rate=logger.cost_rate,
        sps=sps, updates=updates, eval_returns=[float(r) for r in eval_returns],
        eval_costs=[float(c) for c in eval_costs])
    print(f"summary: {path}", flush=True)
    logger.close()
