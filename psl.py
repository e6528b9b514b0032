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
- minecraft: the authors' 10x10 slippery gridworld, tabular Q-learning, five safeguards (paper fig. 4a-4e).
- vizdoom: a map generated here as UDMF text in a PWAD (lava, armor, plasma gun, a door, a Baron of Hell),
  a synchronous PPO on RGB frames (CNN + frame stack), the three Doom safeguards of the paper.

Paper -> code:
- def. 8-9 (safeguard, rejecting sink)  -> `Safeguard` (a table of rules), `SINK`
- def. 10 (product state)               -> `ProductSpace` (global ids of safeguard states); `q` beside `pos`
- eq. 5 (safeguard-shaped reward)       -> `shaped_reward()`
- eq. 7 (safety-bias transfer)          -> `bias_transfer()`, `Safeguard.ancestors()`
- progression (V(s0) has converged)     -> `has_converged()`; `--progression fixed` = the authors' budget
- Lipton et al. 2016 intrinsic fear     -> `FearTable` (tabular), `FearNet` (pixels)
- Algorithm 1 (PSL with a learner)      -> `run_gridworld()` / `run_vizdoom()`

Deviations (see docs/psl.md for the reasons and the full list):
- Q-learning updates the EXECUTED action (the authors' code updates the greedy one under exploration).
- The gridworld runs `--num-envs` episodes side by side; each batch of updates reads one Q snapshot
  (`--num-envs 1` is plain sequential Q-learning).
- The fifth gridworld safeguard is reconstructed (the code has four): both branches of safeguard 4 joined.
- `--progression converge` also ends a safeguard at the latest at the fixed schedule's boundary.
- Gridworld baseline and intrinsic fear learn on the MDP state only and get the final safeguard's signal
  (the MDP has no task reward); tabular intrinsic fear uses counts as its classifier.
- ViZDoom: synchronous PPO with a frame stack instead of APPO + GRU (sample-factory); tiny CPU budgets.
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
    """unused here (kept for the common block); ViZDoom frames are not recorded"""
    save_model: bool = False
    """whether to save the Q-table (minecraft) or the network (vizdoom) into the run directory"""

    # Algorithm specific arguments
    env_id: str = "minecraft"
    """the environment: minecraft (tabular gridworld) or vizdoom (pixels)"""
    method: str = "psl"
    """psl (progression + bias transfer), zero-shot (final safeguard only), intrinsic-fear, or baseline"""
    progression: str = "converge"
    """when to move to the next safeguard: converge (V(s0) converged, the paper) or fixed (equal budgets, the code)"""
    converge_window: int = 100
    """episodes per window of the convergence rule: |mean(last window) - mean(window before)| < converge_tol"""
    converge_tol: float = 0.01
    """tolerance of the convergence rule on V(s0)"""
    penalty: float = 0.1
    """p of eq. 5: the penalty for entering the rejecting sink (gridworld: 0.1 as the authors' code)"""
    fear_radius: int = 5
    """intrinsic fear: k_r, the number of steps before a catastrophe whose states are labelled dangerous"""
    fear_factor: float = 0.1
    """intrinsic fear: lambda, the weight of the fear penalty once fully phased in"""
    fear_phase_in: float = 0.2
    """intrinsic fear: fraction of the training budget over which lambda grows linearly from 0"""
    eval_episodes: int = 100
    """gridworld: greedy test episodes under the final safeguard after training"""

    # Gridworld (tabular Q-learning)
    total_episodes: int = 5000
    """gridworld: training episodes over the whole progression"""
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
    transfer_factor: float = 1.0
    """eq. 7: bias-transfer factor (1 = plain average of the ancestors' values, as the authors' code)"""
    transfer_depth: int = 4
    """eq. 7: k, how many parent steps towards the initial state the ancestors are collected"""
    authors_update: bool = False
    """gridworld: reproduce the authors' code, which updates the GREEDY action when a random one was executed
    (a bug, for comparison only; off = correct Q-learning)"""

    # ViZDoom (synchronous PPO on RGB frames)
    total_timesteps: int = 100_000
    """vizdoom: total agent steps (each repeats the action doom_frame_skip frames)"""
    doom_stage_fractions: tuple[float, float] = (0.0625, 0.375)
    """vizdoom, fixed progression: end of safeguards 0 and 1 as fractions of the budget (paper: 2.5M, 15M of 40M)"""
    doom_eval_episodes: int = 8
    """vizdoom: evaluation episodes under the final safeguard after training"""
    doom_penalty: float = 1.0
    """vizdoom: p of eq. 5 (paper tried 0, 0.5, 1)"""
    doom_frame_skip: int = 4
    """vizdoom: frames per agent step"""
    doom_episode_tics: int = 1400
    """vizdoom: episode timeout in game tics (35 per second)"""
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
    num_minibatches: int = 4
    """vizdoom: PPO minibatches per epoch"""
    update_epochs: int = 4
    """vizdoom: PPO epochs per rollout"""
    clip_coef: float = 0.1
    """vizdoom: PPO clip (paper: 0.1)"""
    ent_coef: float = 0.01
    """vizdoom: entropy bonus"""
    vf_coef: float = 0.5
    """vizdoom: value loss weight"""
    max_grad_norm: float = 0.5
    """vizdoom: gradient clipping"""
    torch_threads: int = 1
    """vizdoom: CPU threads for torch (1 avoids oversubscribing a small CPU beside the Doom games)"""
    hidden_size: int = 512
    """vizdoom: width of the fully connected layer after the CNN (paper: 512)"""


# ------------------------------------------------------------------------------------------------------
# Safeguards (def. 8-10)
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
    """The explicit product (def. 10): every safeguard state of a progression gets one global integer id.

    `table(k, label_sets)` compiles safeguard k into next_id[q_id, label_id] (-1 = sink) so that many
    environments step their safeguards with one array lookup.
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


def shaped_reward(mdp_reward, violated, accept_reward: float, penalty: float):
    # eq. 5: r' = r + r_accept * [q' accepting] - p * [q' in the rejecting sink]
    violated = np.asarray(violated, dtype=np.float64)
    return np.asarray(mdp_reward, dtype=np.float64) + accept_reward * (1.0 - violated) - penalty * violated


def bias_transfer(Q, visited, sg: Safeguard, space: ProductSpace, q_id: int, cell, factor: float, depth: int):
    """eq. 7: first visit of product state (s, q): Q(s, q, .) = factor * mean of Q(s, q', .) over the
    ancestors q' of q (up to `depth` parent steps) already visited at s. Returns True if it transferred."""
    # eq. 7: Q(s, q, .) <- factor * (1 / |N_k(q)|) * sum over q' in N_k(q) of Q(s, q', .)
    anc = [space.index[a] for a in sg.ancestors(space.names[q_id], depth)]
    anc = [a for a in anc if visited[(a, *cell)]]
    if anc:
        Q[(q_id, *cell)] = factor * np.mean([Q[(a, *cell)] for a in anc], axis=0)
    return bool(anc)


def has_converged(values, window: int, tol: float) -> bool:
    """Progression rule of the paper: V(s0) has converged when the means of the last two windows agree."""
    if len(values) < 2 * window:
        return False
    v = np.asarray(values[-2 * window :])
    return abs(v[window:].mean() - v[:window].mean()) < tol


# ------------------------------------------------------------------------------------------------------
# The Minecraft-inspired gridworld (authors' layout 1) and its five safeguards (paper fig. 4a-4e)
# ------------------------------------------------------------------------------------------------------
GRID_LABELS = ["safe", "lava", "creeper", "wood", "iron", "work_bench", "smith_table", "diamond"]
GRID_LABEL_SETS = [frozenset() if n == "safe" else frozenset({n}) for n in GRID_LABELS]
GRID_START = (5, 2)
GRID_MOVES = np.array([[0, 1], [-1, 0], [0, -1], [1, 0], [0, 0]])  # right, up, left, down, stay

DANGER = {"creeper", "lava"}
MINECRAFT_SAFEGUARDS = [
    Safeguard("1: never creeper, never lava", [
        ("start", DANGER, SINK),
    ]),
    Safeguard("2: as 1, and remember wood", [
        ("start", DANGER, SINK), ("start", {"wood"}, "wood"),
        ("wood", DANGER, SINK),
    ]),
    Safeguard("3: after wood then work bench, lava is allowed", [
        ("start", DANGER, SINK), ("start", {"wood"}, "wood"),
        ("wood", DANGER, SINK), ("wood", {"work_bench"}, "wood+bench"),
        ("wood+bench", {"creeper"}, SINK),
    ]),
    Safeguard("4: as 3, or wood then iron then smith table: creeper is allowed", [
        ("start", DANGER, SINK), ("start", {"wood"}, "wood"),
        ("wood", DANGER, SINK), ("wood", {"work_bench"}, "wood+bench"), ("wood", {"iron"}, "wood+iron"),
        ("wood+bench", {"creeper"}, SINK),
        ("wood+iron", DANGER, SINK), ("wood+iron", {"smith_table"}, "wood+iron+smith"),
        ("wood+iron+smith", {"lava"}, SINK),
    ]),
    # Reconstructed (the code has four): both branches of 4 joined; with both crafts done nothing is unsafe.
    Safeguard("5: as 4, and both branches together allow lava and creeper", [
        ("start", DANGER, SINK), ("start", {"wood"}, "wood"),
        ("wood", DANGER, SINK), ("wood", {"work_bench"}, "wood+bench"), ("wood", {"iron"}, "wood+iron"),
        ("wood+bench", {"creeper"}, SINK), ("wood+bench", {"iron"}, "bench+iron"),
        ("bench+iron", {"creeper"}, SINK), ("bench+iron", {"smith_table"}, "crafted"),
        ("wood+iron", DANGER, SINK), ("wood+iron", {"smith_table"}, "wood+iron+smith"),
        ("wood+iron+smith", {"lava"}, SINK), ("wood+iron+smith", {"work_bench"}, "crafted"),
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
    catastrophe), estimated by counts (the maximum-likelihood tabular classifier) from the last k_r states
    before each catastrophe (danger) and all states farther from any catastrophe (safe)."""

    def __init__(self, shape):
        self.danger, self.safe = np.zeros(shape), np.zeros(shape)

    def __call__(self, idx):
        d, s = self.danger[idx], self.safe[idx]
        return np.where(d + s > 0, d / np.maximum(d + s, 1), 0.0)


def greedy(Qs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """argmax over actions with uniformly random tie-breaking (all-zero rows pick a random action)."""
    best = Qs == Qs.max(axis=1, keepdims=True)
    return np.argmax(best * rng.random(Qs.shape), axis=1)


def run_gridworld(args: Args, logger: Logger) -> dict:
    """Algorithm 1 with tabular Q-learning on the product of the gridworld and the safeguard in force."""
    rng = np.random.default_rng(args.seed)
    final = len(MINECRAFT_SAFEGUARDS) - 1
    progression = list(range(len(MINECRAFT_SAFEGUARDS))) if args.method == "psl" else [final]
    space = ProductSpace(MINECRAFT_SAFEGUARDS)
    tables = np.stack([space.table(k, GRID_LABEL_SETS) for k in range(len(MINECRAFT_SAFEGUARDS))])
    # psl and zero-shot learn on the product state (s, q); baseline and intrinsic fear see the MDP state only
    # (their Q-table has one safeguard slot) and are scored against the final safeguard.
    product = args.method in ("psl", "zero-shot")
    Q = np.zeros((len(space.names) if product else 1, 10, 10, 5))
    visited = np.zeros(Q.shape[:3], dtype=bool)
    fear = FearTable((10, 10)) if args.method == "intrinsic-fear" else None
    start_q = space.index[INITIAL]

    env = GridWorld(args.num_envs, args.slip_probability, rng)
    n = args.num_envs
    q = np.full(n, start_q)  # safeguard state of the product (global id)
    stage_of_env = np.zeros(n, dtype=np.int64)  # which safeguard of the progression each episode runs under
    ep_ret, ep_len = np.zeros(n), np.zeros(n, dtype=np.int64)
    recent_pos = np.zeros((args.fear_radius, n, 2), dtype=np.int64)
    recent_len = np.zeros(n, dtype=np.int64)

    stage, stage_v0, episodes_started, episodes_done, violations = 0, [], 0, 0, 0
    stage_budget = args.total_episodes // len(progression)
    v_s0_per_stage, global_step = {}, 0
    v0_curve, violation_curve = [], []  # per episode started / finished (for the benchmark's plots)

    def start_episodes(idx):
        nonlocal episodes_started, stage
        for i in idx:
            # progression: move on when V(s0) has converged (paper) or after an equal share (authors' code)
            if stage < len(progression) - 1:
                move = episodes_started >= (stage + 1) * stage_budget  # fixed share (also the cap of converge)
                if args.progression == "converge":
                    move = move or has_converged(stage_v0, args.converge_window, args.converge_tol)
                if move:
                    v_s0_per_stage[MINECRAFT_SAFEGUARDS[progression[stage]].name] = float(np.mean(stage_v0[-50:]))
                    stage, stage_v0[:] = stage + 1, []
            stage_of_env[i], q[i] = progression[stage], start_q
            v0 = Q[(start_q if product else 0, *GRID_START)].max()
            stage_v0.append(v0)
            v0_curve.append(v0)
            logger.scalar("charts/V_s0", v0, global_step)
            episodes_started += 1
        env.reset(idx)
        ep_ret[idx], ep_len[idx], recent_len[idx] = 0.0, 0, 0

    cost_steps = []
    start_episodes(np.arange(n))
    visited[(start_q if product else 0, *GRID_START)] = True
    t0 = time.time()
    while episodes_done < args.total_episodes:
        qa = q if product else np.zeros(n, dtype=np.int64)
        r, c = env.pos[:, 0].copy(), env.pos[:, 1].copy()
        Qs = Q[qa, r, c]
        greedy_actions = greedy(Qs, rng)
        actions = np.where(rng.random(n) < args.epsilon, rng.integers(0, 5, n), greedy_actions)
        labels = env.step(actions)
        r2, c2 = env.pos[:, 0], env.pos[:, 1]
        q2 = tables[stage_of_env, q, labels]  # def. 10: the safeguard steps on the label of the state reached
        violated = q2 < 0  # eq. 4: the run is unsafe as soon as it enters the rejecting sink
        global_step += n

        # eq. 7: first visit of a product state -> initialise from its ancestor safeguard states (PSL only)
        q2a = np.where(violated, 0, q2) if product else np.zeros(n, dtype=np.int64)
        for i in np.flatnonzero(~violated & ~visited[q2a, r2, c2]):
            if args.method == "psl":
                sg = MINECRAFT_SAFEGUARDS[stage_of_env[i]]
                bias_transfer(Q, visited, sg, space, q2a[i], (r2[i], c2[i]), args.transfer_factor, args.transfer_depth)
            visited[q2a[i], r2[i], c2[i]] = True

        reward = shaped_reward(0.0, violated, args.accept_reward, args.penalty)  # eq. 5 (no MDP reward here)
        next_v = np.where(violated, 0.0, Q[q2a, r2, c2].max(axis=1))  # the sink is absorbing with value 0
        target = reward + args.gamma * next_v
        if fear is not None:  # Lipton et al.: target r + gamma max Q(s') - lambda F(s'), lambda phased in
            lam = args.fear_factor * min(1.0, episodes_done / max(args.fear_phase_in * args.total_episodes, 1))
            target = target - lam * fear((r2, c2))
        # Q-learning on the EXECUTED action (several envs on the same (s, a): the last write wins)
        a = greedy_actions if args.authors_update else actions
        Q[qa, r, c, a] += args.alpha * (target - Q[qa, r, c, a])

        if fear is not None:  # states k_r steps before now are far from any catastrophe so far: safe
            slot = recent_len % args.fear_radius
            old = recent_len >= args.fear_radius
            np.add.at(fear.safe, (recent_pos[slot[old], np.flatnonzero(old), 0],
                                  recent_pos[slot[old], np.flatnonzero(old), 1]), 1)  # fmt: skip
            recent_pos[slot, np.arange(n)] = env.pos
            recent_len += 1

        q = np.where(violated, q, q2)
        ep_ret += reward
        ep_len += 1
        cost_steps.append(violated)
        if len(cost_steps) >= 200:  # charts/cost_rate, written every 200 vector steps
            logger.log_costs(global_step, np.concatenate(cost_steps))
            cost_steps = []
        done = violated | (ep_len >= args.max_episode_steps)
        if done.any():
            idx = np.flatnonzero(done)
            for i in idx:
                if fear is not None:  # the last k_r states: dangerous if the episode ended in a catastrophe
                    m = min(recent_len[i], args.fear_radius)
                    cells = recent_pos[(recent_len[i] - 1 - np.arange(m)) % args.fear_radius, i]
                    np.add.at(fear.danger if violated[i] else fear.safe, (cells[:, 0], cells[:, 1]), 1)
                violations += int(violated[i])
                violation_curve.append(violations)
                episodes_done += 1
                logger.log_episode(global_step, ep_ret[i], float(violated[i]), ep_len[i])
            logger.scalar("charts/violations", violations, global_step)
            logger.scalar("charts/safeguard_index", progression[stage], global_step)
            if episodes_done % 500 < len(idx):
                logger.console(global_step, f"episodes={episodes_done} safeguard={progression[stage] + 1} "
                               f"V(s0)={stage_v0[-1] if stage_v0 else float('nan'):.3f} violations={violations}")
            start_episodes(idx)
    logger.console(global_step, f"episodes={episodes_done} violations={violations}")
    v_s0_per_stage[MINECRAFT_SAFEGUARDS[progression[stage]].name] = float(np.mean(stage_v0[-50:] or [np.nan]))
    check_finite("Q-table", torch.as_tensor(Q))
    train_time = time.time() - t0

    # Final test: greedy episodes under the final safeguard (the authors' test), success = no violation
    test_env = GridWorld(args.eval_episodes, args.slip_probability, rng)
    test_env.reset(np.arange(args.eval_episodes))
    tq = np.full(args.eval_episodes, start_q)
    alive = np.ones(args.eval_episodes, dtype=bool)
    ret = np.zeros(args.eval_episodes)
    for _ in range(args.max_episode_steps):
        qa = tq if product else np.zeros_like(tq)
        a = greedy(Q[qa, test_env.pos[:, 0], test_env.pos[:, 1]], rng)
        tq2 = tables[final, tq, test_env.step(a)]
        ret += alive * shaped_reward(0.0, tq2 < 0, args.accept_reward, args.penalty)
        alive &= tq2 >= 0
        tq = np.where(tq2 < 0, tq, tq2)
        if not alive.any():
            break
    for i in range(args.eval_episodes):
        logger.log_episode(global_step, ret[i], float(not alive[i]), 0, prefix="eval")
    result = {
        "V_s0": float(Q[(start_q if product else 0, *GRID_START)].max()),
        "V_s0_per_safeguard": v_s0_per_stage,
        "training_violations": violations,
        "test_success": float(alive.mean()),
        "train_seconds": train_time,
        "env_steps": global_step,
        "Q": Q,
        "V_s0_curve": np.array(v0_curve),
        "violation_curve": np.array(violation_curve),
    }
    logger.scalar("eval/success_rate", result["test_success"], global_step)
    print(f"V(s0)={result['V_s0']:.3f} training violations={violations} test success={100 * alive.mean():.0f}% "
          f"test violations={100 * (1 - alive.mean()):.0f}% ({train_time:.1f} s, {global_step} env steps)")
    print("V(s0) at the end of each safeguard:", {k: round(v, 3) for k, v in v_s0_per_stage.items()})
    if args.save_model:
        np.savez(os.path.join(logger.run_dir, "q_table.npz"), Q=Q, visited=visited, states=np.array(space.names))
    return result


# ------------------------------------------------------------------------------------------------------
# ViZDoom: a map generated as UDMF text in a PWAD, labels from game variables, the three Doom safeguards
# ------------------------------------------------------------------------------------------------------
DOOM_SAFEGUARDS = [
    Safeguard("0: never lava", [
        ("start", {"lava"}, SINK),
    ]),
    Safeguard("1: lava only after armor; the boss area is a violation", [
        ("start", {"armor"}, "armor"), ("start", {"lava", "boss_area"}, SINK),
        ("armor", {"boss_area"}, SINK),
    ]),
    Safeguard("2: as 1, and the boss area only after the weapon", [
        ("start", {"armor"}, "armor"), ("start", {"lava", "boss_area"}, SINK),
        ("armor", {"weapon"}, "armed"), ("armor", {"boss_area"}, SINK),
    ]),
]  # fmt: skip

# The map, south to north (Doom units, y grows north): start room with armor and a radiation suit, a band of
# lava floor (20 damage every 32 tics) across the whole width, the item room with a plasma gun and cells, a
# door (Door_Raise on use), the boss room with a Baron of Hell. The door sector comes last (see udmf_textmap).
DOOM_LAVA_Y, DOOM_DOOR_Y = (384, 512), (896, 912)
DOOM_SECTORS = [  # (clockwise polygon, floor flat, sector properties)
    ([(0, 0), (0, 384), (512, 384), (512, 0)], "FLOOR0_1", {}),
    ([(0, 384), (0, 512), (512, 512), (512, 384)], "LAVA1", {"damageamount": 20, "damageinterval": 32}),
    ([(0, 512), (0, 896), (192, 896), (320, 896), (512, 896), (512, 512)], "FLOOR0_1", {}),
    ([(0, 912), (0, 1280), (512, 1280), (512, 912), (320, 912), (192, 912)], "FLOOR7_2", {}),
    ([(192, 896), (192, 912), (320, 912), (320, 896)], "FLAT20", {"heightceiling": 0}),  # the closed door
]
DOOM_THINGS = [  # (x, y, angle, type): player start, green armor, radiation suit, plasma gun, 2 cell packs, baron
    (128, 64, 90, 1), (416, 160, 90, 2018), (416, 256, 90, 2025), (256, 704, 90, 2004),
    (192, 704, 90, 17), (320, 704, 90, 17), (256, 1152, 270, 3003),
]


def udmf_textmap() -> str:
    """The map as UDMF text (ZDoom namespace). Each polygon edge becomes a linedef; an edge shared by two
    sectors (walked in opposite directions) becomes one two-sided linedef whose front is the first sector."""

    def block(kind, props):
        def fmt(v):
            return ("true" if v else "false") if isinstance(v, bool) else f'"{v}"' if isinstance(v, str) else v

        return kind + "\n{\n" + "".join(f"  {k} = {fmt(v)};\n" for k, v in props.items()) + "}"

    door, edges, verts, sides, out = len(DOOM_SECTORS) - 1, {}, [], [], ['namespace = "zdoom";']
    for s, (poly, _, _) in enumerate(DOOM_SECTORS):
        for a, b in zip(poly, poly[1:] + poly[:1]):
            if (b, a) in edges:
                edges[(b, a)]["back"] = s
            else:
                edges[(a, b)] = {"front": s}
    for (a, b), e in edges.items():
        verts += [p for p in (a, b) if p not in verts]
        line = {"v1": verts.index(a), "v2": verts.index(b), "sidefront": len(sides)}
        if "back" in e:  # two-sided; a line onto the door sector opens it when used from the front
            is_door = door == e["back"]
            tex = {"texturetop": "BIGDOOR2"} if is_door else {}
            line.update(sideback=len(sides) + 1, twosided=True)
            if is_door:
                line.update(special=12, arg0=0, arg1=32, arg2=105, playeruse=True, repeatspecial=True)
            sides += [{"sector": e["front"], **tex}, {"sector": e["back"], **tex}]
        else:
            line["blocking"] = True
            sides.append({"sector": e["front"], "texturemiddle": "DOORTRAK" if e["front"] == door else "STARTAN2"})
        out.append(block("linedef", line))
    out += [block("vertex", {"x": float(x), "y": float(y)}) for x, y in verts]
    out += [block("sidedef", sd) for sd in sides]
    for _, flat, extra in DOOM_SECTORS:
        base = {"heightfloor": 0, "heightceiling": 128, "texturefloor": flat, "textureceiling": "CEIL3_5",
                "lightlevel": 208}
        out.append(block("sector", {**base, **extra}))
    skills = {f"skill{i}": True for i in range(1, 6)}
    for x, y, angle, kind in DOOM_THINGS:
        thing = {"x": float(x), "y": float(y), "angle": angle, "type": kind, **skills, "single": True}
        out.append(block("thing", thing))
    return "\n".join(out) + "\n"


def write_wad(path: str) -> str:
    """A PWAD with the lumps MAP01 (empty marker), TEXTMAP (the UDMF text) and ENDMAP; ZDoom builds the nodes."""
    import struct

    lumps = [("MAP01", b""), ("TEXTMAP", udmf_textmap().encode()), ("ENDMAP", b"")]
    data, directory, offset = b"", b"", 12
    for name, payload in lumps:
        directory += struct.pack("<ii8s", offset, len(payload), name.encode())
        data, offset = data + payload, offset + len(payload)
    with open(path, "wb") as f:
        f.write(b"PWAD" + struct.pack("<ii", len(lumps), offset) + data + directory)
    return path


DOOM_ACTIONS = [  # buttons: MOVE_FORWARD, TURN_LEFT, TURN_RIGHT, ATTACK, USE
    [1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 0, 0, 1, 0],
    [1, 0, 0, 0, 1],
]
DOOM_VARIABLES = ["POSITION_X", "POSITION_Y", "ARMOR", "WEAPON6", "HEALTH", "DAMAGECOUNT"]


def doom_labels(gv) -> frozenset:
    """Labels from game variables: lava = standing in the lava band, boss_area = past the door,
    armor = ARMOR > 0, weapon = the plasma gun's slot variable WEAPON6 > 0."""
    x, y, armor, weapon = gv[0], gv[1], gv[2], gv[3]
    labels = set()
    if DOOM_LAVA_Y[0] <= y < DOOM_LAVA_Y[1] and 0 <= x <= 512:
        labels.add("lava")
    if y > DOOM_DOOR_Y[1]:
        labels.add("boss_area")
    if armor > 0:
        labels.add("armor")
    if weapon > 0:
        labels.add("weapon")
    return frozenset(labels)


def doom_reward(prev, gv, dead: bool) -> float:
    """The notes' reward: +0.003 per damage point dealt, +0.01 per armor point gained, +1 for the weapon,
    -1 on death."""
    return (0.003 * (gv[5] - prev[5]) + 0.01 * max(gv[2] - prev[2], 0.0) + 1.0 * float(gv[3] > 0 and prev[3] <= 0)
            - 1.0 * float(dead))  # fmt: skip


class DoomVecEnv:
    """`num_envs` ViZDoom games in this process, stepped one after the other behind a batch API.

    step(actions) -> obs (N, 3 * frame_stack, 60, 80) uint8, game reward (N,), labels [frozenset] * N,
    done (N,) (death or timeout; the env is then reset and obs is the new episode's first observation).
    `reset_one(i)` starts a new episode (used when the safeguard ends an episode on a violation).
    """

    def __init__(self, num_envs: int, wad: str, seed: int, frame_skip: int, episode_tics: int, stack: int,
                 cheats: bool = False):
        import vizdoom as vzd

        self.games, self.skip, self.stack = [], frame_skip, stack
        for i in range(num_envs):
            g = vzd.DoomGame()
            g.set_doom_scenario_path(wad)
            g.set_doom_map("map01")
            g.set_doom_config_path(os.path.join(os.path.dirname(os.path.abspath(wad)), "_vizdoom.ini"))  # not in cwd
            g.set_screen_resolution(vzd.ScreenResolution.RES_160X120)
            g.set_screen_format(vzd.ScreenFormat.CRCGCB)
            g.set_render_hud(False)
            g.set_window_visible(False)
            g.set_available_buttons([getattr(vzd.Button, b) for b in ("MOVE_FORWARD", "TURN_LEFT", "TURN_RIGHT",
                                                                        "ATTACK", "USE")])
            g.set_available_game_variables([getattr(vzd.GameVariable, v) for v in DOOM_VARIABLES])
            g.set_episode_timeout(episode_tics)
            g.set_seed(seed + i)
            if cheats:
                g.add_game_args("+sv_cheats 1")
            g.set_mode(vzd.Mode.PLAYER)
            g.init()
            self.games.append(g)
        n = num_envs
        self.frames = np.zeros((n, stack, 3, 60, 80), dtype=np.uint8)
        self.vars = np.zeros((n, len(DOOM_VARIABLES)))
        for i in range(n):
            self.reset_one(i)

    def _read(self, i):
        state = self.games[i].get_state()
        return state.screen_buffer[:, ::2, ::2], np.asarray(state.game_variables, dtype=np.float64)

    def reset_one(self, i: int) -> None:
        self.games[i].new_episode()
        frame, self.vars[i] = self._read(i)
        self.frames[i] = frame

    def obs(self) -> np.ndarray:
        return self.frames.reshape(len(self.games), -1, 60, 80)

    def labels(self) -> list:
        return [doom_labels(v) for v in self.vars]

    def step(self, actions):
        n = len(self.games)
        rewards, done = np.zeros(n), np.zeros(n, dtype=bool)
        for i, g in enumerate(self.games):
            g.make_action(DOOM_ACTIONS[int(actions[i])], self.skip)
            if g.is_episode_finished():
                rewards[i], done[i] = doom_reward(self.vars[i], self.vars[i], g.is_player_dead()), True
                self.reset_one(i)
                continue
            frame, gv = self._read(i)
            rewards[i] = doom_reward(self.vars[i], gv, False)
            self.vars[i] = gv
            self.frames[i] = np.roll(self.frames[i], -1, axis=0)
            self.frames[i, -1] = frame
        return self.obs(), rewards, self.labels(), done

    def close(self) -> None:
        for g in self.games:
            g.close()


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
    """Intrinsic fear (Lipton et al. 2016) on pixels: P(the last frame is within k_r steps of a catastrophe)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 8, 4), nn.ReLU(), nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.Flatten(),
            nn.Linear(32 * 6 * 8, 64), nn.ReLU(), nn.Linear(64, 1),
        )  # fmt: skip

    def forward(self, frames):  # frames (B, 3, 60, 80) uint8 -> logits (B,)
        return self.net(frames.float() / 255.0).squeeze(-1)


def run_vizdoom(args: Args, logger: Logger) -> dict:
    """Algorithm 1 with a synchronous PPO: each safeguard of the progression trains from the previous weights."""
    device = get_device(args.cuda)
    torch.set_num_threads(args.torch_threads)
    final = len(DOOM_SAFEGUARDS) - 1
    progression = list(range(len(DOOM_SAFEGUARDS))) if args.method == "psl" else [final]
    boundaries = [int(f * args.total_timesteps) for f in args.doom_stage_fractions] + [args.total_timesteps]
    space = ProductSpace(DOOM_SAFEGUARDS)
    guarded = args.method in ("psl", "zero-shot")  # the safeguard shapes the reward and ends the episode
    wad = write_wad(os.path.join(tempfile.mkdtemp(prefix="psl_"), "psl_map.wad"))
    n = args.num_envs
    env = DoomVecEnv(n, wad, args.seed, args.doom_frame_skip, args.doom_episode_tics, args.frame_stack)
    agent = Agent(3 * args.frame_stack, len(space.names), len(DOOM_ACTIONS), args.hidden_size).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    fear_net = FearNet().to(device) if args.method == "intrinsic-fear" else None
    fear_opt = torch.optim.Adam(fear_net.parameters(), lr=1e-4) if fear_net is not None else None
    danger_mem, safe_mem = deque(maxlen=5000), deque(maxlen=5000)
    recent = [deque() for _ in range(n)]

    batch_size = n * args.num_steps
    minibatch_size = max(batch_size // args.num_minibatches, 1)
    num_iterations = max(args.total_timesteps // batch_size, 1)
    obs_buf = torch.zeros((args.num_steps, n, 3 * args.frame_stack, 60, 80), dtype=torch.uint8, device=device)
    q_buf = torch.zeros((args.num_steps, n, len(space.names)), device=device)
    actions_buf = torch.zeros((args.num_steps, n), dtype=torch.long, device=device)
    logprobs_buf, rewards_buf, dones_buf, values_buf = (
        torch.zeros((args.num_steps, n), device=device) for _ in range(4)
    )

    stage, stage_v0, global_step, violations = 0, [], 0, 0
    q = [INITIAL] * n  # safeguard state of each env (the monitor of the final safeguard for baseline / fear)
    first = np.ones(n, dtype=bool)  # the next observation is an episode's first (for V(s0))
    ep_ret, ep_len, ep_game = np.zeros(n), np.zeros(n, dtype=np.int64), np.zeros(n)

    def onehot(states):
        out = torch.zeros((n, len(space.names)), device=device)
        if guarded:  # baseline and intrinsic fear do not see the safeguard
            out[torch.arange(n), torch.as_tensor([space.index[s] if s != SINK else 0 for s in states])] = 1.0
        return out

    next_obs, next_done = torch.as_tensor(env.obs(), device=device), torch.zeros(n, device=device)
    start_time = time.time()
    for iteration in range(1, num_iterations + 1):
        # progression: next safeguard when V(s0) has converged (paper) or at the fixed schedule's boundary
        if stage < len(progression) - 1:
            move = global_step >= boundaries[stage]
            if args.progression == "converge":
                move = move or has_converged(stage_v0, args.converge_window, args.converge_tol)
            if move:  # continue from the previous weights with a fresh optimizer and fresh episodes
                stage, stage_v0 = stage + 1, []
                optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
                for i in range(n):
                    env.reset_one(i)
                    q[i], first[i], ep_ret[i], ep_len[i], ep_game[i] = INITIAL, True, 0.0, 0, 0.0
                next_obs = torch.as_tensor(env.obs(), device=device)
        sg = DOOM_SAFEGUARDS[progression[stage]]
        lam = args.fear_factor * min(1.0, global_step / max(args.fear_phase_in * args.total_timesteps, 1))

        for step in range(args.num_steps):
            global_step += n
            q_now = onehot(q)
            obs_buf[step], q_buf[step], dones_buf[step] = next_obs, q_now, next_done
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs, q_now)
            values_buf[step], actions_buf[step], logprobs_buf[step] = value, action, logprob
            for i in np.flatnonzero(first):
                stage_v0.append(float(value[i]))
                logger.scalar("charts/V_s0", float(value[i]), global_step)
            first[:] = False

            obs_np, game_r, labels, game_done = env.step(action.cpu().numpy())
            # def. 10: the safeguard steps on the labels of the state just reached (skipped at a game reset)
            q2 = [q[i] if game_done[i] else sg.step(q[i], labels[i]) for i in range(n)]
            violated = np.array([q2[i] == SINK and q[i] != SINK for i in range(n)])  # eq. 4: entering the sink
            reward = shaped_reward(game_r, violated & guarded, 0.0, args.doom_penalty)  # eq. 5
            if fear_net is not None:
                frames = torch.as_tensor(obs_np[:, -3:], device=device)
                with torch.no_grad():
                    reward = reward - lam * torch.sigmoid(fear_net(frames)).cpu().numpy()
                for i in range(n):
                    recent[i].append(obs_np[i, -3:].copy())
                    if len(recent[i]) > args.fear_radius:
                        safe_mem.append(recent[i].popleft())
            done = game_done | (violated & guarded)
            violations += int(violated.sum())
            logger.log_costs(global_step, violated)
            ep_ret += reward
            ep_game += game_r
            ep_len += 1
            for i in range(n):
                q[i] = q2[i]
                if fear_net is not None and (violated[i] or game_done[i]):  # catastrophe: the last k_r frames
                    (danger_mem if violated[i] else safe_mem).extend(recent[i])
                    recent[i].clear()
                if done[i]:
                    if not game_done[i]:
                        env.reset_one(i)  # the safeguard ended the episode
                    logger.log_episode(global_step, ep_ret[i], float(q[i] == SINK), ep_len[i])
                    logger.scalar("charts/episodic_game_reward", ep_game[i], global_step)
                    q[i], first[i], ep_ret[i], ep_len[i], ep_game[i] = INITIAL, True, 0.0, 0, 0.0
            rewards_buf[step] = torch.as_tensor(reward, dtype=torch.float32, device=device)
            next_obs = torch.as_tensor(env.obs(), device=device)
            next_done = torch.as_tensor(done, dtype=torch.float32, device=device)
        logger.scalar("charts/violations", violations, global_step)
        logger.scalar("charts/safeguard_index", progression[stage], global_step)

        # GAE and the PPO update (CleanRL)
        with torch.no_grad():
            next_value = agent.get_value(next_obs, onehot(q))
            advantages, lastgaelam = torch.zeros_like(rewards_buf), 0
            for t in reversed(range(args.num_steps)):
                nonterminal = 1.0 - (next_done if t == args.num_steps - 1 else dones_buf[t + 1])
                nextvalues = next_value if t == args.num_steps - 1 else values_buf[t + 1]
                delta = rewards_buf[t] + args.doom_gamma * nextvalues * nonterminal - values_buf[t]
                advantages[t] = lastgaelam = delta + args.doom_gamma * args.gae_lambda * nonterminal * lastgaelam
            returns = advantages + values_buf
        b_obs, b_q = obs_buf.reshape(-1, *obs_buf.shape[2:]), q_buf.reshape(-1, q_buf.shape[-1])
        b_actions, b_logprobs = actions_buf.reshape(-1), logprobs_buf.reshape(-1)
        b_adv, b_returns, b_values = advantages.reshape(-1), returns.reshape(-1), values_buf.reshape(-1)
        for epoch in range(args.update_epochs):
            perm = torch.randperm(batch_size, device=device)
            for start in range(0, batch_size, minibatch_size):
                mb = perm[start : start + minibatch_size]
                _, newlogprob, entropy, newvalue = agent.get_action_and_value(b_obs[mb], b_q[mb], b_actions[mb])
                ratio = (newlogprob - b_logprobs[mb]).exp()
                mb_adv = b_adv[mb]
                mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std(unbiased=False) + 1e-8)
                clipped = ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)
                pg_loss = torch.max(-mb_adv * ratio, -mb_adv * clipped).mean()
                v_loss = 0.5 * ((newvalue - b_returns[mb]) ** 2).mean()
                entropy_loss = entropy.mean()
                loss = pg_loss - args.ent_coef * entropy_loss + args.vf_coef * v_loss
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
        logger.console(global_step, f"safeguard={progression[stage]} violations={violations}")
    train_seconds = time.time() - start_time

    # Final evaluation: episodes with actions sampled from the policy, scored against the final safeguard
    # (monitored, not terminated: a violation is counted and the episode goes on)
    results = {"training_violations": violations, "env_steps": global_step, "train_seconds": train_seconds,
               "SPS": global_step / max(train_seconds, 1e-9)}
    eval_env, sg_final = env, DOOM_SAFEGUARDS[final]
    ev_ret, ev_viol, done_eps = [], [], 0
    for i in range(n):
        eval_env.reset_one(i)
    q_eval, ret_i, viol_i = [INITIAL] * n, np.zeros(n), np.zeros(n, dtype=bool)
    obs_t = torch.as_tensor(eval_env.obs(), device=device)
    while done_eps < args.doom_eval_episodes:
        with torch.no_grad():
            out = torch.zeros((n, len(space.names)), device=device)
            if guarded:
                for i in range(n):
                    out[i, space.index[q_eval[i]] if q_eval[i] != SINK else 0] = 1.0
            action, _, _, _ = agent.get_action_and_value(obs_t, out)
        obs_np, game_r, labels, game_done = eval_env.step(action.cpu().numpy())
        for i in range(n):
            if not game_done[i]:
                q_eval[i] = sg_final.step(q_eval[i], labels[i])
            viol_i[i] |= q_eval[i] == SINK
            ret_i[i] += game_r[i]
            if game_done[i] and done_eps < args.doom_eval_episodes:
                ev_ret.append(ret_i[i])
                ev_viol.append(float(viol_i[i]))
                logger.log_episode(global_step, ret_i[i], float(viol_i[i]), 0, prefix="eval")
                done_eps += 1
                q_eval[i], ret_i[i], viol_i[i] = INITIAL, 0.0, False
        obs_t = torch.as_tensor(obs_np, device=device)
    results.update(eval_game_reward=float(np.mean(ev_ret)), eval_violation_rate=float(np.mean(ev_viol)))
    print(f"training violations={violations} eval game reward={results['eval_game_reward']:.3f} "
          f"eval violation rate={results['eval_violation_rate']:.2f} ({results['SPS']:.0f} env steps/s)")
    if args.save_model:
        torch.save(agent.state_dict(), os.path.join(logger.run_dir, "psl_vizdoom.pt"))
    env.close()
    return results


METHODS = ("psl", "zero-shot", "intrinsic-fear", "baseline")


def check_args(args: Args) -> None:
    check_choice(args, "env_id", ("minecraft", "vizdoom"))
    check_choice(args, "method", METHODS)
    check_choice(args, "progression", ("converge", "fixed"))
    check_positive(args, "num_envs", "eval_episodes", "converge_window", "converge_tol", "fear_radius")
    if args.env_id == "minecraft":
        check_positive(args, "total_episodes", "max_episode_steps", "alpha", "gamma", "transfer_depth")
        # alpha, gamma and the bias-transfer factor of eq. 7 are fractions, as epsilon and the slip probability
        for name in ("epsilon", "slip_probability", "alpha", "gamma", "transfer_factor"):
            if not 0.0 <= getattr(args, name) <= 1.0:
                raise SystemExit(f"error: --{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)!r}")
    else:
        check_positive(args, "total_timesteps", "doom_eval_episodes", "num_steps", "num_minibatches", "update_epochs",
                       "learning_rate", "frame_stack", "torch_threads", "doom_frame_skip", "doom_episode_tics",
                       "hidden_size")  # fmt: skip
        a, b = args.doom_stage_fractions
        if not 0.0 <= a <= b <= 1.0:
            raise SystemExit(f"error: --doom-stage-fractions must be two increasing fractions in [0, 1], got {a} {b}")
    if args.penalty < 0 or args.doom_penalty < 0 or args.fear_factor < 0:
        raise SystemExit("error: --penalty, --doom-penalty and --fear-factor must be >= 0")


if __name__ == "__main__":
    args = tyro.cli(Args)
    check_args(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    logger = Logger(run_name, args)
    seed_everything(args.seed, args.torch_deterministic)
    if args.env_id == "minecraft":
        run_gridworld(args, logger)
    else:
        run_vizdoom(args, logger)
    logger.close()
