"""Progressive Safeguarded Learning (PSL).

Paper: "Progressive Safeguards for Safe and Model-Agnostic Reinforcement Learning", N. Omi, H. Hasanbeig,
H. Sharma, S. K. Rajamani, S. Sen (Microsoft Research), arXiv 2410.24096. Authors' code:
github.com/grockious/safeguardedRL (read, not copied).

Idea: a *safeguard* is a small finite-state machine over sets of labels with a rejecting sink (def. 8-9).
It runs beside the environment (the product or "safeguarded" state is (MDP state, safeguard state),
def. 10) and shapes the reward: a bonus in accepting states and a penalty p on entering the sink, where the
episode ends (eq. 5). Training walks through a progression of safeguards, from "never touch anything
dangerous" to nuanced ones ("lava is fine once you carry wood to a work bench"); when the agent moves to
the next safeguard, its safety bias is transferred: a tabular agent initialises each new product state from
its ancestor safeguard states (eq. 7), a network agent continues from the previous weights.

Two environments, one flag (`--env-id minecraft|vizdoom`), four methods (`--method psl|zero-shot|
intrinsic-fear|baseline`):
- minecraft: the authors' 10x10 slippery gridworld, tabular Q-learning, the authors' four safeguards
  (`minecraft_1` = paper fig. 4a and 4b together, `_2` = 4c, `_6` = 4d, `_7` = 4e, the final one).
- vizdoom: a map generated as UDMF text (common/doom.py: lava, armor, plasma gun, a door, a Baron of Hell),
  a synchronous PPO on RGB frames (CNN + frame stack), games in worker processes, the three Doom safeguards.

Every method is scored with one violation metric per domain, whatever safeguard it trains under: the final
safeguard run as a monitor (gridworld) and the authors' fixed checks "in lava without armor", "in the boss area
without the weapon" (ViZDoom), per episode and per step. Standard RL and intrinsic fear have no safeguard by
default in both domains (the environment's reward, no stop at a violation), as the authors' ViZDoom runs.

Long runs (issue 15): `--checkpoint-every N` writes runs/<run>/checkpoint.pt every N finished EPISODES for minecraft
(its budget, --total-episodes, is counted in episodes) or every N ENV STEPS for vizdoom (--total-timesteps), and at
the end of training; `--resume runs/<run>` continues the same run directory and TensorBoard curves under the
safeguard it was killed in (finished safeguards are not redone). The environments are reset on resume: the episodes
in progress are lost (a vizdoom checkpoint counts their violations, as a safeguard switch does). The plan (each
safeguard with its budget) is printed at the start. `--capture-video` records the first evaluation episode as
runs/<run>/videos/eval-episode-0.mp4. Every run ends by writing runs/<run>/summary.json: an episode's cost is the
common metric below (gridworld: 0/1, vizdoom: 0-2 checks failed) and `cost_limit` is 0, as the paper has no cost
budget: a run is unsafe once in the sink (eq. 4), so any violation puts an episode over the limit.

Paper -> code:
- def. 8-9 (safeguard, rejecting sink)  -> `Safeguard` (a table of rules), `SINK`
- def. 10 (product state)               -> `ProductSpace` (global ids of safeguard states); `sg_state` beside `pos`
- eq. 4 (a run is unsafe once in the sink) -> `sg_violated`; the common metric: `monitor` / `doom_checks()`
- eq. 5 (safeguard-shaped reward)       -> `shaped_reward()`
- eq. 7 (safety-bias transfer)          -> `bias_transfer()`, `transfer_sources()`, `Safeguard.ancestors()`
- the progression (Algorithm 1)         -> `Progression`: a fixed budget per safeguard, or earlier once the values of
                                           the product states the safeguard adds have settled
- Lipton et al. 2016 intrinsic fear     -> `FearTable` (tabular), `FearNet` and `label_fear_frames` (pixels)
- def. 13 (probability of staying safe) -> `safety_probability()`: exact, on the gridworld's product MDP
- Algorithm 1 (PSL with a learner)      -> `run_gridworld()` / `run_vizdoom()`

Deviations (see docs/psl.md for the reasons and the full list):
- Q-learning updates the EXECUTED action (the authors' code updates the greedy one; `--authors-update`).
- The gridworld runs `--num-envs` episodes side by side; each batch of updates reads one Q snapshot
  (`--num-envs 1` is plain sequential Q-learning).
- eq. 7 averages the visited ancestors of the new safeguard state (`--transfer authors`: states 0..i-1 of the
  i-th safeguard, as their code, which includes siblings).
- `--progression converge` (default) ends a safeguard once the values of its new product states have settled, at
  the latest at the fixed budget; the paper's "V(s0) has converged" cannot tell the safeguards apart (V(s0) is the
  value of (s0, initial state), the same in all of them).
- ViZDoom: synchronous PPO with a frame stack instead of APPO + GRU (sample-factory); 80x60 RGB instead of 128x72;
  one categorical over the authors' 54 button combinations instead of four independent heads; small CPU budgets.
- Intrinsic fear follows Lipton et al. (a classifier of "within k_r steps of a catastrophe"); the authors'
  doom_gym.py has a fixed penalty for k steps after the health rises instead. Catastrophe = the common metric.
- The LLM fine-tuning domain of the paper is out of scope.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import Logger, check_choice, check_finite, check_positive, get_device, layer_init, seed_everything
from common.checkpoint import (CHECKPOINT_NAME, RESUMABLE_CHANGES, Checkpointer, check_identity, pack_array,
                               resume_run, set_rng_state, unpack_array)
from common.logger import format_eta
from common.summary import write_summary
from common.video import save_video, video_path
from common.doom import ACTIONS as DOOM_ACTIONS
from common.doom import DOOR_Y, LAVA_Y, MAP_WIDTH, DoomVecEnv, write_wad


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    cuda: bool = True
    """if toggled, cuda will be enabled by default (vizdoom only; the gridworld is tabular numpy)"""
    capture_video: bool = False
    """record the first evaluation episode as runs/<run>/videos/eval-episode-0.mp4: minecraft, the first greedy test
    episode drawn as a 160x160 image (16 px per cell, the agent blue, red once it violates); vizdoom, the first
    evaluation episode as the agent sees it (the 160x120 screen buffer halved to 80x60 RGB, upscaled 4x to 320x240)"""
    save_model: bool = False
    """whether to save the Q-table (minecraft) or the network (vizdoom) into the run directory"""
    checkpoint_every: int = -1
    """a checkpoint (runs/<run>/checkpoint.pt) every this many EPISODES for minecraft (its budget is counted in
    episodes) or ENV STEPS for vizdoom, and at the end of training; -1: 1000 episodes (minecraft; measured 0.2-0.7
    MiB and 0.1-0.7 s each in a default run) or 20480 steps (vizdoom, 20 PPO updates; 10 MiB and 0.1 s at the default
    sizes, up to 67 MiB and 2 s measured with intrinsic fear's frame memory); 0: only at the end"""
    checkpoint_buffer: bool = True
    """keep intrinsic fear's frame memory (vizdoom, up to 2 x 5000 frames) in the checkpoint; --no-checkpoint-buffer
    leaves it out (smaller files; a resumed run refills it). Q-learning and PPO have no replay buffer"""
    resume: str | None = None
    """a run directory runs/<run> to continue; its flags are used, only --total-episodes/--total-timesteps/
    --checkpoint-every/... may change. The environments are reset: the episodes in progress are lost"""

    # Algorithm specific arguments
    env_id: str = "minecraft"
    """the environment: minecraft (tabular gridworld) or vizdoom (pixels)"""
    method: str = "psl"
    """psl (progression + bias transfer), zero-shot (final safeguard only), intrinsic-fear, or baseline"""
    progression: str = "converge"
    """when PSL moves on: converge (the values of the new safeguard's own product states have settled, at the
    latest at the fixed budget) or fixed (the budget only, as the authors' code)"""
    converge_window: int = 100
    """converge: values recorded per window (gridworld: episodes; vizdoom: rollouts); settled when the means of the
    last two windows differ by less than --converge-tol"""
    converge_tol: float = 0.01
    """converge: tolerance on the new product states' mean value"""
    baselines_guarded: bool = False
    """baseline and intrinsic fear also get the final safeguard: its penalty, and the episode ends at its first
    violation (on the MDP state only). Off: standard RL on the environment's reward, as the authors' ViZDoom runs"""
    penalty: float = 0.1
    """p of eq. 5: the penalty for entering the rejecting sink (gridworld: 0.1 as the authors' code)"""
    fear_radius: int = 5
    """intrinsic fear: k_r, the number of steps before a catastrophe whose states are labelled dangerous"""
    fear_factor: float = 0.1
    """intrinsic fear: lambda, the weight of the fear penalty once fully phased in"""
    fear_phase_in: float = 0.2
    """intrinsic fear: fraction of the training budget over which lambda grows linearly from 0"""
    eval_episodes: int = 100
    """gridworld: greedy test episodes under the final safeguard after training (the authors' test)"""

    # Gridworld (tabular Q-learning)
    total_episodes: int = 5000
    """gridworld: training episodes over the whole progression, all safeguards together (--total-timesteps is not
    used here)"""
    stage_episodes: int = 0
    """gridworld: the fixed budget of each safeguard but the last, in episodes (0 = an equal share of
    --total-episodes; the authors' code uses 1666, which leaves 2 of 5000 episodes to its 4th safeguard)"""
    max_episode_steps: int = 1000
    """gridworld: at most this many steps per episode"""
    num_envs: int = 32
    """number of environments stepped side by side (gridworld: episodes in parallel; vizdoom: PPO actors)"""
    alpha: float = 0.9
    """gridworld: Q-learning rate"""
    gamma: float = 0.9
    """discount factor (gridworld 0.9; vizdoom uses --doom-gamma)"""
    epsilon: float = 0.1
    """gridworld: epsilon-greedy exploration"""
    slip_probability: float = 0.05
    """gridworld: probability that the action is replaced by a random one"""
    accept_reward: float = 0.1
    """gridworld: reward of eq. 5 for each step that ends in an accepting (non-sink) safeguard state"""
    transfer: str = "ancestors"
    """eq. 7: average over the visited ancestors of the new state (ancestors, the paper) or over the states
    0..i-1 of the i-th safeguard (authors, their code)"""
    transfer_factor: float = 1.0
    """eq. 7: bias-transfer factor (1 = plain average, as the authors' code)"""
    transfer_depth: int = 4
    """eq. 7: k, how many parent steps towards the initial state the ancestors are collected"""
    authors_update: bool = False
    """gridworld: reproduce the authors' code, which updates the GREEDY action when a random one was executed
    (a bug, for comparison only; off = correct Q-learning)"""
    exact_eval_every: int = 500
    """gridworld: every this many episodes, compute exactly the probability that the greedy policy satisfies the
    final safeguard for --max-episode-steps steps (charts/safety_probability; 0 = only at the end)"""

    # ViZDoom (synchronous PPO on RGB frames)
    total_timesteps: int = 100_000
    """vizdoom: agent steps over the whole progression, all safeguards together (each step repeats the action
    doom_frame_skip frames); unused by minecraft, whose budget is --total-episodes"""
    doom_stage_fractions: tuple[float, float] = (0.0625, 0.375)
    """vizdoom: end of safeguards 0 and 1 as fractions of the budget (the authors: 2.5M and 15M of 40M frames)"""
    doom_eval_episodes: int = 8
    """vizdoom: evaluation episodes under the final safeguard after training"""
    doom_penalty: float = 1.0
    """vizdoom: p of eq. 5 (the authors ran PSL with 0, 0.5 and 1, zero-shot with 0)"""
    doom_frame_skip: int = 4
    """vizdoom: frames per agent step"""
    doom_episode_tics: int = 4200
    """vizdoom: episode timeout in game tics (35 per second; the authors' safe_rl.cfg: 4200)"""
    doom_workers: int = -1
    """vizdoom: worker processes for the games (-1 = one per CPU core, at most --num-envs; 0 = this process)"""
    frame_stack: int = 2
    """vizdoom: RGB frames stacked as the observation"""
    learning_rate: float = 1e-4
    """vizdoom: Adam learning rate (paper: 1e-4)"""
    num_steps: int = 32
    """vizdoom: rollout length per environment (paper: 32)"""
    doom_gamma: float = 0.99
    """vizdoom: discount factor"""
    gae_lambda: float = 0.95
    """vizdoom: GAE lambda"""
    num_minibatches: int = 1
    """vizdoom: PPO minibatches per epoch (the authors' APPO: one batch of 1024 transitions per update)"""
    update_epochs: int = 1
    """vizdoom: PPO epochs per rollout (the authors' APPO: 1)"""
    clip_coef: float = 0.1
    """vizdoom: PPO clip (paper: 0.1)"""
    ent_coef: float = 0.01
    """vizdoom: entropy bonus"""
    vf_coef: float = 0.5
    """vizdoom: value loss weight"""
    max_grad_norm: float = 4.0
    """vizdoom: gradient clipping (the authors' APPO: 4)"""
    torch_threads: int = 1
    """vizdoom: CPU threads for torch (1 avoids oversubscribing a small CPU beside the Doom games)"""
    hidden_size: int = 512
    """vizdoom: width of the fully connected layer after the CNN (paper: 512)"""


# ------------------------------------------------------------------------------------------------------
# Safeguards (def. 8-10), the shaped reward (eq. 5), bias transfer (eq. 7) and the progression
# ------------------------------------------------------------------------------------------------------
SINK = "sink"  # def. 9: the rejecting sink; entering it is a safety violation and it is never left
INITIAL = "start"


class Safeguard:
    """A finite-state machine over sets of labels with a rejecting sink (def. 8-9), stepped on the fly.

    `rules` is a table of (state, labels, next_state): in `state`, if ANY of `labels` is in the label set
    just observed, go to `next_state`; the first matching row wins; no match = stay. States are names, so
    the same name in two safeguards of a progression is the same safeguard state (bias transfer, eq. 7).
    Every non-sink state is accepting. Example, "never creeper, never lava":
        Safeguard("no creeper, no lava", [("start", {"creeper", "lava"}, SINK)])
    """

    def __init__(self, name: str, rules: list[tuple[str, set, str]]):
        self.name, self.rules = name, [(q, frozenset(labels), q2) for q, labels, q2 in rules]
        self.states = [INITIAL]
        for q, _, q2 in self.rules:
            for s in (q, q2):
                if s != SINK and s not in self.states:
                    self.states.append(s)

    def step(self, q: str, labels) -> str:
        if q == SINK:
            return SINK  # remark 14: once in the sink the specification can never be met again
        for src, trigger, dst in self.rules:
            if src == q and trigger & set(labels):
                return dst
        return q

    def parents(self, q: str) -> set[str]:
        """States with an edge into q (self-loops and the sink excluded)."""
        return {src for src, _, dst in self.rules if dst == q and src != q and src != SINK}

    def ancestors(self, q: str, k: int) -> list[str]:
        """eq. 7: the loop-free set of nodes reached from q by walking up to k steps from child to parent."""
        found, frontier = [], {q}
        for _ in range(k):
            frontier = {p for s in frontier for p in self.parents(s)} - set(found) - {q}
            found += sorted(frontier)
        return found

    def run(self, trace) -> list[str]:
        """The run of the safeguard on a label trace (one label set per step), initial state excluded."""
        q, out = INITIAL, []
        for labels in trace:
            q = self.step(q, labels)
            out.append(q)
        return out


class ProductSpace:
    """The explicit product (def. 10): every safeguard state of a progression gets one global integer id, in order
    of first appearance (for the gridworld these are the authors' automaton state numbers 0-4).

    `table(k, label_sets)` compiles safeguard k into next_id[q_id, label_id] (-1 = sink) so that many
    environments step their safeguards with one array lookup. `new_states(order)[k]` are the ids of the states
    that the k-th safeguard of `order` adds to the ones before it.
    """

    def __init__(self, safeguards: list[Safeguard]):
        self.safeguards = safeguards
        self.names = []
        for sg in safeguards:
            self.names += [s for s in sg.states if s not in self.names]
        self.index = {n: i for i, n in enumerate(self.names)}

    def table(self, k: int, label_sets: list[frozenset]) -> np.ndarray:
        sg, out = self.safeguards[k], np.full((len(self.names), len(label_sets)), -1, dtype=np.int64)
        for i, name in enumerate(self.names):
            for j, labels in enumerate(label_sets):
                nxt = sg.step(name, labels) if name in sg.states else SINK
                out[i, j] = -1 if nxt == SINK else self.index[nxt]
        return out

    def new_states(self, order: list[int]) -> list[list[int]]:
        seen, out = set(), []
        for k in order:
            out.append([self.index[s] for s in self.safeguards[k].states if s not in seen])
            seen |= set(self.safeguards[k].states)
        return out


def shaped_reward(mdp_reward, violated, accept_reward: float, penalty: float):
    # eq. 5: r' = r + r_accept * [q' accepting] - p * [q' in the rejecting sink]
    violated = np.asarray(violated, dtype=np.float64)
    return np.asarray(mdp_reward, dtype=np.float64) + accept_reward * (1.0 - violated) - penalty * violated


def transfer_sources(space: ProductSpace, sg: Safeguard, q_id: int, stage: int, rule: str, depth: int) -> list[int]:
    """Which safeguard states eq. 7 averages for a new product state (s, q): the ancestors of q up to `depth` parent
    steps (`ancestors`, the paper), or the states numbered 0..stage-1 (`authors`: their code's loop over
    `range(DFA_indx)`, which for the last safeguard also takes a sibling of q)."""
    if rule == "authors":
        return list(range(stage))
    return [space.index[a] for a in sg.ancestors(space.names[q_id], depth)]


def bias_transfer(Q, visited, q_id: int, cell, sources: list[int], factor: float) -> bool:
    """eq. 7: first visit of product state (s, q): Q(s, q, .) = factor * mean of Q(s, q', .) over the source states
    q' already visited at s. Returns True if it transferred (no visited source: Q stays at its initial 0)."""
    # eq. 7: Q(s, q, .) <- factor * (1 / |N_k(q)|) * sum over q' in N_k(q) of Q(s, q', .)
    found = [a for a in sources if a != q_id and visited[(a, *cell)]]
    if found:
        Q[(q_id, *cell)] = factor * np.mean([Q[(a, *cell)] for a in found], axis=0)
    return bool(found)


def has_converged(values, window: int, tol: float) -> bool:
    """The means of the last two windows of recorded values agree within tol."""
    if len(values) < 2 * window:
        return False
    v = np.asarray(values[-2 * window :])
    return abs(v[window:].mean() - v[:window].mean()) < tol


class Progression:
    """Algorithm 1's outer loop: which safeguard of `order` is in force, and when to move on.

    Safeguard k ends at the latest when the budget count (episodes started or env steps) reaches `ends[k]`. With
    rule "converge" it ends earlier once the values of the product states that safeguard k adds have settled
    (`record` one value per episode or rollout that reached such a state; `has_converged` on them). The paper's
    rule, "V(s0) has converged", would look at (s0, initial state), which every safeguard shares.
    """

    def __init__(self, order: list[int], ends: list[int], rule: str, window: int, tol: float):
        self.order, self.ends, self.rule, self.window, self.tol = order, ends, rule, window, tol
        self.stage, self.values, self.switches = 0, [], []

    @property
    def safeguard(self) -> int:
        return self.order[self.stage]

    def record(self, value: float) -> None:
        self.values.append(value)

    def advance(self, count: int) -> bool:
        """Move to the next safeguard if this one is done; True if it moved."""
        if self.stage == len(self.order) - 1:
            return False
        settled = self.rule == "converge" and has_converged(self.values, self.window, self.tol)
        if count >= self.ends[self.stage] or settled:
            self.stage, self.values = self.stage + 1, []
            self.switches.append(count)
            return True
        return False

    def state_dict(self) -> dict:
        return {"stage": self.stage, "values": list(self.values), "switches": list(self.switches)}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.values, self.switches = state["stage"], list(state["values"]), list(state["switches"])


def print_plan(args: Args, safeguards: list[Safeguard], order: list[int], ends: list[int], guarded: bool,
               unit: str, evaluation: str, checkpoint_every: int, run_dir: str) -> None:
    """The run's plan at the start: each safeguard of the progression with its budget, the evaluation, checkpoints."""
    budget = "--total-episodes" if unit == "episodes" else "--total-timesteps"
    print(f"plan: {args.method} on {args.env_id}, {ends[-1]} {unit} of training in all ({budget}), then {evaluation}")
    start = 0
    for k, (sg, end) in enumerate(zip(order, ends)):
        if not guarded:
            print(f"  {unit} 0-{end}: no safeguard in force (the environment's reward; violations counted by the "
                  f"final safeguard '{safeguards[sg].name}')")
            break
        early = " or earlier, once its new states' values settle" if args.progression == "converge" else ""
        last = k == len(order) - 1
        print(f"  safeguard {k + 1}/{len(order)} '{safeguards[sg].name}': {unit} {start}-{end}{'' if last else early}")
        start = end
    every = f"every {checkpoint_every} {unit} and " if checkpoint_every else ""
    print(f"  checkpoint {every}at the end of training -> {os.path.join(run_dir, CHECKPOINT_NAME)}", flush=True)


def checkpoint_interval(args: Args) -> int:
    """--checkpoint-every, -1 resolved: 1000 episodes (minecraft), 20 PPO updates of the default size (vizdoom)."""
    if args.checkpoint_every >= 0:
        return args.checkpoint_every
    return 1000 if args.env_id == "minecraft" else 20 * 1024


# ------------------------------------------------------------------------------------------------------
# The Minecraft-inspired gridworld (authors' layout 1) and their four safeguards (paper fig. 4a-4e)
# ------------------------------------------------------------------------------------------------------
GRID_LABELS = ["safe", "lava", "creeper", "wood", "iron", "work_bench", "smith_table", "diamond"]
GRID_LABEL_SETS = [frozenset() if n == "safe" else frozenset({n}) for n in GRID_LABELS]
GRID_START = (5, 2)
GRID_MOVES = np.array([[0, 1], [-1, 0], [0, -1], [1, 0], [0, 0]])  # right, up, left, down, stay
GRID_LAYOUT_P = (0.05, 0.9, 0.05)  # object jitter i = -1, 0, +1 at each reset (the authors' reset())

DANGER = {"creeper", "lava"}
MINECRAFT_SAFEGUARDS = [  # the authors' minecraft_1, _2, _6, _7; state names = their states 0, 1, 2, 3, 4
    Safeguard("1: never creeper, never lava (fig. 4a and 4b)", [
        ("start", DANGER, SINK),
    ]),
    Safeguard("2: as 1, and remember wood (fig. 4c)", [
        ("start", DANGER, SINK), ("start", {"wood"}, "wood"),
        ("wood", DANGER, SINK),
    ]),
    Safeguard("3: after wood then work bench, lava is allowed (fig. 4d)", [
        ("start", DANGER, SINK), ("start", {"wood"}, "wood"),
        ("wood", DANGER, SINK), ("wood", {"work_bench"}, "wood+bench"),
        ("wood+bench", {"creeper"}, SINK),
    ]),
    Safeguard("4: as 3, or wood then iron then smith table: creeper is allowed, lava is not (fig. 4e)", [
        ("start", DANGER, SINK), ("start", {"wood"}, "wood"),
        ("wood", DANGER, SINK), ("wood", {"work_bench"}, "wood+bench"), ("wood", {"iron"}, "wood+iron"),
        ("wood+bench", {"creeper"}, SINK),
        ("wood+iron", DANGER, SINK), ("wood+iron", {"smith_table"}, "wood+iron+smith"),
        ("wood+iron+smith", {"lava"}, SINK),
    ]),
]  # fmt: skip


def minecraft_label_maps() -> np.ndarray:
    """The authors' layout 1 as label ids, for the three jitters i = -1, 0, +1 of some objects (shape 3x10x10)."""
    maps = np.zeros((3, 10, 10), dtype=np.int64)
    for k, i in enumerate((-1, 0, 1)):
        m, L = maps[k], GRID_LABELS.index
        m[0:3, 5] = L("lava")
        m[2, 8:10] = L("lava")
        m[0, 0] = m[4 + i, 5] = L("creeper")
        m[2, 2 + i] = m[7, 3 + i] = m[5 + i, 7] = L("wood")
        m[0, 3 + i] = m[4 + i, 0] = m[9, 4 + i] = L("iron")
        m[6 + i, 1] = m[6, 5 + i] = m[4 + i, 9] = L("work_bench")
        m[2 + i, 4] = m[9, 0] = m[7, 7 + i] = L("smith_table")
        m[0, 7] = L("diamond")
    return maps


class GridWorld:
    """`num_envs` copies of the 10x10 slippery gridworld, stepped together with numpy.

    With probability `slip` the action is replaced by a uniformly random one; a move off the edge stays in
    place. At each reset the label layout is jittered by one cell (p = 0.05 each way), as the authors' code.
    """

    def __init__(self, num_envs: int, slip: float, rng: np.random.Generator):
        self.n, self.slip, self.rng = num_envs, slip, rng
        self.maps = minecraft_label_maps()
        self.layout = np.ones(num_envs, dtype=np.int64)
        self.pos = np.tile(np.array(GRID_START), (num_envs, 1))

    def reset(self, idx) -> None:
        u = self.rng.random(len(idx))
        self.layout[idx] = np.where(u < 0.05, 2, np.where(u < 0.1, 0, 1))  # i = +1, -1, 0
        self.pos[idx] = GRID_START

    def labels(self) -> np.ndarray:
        return self.maps[self.layout, self.pos[:, 0], self.pos[:, 1]]

    def step(self, actions: np.ndarray) -> np.ndarray:
        slipped = self.rng.random(self.n) < self.slip
        actions = np.where(slipped, self.rng.integers(0, 5, self.n), actions)
        self.pos = np.clip(self.pos + GRID_MOVES[actions], 0, 9)
        return self.labels()


class FearTable:
    """Intrinsic fear (Lipton et al. 2016) for a tabular state: F(s) = P(s is within k_r steps of a
    catastrophe), estimated by counts (the maximum-likelihood tabular classifier): `danger` counts the states
    reached in the k_r steps up to a catastrophe, `safe` those with no catastrophe within k_r steps after them."""

    def __init__(self, shape):
        self.danger, self.safe = np.zeros(shape), np.zeros(shape)

    def __call__(self, idx):
        d, s = self.danger[idx], self.safe[idx]
        return np.where(d + s > 0, d / np.maximum(d + s, 1), 0.0)


def greedy(Qs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """argmax over actions with uniformly random tie-breaking (all-zero rows pick a random action)."""
    best = Qs == Qs.max(axis=1, keepdims=True)
    return np.argmax(best * rng.random(Qs.shape), axis=1)


def policy_table(Q: np.ndarray, visited: np.ndarray, n_states: int, start: int) -> np.ndarray:
    """The values the greedy test policy reads for (safeguard state, cell): Q(s, q) where (s, q) was visited, else
    the authors' test fallback Q(s, q0) (their "meta-learning queries"); an MDP-state agent reads its one slot."""
    if Q.shape[0] == 1:
        return np.broadcast_to(Q, (n_states, *Q.shape[1:]))
    return np.where(visited[..., None], Q, Q[start][None])


def safety_probability(P: np.ndarray | None, table: np.ndarray, slip: float, horizon: int, start: int) -> float:
    """def. 13, exactly: the probability that, from s0 and the initial safeguard state, the greedy policy of the
    values P (n_states x 10 x 10 x 5; ties uniform, as `greedy`) does not enter the sink of `table` within `horizon`
    steps, averaged over the three layouts. P=None: the best policy that knows the layout and the time left
    (value iteration on the product MDP), an upper bound for any policy."""
    n_q, cells = len(table), np.arange(100)
    nxt = np.clip(np.stack([cells // 10, cells % 10], 1)[:, None] + GRID_MOVES[None], 0, 9)
    nxt = nxt[..., 0] * 10 + nxt[..., 1]  # (100 cells, 5 executed actions) -> next cell
    maps = minecraft_label_maps().reshape(3, 100)
    q2 = table[:, maps[:, nxt]]  # (states, layouts, cells, executed actions) -> next safeguard state, -1 = sink
    # flat index of the product state reached in (layout, state, cell); the sink points at a last entry, always 0
    sink = 3 * n_q * 100
    reach = np.where(q2 >= 0, (np.arange(3)[None, :, None, None] * n_q + q2) * 100 + nxt, sink)
    mix = (1 - slip) * np.eye(5) + slip / 5  # P(executed | chosen)
    if P is not None:
        P = P.reshape(n_q, 1, 100, 5)
        best = P == P.max(-1, keepdims=True)
        pi = best / best.sum(-1, keepdims=True)
    V = np.ones(sink + 1)  # probability of staying safe for the remaining steps, per (layout, state, cell)
    V[sink] = 0.0
    for _ in range(horizon):
        W = V[reach] @ mix.T  # (states, layouts, cells, chosen actions)
        W = W.max(-1) if P is None else (pi * W).sum(-1)
        V[:sink] = W.transpose(1, 0, 2).ravel()
    start_value = V[:sink].reshape(3, n_q, 100)[:, start, GRID_START[0] * 10 + GRID_START[1]]
    return float(np.dot(GRID_LAYOUT_P, start_value))


def grid_frame(label_map: np.ndarray, pos, violated: bool, cell: int = 16) -> np.ndarray:
    """The gridworld as an RGB image (--capture-video): each cell a square coloured by its label, the agent a blue
    square inside its cell (red once it has violated the final safeguard). 10 x 10 cells of 16 px: 160 x 160."""
    image = GRID_COLOURS[label_map].repeat(cell, 0).repeat(cell, 1)
    r, c, m = pos[0] * cell, pos[1] * cell, cell // 4
    image[r + m : r + cell - m, c + m : c + cell - m] = (220, 30, 30) if violated else (40, 90, 255)
    return image


GRID_COLOURS = np.array([  # safe, lava, creeper, wood, iron, work_bench, smith_table, diamond
    (235, 235, 225), (250, 120, 0), (60, 170, 60), (140, 90, 40), (170, 170, 185), (210, 180, 120), (80, 80, 90),
    (80, 220, 230)], dtype=np.uint8)  # fmt: skip


def run_gridworld(args: Args, logger: Logger, resumed: dict | None = None) -> dict:
    """Algorithm 1 with tabular Q-learning on the product of the gridworld and the safeguard in force.

    `resumed` (from `resume_run`): continue from its checkpoint, which is written every --checkpoint-every finished
    episodes at the end of a vector step (after its logging): the Q-tables, the safety-bias bookkeeping (visited
    product states), the progression (which safeguard, its recorded values), the fear counts, the counters, the
    environments' random generator and the logger's state. The episodes in progress are not saved: the resumed run
    starts new ones (their Q-updates so far are kept)."""
    rng = np.random.default_rng(args.seed)
    safeguards, final = MINECRAFT_SAFEGUARDS, len(MINECRAFT_SAFEGUARDS) - 1
    order = list(range(len(safeguards))) if args.method == "psl" else [final]
    space = ProductSpace(safeguards)
    tables = np.stack([space.table(k, GRID_LABEL_SETS) for k in range(len(safeguards))])
    new_states = space.new_states(order)
    is_new = np.array([np.isin(np.arange(len(space.names)), ids) for ids in new_states])  # [stage, state id]
    # psl and zero-shot learn on the product state (s, q); baseline and intrinsic fear on the MDP state only
    # (one slot), with the final safeguard's reward and stop only under --baselines-guarded
    product = args.method in ("psl", "zero-shot")
    guarded = product or args.baselines_guarded
    Q = np.zeros((len(space.names) if product else 1, 10, 10, 5))
    U = np.zeros_like(Q)  # the authors' second, pessimistic table (their plotted "value at s0")
    visited = np.zeros(Q.shape[:3], dtype=bool)
    fear = FearTable((10, 10)) if args.method == "intrinsic-fear" else None
    start = space.index[INITIAL]
    stage_len = args.stage_episodes or args.total_episodes // len(order)
    ends = [stage_len * (k + 1) for k in range(len(order) - 1)] + [args.total_episodes]
    progression = Progression(order, ends, args.progression, args.converge_window, args.converge_tol)

    env = GridWorld(args.num_envs, args.slip_probability, rng)
    n = args.num_envs
    sg_state = np.full(n, start)  # the state of the safeguard in force (global id)
    monitor = np.full(n, start)  # the final safeguard as a monitor, for every method: the common metric
    stage_of_env = np.zeros(n, dtype=np.int64)  # the safeguard each episode runs under
    needs_start = np.ones(n, dtype=bool)
    ep_ret, ep_len, ep_viol_steps = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    ep_new = np.zeros(n, dtype=bool)  # the episode reached a product state its safeguard adds
    recent = np.zeros((args.fear_radius, n, 2), dtype=np.int64)  # intrinsic fear: cells of the last k_r steps
    recent_len = np.zeros(n, dtype=np.int64)

    episodes_started, episodes_done, global_step = 0, 0, 0
    violations, violation_steps, sg_violations = 0, 0, 0
    curves = {"V_s0": [], "U_s0": [], "violations": [], "violation_steps": [], "safety_probability": []}
    stage_values = {}
    cost_steps = []

    def checkpoint_state() -> dict:
        """What the next episodes depend on (the episodes in progress are left out)."""
        return {"Q": Q, "U": U, "visited": visited, "fear": None if fear is None else (fear.danger, fear.safe),
                "progression": progression.state_dict(), "episodes_done": episodes_done, "global_step": global_step,
                "violations": (violations, violation_steps, sg_violations), "curves": curves,
                "stage_values": stage_values, "cost_steps": cost_steps, "env_rng": rng.bit_generator.state,
                "logger": logger.state_dict()}  # fmt: skip

    identity = {"script": "psl", "env_id": "minecraft", "method": args.method, "q_shape": list(Q.shape)}
    every = checkpoint_interval(args)
    print_plan(args, safeguards, order, ends, guarded, "episodes", f"{args.eval_episodes} greedy test episodes under "
               "the final safeguard", every, logger.run_dir)  # fmt: skip
    if resumed:  # the saved tables, counters and progression; new episodes start (those in progress are lost)
        check_identity(resumed["identity"], identity, resumed["path"])
        saved = resumed["state"]
        Q[:], U[:], visited[:] = saved["Q"], saved["U"], saved["visited"]
        if fear is not None:
            fear.danger[:], fear.safe[:] = saved["fear"]
        progression.load_state_dict(saved["progression"])
        episodes_done, global_step, curves = saved["episodes_done"], saved["global_step"], saved["curves"]
        violations, violation_steps, sg_violations = saved["violations"]
        stage_values, cost_steps, episodes_started = saved["stage_values"], list(saved["cost_steps"]), episodes_done
        rng.bit_generator.state = saved["env_rng"]
        set_rng_state(saved["rng"])
        print(f"resuming {resumed['run_dir']} at episode {episodes_done} ({global_step} env steps; safeguard "
              f"{progression.stage + 1}/{len(order)} '{safeguards[progression.safeguard].name}')", flush=True)
    else:
        logger.scalar("charts/safeguard_index", progression.safeguard, 0)
    checkpointer = Checkpointer(logger.run_dir, every, identity, start_step=episodes_done)
    t0, first_episode, first_step = time.time(), episodes_done, global_step
    console_every = min(500, max(args.total_episodes // 10, 1))  # episodes between console lines
    while episodes_done < args.total_episodes:
        # start the episodes that need one; the progression moves on between episodes
        for i in np.flatnonzero(needs_start):
            if progression.advance(episodes_started):
                logger.scalar("charts/safeguard_index", progression.safeguard, global_step)
            stage_of_env[i], sg_state[i], monitor[i] = progression.safeguard, start, start
            slot0 = start if product else 0
            curves["V_s0"].append(Q[(slot0, *GRID_START)].max())
            curves["U_s0"].append(U[(slot0, *GRID_START)].min())
            logger.scalar("charts/V_s0", curves["V_s0"][-1], global_step)
            episodes_started += 1
        if needs_start.any():
            idx = np.flatnonzero(needs_start)
            env.reset(idx)
            visited[(start if product else 0, *GRID_START)] = True
            ep_ret[idx], ep_len[idx], ep_viol_steps[idx], ep_new[idx], recent_len[idx] = 0.0, 0, 0, False, 0

        slot = sg_state if product else np.zeros(n, dtype=np.int64)  # the Q-table row of the product state
        r, c = env.pos[:, 0].copy(), env.pos[:, 1].copy()
        greedy_actions = greedy(Q[slot, r, c], rng)
        actions = np.where(rng.random(n) < args.epsilon, rng.integers(0, 5, n), greedy_actions)
        labels = env.step(actions)
        r2, c2 = env.pos[:, 0], env.pos[:, 1]
        global_step += n

        # def. 10: the safeguard in force steps on the label of the state reached; eq. 4: entering its sink
        next_sg_state = tables[stage_of_env, sg_state, labels]
        sg_violated = (next_sg_state < 0) & guarded
        # the common metric: the final safeguard as a monitor; a rejected label counts and the monitor stays put
        next_monitor = tables[final, monitor, labels]
        violation = next_monitor < 0
        monitor = np.where(violation, monitor, next_monitor)

        # eq. 7: first visit of a product state -> initialise from its ancestor safeguard states (PSL only)
        next_slot = np.where(sg_violated, 0, next_sg_state) if product else np.zeros(n, dtype=np.int64)
        for i in np.flatnonzero(~sg_violated & ~visited[next_slot, r2, c2]):
            if args.method == "psl":
                k = stage_of_env[i]
                sources = transfer_sources(space, safeguards[k], next_slot[i], order.index(k), args.transfer,
                                           args.transfer_depth)  # fmt: skip
                bias_transfer(Q, visited, next_slot[i], (r2[i], c2[i]), sources, args.transfer_factor)
            visited[next_slot[i], r2[i], c2[i]] = True
        if product:
            ep_new |= ~sg_violated & is_new[progression.stage, next_slot] & (stage_of_env == progression.safeguard)

        # eq. 5, no MDP reward here; without a safeguard (unguarded baselines) every state is accepting
        reward = shaped_reward(0.0, sg_violated, args.accept_reward, args.penalty)
        next_v = np.where(sg_violated, 0.0, Q[next_slot, r2, c2].max(axis=1))  # the sink is absorbing, value 0
        target = reward + args.gamma * next_v
        if fear is not None:  # Lipton et al.: target r + gamma max Q(s') - lambda F(s'), lambda phased in
            lam = args.fear_factor * min(1.0, episodes_done / max(args.fear_phase_in * args.total_episodes, 1))
            target = target - lam * fear((r2, c2))
        # Q-learning on the EXECUTED action (several envs on the same (s, a): the last write wins)
        a = greedy_actions if args.authors_update else actions
        Q[slot, r, c, a] += args.alpha * (target - Q[slot, r, c, a])
        # the authors' pessimistic table: the minimising action takes r + gamma min U(s') (their plotted value)
        a_min = U[slot, r, c].argmin(axis=1)
        u_target = reward + args.gamma * np.where(sg_violated, 0.0, U[next_slot, r2, c2].min(axis=1))
        U[slot, r, c, a_min] += args.alpha * (u_target - U[slot, r, c, a_min])

        if fear is not None:  # the cells of the last k_r steps: dangerous at a catastrophe, else safe as they age
            ring = recent_len % args.fear_radius
            old = np.flatnonzero(recent_len >= args.fear_radius)
            np.add.at(fear.safe, (recent[ring[old], old, 0], recent[ring[old], old, 1]), 1)
            recent[ring, np.arange(n)] = env.pos
            recent_len += 1
            for i in np.flatnonzero(violation):  # a catastrophe: the cells of the k_r steps up to it
                m = min(recent_len[i], args.fear_radius)
                cells = recent[(recent_len[i] - 1 - np.arange(m)) % args.fear_radius, i]
                np.add.at(fear.danger, (cells[:, 0], cells[:, 1]), 1)
                recent_len[i] = 0

        sg_state = np.where(next_sg_state < 0, sg_state, next_sg_state)  # (an unguarded agent's safeguard is unused)
        ep_ret += reward
        ep_len += 1
        ep_viol_steps += violation
        cost_steps.append(violation)
        if len(cost_steps) >= 200:  # charts/cost_rate (common metric per step), counted every 200 vector steps
            logger.log_costs(global_step, np.concatenate(cost_steps))
            cost_steps = []
        done = sg_violated | (ep_len >= args.max_episode_steps)
        needs_start = done
        for i in np.flatnonzero(done):
            if fear is not None:  # no catastrophe can follow within this episode: the remaining cells are safe
                m = min(recent_len[i], args.fear_radius)
                cells = recent[(recent_len[i] - 1 - np.arange(m)) % args.fear_radius, i]
                np.add.at(fear.safe, (cells[:, 0], cells[:, 1]), 1)
            if ep_new[i] and stage_of_env[i] == progression.safeguard:  # the progression's measure:
                ids = new_states[progression.stage]  # the mean value of the visited states this safeguard adds
                progression.record(float(Q[ids].max(-1)[visited[ids]].mean()))
            violations += int(ep_viol_steps[i] > 0)
            violation_steps += int(ep_viol_steps[i])
            sg_violations += int(sg_violated[i])
            curves["violations"].append(violations)
            curves["violation_steps"].append(violation_steps)
            episodes_done += 1
            logger.log_episode(global_step, ep_ret[i], float(ep_viol_steps[i] > 0), ep_len[i])
            if args.exact_eval_every and episodes_done % args.exact_eval_every == 0:
                P = policy_table(Q, visited, len(space.names), start)
                p = safety_probability(P, tables[final], args.slip_probability, args.max_episode_steps, start)
                curves["safety_probability"].append((episodes_done, p))
                logger.scalar("charts/safety_probability", p, global_step)
        if done.any():
            stage_values[safeguards[progression.safeguard].name] = curves["V_s0"][-1]
            logger.scalar("charts/violations", violations, global_step)
            logger.scalar("charts/violation_steps", violation_steps, global_step)
            logger.scalar("charts/safeguard_violations", sg_violations, global_step)
            logger.scalar("charts/U_s0", curves["U_s0"][-1], global_step)
            if episodes_done % console_every < done.sum():  # the budget is in episodes: their share done, the ETA
                eta = (args.total_episodes - episodes_done) * (time.time() - t0) / max(episodes_done - first_episode, 1)
                logger.console(global_step, f"episodes={episodes_done}/{args.total_episodes} "
                               f"({100 * episodes_done / args.total_episodes:.0f}%) ETA {format_eta(eta)} safeguard="
                               f"{progression.safeguard + 1} V(s0)={curves['V_s0'][-1]:.3f} violations={violations}")
        if checkpointer.due(episodes_done) and episodes_done < args.total_episodes:  # (the last one: below)
            # at the end of a vector step, after its logging; the interval is counted in episodes
            checkpointer.save(episodes_done, checkpoint_state(), args)
    logger.console(global_step, f"episodes={episodes_done} violations={violations}")
    check_finite("Q-table", torch.as_tensor(Q))
    train_time = time.time() - t0
    checkpointer.save(episodes_done, checkpoint_state(), args)  # the end of training, before the final test

    # Final test: the authors' 100 greedy episodes under the final safeguard (success = no violation in
    # max_episode_steps), and the same quantity exactly, with the best possible value beside it
    P = policy_table(Q, visited, len(space.names), start)
    test_env = GridWorld(args.eval_episodes, args.slip_probability, rng)
    test_env.reset(np.arange(args.eval_episodes))
    tq = np.full(args.eval_episodes, start)
    alive = np.ones(args.eval_episodes, dtype=bool)
    ret = np.zeros(args.eval_episodes)
    frames = [grid_frame(test_env.maps[test_env.layout[0]], test_env.pos[0], False)] if args.capture_video else []
    for _ in range(args.max_episode_steps):
        a = greedy(P[tq, test_env.pos[:, 0], test_env.pos[:, 1]], rng)
        tq2 = tables[final, tq, test_env.step(a)]
        ret += alive * shaped_reward(0.0, tq2 < 0, args.accept_reward, args.penalty)
        if frames and alive[0]:  # --capture-video: the first test episode, up to its violation
            frames.append(grid_frame(test_env.maps[test_env.layout[0]], test_env.pos[0], tq2[0] < 0))
        alive &= tq2 >= 0
        tq = np.where(tq2 < 0, tq, tq2)
        if not alive.any():
            break
    if frames:
        print(f"video: {save_video(frames, video_path(logger.run_dir, 'eval', 0), fps=10)}")
    for i in range(args.eval_episodes):
        logger.log_episode(global_step, ret[i], float(not alive[i]), 0, prefix="eval")
    p_final = safety_probability(P, tables[final], args.slip_probability, args.max_episode_steps, start)
    p_best = safety_probability(None, tables[final], args.slip_probability, args.max_episode_steps, start)
    result = {
        "V_s0": float(Q[(start if product else 0, *GRID_START)].max()),
        "U_s0": float(U[(start if product else 0, *GRID_START)].min()),
        "V_s0_per_safeguard": stage_values,
        "switches": progression.switches,
        "training_violations": violations,
        "violation_steps": violation_steps,
        "safeguard_violations": sg_violations,
        "test_success": float(alive.mean()),
        "safety_probability": p_final,
        "optimal_safety_probability": p_best,
        "train_seconds": train_time,
        "env_steps": global_step,
        "Q": Q,
        "curves": {k: np.array(v) for k, v in curves.items()},
    }
    # summary.json: a training episode's cost is 1 if it violated the final safeguard (the common metric), and the
    # limit is 0 (eq. 4: a run is unsafe once in the sink); the test episodes' return is eq. 5's, their cost 0/1
    result["summary"] = {
        "env_id": "minecraft", "total_steps": global_step, "eval_return": float(ret.mean()),
        "eval_cost": float(1.0 - alive.mean()), "train_cost": violations / max(episodes_done, 1),
        "train_episodes": episodes_done, "train_violating_episodes": violations, "cost_limit": 0.0,
        "cost_rate": logger.cost_rate, "sps": (global_step - first_step) / max(train_time, 1e-9),
        "eval_returns": ret.tolist(), "test_success": result["test_success"], "safety_probability": p_final,
        "optimal_safety_probability": p_best, "V_s0": result["V_s0"], "switches": progression.switches,
        "violation_steps": violation_steps, "safeguard_violations": sg_violations,
    }  # fmt: skip
    logger.scalar("eval/success_rate", result["test_success"], global_step)
    logger.scalar("eval/safety_probability", p_final, global_step)
    logger.scalar("eval/optimal_safety_probability", p_best, global_step)
    print(f"V(s0)={result['V_s0']:.3f} U(s0)={result['U_s0']:.3f} training violations={violations} episodes "
          f"({violation_steps} steps; against the safeguard in force: {sg_violations}) test success="
          f"{100 * alive.mean():.0f}% P(safe)={p_final:.4f} (best {p_best:.4f}) safeguard switches at episodes "
          f"{progression.switches} ({train_time:.1f} s, {global_step} env steps)")
    if args.save_model:
        np.savez(os.path.join(logger.run_dir, "q_table.npz"), Q=Q, U=U, visited=visited, states=np.array(space.names))
    return result


# ------------------------------------------------------------------------------------------------------
# ViZDoom: labels from game variables, the authors' three safeguards and fixed checks, the reward
# ------------------------------------------------------------------------------------------------------
DOOM_SAFEGUARDS = [  # the authors' safeguard_callbacks.py; "armor" is checked first, as theirs
    Safeguard("0: never lava", [
        ("start", {"lava"}, SINK),
    ]),
    Safeguard("1: lava only after armor; then the boss area is a violation", [
        ("start", {"armor"}, "armor"), ("start", {"lava"}, SINK),
        ("armor", {"boss_area"}, SINK),
    ]),
    Safeguard("2: as 1, and the boss area only after the weapon", [
        ("start", {"armor"}, "armor"), ("start", {"lava"}, SINK),
        ("armor", {"weapon"}, "armed"), ("armor", {"boss_area"}, SINK),
    ]),
]  # fmt: skip
DOOM_CHECKS = ("lava without armor", "boss area without weapon")


def doom_labels(gv) -> frozenset:
    """The labelling function: lava = standing in the lava band, boss_area = past the door, armor = ARMOR > 0,
    weapon = the plasma gun's slot variable WEAPON6 > 0 (game variables POSITION_X/Y, ARMOR, WEAPON6, ...)."""
    x, y, armor, weapon = gv[0], gv[1], gv[2], gv[3]
    labels = set()
    if LAVA_Y[0] <= y < LAVA_Y[1] and 0 <= x <= MAP_WIDTH:
        labels.add("lava")
    if y > DOOR_Y[1]:
        labels.add("boss_area")
    if armor > 0:
        labels.add("armor")
    if weapon > 0:
        labels.add("weapon")
    return frozenset(labels)


def doom_checks(labels: list[frozenset]) -> np.ndarray:
    """The common metric, the authors' fixed checks (doom_gym.py), the same for every method whatever safeguard it
    trains under: (in lava without armor, in the boss area without the weapon) per env, shape (N, 2)."""
    return np.array([["lava" in s and "armor" not in s, "boss_area" in s and "weapon" not in s] for s in labels],
                    dtype=bool).reshape(len(labels), 2)  # fmt: skip


def doom_reward(prev, gv, dead: bool) -> float:
    """The authors' reward (SAFERL_REWARD_SHAPING + the engine's death penalty): +0.003 per damage point dealt (at
    most 200 per step), +0.01 per armor point gained, +1 for the weapon, -1 on death."""
    return (0.003 * np.clip(gv[5] - prev[5], 0.0, 200.0) + 0.01 * max(gv[2] - prev[2], 0.0)
            + 1.0 * max(gv[3] - prev[3], 0.0) - 1.0 * float(dead))  # fmt: skip


def step_safeguard(sg: Safeguard | None, states: list[str], labels: list[frozenset]) -> tuple[list[str], np.ndarray]:
    """def. 10 and eq. 4 for a batch: the safeguard in force steps on the labels reached; returns the next states and
    which envs entered the sink. sg=None: no safeguard (the unguarded baselines), nothing is a violation."""
    if sg is None:
        return list(states), np.zeros(len(states), dtype=bool)
    nxt = [sg.step(q, lab) for q, lab in zip(states, labels)]
    return nxt, np.array([b == SINK and a != SINK for a, b in zip(states, nxt)])


class Agent(nn.Module):
    """Actor-critic on the product state: CNN features of the stacked RGB frames + one-hot safeguard state."""

    def __init__(self, in_channels: int, n_safeguard_states: int, n_actions: int, hidden: int):
        super().__init__()
        self.cnn = nn.Sequential(
            layer_init(nn.Conv2d(in_channels, 32, 8, 4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, 2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, 1)), nn.ReLU(), nn.Flatten(),
            layer_init(nn.Linear(64 * 4 * 6, hidden)), nn.ReLU(),
        )  # fmt: skip
        self.actor = layer_init(nn.Linear(hidden + n_safeguard_states, n_actions), std=0.01)
        self.critic = layer_init(nn.Linear(hidden + n_safeguard_states, 1), std=1.0)

    def features(self, obs, q_onehot):
        return torch.cat([self.cnn(obs.float() / 255.0), q_onehot], dim=-1)

    def get_value(self, obs, q_onehot):
        return self.critic(self.features(obs, q_onehot)).squeeze(-1)

    def get_action_and_value(self, obs, q_onehot, action=None):
        h = self.features(obs, q_onehot)
        dist = torch.distributions.Categorical(logits=self.actor(h))
        if action is None:
            action = dist.sample()
        return action, dist.log_prob(action), dist.entropy(), self.critic(h).squeeze(-1)


class FearNet(nn.Module):
    """Intrinsic fear (Lipton et al. 2016) on pixels: P(a catastrophe follows within k_r steps of this frame)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 8, 4), nn.ReLU(), nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.Flatten(),
            nn.Linear(32 * 6 * 8, 64), nn.ReLU(), nn.Linear(64, 1),
        )  # fmt: skip

    def forward(self, frames):  # frames (B, 3, 60, 80) uint8 -> logits (B,)
        return self.net(frames.float() / 255.0).squeeze(-1)


def label_fear_frames(recent: deque, frame: np.ndarray, done: bool, violation: bool, fear_radius: int,
                      danger_mem: deque, safe_mem: deque) -> None:  # fmt: skip
    """Intrinsic fear's labels (Lipton et al. 2016) for one env after one step. `recent` holds the frames not yet
    labelled (at most k_r = fear_radius of them); `frame` is the frame the step reached, `violation` the common
    metric on that step (the dying step's included). A violation makes the frames of the k_r steps before it and
    its own frame dangerous (within k_r steps of a catastrophe); a frame with k_r steps and no violation after it
    is safe, and so are the frames left at the end of an episode without a violation. Labelled frames leave
    `recent`, so later frames of a long violation (standing in lava) are labelled by their own step. At `done`
    `frame` is already the next episode's first frame: it is not kept (the dying frame itself is not seen)."""
    if not done:
        recent.append(frame.copy())  # a copy: obs is a view of the frame stack
    if violation:  # a catastrophe: the frames of the k_r steps up to it are dangerous
        danger_mem.extend(recent)
        recent.clear()
    while len(recent) > fear_radius or (done and recent):
        safe_mem.append(recent.popleft())  # no catastrophe within k_r steps after it


def onehot(states: list[str], space: ProductSpace, product: bool, device) -> torch.Tensor:
    """The safeguard state as a one-hot beside the CNN features (all zeros for the MDP-state agents)."""
    out = torch.zeros((len(states), len(space.names)), device=device)
    if product:
        idx = [space.index[s] if s != SINK else space.index[INITIAL] for s in states]
        out[torch.arange(len(states)), torch.as_tensor(idx)] = 1.0
    return out


def evaluate_vizdoom(agent: Agent, env: DoomVecEnv, space: ProductSpace, product: bool, episodes: int,
                     device, frames: list | None = None) -> tuple[list[float], list[int]]:  # fmt: skip
    """Episodes with actions sampled from the policy under the final safeguard (its state in the one-hot for the
    product agents), monitored and not stopped: the game reward and the common metric of each episode. `frames`
    (a list): the first game's first episode is appended to it, the agent's last RGB frame upscaled 4x."""
    sg = DOOM_SAFEGUARDS[-1]
    obs, gv = env.reset()
    states, prev = [INITIAL] * env.n, gv
    ret, seen = np.zeros(env.n), np.zeros((env.n, 2), dtype=bool)
    returns, costs = [], []
    recording = frames is not None
    while len(returns) < episodes:
        if recording:
            frames.append(obs[0, -3:].transpose(1, 2, 0).repeat(4, 0).repeat(4, 1))
        with torch.no_grad():
            action, _, _, _ = agent.get_action_and_value(torch.as_tensor(obs, device=device),
                                                         onehot(states, space, product, device))  # fmt: skip
        obs, gv, done, dead, start_gv = env.step(action.cpu().numpy())
        labels = [doom_labels(v) for v in gv]
        states, _ = step_safeguard(sg, states, labels)
        seen |= doom_checks(labels)
        ret += [doom_reward(prev[i], gv[i], dead[i]) for i in range(env.n)]
        prev = np.where(done[:, None], start_gv, gv)
        recording &= not done[0]
        for i in np.flatnonzero(done):
            if len(returns) < episodes:
                returns.append(float(ret[i]))
                costs.append(int(seen[i].sum()))
            states[i], ret[i], seen[i] = INITIAL, 0.0, False
    return returns, costs


def ppo_loss(agent: Agent, obs, q_onehot, actions, old_logprobs, advantages, returns, args: Args):
    """CleanRL's clipped PPO objective on one minibatch: (loss, policy loss, value loss, entropy)."""
    _, newlogprob, entropy, newvalue = agent.get_action_and_value(obs, q_onehot, actions)
    ratio = (newlogprob - old_logprobs).exp()
    advantages = (advantages - advantages.mean()) / (advantages.std(unbiased=False) + 1e-8)
    clipped = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
    pg_loss = torch.max(-advantages * ratio, -advantages * clipped).mean()
    v_loss = 0.5 * ((newvalue - returns) ** 2).mean()
    entropy_loss = entropy.mean()
    return pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss, pg_loss, v_loss, entropy_loss


def run_vizdoom(args: Args, logger: Logger, resumed: dict | None = None) -> dict:
    """Algorithm 1 with a synchronous PPO: each safeguard of the progression trains from the previous weights.

    `resumed` (from `resume_run`): continue from its checkpoint, written every --checkpoint-every env steps at the
    end of a PPO iteration (after its logging): the networks and optimisers, the progression (which safeguard), the
    counters, intrinsic fear's frame memory (unless --no-checkpoint-buffer), the logger's state. The games are
    restarted: the episodes in progress are lost (their violations are counted, as at a safeguard switch)."""
    device = get_device(args.cuda)
    torch.set_num_threads(args.torch_threads)
    safeguards, final = DOOM_SAFEGUARDS, len(DOOM_SAFEGUARDS) - 1
    order = list(range(len(safeguards))) if args.method == "psl" else [final]
    space = ProductSpace(safeguards)
    new_states = space.new_states(order)
    product = args.method in ("psl", "zero-shot")  # the agent sees the safeguard state
    guarded = product or args.baselines_guarded  # the safeguard shapes the reward and ends the episode
    ends = [int(f * args.total_timesteps) for f in args.doom_stage_fractions][: len(order) - 1] + [args.total_timesteps]
    progression = Progression(order, ends, args.progression, args.converge_window, args.converge_tol)
    wad = write_wad(os.path.join(tempfile.mkdtemp(prefix="psl_"), "psl_map.wad"))
    n = args.num_envs
    workers = min(os.cpu_count() or 1, n) if args.doom_workers < 0 else args.doom_workers
    env = DoomVecEnv(n, wad, args.seed, args.doom_frame_skip, args.doom_episode_tics, args.frame_stack, workers)
    agent = Agent(3 * args.frame_stack, len(space.names), len(DOOM_ACTIONS), args.hidden_size).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    fear_net = FearNet().to(device) if args.method == "intrinsic-fear" else None
    fear_opt = torch.optim.Adam(fear_net.parameters(), lr=1e-4) if fear_net is not None else None
    danger_mem, safe_mem = deque(maxlen=5000), deque(maxlen=5000)
    recent = [deque() for _ in range(n)]  # intrinsic fear: the frames of the last k_r steps of each env

    batch_size = n * args.num_steps
    minibatch_size = max(batch_size // args.num_minibatches, 1)
    num_iterations = max(args.total_timesteps // batch_size, 1)
    obs_buf = torch.zeros((args.num_steps, n, 3 * args.frame_stack, 60, 80), dtype=torch.uint8, device=device)
    q_buf = torch.zeros((args.num_steps, n, len(space.names)), device=device)
    actions_buf = torch.zeros((args.num_steps, n), dtype=torch.long, device=device)
    logprobs_buf, rewards_buf, dones_buf, values_buf = (
        torch.zeros((args.num_steps, n), device=device) for _ in range(4)
    )

    global_step, violations, violation_steps, sg_violations = 0, 0, 0, 0
    train_episodes, train_cost, violating_episodes = 0, 0.0, 0  # the logged training episodes (summary.json)
    start_iteration = 1

    def checkpoint_state() -> dict:
        """Networks, optimisers, progression, counters; the fear memory unless --no-checkpoint-buffer."""
        memory = None
        if fear_net is not None and args.checkpoint_buffer:
            memories = (("danger", danger_mem), ("safe", safe_mem))
            memory = {k: pack_array(np.stack(m)) if m else None for k, m in memories}
        return {"agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "fear_memory": memory,
                "fear_net": None if fear_net is None else fear_net.state_dict(),
                "fear_opt": None if fear_opt is None else fear_opt.state_dict(),
                "progression": progression.state_dict(), "global_step": global_step, "iteration": iteration,
                "violations": violations + int(ep_seen.sum()),  # the episodes in progress end here, as at a switch
                "counters": (violation_steps, sg_violations, train_episodes, train_cost, violating_episodes),
                "logger": logger.state_dict()}  # fmt: skip

    identity = {"script": "psl", "env_id": "vizdoom", "method": args.method, "hidden_size": args.hidden_size,
                "frame_stack": args.frame_stack, "safeguard_states": len(space.names), "actions": len(DOOM_ACTIONS)}
    every = checkpoint_interval(args)
    print_plan(args, safeguards, order, ends, guarded, "env steps", f"{args.doom_eval_episodes} evaluation episodes "
               f"under the final safeguard; {num_iterations} PPO updates of {batch_size} steps", every, logger.run_dir)
    if resumed:  # the saved networks, optimisers, counters and progression; the games restart
        check_identity(resumed["identity"], identity, resumed["path"])
        saved = resumed["state"]
        agent.load_state_dict(saved["agent"])
        optimizer.load_state_dict(saved["optimizer"])
        if fear_net is not None:
            fear_net.load_state_dict(saved["fear_net"])
            fear_opt.load_state_dict(saved["fear_opt"])
            for key, memory in (("danger", danger_mem), ("safe", safe_mem)):
                if saved["fear_memory"] and saved["fear_memory"][key]:
                    memory.extend(unpack_array(saved["fear_memory"][key]).copy())
        progression.load_state_dict(saved["progression"])
        global_step, start_iteration, violations = saved["global_step"], saved["iteration"] + 1, saved["violations"]
        violation_steps, sg_violations, train_episodes, train_cost, violating_episodes = saved["counters"]
        set_rng_state(saved["rng"])
        print(f"resuming {resumed['run_dir']} at step {global_step} (safeguard {progression.stage + 1}/{len(order)} "
              f"'{safeguards[progression.safeguard].name}')", flush=True)
    checkpointer = Checkpointer(logger.run_dir, every, identity, start_step=global_step)
    first_step, iteration = global_step, start_iteration - 1
    sg_state = [INITIAL] * n  # the state of the safeguard in force in each env
    first = np.ones(n, dtype=bool)  # the next observation is an episode's first (for V(s0))
    ep_ret, ep_len, ep_game = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n)
    ep_seen = np.zeros((n, 2), dtype=bool)  # which of the common checks fired in the episode so far
    obs, prev_gv = env.reset()
    next_obs, next_done = torch.as_tensor(obs, device=device), torch.zeros(n, device=device)
    for iteration in range(start_iteration, num_iterations + 1):
        if progression.advance(global_step):  # next safeguard: the same weights, a fresh optimizer, new episodes
            optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
            violations += int(ep_seen.sum())  # the episodes cut here keep their violations (they are not logged)
            obs, prev_gv = env.reset()
            next_obs = torch.as_tensor(obs, device=device)
            sg_state, first[:], ep_ret[:], ep_len[:], ep_game[:], ep_seen[:] = [INITIAL] * n, True, 0.0, 0, 0.0, False
            for r in recent:
                r.clear()
        sg = safeguards[progression.safeguard] if guarded else None
        lam = args.fear_factor * min(1.0, global_step / max(args.fear_phase_in * args.total_timesteps, 1))
        new_values = []

        for step in range(args.num_steps):
            global_step += n
            q_now = onehot(sg_state, space, product, device)
            obs_buf[step], q_buf[step], dones_buf[step] = next_obs, q_now, next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs, q_now)
            values_buf[step], actions_buf[step], logprobs_buf[step] = value, action, logprob
            for i in np.flatnonzero(first):
                logger.scalar("charts/V_s0", float(value[i]), global_step)
            first[:] = False
            if product:  # the progression's measure: the critic's value on the states this safeguard adds
                is_new = [space.index.get(s, -1) in new_states[progression.stage] for s in sg_state]
                new_values += value[torch.as_tensor(is_new)].tolist()

            obs, gv, game_done, dead, start_gv = env.step(action.cpu().numpy())
            # def. 10: the safeguard steps on the labels of the state reached, the last step of an episode included
            labels = [doom_labels(v) for v in gv]
            sg_state, sg_violated = step_safeguard(sg, sg_state, labels)  # eq. 4: entering the sink
            checks = doom_checks(labels)  # the common metric, every method
            game_r = np.array([doom_reward(prev_gv[i], gv[i], dead[i]) for i in range(n)])
            reward = shaped_reward(game_r, sg_violated, 0.0, args.doom_penalty)  # eq. 5
            done = game_done | sg_violated  # the safeguard ends the episode at a violation
            ended = np.flatnonzero(sg_violated & ~game_done)
            if len(ended):  # start their next episodes now
                obs, start_gv_ended = env.reset(mask=sg_violated & ~game_done)
                start_gv[ended] = start_gv_ended[ended]
            if fear_net is not None:  # Lipton et al.: r - lambda F(s'), and the frames labelled for F
                frames = torch.as_tensor(obs[:, -3:], device=device)
                with torch.no_grad():
                    reward = reward - lam * torch.sigmoid(fear_net(frames)).cpu().numpy() * ~done
                for i in range(n):
                    label_fear_frames(recent[i], obs[i, -3:], done[i], checks[i].any(), args.fear_radius,
                                      danger_mem, safe_mem)  # fmt: skip
            violation_steps += int(checks.sum())
            sg_violations += int(sg_violated.sum())
            logger.log_costs(global_step, checks.any(1))
            ep_seen |= checks
            ep_ret += reward
            ep_game += game_r
            ep_len += 1
            prev_gv = np.where(done[:, None], start_gv, gv)
            for i in np.flatnonzero(done):
                violations += int(ep_seen[i].sum())
                train_episodes, train_cost = train_episodes + 1, train_cost + float(ep_seen[i].sum())
                violating_episodes += int(ep_seen[i].any())
                logger.log_episode(global_step, ep_ret[i], float(ep_seen[i].sum()), ep_len[i])
                logger.scalar("charts/episodic_game_reward", ep_game[i], global_step)
                sg_state[i], first[i], ep_ret[i], ep_len[i], ep_game[i], ep_seen[i] = INITIAL, True, 0.0, 0, 0.0, False
            rewards_buf[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(obs, device=device)
            next_done = torch.as_tensor(done, dtype=torch.float32, device=device)
        if new_values:
            progression.record(float(np.mean(new_values)))
        logger.scalar("charts/violations", violations, global_step)
        logger.scalar("charts/violation_steps", violation_steps, global_step)
        logger.scalar("charts/safeguard_violations", sg_violations, global_step)
        logger.scalar("charts/safeguard_index", progression.safeguard, global_step)

        # GAE and the PPO update (CleanRL)
        with torch.no_grad():
            next_value = agent.get_value(next_obs, onehot(sg_state, space, product, device))
            advantages, lastgaelam = torch.zeros_like(rewards_buf), 0
            for t in reversed(range(args.num_steps)):
                nonterminal = 1.0 - (next_done if t == args.num_steps - 1 else dones_buf[t + 1])
                nextvalues = next_value if t == args.num_steps - 1 else values_buf[t + 1]
                delta = rewards_buf[t] + args.doom_gamma * nextvalues * nonterminal - values_buf[t]
                advantages[t] = lastgaelam = delta + args.doom_gamma * args.gae_lambda * nonterminal * lastgaelam
            returns = advantages + values_buf
        b_obs, b_q = obs_buf.reshape(-1, *obs_buf.shape[2:]), q_buf.reshape(-1, q_buf.shape[-1])
        b_actions, b_logprobs = actions_buf.reshape(-1), logprobs_buf.reshape(-1)
        b_adv, b_returns = advantages.reshape(-1), returns.reshape(-1)
        for epoch in range(args.update_epochs):
            perm = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb = perm[start : start + minibatch_size]
                loss, pg_loss, v_loss, entropy_loss = ppo_loss(agent, b_obs[mb], b_q[mb], b_actions[mb],
                                                               b_logprobs[mb], b_adv[mb], b_returns[mb], args)
                check_finite("PPO loss", loss)
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
                optimizer.step()

        # intrinsic fear: train the classifier on danger frames vs safe frames (balanced minibatch)
        if fear_net is not None and danger_mem and safe_mem:
            for _ in range(4):
                k = min(64, len(danger_mem), len(safe_mem))
                d = [danger_mem[j] for j in np.random.randint(len(danger_mem), size=k)]
                s = [safe_mem[j] for j in np.random.randint(len(safe_mem), size=k)]
                x = torch.as_tensor(np.stack(d + s), device=device)
                y = torch.cat([torch.ones(k), torch.zeros(k)]).to(device)
                fear_loss = F.binary_cross_entropy_with_logits(fear_net(x), y)
                fear_opt.zero_grad()
                fear_loss.backward()
                fear_opt.step()
            logger.scalar("losses/fear_loss", fear_loss.item(), global_step)

        logger.scalar("losses/policy_loss", pg_loss.item(), global_step)
        logger.scalar("losses/value_loss", v_loss.item(), global_step)
        logger.scalar("losses/entropy", entropy_loss.item(), global_step)
        logger.scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
        logger.console(global_step, f"safeguard={progression.safeguard} violations={violations} "
                                    f"(steps {violation_steps}, safeguard {sg_violations})")  # fmt: skip
        if checkpointer.due(global_step) and iteration < num_iterations:  # after this iteration's logging
            checkpointer.save(global_step, checkpoint_state(), args)
    checkpointer.save(global_step, checkpoint_state(), args)  # the end of training, before the evaluation
    violations += int(ep_seen.sum())  # the episodes still running at the end keep their violations too
    train_seconds = time.time() - logger.start_time
    env.close()

    eval_env = DoomVecEnv(min(args.doom_eval_episodes, n), wad, args.seed + 10_000, args.doom_frame_skip,
                          args.doom_episode_tics, args.frame_stack, min(workers, args.doom_eval_episodes))  # fmt: skip
    frames = [] if args.capture_video else None
    ev_ret, ev_cost = evaluate_vizdoom(agent, eval_env, space, product, args.doom_eval_episodes, device, frames)
    eval_env.close()
    if frames:
        print(f"video: {save_video(frames, video_path(logger.run_dir, 'eval', 0), fps=35 // args.doom_frame_skip)}")
    for ret, cost in zip(ev_ret, ev_cost):
        logger.log_episode(global_step, ret, cost, 0, prefix="eval")
    results = {"training_violations": violations, "violation_steps": violation_steps,
               "safeguard_violations": sg_violations, "env_steps": global_step, "train_seconds": train_seconds,
               "SPS": global_step / max(train_seconds, 1e-9), "switches": progression.switches,
               "eval_game_reward": float(np.mean(ev_ret)), "eval_violations": float(np.mean(ev_cost))}  # fmt: skip
    # summary.json: an episode's cost is the number of the authors' two checks it failed (0-2); the limit is 0
    results["summary"] = {
        "env_id": "vizdoom", "total_steps": global_step, "eval_return": results["eval_game_reward"],
        "eval_cost": results["eval_violations"], "train_cost": train_cost / max(train_episodes, 1),
        "train_episodes": train_episodes, "train_violating_episodes": violating_episodes, "cost_limit": 0.0,
        "cost_rate": logger.cost_rate, "sps": (global_step - first_step) / max(train_seconds, 1e-9),
        "eval_returns": ev_ret, "eval_costs": ev_cost, "training_violations": violations,
        "violation_steps": violation_steps, "safeguard_violations": sg_violations, "switches": progression.switches,
    }  # fmt: skip
    print(f"training violations={violations} per episode ({violation_steps} steps; against the safeguard in force: "
          f"{sg_violations}) eval game reward={results['eval_game_reward']:.3f} eval violations per episode="
          f"{results['eval_violations']:.2f} ({results['SPS']:.0f} env steps/s)")
    if args.save_model:
        torch.save(agent.state_dict(), os.path.join(logger.run_dir, "psl_vizdoom.pt"))
    return results


METHODS = ("psl", "zero-shot", "intrinsic-fear", "baseline")
# flags a resumed run may change: the common ones, the gridworld's budget, and what is recorded (not what is computed)
MAY_CHANGE_ON_RESUME = RESUMABLE_CHANGES + ("total_episodes",)


def check_args(args: Args) -> None:
    check_choice(args, "env_id", ("minecraft", "vizdoom"))
    check_choice(args, "method", METHODS)
    check_choice(args, "progression", ("converge", "fixed"))
    check_choice(args, "transfer", ("ancestors", "authors"))
    check_positive(args, "num_envs", "eval_episodes", "converge_window", "converge_tol", "fear_radius")
    if args.env_id == "minecraft":
        check_positive(args, "total_episodes", "max_episode_steps", "alpha", "gamma", "transfer_depth")
        # alpha, gamma and the bias-transfer factor of eq. 7 are fractions, as epsilon and the slip probability
        for name in ("epsilon", "slip_probability", "alpha", "gamma", "transfer_factor"):
            if not 0.0 <= getattr(args, name) <= 1.0:
                raise SystemExit(f"error: --{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)!r}")
        if args.stage_episodes < 0 or args.exact_eval_every < 0:
            raise SystemExit("error: --stage-episodes and --exact-eval-every must be >= 0")
    else:
        check_positive(args, "total_timesteps", "doom_eval_episodes", "num_steps", "num_minibatches", "update_epochs",
                       "learning_rate", "frame_stack", "torch_threads", "doom_frame_skip", "doom_episode_tics",
                       "hidden_size")  # fmt: skip
        a, b = args.doom_stage_fractions
        if not 0.0 <= a <= b <= 1.0:
            raise SystemExit(f"error: --doom-stage-fractions must be two increasing fractions in [0, 1], got {a} {b}")
    if args.checkpoint_every < -1:
        raise SystemExit(f"error: --checkpoint-every must be -1 (the default interval), 0 (only at the end) or "
                         f"positive, got {args.checkpoint_every}")
    if args.penalty < 0 or args.doom_penalty < 0 or args.fear_factor < 0:
        raise SystemExit("error: --penalty, --doom-penalty and --fear-factor must be >= 0")


if __name__ == "__main__":
    args = tyro.cli(Args)
    # --resume runs/<run>: that run's flags (a longer budget or another checkpoint interval may be given)
    args, resumed = resume_run(args, "psl", MAY_CHANGE_ON_RESUME)
    check_args(args)
    start_time = time.time()
    # the gridworld's budget is in episodes (shown in the console line), ViZDoom's in env steps
    total = 0 if args.env_id == "minecraft" else args.total_timesteps
    if resumed:  # the same run directory and TensorBoard curves, continued from the checkpoint's step
        run_dir = resumed["run_dir"]
        logger = Logger(os.path.basename(run_dir), args, root=os.path.dirname(run_dir), total_steps=total,
                        resume_step=resumed["state"]["global_step"])  # fmt: skip
        logger.load_state_dict(resumed["state"]["logger"])
        logger.total_steps = total
    else:
        logger = Logger(f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}", args, total_steps=total)
    seed_everything(args.seed, args.torch_deterministic)
    if args.env_id == "minecraft":
        results = run_gridworld(args, logger, resumed)
    else:
        results = run_vizdoom(args, logger, resumed)
    write_summary(logger.run_dir, args, script="psl", start_time=start_time, **results["summary"])
    logger.close()
