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
- ViZDoom: synchronous PPO with a frame stack instead of APPO + GRU (sample-factory); tiny CPU budgets.
- The LLM fine-tuning domain of the paper is out of scope.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
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
    """greedy test episodes under the final safeguard after training"""

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

    def start_episodes(idx):
        nonlocal episodes_started, stage
        for i in idx:
            # progression: move on when V(s0) has converged (paper) or after an equal share (authors' code)
            if stage < len(progression) - 1:
                if args.progression == "fixed":
                    move = episodes_started >= (stage + 1) * stage_budget
                else:
                    move = has_converged(stage_v0, args.converge_window, args.converge_tol)
                if move:
                    v_s0_per_stage[MINECRAFT_SAFEGUARDS[progression[stage]].name] = float(np.mean(stage_v0[-50:]))
                    stage, stage_v0[:] = stage + 1, []
            stage_of_env[i], q[i] = progression[stage], start_q
            v0 = Q[(start_q if product else 0, *GRID_START)].max()
            stage_v0.append(v0)
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
        violated = q2 < 0
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
                episodes_done += 1
                logger.log_episode(global_step, ep_ret[i], float(violated[i]), ep_len[i])
            logger.scalar("charts/violations", violations, global_step)
            logger.scalar("charts/safeguard_index", progression[stage], global_step)
            if episodes_done % 500 < len(idx):
                logger.console(global_step, f"episodes={episodes_done} safeguard={progression[stage] + 1} "
                               f"V(s0)={stage_v0[-1] if stage_v0 else float('nan'):.3f} violations={violations}")
            start_episodes(idx)
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
    }
    logger.scalar("eval/success_rate", result["test_success"], global_step)
    print(f"V(s0)={result['V_s0']:.3f} training violations={violations} test success={100 * alive.mean():.0f}% "
          f"test violations={100 * (1 - alive.mean()):.0f}% ({train_time:.1f} s, {global_step} env steps)")
    print("V(s0) at the end of each safeguard:", {k: round(v, 3) for k, v in v_s0_per_stage.items()})
    if args.save_model:
        np.savez(os.path.join(logger.run_dir, "q_table.npz"), Q=Q, visited=visited, states=np.array(space.names))
    return result


METHODS = ("psl", "zero-shot", "intrinsic-fear", "baseline")


def check_args(args: Args) -> None:
    check_choice(args, "env_id", ("minecraft", "vizdoom"))
    check_choice(args, "method", METHODS)
    check_choice(args, "progression", ("converge", "fixed"))
    check_positive(args, "num_envs", "eval_episodes", "converge_window", "converge_tol", "fear_radius")
    if args.env_id == "minecraft":
        check_positive(args, "total_episodes", "max_episode_steps", "alpha", "gamma", "transfer_depth")
        for name in ("epsilon", "slip_probability"):
            if not 0.0 <= getattr(args, name) <= 1.0:
                raise SystemExit(f"error: --{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)!r}")
    else:
        check_positive(args, "total_timesteps", "num_steps", "num_minibatches", "update_epochs", "learning_rate",
                       "frame_stack", "doom_frame_skip", "doom_episode_tics", "hidden_size")
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
