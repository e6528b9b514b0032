"""Anomalous State Sequence Modeling to Enhance Safety in Reinforcement Learning (AnoSeqs).

Kweider, Abou Kassem, Sandouk. IEEE Access 2024. https://arxiv.org/abs/2407.19860
No official code exists and only a summary of the paper was available (see docs/anoseqs.md), so every
detail below that the summary does not fix is a documented choice.

Idea. (1) A TD3 agent is trained in a SOURCE environment where entering unsafe states costs nothing real;
the cost is only used to label which state sequences stayed safe. (2) A transformer autoencoder learns to
reconstruct the safe windows of W consecutive observations; its mean absolute reconstruction error is the
anomaly score, and a threshold tau is a high percentile of the scores of held-out safe windows.
(3) A fresh TD3 agent is trained in the safety-critical TARGET environment on a reward penalised by the
detector when the current window looks anomalous; the target's true cost is never shown to the agent,
only logged. Baselines in this file: plain TD3 (`--penalty-coef 0`) and TD3-Lagrangian on the true cost
(`--lagrangian`).

Paper -> code
- stage 1, safe state sequences from the source     -> `run_td3(..., record=True)`, `label_windows()`
- stage 2, transformer autoencoder, MAE score       -> `TransformerAutoencoder`, `anomaly_score()`, `train_detector()`
- threshold from held-out safe windows              -> `percentile_threshold()`
- reward adjusted by the risk, r' = r - lambda s 1[s > tau] -> `shaped_reward()` (binary form: `--penalty-form binary`)
- stage 3, risk-averse TD3 in the target            -> `run_td3(..., detector=...)`
- detector quality on held-out data (ROC AUC)       -> `roc_auc()`
- TD3 (Fujimoto et al. 2018), SafeRL-Kit defaults   -> `Actor`, `QNetwork`, the update block in `run_td3`
- TD3-Lag baseline (SafeRL-Kit)                     -> the `lagrangian` branches in `run_td3`

Documented choices and deviations (details and reasons in docs/anoseqs.md)
- Source/target pair: by default the source is a separate instance of the target task (`--source-env-id`
  empty); its cost only labels windows. A level-0 source (e.g. SafetyPointCircle0) has no cost signal at all,
  so every window would be "safe" and no ROC AUC could be computed; it still works via `--source-env-id`.
- Window: W = 10 consecutive observations ending at every step (stride 1), all features of the flat
  observation, windows never cross an episode boundary; the first W - 1 steps of an episode are padded on the
  left with the episode's first observation, so the target agent gets a score from its first step on.
  A window is unsafe if any of its steps has cost > 0 or is a termination (the episode ended early).
  Min-max normalisation with statistics of the training safe windows.
- Detector: a plain transformer autoencoder with a bottleneck (encoder -> flattened -> latent vector ->
  decoder of self-attention blocks), not TranAD's two-decoder adversarial scheme: a bottleneck is what
  stops the autoencoder from learning the identity and so reconstructing anomalies too.
- The score of the window ending at s_{t+1} shapes the reward r_t of the transition s_t -> s_{t+1}
  (Safety-Gymnasium's cost c_t is also a property of s_{t+1}).
- TD3's delayed policy update counts critic updates (SafeRL-Kit's plain TD3 updated the actor every step).
- With `--num-envs N > 1`, one gradient step per vector step (update-to-data ratio 1/N).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import (
    Logger,
    ReplayBuffer,
    check_choice,
    check_finite,
    check_positive,
    finished_episodes,
    get_device,
    make_safety_env,
    make_vector_env,
    normalize_env_id,
    seed_everything,
)


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled when available"""
    save_model: bool = False
    """whether to save the target agent's actor and critics into the run directory"""
    torch_threads: int = 1
    """CPU threads of torch (these small networks run fastest on one; 0 = torch's default)"""

    # Algorithm specific arguments
    env_id: str = "SafetyAntRun0"
    """the safety-critical TARGET environment (Safety-Gymnasium id)"""
    source_env_id: str = ""
    """the SOURCE environment of stage 1 (empty: a separate instance of `env_id`)"""
    stage: str = "all"
    """which stages to run: all, 1 (source agent), 2 (detector), 3 (target agent)"""
    source_run: str = ""
    """run directory of an earlier run whose artefacts to reuse (source_data.npz for stage 2, detector.pt for stage 3)"""
    source_timesteps: int = 200_000
    """environment steps of the source agent (stage 1)"""
    total_timesteps: int = 500_000
    """environment steps of the target agent (stage 3)"""
    num_envs: int = 1
    """parallel environments (the detector scores all of them in one batch)"""

    # TD3 (SafeRL-Kit defaults)
    buffer_size: int = 1_000_000
    """the replay memory buffer size"""
    gamma: float = 0.99
    """the discount factor gamma"""
    tau: float = 0.005
    """target smoothing coefficient (Polyak averaging) of TD3's target networks"""
    batch_size: int = 256
    """the batch size of sample from the replay memory"""
    learning_rate: float = 3e-4
    """the learning rate of actor and critics (Adam)"""
    hidden_size: int = 256
    """width of the two hidden layers of actor and critics"""
    learning_starts: int = 5_000
    """environment steps of uniformly random actions before learning starts"""
    exploration_noise: float = 0.1
    """standard deviation of the Gaussian exploration noise (in units of the action scale)"""
    policy_noise: float = 0.2
    """standard deviation of the target policy smoothing noise"""
    noise_clip: float = 0.5
    """clip of the target policy smoothing noise"""
    policy_frequency: int = 2
    """critic updates per delayed actor and target-network update"""

    # AnoSeqs: safe windows and the transformer autoencoder (stage 2)
    window_length: int = 10
    """W, the number of consecutive observations in a state window"""
    window_stride: int = 1
    """stride between the end steps of the source windows used to train the detector"""
    holdout_fraction: float = 0.2
    """fraction of the source episodes held out for the threshold and the ROC AUC"""
    detector_d_model: int = 64
    """width of the transformer autoencoder"""
    detector_heads: int = 4
    """attention heads of the transformer autoencoder"""
    detector_layers: int = 1
    """transformer layers in the encoder and in the decoder"""
    detector_latent_dim: int = 32
    """size of the bottleneck vector that summarises a window"""
    detector_steps: int = 5_000
    """gradient steps of the detector's training"""
    detector_batch_size: int = 256
    """windows per gradient step of the detector"""
    detector_lr: float = 1e-3
    """learning rate of the detector (Adam)"""
    threshold_percentile: float = 99.0
    """tau = this percentile of the anomaly scores of held-out safe windows"""

    # AnoSeqs: reward shaping (stage 3)
    penalty_coef: float = 1.0
    """lambda in r' = r - lambda * score * 1[score > tau]; 0 gives plain TD3"""
    penalty_form: str = "proportional"
    """proportional: r - lambda * score * 1[score > tau]; binary: r - lambda * 1[score > tau]"""

    # TD3-Lagrangian baseline (true cost, no detector)
    lagrangian: bool = False
    """if toggled, stage 3 is TD3-Lag on the target's true cost instead of AnoSeqs (needs --penalty-coef 0)"""
    cost_limit: float = 25.0
    """TD3-Lag: allowed expected episodic cost d"""
    lagrange_lr: float = 1e-3
    """TD3-Lag: step size of the multiplier's projected gradient ascent"""
    lagrange_init: float = 0.0
    """TD3-Lag: initial Lagrange multiplier"""

    # Logging and evaluation
    log_every: int = 2_000
    """environment steps between console lines, histograms and the periodic scalars"""
    eval_episodes: int = 5
    """deterministic evaluation episodes at the end of stage 3 (raw return and cost); 0 to skip"""


STAGES = ("all", "1", "2", "3")
PENALTY_FORMS = ("proportional", "binary")


def check_args(args: Args) -> None:
    """Reject bad input with a message naming the flag and what is accepted."""
    check_choice(args, "stage", STAGES)
    check_choice(args, "penalty_form", PENALTY_FORMS)
    check_positive(args, "source_timesteps", "total_timesteps", "num_envs", "buffer_size", "batch_size",
                   "learning_rate", "hidden_size", "policy_frequency", "window_length", "window_stride",
                   "detector_d_model", "detector_heads", "detector_layers", "detector_latent_dim",
                   "detector_steps", "detector_batch_size", "detector_lr", "log_every", "cost_limit", "lagrange_lr")
    if args.learning_starts < 0 or args.eval_episodes < 0 or args.torch_threads < 0 or args.lagrange_init < 0:
        raise SystemExit("error: --learning-starts, --eval-episodes, --torch-threads and --lagrange-init must be >= 0")
    for name in ("exploration_noise", "policy_noise", "noise_clip"):
        if getattr(args, name) < 0:  # a negative clip makes clamp(-c, c) return the constant -c: a silent wrong run
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0 (0 = no noise), "
                             f"got {getattr(args, name)}")
    if not 0.0 < args.holdout_fraction < 1.0:
        raise SystemExit(f"error: --holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
    if not 0.0 < args.threshold_percentile <= 100.0:
        raise SystemExit(f"error: --threshold-percentile must be in (0, 100], got {args.threshold_percentile}")
    if args.penalty_coef < 0:
        raise SystemExit(f"error: --penalty-coef must be >= 0 (0 = plain TD3), got {args.penalty_coef}")
    if not 0.0 < args.gamma < 1.0 or not 0.0 < args.tau <= 1.0:
        raise SystemExit(f"error: --gamma must be in (0, 1) and --tau in (0, 1]; got {args.gamma}, {args.tau}")
    if args.detector_d_model % args.detector_heads:
        raise SystemExit(f"error: --detector-d-model ({args.detector_d_model}) must be divisible by "
                         f"--detector-heads ({args.detector_heads})")
    if args.lagrangian and args.penalty_coef > 0:
        raise SystemExit("error: --lagrangian is the TD3-Lag baseline on the true cost; it does not use the detector, "
                         "so pass --penalty-coef 0 with it")
    baseline = args.lagrangian or args.penalty_coef == 0
    if args.stage in ("1", "2") and baseline:
        raise SystemExit(f"error: --stage {args.stage} builds the detector, which the baselines (--penalty-coef 0, "
                         "--lagrangian) do not use; drop --stage or give --penalty-coef > 0")
    if args.stage == "2" and not args.source_run:
        raise SystemExit("error: --stage 2 trains the detector on the source data of an earlier run: "
                         "give --source-run runs/<run with stage 1>")
    if args.stage == "3" and not baseline and not args.source_run:
        raise SystemExit("error: --stage 3 with --penalty-coef > 0 needs a trained detector: "
                         "give --source-run runs/<run with stage 2>")
    for name, file in (("2", "source_data.npz"), ("3", "detector.pt")):
        if args.stage == name and args.source_run and not (args.stage == "3" and baseline):
            if not os.path.isfile(os.path.join(args.source_run, file)):
                raise SystemExit(f"error: --source-run {args.source_run!r} holds no {file}; stage {name} needs the "
                                 f"output of stage {int(name) - 1} (run --stage all, or --stage {int(name) - 1})")


# --------------------------------------------------------------------------------------------------
# TD3 networks (CleanRL layout)
# --------------------------------------------------------------------------------------------------


class QNetwork(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim + act_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([obs, action], -1)).squeeze(-1)


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, act_dim), nn.Tanh())
        self.register_buffer("action_scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs) * self.action_scale + self.action_bias


# --------------------------------------------------------------------------------------------------
# Stage 1 -> 2: safe windows from the source episodes
# --------------------------------------------------------------------------------------------------


def window_indices(episode_start: np.ndarray, ends: np.ndarray, window: int) -> np.ndarray:
    """Row indices (M, W) of the windows ending at rows `ends`, left-padded with the episode's first row.

    `episode_start[i]` is the row where the episode of row i starts; a window never crosses it.
    """
    idx = ends[:, None] - (window - 1) + np.arange(window)[None, :]
    return np.maximum(idx, episode_start[ends][:, None])


def label_windows(cost: np.ndarray, terminal: np.ndarray, episode_start: np.ndarray, window: int,
                  stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the source data: (end rows, safe flags).

    Row t of an episode holds the observation s_t and the cost/termination of the step that produced it
    (row 0: the reset observation, cost 0). One window ends at every `stride`-th row of each episode; a window
    is safe iff none of its rows has cost > 0 or is a termination (the episode ended early).
    """
    rows = np.arange(len(cost))
    ends = rows[(rows - episode_start) % stride == 0]
    bad = np.concatenate([[0], np.cumsum((cost > 0) | terminal)])  # bad[k] = unsafe rows among rows < k
    first = np.maximum(ends - window + 1, episode_start[ends])
    safe = (bad[ends + 1] - bad[first]) == 0
    return ends, safe


def split_episodes(episode_start: np.ndarray, ends: np.ndarray, fraction: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Boolean mask over `ends`: True for windows of held-out episodes (at least one episode on each side)."""
    episodes = np.unique(episode_start)
    if len(episodes) < 2:
        raise SystemExit(f"error: the source data holds {len(episodes)} episode; the detector needs at least 2 "
                         "(one to train on, one to set the threshold): raise --source-timesteps")
    n_hold = int(np.clip(round(fraction * len(episodes)), 1, len(episodes) - 1))
    held = rng.choice(episodes, size=n_hold, replace=False)
    return np.isin(episode_start[ends], held)


# --------------------------------------------------------------------------------------------------
# Stage 2: the transformer autoencoder and its threshold
# --------------------------------------------------------------------------------------------------


class TransformerAutoencoder(nn.Module):
    """Window (B, W, D) -> transformer encoder -> latent vector -> transformer decoder -> reconstruction (B, W, D).

    Inputs are min-max normalised with the statistics of the source's safe training windows (`lo`, `scale`,
    stored in the module so that a saved detector carries them).
    """

    def __init__(self, obs_dim: int, window: int, d_model: int, heads: int, layers: int, latent_dim: int,
                 lo: np.ndarray | None = None, scale: np.ndarray | None = None):
        super().__init__()
        self.window, self.d_model = window, d_model
        self.register_buffer("lo", torch.zeros(obs_dim) if lo is None else torch.as_tensor(lo, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(obs_dim) if scale is None else torch.as_tensor(scale, dtype=torch.float32))
        self.embed = nn.Linear(obs_dim, d_model)
        self.enc_pos = nn.Parameter(0.02 * torch.randn(1, window, d_model))
        self.dec_pos = nn.Parameter(0.02 * torch.randn(1, window, d_model))

        def block():
            return nn.TransformerEncoder(
                nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True),
                layers, enable_nested_tensor=False)

        self.encoder, self.decoder = block(), block()
        self.to_latent = nn.Linear(window * d_model, latent_dim)
        self.from_latent = nn.Linear(latent_dim, window * d_model)
        self.out = nn.Linear(d_model, obs_dim)

    def normalize(self, windows: torch.Tensor) -> torch.Tensor:
        return (windows - self.lo) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct NORMALISED windows x (B, W, D)."""
        h = self.encoder(self.embed(x) + self.enc_pos)
        z = self.to_latent(h.flatten(1))
        h = self.from_latent(z).view(-1, self.window, self.d_model) + self.dec_pos
        return self.out(self.decoder(h))


def anomaly_score(model: TransformerAutoencoder, windows: torch.Tensor) -> torch.Tensor:
    """Raw windows (B, W, D) -> anomaly scores (B,)."""
    x = model.normalize(windows)
    return (model(x) - x).abs().mean(dim=(1, 2))  # eq. MAE: score = mean_{t,d} |x_{t,d} - x_hat_{t,d}|


def minmax_stats(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature minimum and range of `obs` (N, D); a constant feature gets range 1."""
    lo, hi = obs.min(0), obs.max(0)
    scale = np.where(hi - lo > 1e-6, hi - lo, 1.0)
    return lo.astype(np.float32), scale.astype(np.float32)


def percentile_threshold(scores: np.ndarray, percentile: float) -> float:
    """tau = the `percentile`-th percentile of held-out safe scores (linear interpolation between order statistics)."""
    return float(np.percentile(np.asarray(scores, dtype=np.float64), percentile))


def roc_auc(scores_negative: np.ndarray, scores_positive: np.ndarray) -> float:
    """Area under the ROC curve = P(score of a positive > score of a negative) + 0.5 P(tie) (Mann-Whitney U)."""
    neg, pos = np.asarray(scores_negative, np.float64), np.asarray(scores_positive, np.float64)
    if len(neg) == 0 or len(pos) == 0:
        return float("nan")
    allscores = np.concatenate([neg, pos])
    order = np.argsort(allscores, kind="mergesort")
    ranks = np.empty(len(allscores))
    sorted_scores = allscores[order]
    # average ranks (1-based) over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def score_in_batches(model: TransformerAutoencoder, obs: torch.Tensor, index: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Scores of the windows obs[index] (index: (M, W) rows), batched to bound memory."""
    out = []
    with torch.no_grad():
        for i in range(0, len(index), batch):
            out.append(anomaly_score(model, obs[torch.as_tensor(index[i:i + batch], device=obs.device)]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_detector(args: Args, data: dict, logger: Logger, device: torch.device) -> tuple[TransformerAutoencoder, float, float]:
    """Stage 2: fit the autoencoder on safe training windows; tau from held-out safe windows; ROC AUC. Returns (model, tau, auc)."""
    rng = np.random.default_rng(args.seed)
    obs, start = data["obs"], data["episode_start"]
    ends, safe = label_windows(data["cost"], data["terminal"], start, args.window_length, args.window_stride)
    held = split_episodes(start, ends, args.holdout_fraction, rng)
    train_idx = window_indices(start, ends[safe & ~held], args.window_length)
    hold_idx = window_indices(start, ends[safe & held], args.window_length)
    # every unsafe window (never trained on), at every stride-1 end, so that short cost bursts all count
    all_ends, all_safe = label_windows(data["cost"], data["terminal"], start, args.window_length, 1)
    unsafe_idx = window_indices(start, all_ends[~all_safe], args.window_length)
    if len(train_idx) == 0 or len(hold_idx) == 0:
        raise SystemExit("error: no safe source windows to train on or to set the threshold with "
                         f"({len(train_idx)} train, {len(hold_idx)} held out): raise --source-timesteps")
    print(f"stage 2: {len(train_idx)} safe training windows, {len(hold_idx)} held-out safe windows, "
          f"{len(unsafe_idx)} unsafe windows (W={args.window_length})", flush=True)
    lo, scale = minmax_stats(obs[np.unique(train_idx)])
    model = TransformerAutoencoder(obs.shape[1], args.window_length, args.detector_d_model, args.detector_heads,
                                   args.detector_layers, args.detector_latent_dim, lo, scale).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.detector_lr)
    obs_t = torch.as_tensor(obs, dtype=torch.float32, device=device)
    train_idx_t = torch.as_tensor(train_idx, device=device)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    start_time = time.time()
    for step in range(1, args.detector_steps + 1):
        batch = train_idx_t[torch.randint(len(train_idx_t), (args.detector_batch_size,), generator=gen).to(device)]
        loss = anomaly_score(model, obs_t[batch]).mean()  # MAE reconstruction loss on safe windows
        check_finite("losses/detector_loss", loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(1, args.detector_steps // 20) == 0 or step == args.detector_steps:
            model.eval()
            hold_scores = score_in_batches(model, obs_t, hold_idx[:8192])
            model.train()
            logger.scalar("losses/detector_loss", loss.item(), step)
            logger.scalar("losses/detector_heldout_loss", hold_scores.mean(), step)
            print(f"detector step={step} loss={loss.item():.4f} heldout={hold_scores.mean():.4f} "
                  f"({time.time() - start_time:.0f}s)", flush=True)
    model.eval()
    hold_scores = score_in_batches(model, obs_t, hold_idx)
    unsafe_scores = score_in_batches(model, obs_t, unsafe_idx)
    tau = percentile_threshold(hold_scores, args.threshold_percentile)
    auc = roc_auc(hold_scores, unsafe_scores)
    logger.scalar("charts/anomaly_threshold", tau, args.detector_steps)
    logger.scalar("charts/detector_roc_auc", auc, args.detector_steps)
    logger.scalar("charts/unsafe_flagged_fraction", float((unsafe_scores > tau).mean()) if len(unsafe_scores) else float("nan"),
                  args.detector_steps)
    logger.writer.add_histogram("charts/heldout_safe_score", hold_scores, args.detector_steps)
    if len(unsafe_scores):
        logger.writer.add_histogram("charts/unsafe_score", unsafe_scores, args.detector_steps)
        print(f"stage 2: tau={tau:.4f} (p{args.threshold_percentile:g} of held-out safe scores); ROC AUC safe vs "
              f"unsafe windows = {auc:.3f}; unsafe windows above tau: {(unsafe_scores > tau).mean():.1%}", flush=True)
    else:
        print(f"stage 2: tau={tau:.4f}; the source data holds no unsafe window, so the ROC AUC is undefined", flush=True)
    return model, tau, auc


# --------------------------------------------------------------------------------------------------
# Stage 3: the shaped reward
# --------------------------------------------------------------------------------------------------


def shaped_reward(reward: torch.Tensor, score: torch.Tensor, tau: float, coef: float, form: str) -> torch.Tensor:
    """Reward adjusted by the anomaly score (penalty only when the score exceeds tau)."""
    flagged = (score > tau).to(reward.dtype)
    if form == "binary":
        return reward - coef * flagged  # binary variant: r' = r - lambda * 1[score > tau]
    return reward - coef * score * flagged  # eq. reward shaping: r' = r - lambda * score * 1[score > tau]


# --------------------------------------------------------------------------------------------------
# TD3 (stages 1 and 3)
# --------------------------------------------------------------------------------------------------


def run_td3(args: Args, env_id: str, total_timesteps: int, logger: Logger, device: torch.device, seed: int,
            record: bool = False, detector: TransformerAutoencoder | None = None, tau_threshold: float = 0.0,
            lagrangian: bool = False):
    """Train TD3 on `env_id`. Stage 1: `record=True` returns the source data. Stage 3: `detector` shapes the reward,
    or `lagrangian=True` runs TD3-Lag on the true cost. Returns (actor, critics, source data or None)."""
    envs = make_vector_env(env_id, args.num_envs, seed)
    obs_dim = envs.single_observation_space.shape[0]
    act_space = envs.single_action_space
    act_dim = act_space.shape[0]
    if detector is not None and detector.lo.shape[0] != obs_dim:
        raise SystemExit(f"error: the detector was trained on observations of size {detector.lo.shape[0]} but "
                         f"{env_id} has {obs_dim}: use a source run of a task with the same observation space")

    actor = Actor(obs_dim, act_dim, args.hidden_size, act_space.low, act_space.high).to(device)
    actor_target = Actor(obs_dim, act_dim, args.hidden_size, act_space.low, act_space.high).to(device)
    actor_target.load_state_dict(actor.state_dict())
    qf1, qf2 = QNetwork(obs_dim, act_dim, args.hidden_size).to(device), QNetwork(obs_dim, act_dim, args.hidden_size).to(device)
    qf1_target, qf2_target = (QNetwork(obs_dim, act_dim, args.hidden_size).to(device),
                              QNetwork(obs_dim, act_dim, args.hidden_size).to(device))
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_params = list(qf1.parameters()) + list(qf2.parameters())
    if lagrangian:  # TD3-Lag: a cost critic and a multiplier
        qc = QNetwork(obs_dim, act_dim, args.hidden_size).to(device)
        qc_target = QNetwork(obs_dim, act_dim, args.hidden_size).to(device)
        qc_target.load_state_dict(qc.state_dict())
        q_params += list(qc.parameters())
        lagrange_multiplier = args.lagrange_init
        max_ep_len = envs.env.envs[0].spec.max_episode_steps or 1000
        # the episodic cost limit d as a per-state Q_c limit (SafeRL-Kit's conversion)
        qc_limit = args.cost_limit * (1 - args.gamma ** max_ep_len) / (1 - args.gamma) / max_ep_len
    q_optimizer = torch.optim.Adam(q_params, lr=args.learning_rate)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate)
    action_scale = actor.action_scale
    low = torch.as_tensor(act_space.low, dtype=torch.float32, device=device)
    high = torch.as_tensor(act_space.high, dtype=torch.float32, device=device)

    rb = ReplayBuffer(args.buffer_size, {"obs": ((obs_dim,), np.float32), "action": ((act_dim,), np.float32),
                                         "reward": ((), np.float32), "cost": ((), np.float32),
                                         "next_obs": ((obs_dim,), np.float32), "done": ((), np.float32)},
                      device, seed=seed)
    obs, _ = envs.reset(seed=seed)
    envs.action_space.seed(seed)
    if record:  # stage 1: rows (obs, cost, terminal) per episode, row 0 = the reset observation
        open_eps = [[(obs[i].copy(), 0.0, False)] for i in range(args.num_envs)]
        closed_eps = []
    if detector is not None:  # stage 3: a rolling window per env, padded with the episode's first observation
        windows = torch.as_tensor(obs, dtype=torch.float32, device=device)[:, None].repeat(1, args.window_length, 1)
        interval_scores, score_time = [], 0.0
        all_scores, all_costs = [], []
    interval_flagged = interval_steps = 0
    updates = actor_updates = 0
    # SPS of this stage only: with --stage all the stage-3 logger was created before stages 1 and 2 ran
    logger.restart_clock(0, total_timesteps)
    start_time = logger.start_time
    num_iterations = -(-total_timesteps // args.num_envs)
    for iteration in range(1, num_iterations + 1):
        global_step = iteration * args.num_envs
        if global_step <= args.learning_starts:
            actions = envs.action_space.sample()
        else:
            with torch.no_grad():
                a = actor(torch.as_tensor(obs, dtype=torch.float32, device=device))
                a = a + torch.randn_like(a) * action_scale * args.exploration_noise
                actions = a.clamp(low, high).cpu().numpy()

        next_obs, rewards, costs, terminations, truncations, infos = envs.step(actions)
        for i, ep in finished_episodes(infos):
            logger.log_episode(global_step, ep["r"], ep["c"], ep["l"])
        logger.log_costs(global_step, costs)  # the true cost: logged, never shown to the AnoSeqs/TD3 agent
        real_next_obs = next_obs.copy()
        for i in np.flatnonzero(np.logical_or(terminations, truncations)):
            real_next_obs[i] = infos["final_observation"][i]
        if record:
            for i in range(args.num_envs):
                open_eps[i].append((real_next_obs[i].copy(), float(costs[i]), bool(terminations[i])))
                if terminations[i] or truncations[i]:
                    closed_eps.append(open_eps[i])
                    open_eps[i] = [(next_obs[i].copy(), 0.0, False)]

        stored_rewards = rewards  # the baselines' reward never goes to the device and back
        if detector is not None:
            t0 = time.perf_counter()
            with torch.inference_mode():
                rewards_t = torch.as_tensor(rewards, dtype=torch.float32, device=device)
                nxt = torch.as_tensor(real_next_obs, dtype=torch.float32, device=device)
                windows = torch.cat([windows[:, 1:], nxt[:, None]], 1)  # the window ending at s_{t+1}
                score = anomaly_score(detector, windows)
                rewards_t = shaped_reward(rewards_t, score, tau_threshold, args.penalty_coef, args.penalty_form)
                done_t = torch.as_tensor(np.logical_or(terminations, truncations), device=device)
                fresh = torch.as_tensor(next_obs, dtype=torch.float32, device=device)[:, None].expand_as(windows)
                windows = torch.where(done_t[:, None, None], fresh, windows)  # new episode: pad with its s_0
            score_time += time.perf_counter() - t0
            interval_scores.append(score)
            interval_flagged = interval_flagged + (score > tau_threshold).sum()  # stays on the device until logged
            all_scores.append(score)
            all_costs.append(costs.copy())
            stored_rewards = rewards_t.cpu().numpy()  # the one device->host copy of the scoring block
        interval_steps += args.num_envs

        rb.add(obs=obs, action=actions, reward=stored_rewards, cost=costs, next_obs=real_next_obs,
               done=terminations.astype(np.float32))
        obs = next_obs

        if global_step > args.learning_starts:
            data = rb.sample(args.batch_size)
            with torch.no_grad():
                clipped_noise = (torch.randn_like(data["action"]) * args.policy_noise).clamp(
                    -args.noise_clip, args.noise_clip) * action_scale
                next_actions = (actor_target(data["next_obs"]) + clipped_noise).clamp(low, high)  # target smoothing
                min_qf_next = torch.min(qf1_target(data["next_obs"], next_actions), qf2_target(data["next_obs"], next_actions))
                next_q = data["reward"] + (1 - data["done"]) * args.gamma * min_qf_next  # clipped double-Q target
            qf1_loss = F.mse_loss(qf1(data["obs"], data["action"]), next_q)
            qf2_loss = F.mse_loss(qf2(data["obs"], data["action"]), next_q)
            qf_loss = qf1_loss + qf2_loss
            if lagrangian:
                with torch.no_grad():
                    next_qc = data["cost"] + (1 - data["done"]) * args.gamma * qc_target(data["next_obs"], next_actions)
                qc_loss = F.mse_loss(qc(data["obs"], data["action"]), next_qc)
                qf_loss = qf_loss + qc_loss
            check_finite("losses/qf_loss", qf_loss)
            q_optimizer.zero_grad()
            qf_loss.backward()
            q_optimizer.step()
            updates += 1

            if updates % args.policy_frequency == 0:  # delayed policy update, counted in critic updates
                pi = actor(data["obs"])
                actor_loss = -qf1(data["obs"], pi).mean()
                if lagrangian:
                    qc_pi = qc(data["obs"], pi).mean()
                    actor_loss = actor_loss + lagrange_multiplier * (qc_pi - qc_limit)  # TD3-Lag actor loss
                check_finite("losses/actor_loss", actor_loss)
                actor_optimizer.zero_grad()
                actor_loss.backward()
                actor_optimizer.step()
                actor_updates += 1
                if lagrangian:  # projected gradient ascent on the multiplier
                    lagrange_multiplier = max(0.0, lagrange_multiplier + args.lagrange_lr * (qc_pi.item() - qc_limit))
                with torch.no_grad():
                    pairs = [(actor, actor_target), (qf1, qf1_target), (qf2, qf2_target)]
                    if lagrangian:
                        pairs.append((qc, qc_target))
                    for net, target in pairs:
                        for p, tp in zip(net.parameters(), target.parameters()):
                            tp.mul_(1 - args.tau).add_(args.tau * p)

        if global_step % args.log_every < args.num_envs or iteration == num_iterations:
            if global_step > args.learning_starts and updates >= args.policy_frequency:
                logger.scalar("losses/qf1_loss", qf1_loss.item(), global_step)
                logger.scalar("losses/qf2_loss", qf2_loss.item(), global_step)
                logger.scalar("losses/actor_loss", actor_loss.item(), global_step)
                logger.scalar("charts/actor_updates_per_critic_update", actor_updates / updates, global_step)
                if lagrangian:
                    logger.scalar("losses/qc_loss", qc_loss.item(), global_step)
                    logger.scalar("charts/lagrange_multiplier", lagrange_multiplier, global_step)
                    logger.scalar("charts/qc_value", qc_pi.item(), global_step)
            extra = ""
            if detector is not None:
                scores = torch.cat(interval_scores).cpu().numpy()
                logger.writer.add_histogram("charts/anomaly_score", scores, global_step)
                logger.scalar("charts/anomaly_score_mean", scores.mean(), global_step)
                penalised = float(interval_flagged) / max(interval_steps, 1)
                logger.scalar("charts/penalised_fraction", penalised, global_step)
                logger.scalar("charts/scoring_time_fraction", score_time / max(time.time() - start_time, 1e-9), global_step)
                extra = f"penalised={penalised:.3f}"
                interval_scores, interval_flagged = [], 0
            interval_steps = 0
            logger.console(global_step, extra)
    envs.close()

    source_data = None
    if record:  # the unfinished episodes are kept too: their windows are valid
        episodes = closed_eps + [ep for ep in open_eps if len(ep) > 1]
        lengths = [len(ep) for ep in episodes]
        source_data = {
            "obs": np.stack([row[0] for ep in episodes for row in ep]).astype(np.float32),
            "cost": np.array([row[1] for ep in episodes for row in ep], dtype=np.float32),
            "terminal": np.array([row[2] for ep in episodes for row in ep], dtype=bool),
            "episode_start": np.repeat(np.cumsum([0] + lengths[:-1]), lengths),
        }
    if detector is not None:  # how well the detector's flags match the target's true cost, over all of stage 3
        scores, costs_seen = torch.cat(all_scores).cpu().numpy(), np.concatenate(all_costs)
        auc = roc_auc(scores[costs_seen <= 0], scores[costs_seen > 0])
        logger.scalar("charts/target_roc_auc", auc, global_step)
        logger.scalar("charts/scoring_time_fraction", score_time / max(time.time() - start_time, 1e-9), global_step)
        print(f"stage 3: per-step ROC AUC of the score vs the true cost in the target: {auc:.3f}; "
              f"scoring took {score_time:.1f}s of {time.time() - start_time:.1f}s "
              f"({score_time / max(time.time() - start_time, 1e-9):.1%})", flush=True)
    return actor, (qf1, qf2), source_data


def evaluate(actor: Actor, env_id: str, episodes: int, seed: int, device: torch.device, logger: Logger, step: int) -> None:
    """Deterministic episodes of the target agent: raw (unshaped) return and true episode cost."""
    env = make_safety_env(env_id, seed=seed)
    returns, costs = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret, cost = False, 0.0, 0.0
        while not done:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
            obs, reward, terminated, truncated, info = env.step(action)
            ret, cost, done = ret + reward, cost + info["cost"], terminated or truncated
        logger.log_episode(step, ret, cost, 0, prefix="eval")
        returns.append(ret)
        costs.append(cost)
    env.close()
    print(f"eval: {episodes} episodes, return {np.mean(returns):.2f} +- {np.std(returns):.2f}, "
          f"cost {np.mean(costs):.2f} +- {np.std(costs):.2f}", flush=True)


DETECTOR_CONFIG_KEYS = ("obs_dim", "window_length", "d_model", "heads", "layers", "latent_dim", "source_env_id")


def load_detector(path: str, device: torch.device) -> tuple[TransformerAutoencoder, float, dict]:
    """The detector saved by stage 2; a file that is not one ends in a clear error, not a KeyError traceback."""
    what = f"error: --source-run: {path!r} is not a detector saved by stage 2 of anoseqs.py"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise SystemExit(f"{what}: cannot read it ({e})") from None
    if (not isinstance(ckpt, dict) or any(k not in ckpt for k in ("model", "tau", "config"))
            or not isinstance(ckpt["config"], dict) or any(k not in ckpt["config"] for k in DETECTOR_CONFIG_KEYS)):
        raise SystemExit(f"{what}: it lacks the model, tau or config {list(DETECTOR_CONFIG_KEYS)}; rerun --stage 2")
    c = ckpt["config"]
    model = TransformerAutoencoder(c["obs_dim"], c["window_length"], c["d_model"], c["heads"], c["layers"],
                                   c["latent_dim"]).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SystemExit(f"{what}: its weights do not match its config ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, float(ckpt["tau"]), c


def check_same_observation(source_env_id: str, env_id: str) -> None:
    """The detector trained on the source scores target windows: both tasks must give observations of one size."""
    sizes = []
    for name in (source_env_id, env_id):
        env = make_safety_env(name, seed=0)
        sizes.append(env.observation_space.shape[0])
        env.close()
    if sizes[0] != sizes[1]:
        raise SystemExit(f"error: --source-env-id {source_env_id} gives observations of size {sizes[0]} but --env-id "
                         f"{env_id} gives {sizes[1]}; the detector needs one size (e.g. SafetyPointCircle0 -> "
                         "SafetyPointCircle1, SafetyPointGoal2 -> SafetyPointGoal1; a level-0 Goal task has no hazard "
                         "or vase lidar)")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    try:
        env_id, vision = normalize_env_id(args.env_id)
        source_env_id, source_vision = normalize_env_id(args.source_env_id or args.env_id)
    except ValueError as e:
        raise SystemExit(f"error: --env-id / --source-env-id: {e}") from None
    if vision or source_vision:  # the id was silently reduced to its state version before
        raise SystemExit(f"error: --env-id {args.env_id!r} / --source-env-id {args.source_env_id!r}: AnoSeqs works on "
                         "state observations (windows of flat feature vectors); drop 'Vision' from the id")
    baseline = args.lagrangian or args.penalty_coef == 0
    if not baseline and args.stage == "all" and source_env_id != env_id:
        check_same_observation(source_env_id, env_id)  # before hours of stages 1 and 2, not after them
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    logger = Logger(run_name, args)
    seed_everything(args.seed, args.torch_deterministic)
    device = get_device(args.cuda)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    stages = ["3"] if baseline else (["1", "2", "3"] if args.stage == "all" else [args.stage])
    if baseline and args.stage == "all":
        print("baseline (--penalty-coef 0 or --lagrangian): stages 1 and 2 are skipped, no detector is used", flush=True)
    if args.source_run:
        logger.writer.add_text("source_run", args.source_run)

    if "1" in stages:  # stage 1: the source agent; its cost only labels the windows
        print(f"stage 1: TD3 in the source environment {source_env_id} for {args.source_timesteps} steps", flush=True)
        source_logger = Logger("source", args, root=logger.run_dir)
        _, _, source_data = run_td3(args, source_env_id, args.source_timesteps, source_logger, device, args.seed + 10_000,
                                    record=True)
        source_logger.close()
        np.savez_compressed(os.path.join(logger.run_dir, "source_data.npz"), env_id=source_env_id, **source_data)
    elif "2" in stages:
        with np.load(os.path.join(args.source_run, "source_data.npz")) as f:
            source_data = {k: f[k] for k in ("obs", "cost", "terminal", "episode_start")}

    if "2" in stages:  # stage 2: the transformer autoencoder and its threshold
        detector_logger = Logger("detector", args, root=logger.run_dir)
        detector, tau, auc = train_detector(args, source_data, detector_logger, device)
        detector_logger.close()
        config = {"obs_dim": source_data["obs"].shape[1], "window_length": args.window_length,
                  "d_model": args.detector_d_model, "heads": args.detector_heads, "layers": args.detector_layers,
                  "latent_dim": args.detector_latent_dim, "source_env_id": source_env_id, "roc_auc": auc}
        torch.save({"model": detector.state_dict(), "tau": tau, "config": config},
                   os.path.join(logger.run_dir, "detector.pt"))
    elif "3" in stages and not baseline:
        detector, tau, config = load_detector(os.path.join(args.source_run, "detector.pt"), device)
        if config["window_length"] != args.window_length:
            print(f"using the detector's window length {config['window_length']} (not --window-length "
                  f"{args.window_length})", flush=True)
            args.window_length = config["window_length"]
        print(f"stage 3: detector from {args.source_run} (trained on {config['source_env_id']}), tau={tau:.4f}", flush=True)

    if "3" in stages:  # stage 3: the target agent on the shaped reward (or a baseline)
        name = "TD3-Lag" if args.lagrangian else ("TD3" if args.penalty_coef == 0 else "AnoSeqs")
        print(f"stage 3: {name} in the target environment {env_id} for {args.total_timesteps} steps", flush=True)
        logger.scalar("charts/anomaly_threshold", 0.0 if baseline else tau, 0)
        actor, (qf1, qf2), _ = run_td3(args, env_id, args.total_timesteps, logger, device, args.seed,
                                       detector=None if baseline else detector, tau_threshold=0.0 if baseline else tau,
                                       lagrangian=args.lagrangian)
        if args.save_model:
            path = os.path.join(logger.run_dir, f"{args.exp_name}.cleanrl_model")
            torch.save({"actor": actor.state_dict(), "qf1": qf1.state_dict(), "qf2": qf2.state_dict()}, path)
            print(f"model saved to {path}", flush=True)
        if args.eval_episodes > 0:
            evaluate(actor, env_id, args.eval_episodes, args.seed + 100_000, device, logger, args.total_timesteps)
    logger.close()
    print(f"run directory: {logger.run_dir}", flush=True)
