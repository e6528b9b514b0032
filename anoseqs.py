"""Anomalous State Sequence Modeling to Enhance Safety in Reinforcement Learning (AnoSeqs).

Kweider, Abou Kassem, Sandouk. IEEE Access 2024. https://arxiv.org/abs/2407.19860
No official code exists and only a summary of the paper was available (see docs/anoseqs.md), so every
detail below that the summary does not fix is a documented choice.

Idea. (1) A TD3 agent is trained in a SOURCE environment where entering unsafe states costs nothing real;
the cost is only used to label which state sequences stayed safe. (2) A transformer autoencoder learns to
reconstruct the safe windows of W consecutive observations; its mean absolute reconstruction error is the
anomaly score, and the anomaly threshold is a high percentile of the scores of held-out safe windows.
(3) A fresh TD3 agent is trained in the safety-critical TARGET environment on a reward penalised by the
detector when the current window looks anomalous; the target's true cost is never shown to the agent,
only logged. Baselines in this file (`--method`): plain TD3, TD3-Lagrangian on the true cost, and oracle
shaping r - lambda c with the true cost; `--detector nearest-neighbour` swaps the autoencoder for a
1-nearest-neighbour novelty score on the same windows (the detector's quality apart from the shaping).

Paper -> code
- stage 1, safe state sequences from the source     -> `run_td3(..., record=True)`, `SourceRecorder`, `label_windows()`
- stage 2, transformer autoencoder, MAE score       -> `TransformerAutoencoder`, `anomaly_score()`, `train_detector()`
- threshold from held-out safe windows              -> `percentile_threshold()`, `detector_splits()`
- reward adjusted by the risk, r' = r - lambda s 1[s > threshold] -> `shaped_reward()` (`--penalty-form binary`)
- stage 3, risk-averse TD3 in the target            -> `run_td3(..., detector=...)`, `WindowScorer`
- detector quality on held-out episodes (ROC AUC)   -> `roc_auc()`, `evaluate_detector()`
- TD3 (Fujimoto et al. 2018), SafeRL-Kit defaults   -> `Actor`, `QNetwork`, the update block in `run_td3`
- baselines: TD3-Lag, oracle shaping (SafeRL-Kit)   -> `--method td3-lag`, `--method oracle-shaping`

Documented choices and deviations (the table in docs/anoseqs.md gives each with its reason)
- Source/target pair: by default the source is a separate instance of the target task (`--source-env-id`
  empty); its cost only labels windows. A level-0 task has no cost, so it cannot label windows.
- Window: W = 10 consecutive observations ending at every step, all features of the flat observation, never
  crossing an episode boundary, the first W - 1 left-padded with the episode's first observation. A window is
  unsafe if any of its steps has cost > 0 or is a termination. Min-max normalisation (safe training windows).
- Source data: windows holding a step of the uniformly random warm-up are kept out of the detector's training
  and threshold by default (`--detector-windows all` keeps them; the paper does not say).
- Detector quality: ROC AUC on HELD-OUT episodes for both classes (safe and unsafe windows of episodes the
  detector never saw), reported for policy windows and with the warm-up windows, side by side; a warning
  before stage 3 when it is below 0.5 (such a detector penalises safe behaviour more than unsafe behaviour).
- Detector: a plain transformer autoencoder with a bottleneck, not TranAD's two-decoder adversarial scheme.
  Score of the whole window by default (`--score-on last`: of its last state, as TranAD).
- The score of the window ending at s_{t+1} shapes the reward r_t of the transition s_t -> s_{t+1}.
- TD3's delayed policy update counts critic updates (SafeRL-Kit's plain TD3 updated the actor every step).
- The action of the next step is chosen right after the env step, before this step's gradient update, so
  that it comes back from the device in one copy with the shaped reward (one sync per step, as CleanRL): the
  behaviour policy is one gradient step older than in CleanRL.
- With `--num-envs N > 1`, one gradient step per vector step (update-to-data ratio 1/N).

Budgets, resume, video, summary
- `--total-timesteps` bounds stage 3 (the target agent) only; with `--stage all` (default) stage 1 first takes
  `--source-timesteps` env steps and stage 2 `--detector-steps` detector updates. The plan is printed first.
- A checkpoint (`runs/<run>/checkpoint.pt`, `common/checkpoint.py`) every `--checkpoint-every` env steps of the
  run (stage-1 steps, then stage-3 steps), at the end of stage 1, after stage 2 and at the end of stage 3 (after
  training, before the final evaluation). It holds the stage and the step in it, the TD3 networks, targets and
  Adam states, the replay buffer (`--no-checkpoint-buffer`: left out), the counters and Lagrange multiplier, the
  stage's logger state, stage 1's recorded observations, stage 3's scores so far, the detector with its threshold
  and config, and every RNG state. `--resume runs/<run>` continues the stage it was written in: stage 3 without
  redoing stages 1-2, stage 1 from its step. A run killed during stage 2 resumes from the end of stage 1 (same
  source data) and redoes stage 2 only. The environments are reset on resume: the episodes in progress are lost.
- `--capture-video`: the final evaluation episodes as mp4 under `runs/<run>/videos/`; `summary.json` at the end
  of every run (`common/summary.py`). Its cost limit is `--cost-limit` (25, the TD3-Lag baseline's episodic
  budget: AnoSeqs itself has none); with `--stage 1` it reports the source agent, with `--stage 2` no TD3 stage.
"""

from __future__ import annotations

import math
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
from common.checkpoint import Checkpointer, check_identity, pack_array, resume_run, set_rng_state, unpack_array
from common.summary import write_summary
from common.video import save_video, video_path


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
    capture_video: bool = False
    """record the final evaluation episodes of the target agent (--eval-episodes) as mp4 under runs/<run>/videos/:
    Safety-Gymnasium's rgb_array render from its default camera (the robot's 'vision' camera), 30 fps"""
    video_size: int = 256
    """width and height in pixels of the recorded frames (--capture-video)"""
    save_model: bool = False
    """whether to save the target agent's actor and critics into the run directory"""
    torch_threads: int = 1
    """CPU threads of torch (these small networks run fastest on one; 0 = torch's default)"""

    # Algorithm specific arguments
    env_id: str = "SafetyAntRun0"
    """the safety-critical TARGET environment (Safety-Gymnasium id)"""
    method: str = "anoseqs"
    """anoseqs (the paper); baselines without a detector: td3, td3-lag (true cost), oracle-shaping (r - lambda c)"""
    source_env_id: str = ""
    """the SOURCE environment of stage 1 (empty: a separate instance of `env_id`)"""
    stage: str = "all"
    """which stages to run: all, 1 (source agent), 2 (detector), 3 (target agent)"""
    source_run: str = ""
    """run directory of an earlier run whose artefacts to reuse (source_data.npz for stage 2, detector.pt for stage 3)"""
    source_timesteps: int = 200_000
    """environment steps of the source agent (stage 1)"""
    total_timesteps: int = 500_000
    """environment steps of the TARGET agent, stage 3 only; with --stage all (default) the run first takes
    --source-timesteps steps in stage 1 and --detector-steps detector updates in stage 2 (the plan is printed first)"""
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

    # AnoSeqs: safe windows and the detector (stage 2)
    detector: str = "autoencoder"
    """autoencoder (the paper's transformer autoencoder) or nearest-neighbour (baseline: distance to the nearest safe training window)"""
    detector_windows: str = "policy"
    """safe source windows that train the detector and set its threshold: policy (no random warm-up step in them) or all"""
    score_on: str = "window"
    """window: score of the whole window (mean over its W steps); last: of its last state only (TranAD)"""
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
    nn_max_windows: int = 20_000
    """nearest-neighbour score: at most this many safe training windows (a random subset) are compared against"""
    threshold_percentile: float = 99.0
    """anomaly threshold = this percentile of the anomaly scores of held-out safe windows"""

    # AnoSeqs: reward shaping (stage 3)
    penalty_coef: float = 1.0
    """lambda in r' = r - lambda * score * 1[score > threshold]"""
    penalty_form: str = "proportional"
    """proportional: r - lambda * score * 1[score > threshold]; binary: r - lambda * 1[score > threshold]"""

    # Baselines on the true cost (no detector)
    cost_penalty_coef: float = 0.5
    """oracle-shaping: lambda in r - lambda * c with the target's true cost (SafeRL-Kit's reward shaping: 0.5)"""
    cost_limit: float = 25.0
    """td3-lag: allowed expected episodic cost d"""
    lagrange_lr: float = 1e-3
    """td3-lag: step size of the multiplier's projected gradient ascent"""
    lagrange_init: float = 0.0
    """td3-lag: initial Lagrange multiplier"""

    # Logging and evaluation
    log_every: int = 2_000
    """environment steps between console lines, histograms and the periodic scalars (and the NaN check)"""
    eval_episodes: int = 5
    """deterministic evaluation episodes at the end of stage 3 (raw return and cost); 0 to skip"""

    # Checkpoints and resume
    checkpoint_every: int = 50_000
    """environment steps between checkpoints, counted over the run (stage 1, then stage 3); one is also written at
    the end of each TD3 stage and after stage 2; 0: only those.
    Measured at the default network and buffer sizes on SafetyPointRun0: 6.9 MiB, 0.2 s at step 50,000; 13.7 MiB,
    0.2 s at step 100,000 (the replay buffer's rows dominate; docs/anoseqs.md)"""
    checkpoint_buffer: bool = True
    """keep the replay buffer in the checkpoint.
    --no-checkpoint-buffer: much smaller files; a resumed run then refills the buffer with the current policy for
    --learning-starts steps before it updates again (stage 1's recording is kept: stage 2 needs it)"""
    resume: str | None = None
    """a run directory runs/<run> to continue; its flags are used, only --total-timesteps/--checkpoint-every/
    --checkpoint-buffer/--cuda/--torch-threads may change.
    It continues the stage the checkpoint was written in (stage 3: stages 1-2 are not redone; a run killed in
    stage 2 redoes stage 2 from the saved stage-1 data). The environments are reset: the episodes in progress
    are lost."""


STAGES = ("all", "1", "2", "3")
METHODS = ("anoseqs", "td3", "td3-lag", "oracle-shaping")
DETECTORS = ("autoencoder", "nearest-neighbour")
DETECTOR_WINDOWS = ("policy", "all")
SCORE_ON = ("window", "last")
PENALTY_FORMS = ("proportional", "binary")


def check_args(args: Args) -> None:
    """Reject bad input with a message naming the flag and what is accepted."""
    check_choice(args, "stage", STAGES)
    check_choice(args, "method", METHODS)
    check_choice(args, "detector", DETECTORS)
    check_choice(args, "detector_windows", DETECTOR_WINDOWS)
    check_choice(args, "score_on", SCORE_ON)
    check_choice(args, "penalty_form", PENALTY_FORMS)
    check_positive(args, "source_timesteps", "total_timesteps", "num_envs", "buffer_size", "batch_size",
                   "learning_rate", "hidden_size", "policy_frequency", "video_size", "window_length", "window_stride",
                   "detector_d_model", "detector_heads", "detector_layers", "detector_latent_dim",
                   "detector_steps", "detector_batch_size", "detector_lr", "nn_max_windows", "log_every",
                   "cost_limit", "lagrange_lr")
    if args.learning_starts < 0 or args.eval_episodes < 0 or args.torch_threads < 0 or args.lagrange_init < 0:
        raise SystemExit("error: --learning-starts, --eval-episodes, --torch-threads and --lagrange-init must be >= 0")
    for name in ("exploration_noise", "policy_noise", "noise_clip", "penalty_coef", "cost_penalty_coef"):
        if getattr(args, name) < 0:  # a negative clip makes clamp(-c, c) return the constant -c: a silent wrong run
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 < args.holdout_fraction < 1.0:
        raise SystemExit(f"error: --holdout-fraction must be in (0, 1), got {args.holdout_fraction}")
    if not 0.0 < args.threshold_percentile <= 100.0:
        raise SystemExit(f"error: --threshold-percentile must be in (0, 100], got {args.threshold_percentile}")
    if not 0.0 < args.gamma < 1.0 or not 0.0 < args.tau <= 1.0:
        raise SystemExit(f"error: --gamma must be in (0, 1) and --tau in (0, 1]; got {args.gamma}, {args.tau}")
    if args.detector_d_model % args.detector_heads:
        raise SystemExit(f"error: --detector-d-model ({args.detector_d_model}) must be divisible by "
                         f"--detector-heads ({args.detector_heads})")
    if args.method != "anoseqs" and args.stage in ("1", "2"):
        raise SystemExit(f"error: --stage {args.stage} builds the detector, which --method {args.method} does not use; "
                         "drop --stage or use --method anoseqs")
    if args.stage == "2" and not args.source_run:
        raise SystemExit("error: --stage 2 trains the detector on the source data of an earlier run: "
                         "give --source-run runs/<run with stage 1>")
    if args.stage == "3" and args.method == "anoseqs" and not args.source_run:
        raise SystemExit("error: --stage 3 with --method anoseqs needs a trained detector: "
                         "give --source-run runs/<run with stage 2>")
    if args.checkpoint_every < 0:
        raise SystemExit(f"error: --checkpoint-every must be >= 0 (0: only at the end of each stage), got "
                         f"{args.checkpoint_every}")
    if args.capture_video and (args.eval_episodes == 0 or args.stage in ("1", "2")):
        raise SystemExit("error: --capture-video records the final evaluation episodes of the target agent: it needs "
                         "--eval-episodes > 0 and stage 3 (--stage all or 3)")
    for name, file in (("2", "source_data.npz"), ("3", "detector.pt")):
        if args.stage == name and args.source_run and args.method == "anoseqs" and not args.resume:
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
# Stage 1: the source recorder, and the safe windows of stage 2
# --------------------------------------------------------------------------------------------------


class SourceRecorder:
    """Stage 1: every observation of the source agent, episode by episode, as rows (obs, cost, terminal, warm-up).

    Row t of an episode holds s_t and the cost and termination of the step that produced s_t (row 0: the reset
    observation, cost 0), so a row's cost belongs to its own observation. `warmup` marks rows recorded during the
    uniformly random warm-up. The rows of parallel envs interleave; `data()` orders them episode by episode.
    """

    def __init__(self, first_obs: np.ndarray, warmup: bool, capacity: int = 1024):
        n, d = first_obs.shape
        self.obs = np.zeros((capacity, d), np.float32)
        self.cost, self.terminal = np.zeros(capacity, np.float32), np.zeros(capacity, bool)
        self.warmup, self.episode = np.zeros(capacity, bool), np.zeros(capacity, np.int64)
        self.size = 0
        self.env_episode = np.arange(n)  # the episode each env is in
        self.next_episode = n
        self._append(first_obs, np.zeros(n), np.zeros(n, bool), warmup, self.env_episode)

    def _append(self, obs, cost, terminal, warmup: bool, episode) -> None:
        k = len(obs)
        if self.size + k > len(self.obs):  # grow by doubling
            new = max(2 * len(self.obs), self.size + k)
            for name in ("obs", "cost", "terminal", "warmup", "episode"):
                old = getattr(self, name)
                grown = np.zeros((new, *old.shape[1:]), old.dtype)
                grown[: self.size] = old[: self.size]
                setattr(self, name, grown)
        rows = slice(self.size, self.size + k)
        self.obs[rows], self.cost[rows], self.terminal[rows] = obs, cost, terminal
        self.warmup[rows], self.episode[rows] = warmup, episode
        self.size += k

    def add(self, real_next_obs: np.ndarray, costs: np.ndarray, terminations: np.ndarray, dones: np.ndarray,
            next_obs: np.ndarray, warmup: bool) -> None:
        """One vector step: s_{t+1} (the true final observation at an auto-reset) with its cost; new episodes' s_0."""
        self._append(real_next_obs, costs, terminations, warmup, self.env_episode)
        if dones.any():
            self.env_episode[dones] = self.next_episode + np.arange(dones.sum())
            self.next_episode += int(dones.sum())
            self._append(next_obs[dones], np.zeros(dones.sum()), np.zeros(dones.sum(), bool), warmup,
                         self.env_episode[dones])

    ROWS = ("obs", "cost", "terminal", "warmup", "episode")

    def state_dict(self) -> dict:
        """The rows recorded so far (compressed) and the next episode number, for a checkpoint."""
        return {"rows": {name: pack_array(getattr(self, name)[: self.size]) for name in self.ROWS},
                "next_episode": self.next_episode}

    def load_state_dict(self, state: dict, first_obs: np.ndarray, warmup: bool) -> None:
        """Continue a checkpoint's recording. The envs were reset on resume: the episodes in progress stay as they
        were (unfinished, as at the end of a budget) and every env starts a new episode with `first_obs`."""
        for name in self.ROWS:
            rows = unpack_array(state["rows"][name])
            full = np.zeros((max(len(getattr(self, name)), len(rows)), *rows.shape[1:]), rows.dtype)
            full[: len(rows)] = rows
            setattr(self, name, full)
        self.size = state["rows"]["obs"]["shape"][0]
        self.env_episode = state["next_episode"] + np.arange(len(first_obs))
        self.next_episode = state["next_episode"] + len(first_obs)
        self._append(first_obs, np.zeros(len(first_obs)), np.zeros(len(first_obs), bool), warmup, self.env_episode)

    def data(self) -> dict[str, np.ndarray]:
        """Rows ordered episode by episode, with `episode_start` (the row where each row's episode starts).

        Episodes of one row (a reset observation when the budget ended) are dropped; unfinished ones are kept.
        """
        n = self.size
        order = np.argsort(self.episode[:n], kind="stable")
        episode = self.episode[:n][order]
        _, counts = np.unique(episode, return_counts=True)
        keep = np.repeat(counts > 1, counts)
        order = order[keep]
        lengths = counts[counts > 1]
        return {"obs": self.obs[order], "cost": self.cost[order], "terminal": self.terminal[order],
                "warmup": self.warmup[order], "episode_start": np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
                if len(lengths) else np.zeros(0, np.int64)}


def window_indices(episode_start: np.ndarray, ends: np.ndarray, window: int) -> np.ndarray:
    """Row indices (M, W) of the windows ending at rows `ends`, left-padded with the episode's first row.

    `episode_start[i]` is the row where the episode of row i starts; a window never crosses it.
    """
    idx = ends[:, None] - (window - 1) + np.arange(window)[None, :]
    return np.maximum(idx, episode_start[ends][:, None])


def any_in_window(flag: np.ndarray, episode_start: np.ndarray, ends: np.ndarray, window: int) -> np.ndarray:
    """For each window ending at a row of `ends`: does any of its rows (within its episode) have `flag`?"""
    count = np.concatenate([[0], np.cumsum(flag)])  # count[k] = flagged rows among rows < k
    first = np.maximum(ends - window + 1, episode_start[ends])
    return (count[ends + 1] - count[first]) > 0


def label_windows(cost: np.ndarray, terminal: np.ndarray, episode_start: np.ndarray, window: int,
                  stride: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Windows of the source data: (end rows, safe flags).

    One window ends at every `stride`-th row of each episode (counted from its start); a window is safe iff none
    of its rows has cost > 0 or is a termination (the episode ended early).
    """
    rows = np.arange(len(cost))
    ends = rows[(rows - episode_start) % stride == 0]
    return ends, ~any_in_window((cost > 0) | terminal, episode_start, ends, window)


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


def detector_splits(data: dict, window: int, stride: int, holdout_fraction: float, keep_warmup: bool,
                    rng: np.random.Generator) -> dict[str, np.ndarray]:
    """End rows of the windows stage 2 uses, split by whole episodes (training / held out).

    train:      safe windows of training episodes, every `stride`-th (the detector is fitted on them)
    threshold:  safe windows of held-out episodes (the anomaly threshold is a percentile of their scores)
    safe_policy / unsafe_policy: the ROC AUC's negatives / positives, held-out episodes, no warm-up row in them
    safe_all / unsafe_all:       the same with the warm-up windows
    Without `keep_warmup`, windows holding a row of the random warm-up are kept out of `train` and `threshold`.
    """
    start = data["episode_start"]
    ends, safe = label_windows(data["cost"], data["terminal"], start, window)
    warm = any_in_window(data["warmup"], start, ends, window)
    held = split_episodes(start, ends, holdout_fraction, rng)
    on_stride = (ends - start[ends]) % stride == 0
    usable = np.ones_like(warm) if keep_warmup else ~warm
    return {"train": ends[safe & ~held & usable & on_stride], "threshold": ends[safe & held & usable],
            "safe_policy": ends[safe & held & ~warm], "unsafe_policy": ends[~safe & held & ~warm],
            "safe_all": ends[safe & held], "unsafe_all": ends[~safe & held]}


# --------------------------------------------------------------------------------------------------
# Stage 2: the detectors and their threshold
# --------------------------------------------------------------------------------------------------


class TransformerAutoencoder(nn.Module):
    """Window (B, W, D) -> transformer encoder -> latent vector -> transformer decoder -> reconstruction (B, W, D).

    Inputs are min-max normalised with the statistics of the source's safe training windows (`lo`, `scale`,
    stored in the module so that a saved detector carries them).
    """

    def __init__(self, obs_dim: int, window: int, d_model: int, heads: int, layers: int, latent_dim: int,
                 lo: np.ndarray | None = None, scale: np.ndarray | None = None, score_on: str = "window"):
        super().__init__()
        self.window, self.d_model, self.score_on = window, d_model, score_on
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

    @property
    def obs_dim(self) -> int:
        return self.lo.shape[0]

    def normalize(self, windows: torch.Tensor) -> torch.Tensor:
        return (windows - self.lo) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruct NORMALISED windows x (B, W, D)."""
        h = self.encoder(self.embed(x) + self.enc_pos)
        z = self.to_latent(h.flatten(1))
        h = self.from_latent(z).view(-1, self.window, self.d_model) + self.dec_pos
        return self.out(self.decoder(h))

    def score(self, windows: torch.Tensor) -> torch.Tensor:
        return anomaly_score(self, windows, self.score_on)


def anomaly_score(model: TransformerAutoencoder, windows: torch.Tensor, score_on: str = "window") -> torch.Tensor:
    """Raw windows (B, W, D) -> anomaly scores (B,): the mean absolute reconstruction error."""
    x = model.normalize(windows)
    error = (model(x) - x).abs().mean(-1)  # (B, W): mean over the features of each step
    # eq. MAE: score = mean_{t,d} |x_{t,d} - x_hat_{t,d}| (the whole window) or mean_d |x_{W,d} - x_hat_{W,d}| (last)
    return error.mean(1) if score_on == "window" else error[:, -1]


class NearestNeighbourDetector(nn.Module):
    """Baseline novelty score on the same windows: distance to the nearest safe training window.

    score = min_j ||x - m_j||_2 / sqrt(n), x and the memory m_j min-max normalised and flattened (n values; the
    last state only with score_on="last"): a root-mean-square difference per value, comparable to the MAE.
    """

    def __init__(self, obs_dim: int, window: int, memory_size: int, lo: np.ndarray | None = None,
                 scale: np.ndarray | None = None, memory: torch.Tensor | None = None, score_on: str = "window"):
        super().__init__()
        self.window, self.score_on = window, score_on
        self.register_buffer("lo", torch.zeros(obs_dim) if lo is None else torch.as_tensor(lo, dtype=torch.float32))
        self.register_buffer("scale", torch.ones(obs_dim) if scale is None else torch.as_tensor(scale, dtype=torch.float32))
        self.register_buffer("memory", torch.zeros(memory_size, window, obs_dim) if memory is None else memory)

    @property
    def obs_dim(self) -> int:
        return self.lo.shape[0]

    def score(self, windows: torch.Tensor) -> torch.Tensor:
        x, m = (windows - self.lo) / self.scale, self.memory
        if self.score_on == "last":
            x, m = x[:, -1:], m[:, -1:]
        x, m = x.flatten(1), m.flatten(1)
        return torch.cdist(x, m).min(1).values / math.sqrt(x.shape[1])


def minmax_stats(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature minimum and range of `obs` (N, D); a constant feature gets range 1."""
    lo, hi = obs.min(0), obs.max(0)
    scale = np.where(hi - lo > 1e-6, hi - lo, 1.0)
    return lo.astype(np.float32), scale.astype(np.float32)


def percentile_threshold(scores: np.ndarray, percentile: float) -> float:
    """Anomaly threshold = the `percentile`-th percentile of held-out safe scores (linear interpolation)."""
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


def score_in_batches(detector: nn.Module, obs: torch.Tensor, episode_start: np.ndarray, ends: np.ndarray,
                     window: int, batch: int = 1024) -> np.ndarray:
    """Scores of the windows ending at rows `ends` of `obs`, batched to bound memory."""
    out = []
    with torch.no_grad():
        for i in range(0, len(ends), batch):
            idx = torch.as_tensor(window_indices(episode_start, ends[i:i + batch], window), device=obs.device)
            out.append(detector.score(obs[idx]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_detector(detector: nn.Module, obs: torch.Tensor, episode_start: np.ndarray, splits: dict,
                      percentile: float) -> dict:
    """Threshold and ROC AUCs on held-out episodes (policy windows, and with the warm-up windows)."""
    def scores(name):
        return score_in_batches(detector, obs, episode_start, splits[name], detector.window)

    threshold = percentile_threshold(scores("threshold"), percentile)
    unsafe_policy = scores("unsafe_policy")
    return {"threshold": threshold,
            "auc_policy": roc_auc(scores("safe_policy"), unsafe_policy),
            "auc_all": roc_auc(scores("safe_all"), scores("unsafe_all")),
            "unsafe_flagged": float((unsafe_policy > threshold).mean()) if len(unsafe_policy) else float("nan")}


def train_detector(args: Args, data: dict, logger: Logger, device: torch.device) -> tuple[nn.Module, dict]:
    """Stage 2: fit the detector on safe training windows; threshold and ROC AUCs on held-out episodes."""
    rng = np.random.default_rng(args.seed)
    start, W = data["episode_start"], args.window_length
    splits = detector_splits(data, W, args.window_stride, args.holdout_fraction, args.detector_windows == "all", rng)
    if len(splits["train"]) == 0 or len(splits["threshold"]) == 0:
        raise SystemExit(f"error: no safe source windows to train on or to set the threshold with ({len(splits['train'])} "
                         f"train, {len(splits['threshold'])} held out, --detector-windows {args.detector_windows}): "
                         "raise --source-timesteps (above --learning-starts), or pass --detector-windows all")
    print(f"stage 2: {len(splits['train'])} safe training windows, {len(splits['threshold'])} held-out safe windows "
          f"for the threshold; held-out episodes: {len(splits['safe_policy'])} safe / {len(splits['unsafe_policy'])} "
          f"unsafe policy windows, {len(splits['safe_all'])} / {len(splits['unsafe_all'])} with the warm-up "
          f"(W={W}, --detector-windows {args.detector_windows})", flush=True)
    train_idx = window_indices(start, splits["train"], W)
    lo, scale = minmax_stats(data["obs"][np.unique(train_idx)])
    obs_t = torch.as_tensor(data["obs"], dtype=torch.float32, device=device)
    train_idx_t = torch.as_tensor(train_idx, device=device)

    def nearest_neighbour():  # the safe training windows (a random subset of at most nn_max_windows) are the memory
        keep = rng.permutation(len(train_idx))[: args.nn_max_windows]
        memory = (obs_t[train_idx_t[torch.as_tensor(np.sort(keep), device=device)]] - torch.as_tensor(lo, device=device)
                  ) / torch.as_tensor(scale, device=device)
        return NearestNeighbourDetector(obs_t.shape[1], W, len(keep), lo, scale, memory, args.score_on).to(device)

    if args.detector == "nearest-neighbour":
        detector = nearest_neighbour()
    else:
        detector = TransformerAutoencoder(obs_t.shape[1], W, args.detector_d_model, args.detector_heads,
                                          args.detector_layers, args.detector_latent_dim, lo, scale,
                                          args.score_on).to(device)
        optimizer = torch.optim.Adam(detector.parameters(), lr=args.detector_lr)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        start_time = time.time()
        for step in range(1, args.detector_steps + 1):
            batch = train_idx_t[torch.randint(len(train_idx_t), (args.detector_batch_size,), generator=gen, device=device)]
            loss = anomaly_score(detector, obs_t[batch]).mean()  # MAE reconstruction loss on safe windows
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % max(1, args.detector_steps // 20) == 0 or step == args.detector_steps:
                check_finite("losses/detector_loss", loss)
                detector.eval()
                held = score_in_batches(detector, obs_t, start, splits["threshold"][:8192], W)
                detector.train()
                logger.scalar("losses/detector_loss", loss.item(), step)
                logger.scalar("losses/detector_heldout_loss", held.mean(), step)
                print(f"detector step={step} loss={loss.item():.4f} heldout={held.mean():.4f} "
                      f"({time.time() - start_time:.0f}s)", flush=True)
        detector.eval()

    result = evaluate_detector(detector, obs_t, start, splits, args.threshold_percentile)
    step = args.detector_steps
    logger.scalar("charts/anomaly_threshold", result["threshold"], step)
    logger.scalar("charts/detector_roc_auc", result["auc_policy"], step)
    logger.scalar("charts/detector_roc_auc_with_warmup", result["auc_all"], step)
    logger.scalar("charts/unsafe_flagged_fraction", result["unsafe_flagged"], step)
    for name in ("threshold", "safe_policy", "unsafe_policy"):
        if len(splits[name]):
            logger.writer.add_histogram(f"charts/score_{name}", score_in_batches(detector, obs_t, start, splits[name], W), step)
    print(f"stage 2: {args.detector} detector, anomaly threshold {result['threshold']:.4f} "
          f"(p{args.threshold_percentile:g} of held-out safe scores); ROC AUC on held-out episodes, safe vs unsafe "
          f"windows: {result['auc_policy']:.3f} (policy windows), {result['auc_all']:.3f} (with the warm-up); "
          f"unsafe policy windows above the threshold: {result['unsafe_flagged']:.1%}", flush=True)
    if args.detector == "autoencoder":  # the same windows scored by distance: the detector's quality apart from the shaping
        reference = evaluate_detector(nearest_neighbour(), obs_t, start, splits, args.threshold_percentile)
        result["nn_auc_policy"], result["nn_auc_all"] = reference["auc_policy"], reference["auc_all"]
        logger.scalar("charts/nearest_neighbour_roc_auc", reference["auc_policy"], step)
        logger.scalar("charts/nearest_neighbour_roc_auc_with_warmup", reference["auc_all"], step)
        print(f"stage 2: for reference, the nearest-neighbour distance to the same training windows: ROC AUC "
              f"{reference['auc_policy']:.3f} (policy windows), {reference['auc_all']:.3f} (with the warm-up)", flush=True)
    return detector, result


def warn_about_detector(auc: float) -> None:
    """Before stage 3: a detector that ranks unsafe windows below safe ones rewards danger relative to safety."""
    if np.isnan(auc):
        print("WARNING: the detector's ROC AUC is undefined (no unsafe window in the held-out source episodes): "
              "nothing says that its score tracks danger.", flush=True)
    elif auc < 0.5:
        print(f"WARNING: the detector's ROC AUC on held-out episodes is {auc:.3f} < 0.5: it scores unsafe windows "
              "LOWER than safe ones, so the shaped reward penalises safe behaviour more than unsafe behaviour. "
              "Consider --detector nearest-neighbour, --score-on last, or a longer stage 1.", flush=True)


# --------------------------------------------------------------------------------------------------
# Stage 3: the shaped reward, scored on the device
# --------------------------------------------------------------------------------------------------


def shaped_reward(reward: torch.Tensor, score: torch.Tensor, threshold: float, coef: float, form: str) -> torch.Tensor:
    """Reward adjusted by the anomaly score (penalty only when the score exceeds the anomaly threshold)."""
    flagged = (score > threshold).to(reward.dtype)
    if form == "binary":
        return reward - coef * flagged  # binary variant: r' = r - lambda * 1[score > threshold]
    return reward - coef * score * flagged  # eq. reward shaping: r' = r - lambda * score * 1[score > threshold]


class ScoringTimer:
    """Wall time spent scoring. On the CPU every op runs when called, so `perf_counter` is exact. On a GPU the host
    only queues the kernels: CUDA events mark when the device reaches the start and the end of the scoring, and
    their elapsed times are read at the log line (which syncs anyway), never per step."""

    def __init__(self, device: torch.device):
        self.events = device.type == "cuda"
        self.seconds, self.pending = 0.0, []

    def __enter__(self):
        if self.events:
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.events:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.pending.append((self.start, end))
        else:
            self.seconds += time.perf_counter() - self.start

    def total(self) -> float:
        """Seconds spent scoring so far (on a GPU: waits for the last recorded end event)."""
        for start, end in self.pending:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1e3
        self.pending.clear()
        return self.seconds


class WindowScorer:
    """Stage 3: the window of the last W observations of every env, on the device, scored at every step.

    The windows live in a ring buffer (num_envs, W, D): `roll` writes s_{t+1} over the oldest slot, `window` reads
    the slots oldest-first, `score` runs the detector on all envs in one batch, `shape` adjusts the reward, `reset`
    refills the ring of a finished episode with its first observation (the left padding). Every score is kept (on
    the device, preallocated) for the log line and the per-step ROC AUC against the true cost.
    """

    def __init__(self, detector: nn.Module, threshold: float, first_obs: np.ndarray, penalty_coef: float,
                 penalty_form: str, device: torch.device, max_steps: int):
        self.detector, self.threshold, self.device = detector, threshold, device
        self.coef, self.form = penalty_coef, penalty_form
        self.W = detector.window
        self.ring = torch.as_tensor(first_obs, dtype=torch.float32, device=device)[:, None].repeat(1, self.W, 1)
        self.newest = self.W - 1  # the ring slot of the newest observation
        # oldest-first slot order for each position of the newest slot: order[k] = (k + 1 + arange(W)) % W
        self.order = (torch.arange(self.W, device=device)[:, None] + 1 + torch.arange(self.W, device=device)) % self.W
        self.scores = torch.zeros(max_steps, device=device)  # every score of the run, in step order
        self.count = self.logged = 0
        self.timer = ScoringTimer(device)

    def roll(self, next_obs: torch.Tensor) -> None:
        self.newest = (self.newest + 1) % self.W
        self.ring[:, self.newest] = next_obs

    def window(self) -> torch.Tensor:
        return self.ring[:, self.order[self.newest]]  # the W slots, oldest first

    def score(self) -> torch.Tensor:
        return self.detector.score(self.window())

    def shape(self, reward: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        return shaped_reward(reward, score, self.threshold, self.coef, self.form)

    def reset(self, done: torch.Tensor, first_obs: torch.Tensor) -> None:
        self.ring = torch.where(done[:, None, None], first_obs[:, None], self.ring)

    def step(self, reward: np.ndarray, real_next_obs: np.ndarray, next_obs: np.ndarray, done: np.ndarray) -> torch.Tensor:
        """The shaped rewards r'_t (on the device) for the transitions that reached real_next_obs = s_{t+1}."""
        n = len(reward)
        with self.timer, torch.inference_mode():
            # one host->device copy of the step's data: s_{t+1}, the next episodes' s_0, r_t, done
            packed = torch.as_tensor(np.concatenate([real_next_obs, next_obs, reward[:, None], done[:, None]], 1),
                                     dtype=torch.float32, device=self.device)
            d = real_next_obs.shape[1]
            self.roll(packed[:, :d])  # the window ending at s_{t+1}
            score = self.score()
            shaped = self.shape(packed[:, 2 * d], score)
            if done.any():  # read on the host: no sync
                self.reset(packed[:, 2 * d + 1] > 0, packed[:, d:2 * d])
            self.scores[self.count:self.count + n] = score
        self.count += n
        return shaped

    def state_dict(self) -> dict:
        """The scores so far (for the final per-step ROC AUC) and the counters; the windows restart after a resume."""
        return {"scores": self.scores[:self.count].cpu(), "count": self.count, "logged": self.logged,
                "seconds": self.timer.total()}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.logged, self.timer.seconds = state["count"], state["logged"], state["seconds"]
        self.scores[:self.count] = state["scores"].to(self.device)

    def since_last_log(self) -> torch.Tensor:
        scores, self.logged = self.scores[self.logged:self.count], self.count
        return scores


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Several device tensors -> numpy in ONE device->host copy (one sync on a GPU instead of one per tensor)."""
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).cpu().numpy()
    parts = np.split(flat, np.cumsum([t.numel() for t in tensors])[:-1])
    return [p.reshape(t.shape) for p, t in zip(parts, tensors)]


# --------------------------------------------------------------------------------------------------
# TD3 (stages 1 and 3)
# --------------------------------------------------------------------------------------------------


class StageCheckpoint:
    """The run's checkpoints during one TD3 stage. `--checkpoint-every` counts the env steps of the whole run (stage
    1, then stage 3: `offset` is the steps of the stages before); each checkpoint says its stage and step in it."""

    def __init__(self, checkpointer: Checkpointer, args: Args, stage: str, offset: int, start_time: float,
                 extra: dict | None = None):
        self.checkpointer, self.args, self.stage, self.offset = checkpointer, args, stage, offset
        self.start_time, self.extra = start_time, extra or {}

    def due(self, step: int) -> bool:
        return self.checkpointer.due(self.offset + step)

    def save(self, step: int, td3: dict | None) -> None:
        self.checkpointer.save(self.offset + step, {"stage": self.stage, "stage_step": step, "td3": td3,
                                                    "wall_time": time.time() - self.start_time, **self.extra}, self.args)


def td3_state(nets: dict, optimizers: dict, rb: ReplayBuffer | None, counters: dict, logger: Logger,
              recorder: SourceRecorder | None, scorer: WindowScorer | None, true_costs: np.ndarray | None) -> dict:
    """Everything a TD3 stage needs to continue: networks and targets, optimisers, replay buffer (None: left out),
    counters (and the Lagrange multiplier), the stage's logger, stage 1's recording, stage 3's scores."""
    state = {"nets": {k: net.state_dict() for k, net in nets.items()},
             "optimizers": {k: opt.state_dict() for k, opt in optimizers.items()},
             "counters": counters, "logger": logger.state_dict(),
             "replay_buffer": rb.state_dict() if rb is not None else None}
    if recorder is not None:
        state["recorder"] = recorder.state_dict()
    if scorer is not None:
        state["scorer"], state["true_costs"] = scorer.state_dict(), true_costs[:scorer.count].copy()
    return state


def load_td3_state(state: dict, nets: dict, optimizers: dict, rb: ReplayBuffer, logger: Logger,
                   recorder: SourceRecorder | None, scorer: WindowScorer | None, true_costs: np.ndarray | None,
                   first_obs: np.ndarray, warmup: bool) -> dict:
    """Load `td3_state`'s output into freshly built modules; returns the counters."""
    for k, net in nets.items():
        net.load_state_dict(state["nets"][k])
    for k, opt in optimizers.items():
        opt.load_state_dict(state["optimizers"][k])
    if state["replay_buffer"] is not None:
        rb.load_state_dict(state["replay_buffer"])
    logger.load_state_dict(state["logger"])
    if recorder is not None:
        recorder.load_state_dict(state["recorder"], first_obs, warmup)
    if scorer is not None:
        scorer.load_state_dict(state["scorer"])
        true_costs[:scorer.count] = state["true_costs"]
    return state["counters"]


def run_td3(args: Args, env_id: str, total_timesteps: int, logger: Logger, device: torch.device, seed: int,
            method: str = "td3", detector: nn.Module | None = None, threshold: float = 0.0, record: bool = False,
            checkpoint: StageCheckpoint | None = None, resume: dict | None = None):
    """Train TD3 on `env_id`: stage 1 (`record=True` returns the source data), or stage 3 with `method` ("anoseqs"
    shapes the reward with `detector`; "td3-lag" and "oracle-shaping" use the true cost). `checkpoint` saves the
    stage every --checkpoint-every steps and at its end; `resume` (a checkpoint's state) continues the stage it
    saved. Returns (actor, critics, source data or None, stats: steps, episode returns and costs, SPS)."""
    envs = make_vector_env(env_id, args.num_envs, seed)
    obs_dim = envs.single_observation_space.shape[0]
    act_space = envs.single_action_space
    act_dim = act_space.shape[0]
    if detector is not None and detector.obs_dim != obs_dim:
        raise SystemExit(f"error: the detector was trained on observations of size {detector.obs_dim} but "
                         f"{env_id} has {obs_dim}: use a source run of a task with the same observation space")
    lagrangian = method == "td3-lag"

    actor = Actor(obs_dim, act_dim, args.hidden_size, act_space.low, act_space.high).to(device)
    actor_target = Actor(obs_dim, act_dim, args.hidden_size, act_space.low, act_space.high).to(device)
    actor_target.load_state_dict(actor.state_dict())
    qf1, qf2 = QNetwork(obs_dim, act_dim, args.hidden_size).to(device), QNetwork(obs_dim, act_dim, args.hidden_size).to(device)
    qf1_target, qf2_target = (QNetwork(obs_dim, act_dim, args.hidden_size).to(device),
                              QNetwork(obs_dim, act_dim, args.hidden_size).to(device))
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    q_params = list(qf1.parameters()) + list(qf2.parameters())
    pairs = [(actor, actor_target), (qf1, qf1_target), (qf2, qf2_target)]
    if lagrangian:  # TD3-Lag: a cost critic and a multiplier (on the device: no sync when it is updated)
        qc = QNetwork(obs_dim, act_dim, args.hidden_size).to(device)
        qc_target = QNetwork(obs_dim, act_dim, args.hidden_size).to(device)
        qc_target.load_state_dict(qc.state_dict())
        q_params += list(qc.parameters())
        pairs.append((qc, qc_target))
        lagrange_multiplier = torch.tensor(args.lagrange_init, device=device)
        qc_pi = None
        max_ep_len = envs.env.envs[0].spec.max_episode_steps or 1000
        # the episodic cost limit d as a per-state Q_c limit (SafeRL-Kit's conversion)
        qc_limit = args.cost_limit * (1 - args.gamma ** max_ep_len) / (1 - args.gamma) / max_ep_len
    online_params = [p for net, _ in pairs for p in net.parameters()]
    target_params = [p for _, target in pairs for p in target.parameters()]
    # foreach: Adam's multi-tensor implementation, the default on a GPU (on this CPU: within noise, docs/anoseqs.md)
    q_optimizer = torch.optim.Adam(q_params, lr=args.learning_rate, foreach=True)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, foreach=True)
    nets = {"actor": actor, "actor_target": actor_target, "qf1": qf1, "qf2": qf2, "qf1_target": qf1_target,
            "qf2_target": qf2_target, **({"qc": qc, "qc_target": qc_target} if lagrangian else {})}
    optimizers = {"q_optimizer": q_optimizer, "actor_optimizer": actor_optimizer}
    action_scale = actor.action_scale
    low = torch.as_tensor(act_space.low, dtype=torch.float32, device=device)
    high = torch.as_tensor(act_space.high, dtype=torch.float32, device=device)

    rb = ReplayBuffer(args.buffer_size, {"obs": ((obs_dim,), np.float32), "action": ((act_dim,), np.float32),
                                         "reward": ((), np.float32), "cost": ((), np.float32),
                                         "next_obs": ((obs_dim,), np.float32), "done": ((), np.float32)},
                      device, seed=seed)
    num_iterations = -(-total_timesteps // args.num_envs)
    start_step = resume["stage_step"] if resume is not None else 0
    obs, _ = envs.reset(seed=seed + start_step)  # a resumed stage starts new episodes (other seeds than the first)
    recorder = SourceRecorder(obs, args.learning_starts > 0, total_timesteps + 2 * args.num_envs) if record else None
    scorer, true_costs = None, None
    if detector is not None:  # stage 3 of AnoSeqs
        scorer = WindowScorer(detector, threshold, obs, args.penalty_coef, args.penalty_form, device,
                              num_iterations * args.num_envs)
        true_costs = np.zeros(num_iterations * args.num_envs, np.float32)  # for the per-step ROC AUC, logged only
    updates = actor_updates = 0
    episodes = []  # (return, cost) of every finished training episode, for summary.json
    learning_starts = args.learning_starts  # the first update comes after this step
    if resume is not None:  # continue the stage where the checkpoint left it
        counters = load_td3_state(resume["td3"], nets, optimizers, rb, logger, recorder, scorer, true_costs, obs,
                                  start_step < args.learning_starts)
        updates, actor_updates, episodes = counters["updates"], counters["actor_updates"], counters["episodes"]
        if lagrangian:
            lagrange_multiplier = counters["lagrange_multiplier"].to(device)
        if resume["td3"]["replay_buffer"] is None:  # --no-checkpoint-buffer: refill it before updating again
            learning_starts = start_step + args.learning_starts

    def choose_actions(o: np.ndarray, step: int) -> torch.Tensor:
        """Actions for the vector step that ends at global step `step`, on the device."""
        with torch.no_grad():
            if step <= args.learning_starts:  # the random warm-up: uniform actions
                return low + (high - low) * torch.rand((args.num_envs, act_dim), device=device)
            a = actor(torch.as_tensor(o, dtype=torch.float32, device=device))
            return (a + torch.randn_like(a) * action_scale * args.exploration_noise).clamp(low, high)

    losses = {}
    logger.restart_clock(start_step, total_timesteps)  # SPS and ETA of this stage only (stages 1-2 may have run)
    start_time = logger.start_time
    actions = choose_actions(obs, start_step + args.num_envs).cpu().numpy()
    if resume is not None:
        set_rng_state(resume["rng"])  # the random draws continue as from the checkpoint's step on
    first_logged_update = updates + 1 if resume is not None else None  # a resumed run logs its first update's losses
    global_step = start_step
    for iteration in range(start_step // args.num_envs + 1, num_iterations + 1):
        global_step = iteration * args.num_envs
        next_obs, rewards, costs, terminations, truncations, infos = envs.step(actions)
        dones = np.logical_or(terminations, truncations)
        for i, ep in finished_episodes(infos):
            logger.log_episode(global_step, ep["r"], ep["c"], ep["l"])
            episodes.append((float(ep["r"]), float(ep["c"])))
        logger.log_costs(global_step, costs)  # the true cost: logged, never shown to the AnoSeqs/TD3 agent
        real_next_obs = next_obs.copy()
        for i in np.flatnonzero(dones):
            real_next_obs[i] = infos["final_observation"][i]
        if recorder is not None:
            recorder.add(real_next_obs, costs, terminations, dones, next_obs, global_step <= args.learning_starts)

        # The next step's action is chosen now; with a detector it comes back in one copy with the shaped reward.
        next_actions = choose_actions(next_obs, global_step + args.num_envs)
        if method == "oracle-shaping":
            rewards = rewards - args.cost_penalty_coef * costs  # baseline: r - lambda c with the TRUE cost
        if scorer is not None:
            next_actions, rewards = to_host(next_actions, scorer.step(rewards, real_next_obs, next_obs, dones))
            true_costs[(iteration - 1) * args.num_envs:iteration * args.num_envs] = costs
        else:
            next_actions = next_actions.cpu().numpy()  # the one device->host copy of the step, as CleanRL
        rb.add(obs=obs, action=actions, reward=rewards, cost=costs, next_obs=real_next_obs,
               done=terminations.astype(np.float32))
        obs, actions = next_obs, next_actions

        if global_step > learning_starts:
            data = rb.sample(args.batch_size)
            with torch.no_grad():
                clipped_noise = (torch.randn_like(data["action"]) * args.policy_noise).clamp(
                    -args.noise_clip, args.noise_clip) * action_scale
                next_act = (actor_target(data["next_obs"]) + clipped_noise).clamp(low, high)  # target smoothing
                min_qf_next = torch.min(qf1_target(data["next_obs"], next_act), qf2_target(data["next_obs"], next_act))
                next_q = data["reward"] + (1 - data["done"]) * args.gamma * min_qf_next  # clipped double-Q target
            qf1_loss = F.mse_loss(qf1(data["obs"], data["action"]), next_q)
            qf2_loss = F.mse_loss(qf2(data["obs"], data["action"]), next_q)
            qf_loss = qf1_loss + qf2_loss
            losses.update(qf1_loss=qf1_loss, qf2_loss=qf2_loss)
            if lagrangian:
                with torch.no_grad():
                    next_qc = data["cost"] + (1 - data["done"]) * args.gamma * qc_target(data["next_obs"], next_act)
                qc_loss = F.mse_loss(qc(data["obs"], data["action"]), next_qc)
                qf_loss = qf_loss + qc_loss
                losses.update(qc_loss=qc_loss)
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
                losses.update(actor_loss=actor_loss)
                actor_optimizer.zero_grad()
                actor_loss.backward()
                actor_optimizer.step()
                actor_updates += 1
                if lagrangian:  # projected gradient ascent on the multiplier
                    lagrange_multiplier = (lagrange_multiplier + args.lagrange_lr * (qc_pi.detach() - qc_limit)).clamp(min=0.0)
                with torch.no_grad():  # Polyak averaging of all target networks: theta' <- (1 - tau) theta' + tau theta
                    torch._foreach_lerp_(target_params, online_params, args.tau)

        if global_step % args.log_every < args.num_envs or iteration == num_iterations or updates == first_logged_update:
            for name, value in losses.items():  # the NaN check once per log line, not at every update (a sync on a GPU)
                check_finite(f"losses/{name}", value)
                logger.scalar(f"losses/{name}", value.item(), global_step)
            if updates:
                logger.scalar("charts/actor_updates_per_critic_update", actor_updates / updates, global_step)
            if lagrangian and updates:
                logger.scalar("charts/lagrange_multiplier", lagrange_multiplier.item(), global_step)
                if qc_pi is not None:  # an actor update has run (in this process)
                    logger.scalar("charts/qc_value", qc_pi.item(), global_step)
            extra = ""
            if scorer is not None:
                scores = scorer.since_last_log().cpu().numpy()
                penalised = float((scores > threshold).mean())
                logger.writer.add_histogram("charts/anomaly_score", scores, global_step)
                logger.scalar("charts/anomaly_score_mean", scores.mean(), global_step)
                logger.scalar("charts/penalised_fraction", penalised, global_step)
                logger.scalar("charts/scoring_time_fraction", scorer.timer.total() / max(time.time() - start_time, 1e-9),
                              global_step)
                extra = f"penalised={penalised:.3f}"
            logger.console(global_step, extra)

        if checkpoint is not None and (checkpoint.due(global_step) or iteration == num_iterations):  # after logging
            counters = {"updates": updates, "actor_updates": actor_updates, "episodes": episodes,
                        **({"lagrange_multiplier": lagrange_multiplier} if lagrangian else {})}
            checkpoint.save(global_step, td3_state(nets, optimizers, rb if args.checkpoint_buffer else None, counters,
                                                   logger, recorder, scorer, true_costs))
    envs.close()

    stats = {"steps": num_iterations * args.num_envs, "returns": [r for r, _ in episodes],
             "costs": [c for _, c in episodes], "sps": logger.sps(num_iterations * args.num_envs)}
    if scorer is not None:  # how well the detector's score matches the target's true cost, over all of stage 3
        scores = scorer.scores[:scorer.count].cpu().numpy()
        auc = stats["target_roc_auc"] = roc_auc(scores[true_costs <= 0], scores[true_costs > 0])
        logger.scalar("charts/target_roc_auc", auc, global_step)
        wall, scoring = time.time() - start_time, scorer.timer.total()
        print(f"stage 3: per-step ROC AUC of the score vs the true cost in the target: {auc:.3f}; "
              f"scoring took {scoring:.1f}s of {wall:.1f}s ({scoring / max(wall, 1e-9):.1%})", flush=True)
    return actor, (qf1, qf2), (recorder.data() if recorder is not None else None), stats


def evaluate(actor: Actor, env_id: str, episodes: int, seed: int, device: torch.device, logger: Logger, step: int,
             capture_video: bool = False, video_size: int = 256) -> tuple[list[float], list[float]]:
    """Deterministic episodes of the target agent: raw (unshaped) return and true episode cost. With
    `capture_video`, each episode is rendered (rgb_array, video_size pixels square) to runs/<run>/videos/."""
    env = make_safety_env(env_id, seed=seed, render_mode="rgb_array" if capture_video else None,
                          render_size=video_size)
    returns, costs = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, ret, cost = False, 0.0, 0.0
        frames = [env.render()] if capture_video else []
        while not done:
            with torch.no_grad():
                action = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)[None])[0].cpu().numpy()
            obs, reward, terminated, truncated, info = env.step(action)
            ret, cost, done = ret + reward, cost + info["cost"], terminated or truncated
            if capture_video:
                frames.append(env.render())
        logger.log_episode(step, ret, cost, 0, prefix="eval")
        returns.append(float(ret))
        costs.append(float(cost))
        if capture_video:
            path = save_video(frames, video_path(logger.run_dir, "eval", ep), fps=env.metadata.get("render_fps", 30))
            print(f"eval: episode {ep} recorded to {path}", flush=True)
    env.close()
    print(f"eval: {episodes} episodes, return {np.mean(returns):.2f} +- {np.std(returns):.2f}, "
          f"cost {np.mean(costs):.2f} +- {np.std(costs):.2f}", flush=True)
    return returns, costs


DETECTOR_CONFIG_KEYS = ("kind", "obs_dim", "window_length", "score_on", "source_env_id", "roc_auc_policy")


def build_detector(config: dict) -> nn.Module:
    if config["kind"] == "nearest-neighbour":
        return NearestNeighbourDetector(config["obs_dim"], config["window_length"], config["memory_size"],
                                        score_on=config["score_on"])
    return TransformerAutoencoder(config["obs_dim"], config["window_length"], config["d_model"], config["heads"],
                                  config["layers"], config["latent_dim"], score_on=config["score_on"])


def detector_config(args: Args, detector: nn.Module, result: dict, source_env_id: str) -> dict:
    config = {"kind": args.detector, "obs_dim": detector.obs_dim, "window_length": args.window_length,
              "score_on": args.score_on, "source_env_id": source_env_id, "detector_windows": args.detector_windows,
              "roc_auc_policy": result["auc_policy"], "roc_auc_with_warmup": result["auc_all"]}
    if args.detector == "nearest-neighbour":
        config["memory_size"] = detector.memory.shape[0]
    else:
        config.update(d_model=args.detector_d_model, heads=args.detector_heads, layers=args.detector_layers,
                      latent_dim=args.detector_latent_dim)
    return config


def load_detector(path: str, device: torch.device) -> tuple[nn.Module, float, dict]:
    """The detector saved by stage 2; a file that is not one ends in a clear error, not a KeyError traceback."""
    what = f"error: --source-run: {path!r} is not a detector saved by stage 2 of this anoseqs.py"
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:
        raise SystemExit(f"{what}: cannot read it ({e})") from None
    if (not isinstance(ckpt, dict) or any(k not in ckpt for k in ("model", "threshold", "config"))
            or not isinstance(ckpt["config"], dict) or any(k not in ckpt["config"] for k in DETECTOR_CONFIG_KEYS)):
        raise SystemExit(f"{what}: it lacks the model, threshold or config {list(DETECTOR_CONFIG_KEYS)}; "
                         "rerun --stage 2")
    config = ckpt["config"]
    try:
        model = build_detector(config).to(device)
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise SystemExit(f"{what}: its weights do not match its config ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, float(ckpt["threshold"]), config


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


def load_source_data(run_dir: str) -> dict:
    keys = ("obs", "cost", "terminal", "warmup", "episode_start")
    with np.load(os.path.join(run_dir, "source_data.npz")) as f:
        if any(k not in f for k in keys):
            raise SystemExit(f"error: --source-run {run_dir!r}: its source_data.npz lacks {[k for k in keys if k not in f]} "
                             "(written by an older anoseqs.py): rerun --stage 1")
        return {k: f[k] for k in keys}


if __name__ == "__main__":
    args = tyro.cli(Args)
    args, resumed = resume_run(args, "anoseqs")  # --resume runs/<run>: that run's flags and its checkpoint
    check_args(args)
    try:
        env_id, vision = normalize_env_id(args.env_id)
        source_env_id, source_vision = normalize_env_id(args.source_env_id or args.env_id)
    except ValueError as e:
        raise SystemExit(f"error: --env-id / --source-env-id: {e}") from None
    if vision or source_vision:  # the id was silently reduced to its state version before
        raise SystemExit(f"error: --env-id {args.env_id!r} / --source-env-id {args.source_env_id!r}: AnoSeqs works on "
                         "state observations (windows of flat feature vectors); drop 'Vision' from the id")
    uses_detector = args.method == "anoseqs"
    if uses_detector and args.stage == "all" and source_env_id != env_id and resumed is None:
        check_same_observation(source_env_id, env_id)  # before hours of stages 1 and 2, not after them
    stages = (["1", "2", "3"] if args.stage == "all" else [args.stage]) if uses_detector else ["3"]
    # a checkpoint must come from a run of the same tasks and stages, with the same tensor sizes
    identity = {"script": "anoseqs", "env_id": env_id, "source_env_id": source_env_id, "method": args.method,
                "stage": args.stage, "num_envs": args.num_envs, "hidden_size": args.hidden_size,
                "buffer_size": args.buffer_size, "detector": args.detector, "window_length": args.window_length,
                "detector_sizes": [args.detector_d_model, args.detector_heads, args.detector_layers,
                                   args.detector_latent_dim]}
    state = resumed["state"] if resumed is not None else None
    resume_at = state["stage"] if state is not None else None  # the stage the checkpoint was written in: "1" or "3"
    if resumed is not None:
        check_identity(resumed["identity"], identity, resumed["path"])
        run_dir = resumed["run_dir"]  # the same directory and TensorBoard curves
        logger = Logger(os.path.basename(run_dir), args, root=os.path.dirname(run_dir),
                        resume_step=state["stage_step"] if resume_at == "3" else 0)
    else:
        logger = Logger(f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}", args)
    checkpointer = Checkpointer(logger.run_dir, args.checkpoint_every, identity, start_step=state["step"] if state else 0)
    start_time = time.time() - (state["wall_time"] if state else 0.0)  # the run's wall time, over its resumes
    seed_everything(args.seed, args.torch_deterministic)
    device = get_device(args.cuda)
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    if not uses_detector and args.stage == "all":
        print(f"--method {args.method}: a baseline without detector; stages 1 and 2 are skipped", flush=True)
    plan = {"1": f"stage 1: TD3 in {source_env_id} for {args.source_timesteps} steps (--source-timesteps)",
            "2": f"stage 2: the detector on stage 1's safe windows, {args.detector_steps} updates (--detector-steps)",
            "3": f"stage 3: {args.method} in {env_id} for {args.total_timesteps} steps (--total-timesteps)"}
    done = ["1", "2"] if resume_at == "3" else []  # stages finished before the checkpoint
    print("plan: " + "; then ".join(plan[s] + (" (done)" if s in done else "") for s in stages), flush=True)
    if resumed is not None:
        print(f"resuming {logger.run_dir} at step {state['stage_step']} (stage {resume_at}"
              f"{'; stages 1 and 2 are done' if resume_at == '3' and uses_detector else ''}"
              f"{'; stage 2 is redone from the saved stage-1 data' if resume_at == '1' and '2' in stages else ''}); "
              "the environments are reset, the episodes in progress are lost", flush=True)
    elif args.source_run:
        logger.writer.add_text("source_run", args.source_run)
    source_offset = args.source_timesteps if "1" in stages else 0  # env steps before stage 3 (--checkpoint-every)

    if "1" in stages and resume_at in (None, "1"):  # stage 1: the source agent; its cost only labels the windows
        print(f"stage 1: TD3 in the source environment {source_env_id} for {args.source_timesteps} steps", flush=True)
        source_logger = Logger("source", args, root=logger.run_dir, total_steps=args.source_timesteps,
                               resume_step=state["stage_step"] if resume_at == "1" else None)
        _, _, source_data, source_stats = run_td3(
            args, source_env_id, args.source_timesteps, source_logger, device, args.seed + 10_000, record=True,
            checkpoint=StageCheckpoint(checkpointer, args, "1", 0, start_time), resume=state)
        source_logger.close()
        np.savez_compressed(os.path.join(logger.run_dir, "source_data.npz"), env_id=source_env_id, **source_data)
    elif "2" in stages and resume_at is None:
        source_data = load_source_data(args.source_run)

    if "2" in stages and resume_at != "3":  # stage 2: the detector and its anomaly threshold
        detector_logger = Logger("detector", args, root=logger.run_dir, total_steps=args.detector_steps,
                                 resume_step=0 if resumed is not None else None)
        detector, result = train_detector(args, source_data, detector_logger, device)
        detector_logger.close()
        threshold, config = result["threshold"], detector_config(args, detector, result, source_env_id)
        saved_detector = {"model": detector.state_dict(), "threshold": threshold, "config": config}
        torch.save(saved_detector, os.path.join(logger.run_dir, "detector.pt"))
        StageCheckpoint(checkpointer, args, "3", source_offset, start_time, {"detector": saved_detector}).save(0, None)
    elif uses_detector and ("3" in stages or resume_at == "3"):
        if resume_at == "3":  # the detector saved in the checkpoint (stage 2 of this run, or --source-run's)
            saved_detector = state["detector"]
            detector = build_detector(saved_detector["config"]).to(device)
            detector.load_state_dict(saved_detector["model"])
            detector.eval()
            threshold, config = saved_detector["threshold"], saved_detector["config"]
        else:
            detector, threshold, config = load_detector(os.path.join(args.source_run, "detector.pt"), device)
            saved_detector = {"model": detector.state_dict(), "threshold": threshold, "config": config}
        if "3" in stages:
            print(f"stage 3: {config['kind']} detector from {args.source_run or 'the checkpoint'} (trained on "
                  f"{config['source_env_id']}, W={config['window_length']}, score on the {config['score_on']}), anomaly threshold {threshold:.4f}, "
                  f"held-out ROC AUC {config['roc_auc_policy']:.3f}", flush=True)

    if "3" in stages:  # stage 3: the target agent on the shaped reward (or a baseline)
        target_resume = state if resume_at == "3" and state["td3"] is not None else None  # None: stage 3 starts now
        if uses_detector:
            warn_about_detector(config["roc_auc_policy"])
            if target_resume is None:
                logger.scalar("charts/anomaly_threshold", threshold, 0)
                logger.scalar("charts/detector_roc_auc", config["roc_auc_policy"], 0)
        print(f"stage 3: {args.method} in the target environment {env_id} for {args.total_timesteps} steps", flush=True)
        actor, (qf1, qf2), _, target_stats = run_td3(
            args, env_id, args.total_timesteps, logger, device, args.seed, args.method,
            detector if uses_detector else None, threshold if uses_detector else 0.0,
            checkpoint=StageCheckpoint(checkpointer, args, "3", source_offset, start_time,
                                       {"detector": saved_detector} if uses_detector else {}),
            resume=target_resume)
        if args.save_model:
            path = os.path.join(logger.run_dir, f"{args.exp_name}.cleanrl_model")
            torch.save({"actor": actor.state_dict(), "qf1": qf1.state_dict(), "qf2": qf2.state_dict()}, path)
            print(f"model saved to {path}", flush=True)
        eval_returns, eval_costs = [], []
        if args.eval_episodes > 0:
            eval_returns, eval_costs = evaluate(actor, env_id, args.eval_episodes, args.seed + 100_000, device, logger,
                                                args.total_timesteps, args.capture_video, args.video_size)

    # summary.json: the target agent's run (stage 1's with --stage 1; no TD3 stage with --stage 2)
    train = (target_stats if "3" in stages else source_stats if "1" in stages
             else {"steps": 0, "returns": [], "costs": [], "sps": None})
    train_costs = np.asarray(train["costs"], dtype=np.float64)
    write_summary(
        logger.run_dir, args, script="anoseqs", start_time=start_time, env_id=env_id if "3" in stages else source_env_id,
        total_steps=train["steps"], eval_return=float(np.mean(eval_returns)) if "3" in stages and eval_returns else None,
        eval_cost=float(np.mean(eval_costs)) if "3" in stages and eval_costs else None,
        train_cost=float(train_costs.mean()) if len(train_costs) else None, train_episodes=len(train_costs),
        train_violating_episodes=int((train_costs > args.cost_limit).sum()), cost_limit=args.cost_limit,
        cost_rate=(logger if "3" in stages else source_logger).cost_rate if train["steps"] else None, sps=train["sps"],
        stages=stages, source_steps=args.source_timesteps if "1" in stages else 0,
        eval_returns=eval_returns if "3" in stages else [], eval_costs=eval_costs if "3" in stages else [],
        anomaly_threshold=threshold if uses_detector and stages != ["1"] else None,
        detector_roc_auc=config["roc_auc_policy"] if uses_detector and stages != ["1"] else None,
        target_roc_auc=train.get("target_roc_auc"))
    logger.close()
    print(f"run directory: {logger.run_dir}", flush=True)
