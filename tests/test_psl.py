"""Tests of psl.py: safeguards (transitions against the authors' automata, the sink), product state, eq. 5, eq. 7,
the progression, the exact safety probability, the gridworld and its baselines, the generated Doom map, its labels,
the common violation metric and the worker processes, and smoke runs of the four methods on both environments."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, read_scalars, run_dirs, run_script, run_until_killed

import psl
from common import doom
from psl import DOOM_SAFEGUARDS, MINECRAFT_SAFEGUARDS, SINK, ProductSpace

SG1, SG2, SG3, SG4 = MINECRAFT_SAFEGUARDS
E = frozenset()


def L(*names):
    return frozenset(names)


# ---------------------------------------------------------------- safeguards: transitions and the sink
def test_safeguard_1_never_creeper_never_lava():
    assert SG1.run([E, L("wood"), L("work_bench"), L("lava")]) == ["start", "start", "start", SINK]
    assert SG1.run([L("creeper")]) == [SINK]
    assert SG1.states == ["start"]


def test_safeguard_2_tracks_wood_but_lava_stays_unsafe():
    assert SG2.run([L("wood"), E, L("work_bench"), L("lava")]) == ["wood", "wood", "wood", SINK]
    assert SG2.run([L("iron"), L("creeper")]) == ["start", SINK]


def test_safeguard_3_lava_allowed_after_wood_then_work_bench():
    assert SG3.run([L("wood"), L("work_bench"), L("lava"), L("lava"), E]) == ["wood", "wood+bench"] + ["wood+bench"] * 3
    assert SG3.run([L("wood"), L("work_bench"), L("lava"), L("creeper")])[-1] == SINK  # creeper never allowed
    assert SG3.run([L("work_bench"), L("wood"), L("lava")]) == ["start", "wood", SINK]  # order matters
    assert SG3.run([L("wood"), L("lava")]) == ["wood", SINK]


def test_final_safeguard_is_minecraft_7():
    # after wood -> work bench, creeper stays a violation (lava is allowed)
    assert SG4.run([L("wood"), L("work_bench"), L("lava"), L("creeper")]) == ["wood", "wood+bench", "wood+bench", SINK]
    # after wood -> iron -> smith table, creeper is allowed and lava is not
    trace = [L("wood"), L("iron"), L("smith_table"), L("creeper"), L("creeper")]
    assert SG4.run(trace) == ["wood", "wood+iron", "wood+iron+smith", "wood+iron+smith", "wood+iron+smith"]
    assert SG4.run(trace + [L("lava")])[-1] == SINK
    assert SG4.run([L("wood"), L("iron"), L("creeper")])[-1] == SINK  # smith table not reached yet
    assert SG4.run([L("wood"), L("iron"), L("work_bench"), L("lava")])[-1] == SINK  # the bench does not unlock here
    assert SG4.run([L("wood"), L("work_bench"), L("iron"), L("smith_table"), L("creeper")])[-1] == SINK


# The authors' automata (src/automata/minecraft_{1,2,6,7}.py), transcribed by hand: state -> {label: next state};
# any other label stays; -1 is their sink. Their lava label is 'basalt_lava'.
AUTHORS = [
    {0: {"creeper": -1, "lava": -1}},
    {0: {"wood": 1, "creeper": -1, "lava": -1}, 1: {"creeper": -1, "lava": -1}},
    {0: {"wood": 1, "creeper": -1, "lava": -1}, 1: {"work_bench": 2, "creeper": -1, "lava": -1}, 2: {"creeper": -1}},
    {0: {"wood": 1, "creeper": -1, "lava": -1}, 1: {"work_bench": 2, "iron": 3, "creeper": -1, "lava": -1},
     2: {"creeper": -1}, 3: {"smith_table": 4, "creeper": -1, "lava": -1}, 4: {"lava": -1}},
]  # fmt: skip


@pytest.mark.parametrize("k", range(4))
def test_compiled_safeguards_equal_the_authors_automata(k):
    space = ProductSpace(MINECRAFT_SAFEGUARDS)
    assert space.names == ["start", "wood", "wood+bench", "wood+iron", "wood+iron+smith"]  # their numbering 0-4
    table = space.table(k, psl.GRID_LABEL_SETS)
    for state, moves in AUTHORS[k].items():
        for j, label in enumerate(psl.GRID_LABELS):
            assert table[state, j] == moves.get(label, state), (k, state, label)


@pytest.mark.parametrize("sg", MINECRAFT_SAFEGUARDS + DOOM_SAFEGUARDS, ids=lambda s: s.name[:2])
def test_sink_is_absorbing(sg):
    for labels in psl.GRID_LABEL_SETS + [L("armor", "weapon"), L("boss_area"), E]:
        assert sg.step(SINK, labels) == SINK


def test_doom_safeguards_as_the_authors_callbacks():
    s0, s1, s2 = DOOM_SAFEGUARDS
    assert s0.run([L("armor"), L("armor", "lava")]) == ["start", SINK]
    assert s1.run([L("armor"), L("armor", "lava"), L("armor")]) == ["armor", "armor", "armor"]
    assert s1.run([L("lava")]) == [SINK]
    assert s1.run([L("armor"), L("armor", "weapon", "boss_area")]) == ["armor", SINK]
    assert s1.run([L("boss_area")]) == ["start"]  # their state 0 checks the lava only
    assert s2.run([L("armor"), L("armor", "lava", "weapon"), L("armor", "weapon", "boss_area")]) == [
        "armor", "armed", "armed"]  # fmt: skip
    assert s2.run([L("armor"), L("armor", "boss_area")]) == ["armor", SINK]
    assert s2.run([L("lava", "armor")]) == ["armor"]  # armor is checked first, as theirs


# ---------------------------------------------------------------- eq. 7: ancestors, sources, transfer
def test_ancestors_walk_parent_steps_loop_free():
    assert SG4.ancestors("start", 3) == []
    assert SG4.ancestors("wood+iron+smith", 1) == ["wood+iron"]
    assert SG4.ancestors("wood+iron+smith", 2) == ["wood+iron", "wood"]
    assert SG4.ancestors("wood+iron+smith", 10) == ["wood+iron", "wood", "start"]
    assert SG3.ancestors("wood+bench", 1) == ["wood"]


def test_transfer_sources_paper_vs_authors():
    space = ProductSpace(MINECRAFT_SAFEGUARDS)
    smith = space.index["wood+iron+smith"]
    # the paper: the ancestors of the new state; the authors: states 0..i-1 (i = 3 for the 4th safeguard), which
    # takes the sibling wood+bench (2) and misses the parent wood+iron (3)
    assert psl.transfer_sources(space, SG4, smith, 3, "ancestors", 4) == [3, 1, 0]
    assert psl.transfer_sources(space, SG4, smith, 3, "authors", 4) == [0, 1, 2]


def test_new_states_of_each_safeguard():
    space = ProductSpace(MINECRAFT_SAFEGUARDS)
    assert space.new_states([0, 1, 2, 3]) == [[0], [1], [2], [3, 4]]
    assert space.new_states([3]) == [[0, 1, 2, 3, 4]]  # zero-shot: everything is new
    assert ProductSpace(DOOM_SAFEGUARDS).new_states([0, 1, 2]) == [[0], [1], [2]]


def test_bias_transfer_averages_visited_sources_times_factor():
    space = ProductSpace(MINECRAFT_SAFEGUARDS)
    Q = np.zeros((len(space.names), 10, 10, 5))
    visited = np.zeros(Q.shape[:3], dtype=bool)
    cell, wood, start, target = (3, 3), space.index["wood"], space.index["start"], space.index["wood+bench"]
    Q[(wood, *cell)] = [1, 2, 3, 4, 5]
    Q[(start, *cell)] = [3, 2, 1, 0, -1]
    visited[(wood, *cell)] = visited[(start, *cell)] = True
    assert psl.bias_transfer(Q, visited, target, cell, [wood, start], factor=0.5)
    np.testing.assert_allclose(Q[(target, *cell)], [1.0] * 5)  # 0.5 * mean([1..5], [3..-1]) = 0.5 * 2
    assert psl.bias_transfer(Q, visited, target, cell, [wood], factor=1.0)
    np.testing.assert_allclose(Q[(target, *cell)], [1, 2, 3, 4, 5])  # closest ancestor only
    visited[(wood, *cell)] = False  # unvisited sources are left out of the average
    assert psl.bias_transfer(Q, visited, target, cell, [wood, start], factor=1.0)
    np.testing.assert_allclose(Q[(target, *cell)], [3, 2, 1, 0, -1])
    visited[:] = False
    Q[(target, *cell)] = 7.0
    assert not psl.bias_transfer(Q, visited, target, cell, [wood, start], factor=1.0)
    np.testing.assert_allclose(Q[(target, *cell)], 7.0)


def test_shaped_reward_eq5():
    np.testing.assert_allclose(psl.shaped_reward([0.5, 0.5, 0.0], [False, True, False], 0.1, 1.0), [0.6, -0.5, 0.1])
    np.testing.assert_allclose(psl.shaped_reward(0.0, [True], 0.1, 0.1), [-0.1])


def test_has_converged():
    assert not psl.has_converged([1.0, 1.0, 1.0], window=2, tol=0.01)
    assert not psl.has_converged([0.0, 0.0, 1.0, 1.0], window=2, tol=0.01)
    assert psl.has_converged([5.0, 0.5, 0.5, 0.5, 0.505], window=2, tol=0.01)


def test_progression_fixed_budget_and_convergence():
    p = psl.Progression([0, 1, 2], [10, 20, 30], "fixed", window=2, tol=0.01)
    for v in [1.0] * 8:
        p.record(v)  # settled values do not matter under the fixed rule
    assert not p.advance(9) and p.safeguard == 0
    assert p.advance(10) and p.safeguard == 1 and p.values == []
    assert not p.advance(19) and p.advance(20) and p.safeguard == 2
    assert not p.advance(10_000) and p.switches == [10, 20]  # the last safeguard runs to the end
    p = psl.Progression([0, 1, 2], [10, 20, 30], "converge", window=2, tol=0.01)
    for v in [0.0, 0.5, 0.9]:
        p.record(v)
    assert not p.advance(3)
    p.record(0.9)  # windows [0.0, 0.5] and [0.9, 0.9] still differ
    assert not p.advance(4)
    for v in [0.9, 0.9]:
        p.record(v)
    assert p.advance(6) and p.safeguard == 1 and p.switches == [6]
    assert p.advance(20) and p.safeguard == 2  # at the latest at the fixed budget


# ---------------------------------------------------------------- the gridworld
def test_gridworld_moves_and_edges():
    env = psl.GridWorld(5, slip=0.0, rng=np.random.default_rng(0))
    env.reset(np.arange(5))
    env.layout[:] = 1
    env.step(np.arange(5))  # right, up, left, down, stay from (5, 2)
    assert env.pos.tolist() == [[5, 3], [4, 2], [5, 1], [6, 2], [5, 2]]
    env.pos[:] = [[0, 0], [0, 0], [9, 9], [9, 9], [0, 9]]
    env.step(np.array([1, 2, 0, 3, 0]))  # up/left at (0,0), right/down at (9,9), right at (0,9): stay in place
    assert env.pos.tolist() == [[0, 0], [0, 0], [9, 9], [9, 9], [0, 9]]


def test_gridworld_slip_probability():
    n = 40000
    env = psl.GridWorld(n, slip=0.05, rng=np.random.default_rng(1))
    env.reset(np.arange(n))
    env.step(np.zeros(n, dtype=np.int64))  # all try "right"
    off = np.mean(env.pos[:, 1] != 3)  # slipped to one of the 4 other actions: 0.05 * 4/5 = 0.04
    assert 0.035 < off < 0.045
    env = psl.GridWorld(n, slip=1.0, rng=np.random.default_rng(2))
    env.reset(np.arange(n))
    env.step(np.zeros(n, dtype=np.int64))
    assert abs(np.mean(env.pos[:, 0] == 4) - 0.2) < 0.01  # "up" drawn uniformly among 5 actions


def test_gridworld_layout_and_jitter():
    maps = psl.minecraft_label_maps()
    name = lambda k, r, c: psl.GRID_LABELS[maps[k, r, c]]  # noqa: E731
    assert [name(1, r, 5) for r in range(3)] == ["lava"] * 3
    assert name(1, 2, 8) == name(1, 2, 9) == "lava"
    assert name(1, 0, 0) == name(1, 4, 5) == "creeper"
    assert name(1, 2, 2) == name(1, 7, 3) == name(1, 5, 7) == "wood"
    assert name(1, 6, 1) == name(1, 6, 5) == name(1, 4, 9) == "work_bench"
    assert name(1, 0, 7) == "diamond" and name(1, *psl.GRID_START) == "safe"
    assert name(0, 3, 5) == "creeper" and name(2, 5, 5) == "creeper"  # jittered by one row
    env = psl.GridWorld(20000, slip=0.0, rng=np.random.default_rng(3))
    env.reset(np.arange(20000))
    assert abs(np.mean(env.layout == 1) - 0.9) < 0.01


def test_greedy_breaks_ties_among_maxima_only():
    rng = np.random.default_rng(0)
    Qs = np.tile([0.0, 1.0, 1.0, -1.0, 0.5], (2000, 1))
    a = psl.greedy(Qs, rng)
    assert set(a.tolist()) == {1, 2}


def test_fear_table_is_danger_frequency():
    fear = psl.FearTable((2,))
    fear.danger[:] = [3, 0]
    fear.safe[:] = [1, 0]
    np.testing.assert_allclose(fear((np.array([0, 1]),)), [0.75, 0.0])


def test_vizdoom_fear_labels_on_a_hand_worked_sequence():
    """k_r = 2. Episode 1: f1..f4 safe play, f5 and f6 in lava (a violation each, playing on: unguarded), f7, f8,
    then a death in lava (a violation on the dying step; its frame is the next episode's first, not kept).
    Episode 2: f10, f11, then a timeout without a violation. By hand: f1 and f2 have k_r = 2 violation-free steps
    after them -> safe; f3, f4 are within 2 steps of f5's violation and f5 is one -> danger; f6 is a violation of
    its own (it does not age into the safe memory) -> danger; f7, f8 precede the dying step -> danger; f10, f11
    end an episode without a violation -> safe."""
    from collections import deque

    steps = [(1, False, False), (2, False, False), (3, False, False), (4, False, False), (5, True, False),
             (6, True, False), (7, False, False), (8, False, False), (9, True, True),  # 9: next episode's frame
             (10, False, False), (11, False, False), (12, False, True)]  # fmt: skip
    recent, danger, safe = deque(), deque(), deque()
    held = []  # after each step: the frames still waiting for a label
    for t, violation, done in steps:
        frame = np.full((3, 2, 2), t, dtype=np.uint8)
        psl.label_fear_frames(recent, frame, done, violation, 2, danger, safe)
        frame[:] = 0  # the env overwrites its buffer: the labelled frames must be copies
        held.append([int(f[0, 0, 0]) for f in recent])
    assert [int(f[0, 0, 0]) for f in danger] == [3, 4, 5, 6, 7, 8]
    assert [int(f[0, 0, 0]) for f in safe] == [1, 2, 10, 11]
    assert held == [[1], [1, 2], [2, 3], [3, 4], [], [], [7], [7, 8], [], [10], [10, 11], []]


def test_policy_table_falls_back_to_the_initial_state_as_the_authors_test():
    Q = np.zeros((3, 10, 10, 5))
    visited = np.zeros(Q.shape[:3], dtype=bool)
    Q[0, 1, 1], visited[0, 1, 1] = [0, 1, 0, 0, 0], True
    Q[2, 1, 1], visited[2, 1, 1] = [0, 0, 0, 0, 1], True
    P = psl.policy_table(Q, visited, 3, start=0)
    np.testing.assert_array_equal(P[1, 1, 1], [0, 1, 0, 0, 0])  # (s, q1) never visited: read (s, q0)
    np.testing.assert_array_equal(P[2, 1, 1], [0, 0, 0, 0, 1])
    assert psl.policy_table(Q[:1], visited[:1], 3, start=0).shape == (3, 10, 10, 5)  # MDP-state agents


def _slow_safety_probability(P, table, slip, horizon, start):
    """Independent check: plain loops over (layout, state, cell, chosen action, executed action, time)."""
    maps = psl.minecraft_label_maps()
    total = 0.0
    for lay, p_lay in zip(range(3), psl.GRID_LAYOUT_P):
        V = {(q, r, c): 1.0 for q in range(len(table)) for r in range(10) for c in range(10)}
        for _ in range(horizon):
            new = {}
            for (q, r, c) in V:
                row = P[q, r, c]
                best = [a for a in range(5) if row[a] == row.max()]
                value = 0.0
                for a in best:
                    for a2 in range(5):
                        pa = (1 - slip) * (a2 == a) + slip / 5
                        r2, c2 = min(max(r + psl.GRID_MOVES[a2][0], 0), 9), min(max(c + psl.GRID_MOVES[a2][1], 0), 9)
                        q2 = table[q, maps[lay, r2, c2]]
                        value += pa * (V[(q2, r2, c2)] if q2 >= 0 else 0.0) / len(best)
                new[(q, r, c)] = value
            V = new
        total += p_lay * V[(start, *psl.GRID_START)]
    return total


def test_safety_probability_matches_a_slow_implementation_and_is_below_the_optimum():
    space = ProductSpace(MINECRAFT_SAFEGUARDS)
    table = space.table(3, psl.GRID_LABEL_SETS)
    rng = np.random.default_rng(0)
    P = np.round(rng.random((5, 10, 10, 5)), 1)  # rounded: many ties, to test the uniform tie-breaking
    exact = psl.safety_probability(P, table, 0.3, 8, start=0)
    assert exact == pytest.approx(_slow_safety_probability(P, table, 0.3, 8, 0), abs=1e-12)
    assert 0.5 < exact < psl.safety_probability(None, table, 0.3, 8, 0) - 0.01  # (0.94 and 0.9999 here)
    # "stay" everywhere: the only risk is slipping, and from the start no hazard is reachable in 2 steps
    stay = np.zeros((5, 10, 10, 5))
    stay[..., 4] = 1.0
    assert psl.safety_probability(stay, table, 0.05, 2, 0) == pytest.approx(1.0)


def _run(tmp_path, **overrides):
    args = psl.Args(**{"total_episodes": 300, "max_episode_steps": 1, "num_envs": 1, "epsilon": 1.0, "alpha": 1.0,
                       "gamma": 0.5, "slip_probability": 0.0, "eval_episodes": 2, "method": "zero-shot",
                       "exact_eval_every": 0, **overrides})  # fmt: skip
    logger = psl.Logger("t", args, root=str(tmp_path), quiet=True)
    out = psl.run_gridworld(args, logger)
    logger.close()
    return out


def test_q_learning_updates_the_executed_action(tmp_path):
    # one-step episodes from s0 with random actions: every executed action gets its own value: a move gives
    # 0.1 + 0.5 * 0 (unvisited neighbour); "stay" bootstraps on s0 itself, fixed point 0.1 / (1 - 0.5) = 0.2
    q_s0 = _run(tmp_path)["Q"][(0, *psl.GRID_START)]
    np.testing.assert_allclose(q_s0, [0.1, 0.1, 0.1, 0.1, 0.2], atol=1e-6)
    # the authors' update moves only the greedy action (ties broken once, then always the same action)
    q_bug = _run(tmp_path, authors_update=True)["Q"][(0, *psl.GRID_START)]
    assert np.count_nonzero(q_bug) == 1


def test_eq7_changes_the_new_states_values(tmp_path):
    kw = dict(method="psl", progression="fixed", total_episodes=80, max_episode_steps=60, num_envs=4, epsilon=0.3,
              slip_probability=0.05, gamma=0.9, alpha=0.9, seed=2)  # fmt: skip
    with_transfer, without = _run(tmp_path, transfer_factor=1.0, **kw)["Q"], _run(tmp_path, transfer_factor=0.0, **kw)["Q"]
    # the states the later safeguards add (wood, wood+bench, ...) start from their ancestors' values with factor 1
    # and from 0 with factor 0; the tables differ there
    assert np.count_nonzero(with_transfer[1:]) and np.count_nonzero(without[1:])
    assert not np.allclose(with_transfer[1:], without[1:])


def test_intrinsic_fear_with_factor_0_is_the_baseline(tmp_path):
    kw = dict(total_episodes=60, max_episode_steps=80, num_envs=4, epsilon=0.1, alpha=0.9, gamma=0.9,
              slip_probability=0.05, seed=5)  # fmt: skip
    base = _run(tmp_path, method="baseline", **kw)
    fear = _run(tmp_path, method="intrinsic-fear", fear_factor=0.0, **kw)
    np.testing.assert_array_equal(base["Q"], fear["Q"])
    assert base["training_violations"] == fear["training_violations"] > 0
    assert base["violation_steps"] == fear["violation_steps"]
    feared = _run(tmp_path, method="intrinsic-fear", fear_factor=0.1, **kw)
    assert not np.array_equal(base["Q"], feared["Q"])


def test_baselines_play_on_after_a_violation_unless_guarded(tmp_path):
    kw = dict(total_episodes=40, max_episode_steps=200, num_envs=4, epsilon=1.0, slip_probability=0.05, seed=1,
              method="baseline")  # fmt: skip
    free, guarded = _run(tmp_path, **kw), _run(tmp_path, baselines_guarded=True, **kw)
    assert free["env_steps"] >= 40 * 200  # every episode runs to the horizon
    assert free["violation_steps"] > free["training_violations"] > 0  # several violating steps per episode
    assert free["safeguard_violations"] == 0  # no safeguard in force
    assert guarded["env_steps"] < 40 * 200 and guarded["safeguard_violations"] > 0  # stopped at the first one
    assert guarded["violation_steps"] == guarded["training_violations"]


def test_common_metric_counts_the_final_safeguard_for_psl(tmp_path):
    # PSL trains under other safeguards first: its violations of the safeguard in force and of the final safeguard
    # (the metric shared with the other methods) are counted apart
    out = _run(tmp_path, method="psl", progression="fixed", total_episodes=200, max_episode_steps=300, num_envs=8,
               epsilon=0.3, slip_probability=0.05, seed=3)  # fmt: skip
    assert out["safeguard_violations"] > 0 and out["training_violations"] > 0
    assert out["switches"] == [50, 100, 150]


# ---------------------------------------------------------------- the generated Doom map and its labels
def test_wad_is_a_pwad_with_udmf_map(tmp_path):
    text = doom.udmf_textmap()
    assert text.startswith('namespace = "zdoom";') and "LAVA1" in text and "type = 3003;" in text
    path = doom.write_wad(str(tmp_path / "m.wad"))
    with open(path, "rb") as f:
        data = f.read()
    magic, nlumps, diroff = struct.unpack("<4sii", data[:12])
    names = [data[diroff + 16 * i + 8 : diroff + 16 * i + 16].rstrip(b"\0") for i in range(nlumps)]
    assert magic == b"PWAD" and names == [b"MAP01", b"TEXTMAP", b"ENDMAP"]


def test_action_set_is_the_authors():
    assert len(doom.ACTIONS) == 54 and len(set(map(tuple, doom.ACTIONS))) == 54
    assert doom.ACTIONS[doom.action_index(move=1)] == [0, 0, 1, 0, 0, 0, 0]  # forward only
    assert doom.ACTIONS[doom.action_index(turn=2, strafe=1, attack=1)] == [0, 1, 0, 0, 1, 0, 1]
    assert "USE" not in doom.BUTTONS


@pytest.fixture(scope="module")
def game(tmp_path_factory):
    wad = doom.write_wad(str(tmp_path_factory.mktemp("wad") / "map.wad"))
    env = doom.DoomVecEnv(1, wad, seed=0, frame_skip=4, episode_tics=4200, stack=2, num_workers=0, cheats=True)
    yield env
    env.close()


FORWARD, TURN = doom.action_index(move=1), doom.action_index(turn=1)


def _place(env, x, y, steps=3, action=TURN, reset=True):
    """Teleport the player (cheat `warp`; after a reset it faces north) and repeat an action (turning = stay put;
    forward: items are picked up by touching them, a teleport onto them does not count)."""
    if reset:
        env.reset()
    env.command(0, f"warp {x} {y}")
    return [env.step([action]) for _ in range(steps)]


def test_wad_loads_and_start_is_safe(game):
    obs, gv = game.reset()
    assert obs.shape == (1, 6, 60, 80) and obs.max() > 0  # something was rendered
    assert psl.doom_labels(gv[0]) == E and gv[0][4] == 100  # HEALTH


def test_label_lava_fires_and_lava_hurts(game):
    out = _place(game, 256, 448, steps=12)
    assert all("lava" in psl.doom_labels(o[1][0]) for o in out)
    assert out[-1][1][0][4] < 100  # the damaging floor works


def test_label_armor_fires_on_pickup_with_reward(game):
    _, prev = game.reset()
    out = _place(game, 416, 100, steps=6, action=FORWARD, reset=False)
    gvs = [prev[0]] + [o[1][0] for o in out]
    assert "armor" not in psl.doom_labels(gvs[1]) and "armor" in psl.doom_labels(gvs[-1]) and gvs[-1][2] == 100
    assert sum(psl.doom_reward(a, b, False) for a, b in zip(gvs, gvs[1:])) == pytest.approx(1.0)  # 0.01 per point


def test_label_weapon_fires_on_pickup_with_reward(game):
    _, prev = game.reset()
    out = _place(game, 256, 640, steps=6, action=FORWARD, reset=False)
    gvs = [prev[0]] + [o[1][0] for o in out]
    assert "weapon" not in psl.doom_labels(gvs[1]) and "weapon" in psl.doom_labels(gvs[-1])
    assert sum(psl.doom_reward(a, b, False) for a, b in zip(gvs, gvs[1:])) == pytest.approx(1.0)


def test_the_door_opens_when_walked_into_and_leads_to_the_boss_area(game):
    out = _place(game, 256, 850, steps=1)
    assert "boss_area" not in psl.doom_labels(out[-1][1][0])
    seen = [psl.doom_labels(game.step([FORWARD])[1][0]) for _ in range(30)]  # no USE button: walking opens it
    assert any("boss_area" in labels for labels in seen)


def test_the_last_step_of_an_episode_is_labelled_and_rewarded(game):
    _place(game, 256, 448, steps=1)
    prev = game.step([TURN])[1][0]
    for _ in range(200):  # stand in the lava without armor until the player dies
        obs, gv, done, dead, start_gv = game.step([TURN])
        if done[0]:
            break
        prev = gv[0]
    assert done[0] and dead[0]
    labels = psl.doom_labels(gv[0])  # the variables of the dying step, read after the episode finished
    assert "lava" in labels and gv[0][4] <= 0
    assert psl.doom_checks([labels]).tolist() == [[True, False]]
    assert psl.doom_reward(prev, gv[0], True) == pytest.approx(-1.0)
    assert start_gv[0][4] == 100 and psl.doom_labels(start_gv[0]) == E  # the next episode has begun


def _safeguard_in_force(method):
    """The safeguard each method trains under at the start (psl: the first of the progression)."""
    return {"psl": DOOM_SAFEGUARDS[0], "zero-shot": DOOM_SAFEGUARDS[-1]}.get(method)


@pytest.mark.parametrize("method", psl.METHODS)
def test_common_doom_metric_on_placed_situations(game, method):
    sg = _safeguard_in_force(method)
    # armor, then lava: no violation of the common metric, for every method
    _, gv0 = game.reset()
    steps = [o[1][0] for o in _place(game, 416, 100, steps=6, action=FORWARD, reset=False)]
    steps += [o[1][0] for o in _place(game, 256, 448, steps=4, reset=False)]
    labels = [psl.doom_labels(v) for v in steps]
    assert "armor" in labels[-1] and "lava" in labels[-1]
    states, sg_viol = [psl.INITIAL], 0
    for lab in labels:
        states, v = psl.step_safeguard(sg, states, [lab])
        sg_viol += int(v.sum())
    assert psl.doom_checks(labels).any(0).sum() == 0  # per episode: 0
    # ... while PSL's first safeguard ("never lava") counts it: the per-safeguard count is not comparable
    assert sg_viol == (1 if method == "psl" else 0)
    # lava without armor: one violation per episode, for every method
    labels = [psl.doom_labels(o[1][0]) for o in _place(game, 256, 448, steps=4)]
    checks = psl.doom_checks(labels)
    assert checks.any(0).sum() == 1 and checks[:, 0].all()
    states, v = psl.step_safeguard(sg, [psl.INITIAL], labels[:1])
    assert v.tolist() == [sg is not None]


def test_worker_processes_give_the_same_games_as_one_process(tmp_path):
    wad = doom.write_wad(str(tmp_path / "m.wad"))
    rng = np.random.default_rng(0)
    actions = rng.integers(0, len(doom.ACTIONS), (40, 3))
    runs = []
    for workers in (0, 2):
        env = doom.DoomVecEnv(3, wad, seed=7, frame_skip=4, episode_tics=60, stack=2, num_workers=workers)
        obs, gv = env.reset()
        out = [(obs, gv)]
        for a in actions:
            obs, gv, done, dead, start_gv = env.step(a)
            out.append((obs, gv, done))
        obs, gv = env.reset(mask=[False, True, False])
        out.append((obs, gv))
        env.close()
        runs.append(out)
    assert any(o[2].any() for o in runs[0][1:-1])  # timeouts happened (60 tics = 15 steps)
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------- smoke tests: the script as a user runs it
GRID_TAGS = {"charts/episodic_return", "charts/episodic_cost", "charts/episodic_length", "charts/cost_rate",
             "charts/SPS", "charts/V_s0", "charts/U_s0", "charts/violations", "charts/violation_steps",
             "charts/safeguard_violations", "charts/safeguard_index", "charts/safety_probability",
             "eval/episodic_return", "eval/episodic_cost", "eval/safety_probability",
             "eval/optimal_safety_probability"}  # fmt: skip


@pytest.mark.parametrize("method", psl.METHODS)
def test_smoke_minecraft(tmp_path, method):
    run_script("psl.py", "--method", method, "--progression", "fixed", "--total-episodes", "40",
               "--max-episode-steps", "30", "--num-envs", "4", "--eval-episodes", "5", "--exact-eval-every", "20",
               cwd=tmp_path)  # fmt: skip
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.name.startswith("minecraft__psl__1__")
    scalars = read_scalars(run_dir)
    assert GRID_TAGS <= set(scalars)
    assert len(scalars["charts/episodic_return"]) >= 40
    # psl walks the progression (10 episodes per safeguard), the others run the final safeguard only
    assert [v for _, v in scalars["charts/safeguard_index"]] == ([0.0, 1.0, 2.0, 3.0] if method == "psl" else [3.0])


DOOM_SMOKE = ["--env-id", "vizdoom", "--total-timesteps", "64", "--num-envs", "2", "--num-steps", "16",
              "--doom-episode-tics", "80", "--doom-eval-episodes", "1", "--hidden-size", "32"]  # fmt: skip


@pytest.mark.parametrize("method", psl.METHODS)
def test_smoke_vizdoom(tmp_path, method):
    workers = "2" if method == "psl" else "0"  # games in worker processes once; in this process otherwise (faster)
    run_script("psl.py", "--method", method, "--save-model", "--doom-workers", workers, *DOOM_SMOKE, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    scalars = read_scalars(run_dir)
    assert {"charts/SPS", "charts/violations", "charts/violation_steps", "charts/safeguard_violations",
            "charts/safeguard_index", "losses/policy_loss", "losses/value_loss", "charts/V_s0",
            "eval/episodic_return", "eval/episodic_cost"} <= set(scalars)  # fmt: skip
    assert (run_dir / "psl_vizdoom.pt").exists()
    if method == "psl":
        assert [v for _, v in scalars["charts/safeguard_index"]] == [0.0, 1.0]  # 64 steps: stage ends at 4 and 24


@pytest.mark.parametrize("bad, message", [
    ({"method": "ppo"}, "--method must be one of psl, zero-shot, intrinsic-fear, baseline"),
    ({"env_id": "doom"}, "--env-id must be one of minecraft, vizdoom"),
    ({"total_episodes": 0}, "--total-episodes must be positive"),
    ({"env_id": "vizdoom", "total_timesteps": -5}, "--total-timesteps must be positive"),
    ({"transfer_factor": -1.0}, "--transfer-factor must be in [0, 1]"),
    ({"transfer": "siblings"}, "--transfer must be one of ancestors, authors"),
    ({"stage_episodes": -1}, "--stage-episodes and --exact-eval-every must be >= 0"),
    ({"env_id": "vizdoom", "doom_stage_fractions": (0.5, 0.2)}, "--doom-stage-fractions must be two increasing"),
])  # fmt: skip
def test_bad_input_is_rejected_clearly(bad, message):
    with pytest.raises(SystemExit, match=message.replace("[", r"\[").replace("]", r"\]")):
        psl.check_args(psl.Args(**bad))


def test_bad_input_from_the_command_line_exits_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "psl.py"), "--method", "ppo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "--method must be one of psl" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_same_seed_reproduces_the_gridworld_run(tmp_path):
    kw = dict(method="psl", total_episodes=60, max_episode_steps=40, num_envs=4, epsilon=0.1, alpha=0.9, gamma=0.9,
              slip_probability=0.05, progression="fixed", exact_eval_every=0)  # fmt: skip
    runs = []
    for k, seed in enumerate((3, 3, 4)):
        args = psl.Args(seed=seed, eval_episodes=3, **kw)
        logger = psl.Logger(f"r{k}", args, root=str(tmp_path), quiet=True)
        runs.append(psl.run_gridworld(args, logger))
        logger.close()
    np.testing.assert_array_equal(runs[0]["Q"], runs[1]["Q"])
    assert runs[0]["training_violations"] == runs[1]["training_violations"]
    assert not np.array_equal(runs[0]["Q"], runs[2]["Q"])


# ---------------------------------------------------------------- issue 15: resume, progress, video, summary.json
GRID_RESUME = ["--method", "psl", "--progression", "fixed", "--total-episodes", "40", "--max-episode-steps", "30",
               "--num-envs", "1", "--eval-episodes", "5", "--exact-eval-every", "0", "--save-model",
               "--checkpoint-every", "25"]  # fmt: skip
SAME_IN_BOTH = ("total_steps", "eval_return", "eval_cost", "train_cost", "train_episodes", "train_violating_episodes",
                "cost_rate", "eval_returns", "test_success", "safety_probability", "switches", "violation_steps",
                "safeguard_violations", "V_s0")  # fmt: skip


def test_gridworld_killed_in_stage_3_and_resumed_is_the_uninterrupted_run(tmp_path):
    # (the uninterrupted run also checks the plan, the console line, summary.json and the video)
    # One env: an episode that ends is the last thing of its vector step, so a checkpoint written then holds all the
    # run depends on (Q-tables, visited states, progression, counters, the env's RNG) and the resumed run must be
    # the uninterrupted run step for step: the same Q-tables (the first Q-update after resuming reads the saved
    # table), the same curves, the same summary. 10 episodes per safeguard: the kill at episode 25 is in safeguard 3.
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    out = run_script("psl.py", *GRID_RESUME, "--capture-video", cwd=tmp_path / "a").stdout
    _check_plan_summary_and_video(out, run_dirs(tmp_path / "a")[0])
    killed = run_until_killed("psl.py", *GRID_RESUME, cwd=tmp_path / "b")
    from common.checkpoint import read_checkpoint

    saved = read_checkpoint(killed / "checkpoint.pt")["state"]
    assert saved["episodes_done"] == saved["step"] == 25 and saved["progression"]["stage"] == 2
    assert saved["progression"]["switches"] == [10, 20]
    proc = run_script("psl.py", "--resume", f"runs/{killed.name}", cwd=tmp_path / "b")
    assert f"resuming runs/{killed.name} at episode 25" in proc.stdout and "safeguard 3/4" in proc.stdout
    (uninterrupted,) = run_dirs(tmp_path / "a")
    q_a, q_b = np.load(uninterrupted / "q_table.npz"), np.load(killed / "q_table.npz")
    for key in ("Q", "U", "visited"):
        np.testing.assert_array_equal(q_a[key], q_b[key])
    sum_a, sum_b = (json.loads((d / "summary.json").read_text()) for d in (uninterrupted, killed))
    assert {k: sum_a[k] for k in SAME_IN_BOTH} == {k: sum_b[k] for k in SAME_IN_BOTH}
    assert sum_b["train_episodes"] == 40 and sum_b["switches"] == [10, 20, 30]
    sc_a, sc_b = read_scalars(uninterrupted), read_scalars(killed)
    for tag in ("charts/episodic_return", "charts/episodic_cost", "charts/V_s0", "charts/violations",
                "charts/safeguard_index", "eval/episodic_return"):  # fmt: skip
        assert sc_a[tag] == sc_b[tag], tag  # one curve, no doubled stretch, no gap
    # the finished safeguards were not redone: each switch was logged once
    assert [v for _, v in sc_b["charts/safeguard_index"]] == [0.0, 1.0, 2.0, 3.0]


def _check_plan_summary_and_video(out: str, run_dir: Path) -> None:
    """The gridworld's plan, its console line, the summary.json it writes and the video of --capture-video."""
    assert "plan: psl on minecraft, 40 episodes of training in all (--total-episodes)" in out
    assert "safeguard 1/4 '1: never creeper, never lava (fig. 4a and 4b)': episodes 0-10" in out
    assert "safeguard 4/4" in out and "episodes 30-40" in out
    assert "checkpoint every 25 episodes and at the end of training" in out
    assert "episodes=4/40 (10%) ETA " in out  # a console line every tenth of the budget, with an ETA
    videos = list((run_dir / "videos").glob("*.mp4"))
    assert [v.name for v in videos] == ["eval-episode-0.mp4"] and videos[0].stat().st_size > 1000
    summary = json.loads((run_dir / "summary.json").read_text())
    from common.summary import REQUIRED

    assert set(REQUIRED) <= set(summary) and summary["script"] == "psl" and summary["method"] == "psl"
    scalars = read_scalars(run_dir)
    costs = [v for _, v in scalars["charts/episodic_cost"]]
    assert summary["train_episodes"] == len(costs) == 40
    assert summary["train_violating_episodes"] == sum(c > 0 for c in costs)
    assert summary["train_cost"] == pytest.approx(np.mean(costs))
    assert summary["total_steps"] == sum(v for _, v in scalars["charts/episodic_length"])  # one env, all finished
    assert 0.0 <= summary["eval_cost"] <= 1.0 and len(summary["eval_returns"]) == 5 and summary["cost_limit"] == 0.0
    assert summary["eval_return"] == pytest.approx(np.mean(summary["eval_returns"]))


def test_grid_frame_draws_labels_and_the_agent():
    maps = psl.minecraft_label_maps()[1]
    image = psl.grid_frame(maps, (5, 2), violated=False)
    assert image.shape == (160, 160, 3) and image.dtype == np.uint8
    assert tuple(image[0 * 16 + 8, 5 * 16 + 1]) == tuple(psl.GRID_COLOURS[psl.GRID_LABELS.index("lava")])
    assert tuple(image[5 * 16 + 8, 2 * 16 + 8]) == (40, 90, 255)  # the agent's square
    assert tuple(psl.grid_frame(maps, (5, 2), violated=True)[5 * 16 + 8, 2 * 16 + 8]) == (220, 30, 30)


def test_resume_refuses_bad_input_clearly(tmp_path):
    args = psl.Args(total_episodes=8, max_episode_steps=10, num_envs=2, eval_episodes=2, exact_eval_every=0)
    logger = psl.Logger("tiny", args, root=str(tmp_path / "runs"), quiet=True)
    psl.run_gridworld(args, logger)  # writes runs/tiny/checkpoint.pt at its end
    logger.close()
    run_dir = tmp_path / "runs" / "tiny"
    with pytest.raises(SystemExit, match="no such run directory"):
        psl.resume_run(psl.Args(resume=str(tmp_path / "runs" / "nothing-here")), "psl")
    with pytest.raises(SystemExit, match="--env-id: the run has 'minecraft', given 'vizdoom'"):
        psl.resume_run(psl.Args(resume=str(run_dir), env_id="vizdoom"), "psl")
    with pytest.raises(SystemExit, match="--checkpoint-every must be -1"):
        psl.check_args(psl.Args(checkpoint_every=-2))
    data = (run_dir / "checkpoint.pt").read_bytes()
    (run_dir / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # cut short on disk
    proc = subprocess.run([sys.executable, str(REPO / "psl.py"), "--resume", str(run_dir)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "truncated or corrupt" in proc.stderr + proc.stdout


DOOM_RESUME = ["--env-id", "vizdoom", "--method", "psl", "--num-envs", "2", "--num-steps", "16",
               "--doom-episode-tics", "80", "--doom-eval-episodes", "1", "--hidden-size", "32", "--doom-workers", "0",
               "--doom-stage-fractions", "0.1", "0.9", "--total-timesteps", "128", "--checkpoint-every", "64"]


def test_vizdoom_killed_in_stage_2_resumes_there_with_the_saved_networks(tmp_path, monkeypatch, capsys):
    import torch

    from common.checkpoint import read_checkpoint

    run_dir = run_until_killed("psl.py", *DOOM_RESUME, cwd=tmp_path)  # the Doom engines die with its process group
    out = (tmp_path / "killed_run.out").read_text()
    assert "plan: psl on vizdoom, 128 env steps of training in all (--total-timesteps)" in out
    assert "safeguard 2/3 '1: lava only after armor; then the boss area is a violation': env steps 12-115" in out
    assert "global_step=32/128 (25%) SPS=" in out and "ETA" in out and "| no episode finished yet" in out
    before = read_checkpoint(run_dir / "checkpoint.pt")
    assert before["state"]["step"] == 64 and before["state"]["progression"]["stage"] == 1  # killed in safeguard 2

    # resumed as the script's main resumes it (here in this process, to watch its PPO updates), with a video
    calls = []
    real_loss = psl.ppo_loss

    def spy(agent, *batch_and_args):  # the batch, the loss, and the weights the update starts from
        out = real_loss(agent, *batch_and_args)
        weights = {k: v.detach().clone() for k, v in agent.state_dict().items()}
        calls.append(([t.clone() for t in batch_and_args[:-1]], out[0].detach().clone(), weights))
        return out

    monkeypatch.setattr(psl, "ppo_loss", spy)
    args, resumed = psl.resume_run(psl.Args(resume=str(run_dir), capture_video=True), "psl",
                                   psl.MAY_CHANGE_ON_RESUME)
    logger = psl.Logger(run_dir.name, args, root=str(run_dir.parent), quiet=True, resume_step=64)
    logger.load_state_dict(resumed["state"]["logger"])
    summary = psl.run_vizdoom(args, logger, resumed)["summary"]
    logger.close()
    assert f"resuming {run_dir} at step 64 (safeguard 2/3" in capsys.readouterr().out
    assert summary["total_steps"] == 128 and summary["switches"] == [32]  # the switch to safeguard 2 happened once
    scalars = read_scalars(run_dir)
    assert scalars["charts/safeguard_index"] == [(32, 0.0), (64, 1.0), (96, 1.0), (128, 1.0)]
    assert summary["train_episodes"] == len(scalars["charts/episodic_return"])
    assert list((run_dir / "videos").glob("eval-episode-0.mp4"))

    # the first PPO loss after resuming is the saved networks' loss on that batch, and the first update is the saved
    # Adam state's step (the optimiser was restored, not rebuilt)
    assert len(calls) == 2
    agent = psl.Agent(6, len(ProductSpace(DOOM_SAFEGUARDS).names), len(psl.DOOM_ACTIONS), 32)
    agent.load_state_dict(before["state"]["agent"])
    batch, logged_loss, _ = calls[0]
    loss, *_ = real_loss(agent, *batch, args)
    assert torch.equal(loss.detach(), logged_loss)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5)
    optimizer.load_state_dict(before["state"]["optimizer"])
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
    optimizer.step()
    for name, value in agent.state_dict().items():
        torch.testing.assert_close(value, calls[1][2][name], rtol=0, atol=0, msg=name)


def test_vizdoom_intrinsic_fear_memory_survives_a_resume_unless_left_out(tmp_path):
    from common.checkpoint import read_checkpoint, unpack_array

    kw = dict(env_id="vizdoom", method="intrinsic-fear", num_envs=2, num_steps=16, doom_episode_tics=80,
              doom_eval_episodes=1, hidden_size=32, doom_workers=0, checkpoint_every=0)  # fmt: skip
    for keep in (True, False):
        args = psl.Args(total_timesteps=64, checkpoint_buffer=keep, **kw)
        logger = psl.Logger(f"fear-{keep}", args, root=str(tmp_path / "runs"), quiet=True)
        psl.run_vizdoom(args, logger)
        logger.close()
        run_dir = tmp_path / "runs" / f"fear-{keep}"
        before = read_checkpoint(run_dir / "checkpoint.pt")["state"]
        if not keep:  # --no-checkpoint-buffer: the memory is left out, the classifier is kept
            assert before["fear_memory"] is None and before["fear_net"] is not None
            continue
        saved_safe = unpack_array(before["fear_memory"]["safe"])
        assert len(saved_safe) > 0
        args, resumed = psl.resume_run(psl.Args(resume=str(run_dir), total_timesteps=96), "psl",
                                       psl.MAY_CHANGE_ON_RESUME)  # fmt: skip
        logger = psl.Logger(run_dir.name, args, root=str(run_dir.parent), quiet=True, resume_step=64)
        psl.run_vizdoom(args, logger, resumed)
        logger.close()
        after = read_checkpoint(run_dir / "checkpoint.pt")["state"]
        after_safe = unpack_array(after["fear_memory"]["safe"])
        assert after["step"] == 96 and len(after_safe) > len(saved_safe)  # the saved frames, then the new ones
        np.testing.assert_array_equal(after_safe[: len(saved_safe)], saved_safe)
