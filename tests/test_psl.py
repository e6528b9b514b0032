"""Tests of psl.py: safeguards (transitions, sink), product state, eq. 5, eq. 7, the gridworld, the generated
Doom map and its labels, and smoke runs of the four methods on both environments."""

from __future__ import annotations

import os
import struct
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, read_scalars, run_dirs, run_script

import psl
from psl import DOOM_SAFEGUARDS, MINECRAFT_SAFEGUARDS, SINK, ProductSpace

SG1, SG2, SG3, SG4, SG5 = MINECRAFT_SAFEGUARDS
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


def test_safeguard_4_iron_branch_allows_creeper_not_lava():
    trace = [L("wood"), L("iron"), L("smith_table"), L("creeper"), L("creeper")]
    assert SG4.run(trace) == ["wood", "wood+iron", "wood+iron+smith", "wood+iron+smith", "wood+iron+smith"]
    assert SG4.run(trace + [L("lava")])[-1] == SINK
    assert SG4.run([L("wood"), L("iron"), L("lava")])[-1] == SINK  # smith table not reached yet
    assert SG4.run([L("wood"), L("work_bench"), L("lava"), L("iron"), L("smith_table"), L("creeper")])[-1] == SINK


def test_safeguard_5_both_branches_unlock_everything():
    a = SG5.run([L("wood"), L("work_bench"), L("iron"), L("lava"), L("smith_table"), L("creeper"), L("lava")])
    assert a == ["wood", "wood+bench", "bench+iron", "bench+iron", "crafted", "crafted", "crafted"]
    b = SG5.run([L("wood"), L("iron"), L("smith_table"), L("work_bench"), L("lava"), L("creeper")])
    assert b == ["wood", "wood+iron", "wood+iron+smith", "crafted", "crafted", "crafted"]
    assert SG5.run([L("wood"), L("work_bench"), L("iron"), L("creeper")])[-1] == SINK


@pytest.mark.parametrize("sg", MINECRAFT_SAFEGUARDS + DOOM_SAFEGUARDS, ids=lambda s: s.name[:2])
def test_sink_is_absorbing(sg):
    for labels in psl.GRID_LABEL_SETS + [L("armor", "weapon"), L("boss_area"), E]:
        assert sg.step(SINK, labels) == SINK


def test_doom_safeguards():
    s0, s1, s2 = DOOM_SAFEGUARDS
    assert s0.run([L("armor"), L("armor", "lava")]) == ["start", SINK]
    assert s1.run([L("armor"), L("armor", "lava"), L("armor")]) == ["armor", "armor", "armor"]
    assert s1.run([L("lava")]) == [SINK]
    assert s1.run([L("armor"), L("armor", "weapon", "boss_area")]) == ["armor", SINK]
    assert s2.run([L("armor"), L("armor", "lava", "weapon"), L("armor", "weapon", "boss_area")]) == [
        "armor", "armed", "armed"]  # fmt: skip
    assert s2.run([L("armor"), L("armor", "boss_area")]) == ["armor", SINK]
    assert s2.run([L("weapon"), L("boss_area")]) == ["start", SINK]


# ---------------------------------------------------------------- product state, eq. 7 ancestors and transfer
def test_ancestors_walk_parent_steps_loop_free():
    assert SG5.ancestors("start", 3) == []
    assert SG5.ancestors("crafted", 1) == ["bench+iron", "wood+iron+smith"]
    assert SG5.ancestors("crafted", 2) == ["bench+iron", "wood+iron+smith", "wood+bench", "wood+iron"]
    assert set(SG5.ancestors("crafted", 10)) == {"bench+iron", "wood+iron+smith", "wood+bench", "wood+iron", "wood",
                                                 "start"}  # fmt: skip
    assert SG3.ancestors("wood+bench", 1) == ["wood"]


def test_product_space_ids_and_compiled_tables_match_the_machines():
    space = ProductSpace(MINECRAFT_SAFEGUARDS)
    assert space.names == ["start", "wood", "wood+bench", "wood+iron", "wood+iron+smith", "bench+iron", "crafted"]
    for k, sg in enumerate(MINECRAFT_SAFEGUARDS):
        table = space.table(k, psl.GRID_LABEL_SETS)
        for name in sg.states:
            for j, labels in enumerate(psl.GRID_LABEL_SETS):
                nxt = sg.step(name, labels)
                assert table[space.index[name], j] == (-1 if nxt == SINK else space.index[nxt])
    t3 = space.table(2, psl.GRID_LABEL_SETS)
    assert t3[space.index["wood"], psl.GRID_LABELS.index("work_bench")] == space.index["wood+bench"]
    assert t3[space.index["wood+bench"], psl.GRID_LABELS.index("lava")] == space.index["wood+bench"]
    assert t3[space.index["start"], psl.GRID_LABELS.index("lava")] == -1


def test_bias_transfer_averages_visited_ancestors_times_factor():
    space = ProductSpace(MINECRAFT_SAFEGUARDS)
    Q = np.zeros((len(space.names), 10, 10, 5))
    visited = np.zeros(Q.shape[:3], dtype=bool)
    cell = (3, 3)
    Q[(space.index["wood"], *cell)] = [1, 2, 3, 4, 5]
    Q[(space.index["start"], *cell)] = [3, 2, 1, 0, -1]
    visited[(space.index["wood"], *cell)] = visited[(space.index["start"], *cell)] = True
    target = space.index["wood+bench"]
    assert psl.bias_transfer(Q, visited, SG3, space, target, cell, factor=0.5, depth=2)
    np.testing.assert_allclose(Q[(target, *cell)], [1.0] * 5)  # 0.5 * mean([1..5], [3..-1]) = 0.5 * 2
    assert psl.bias_transfer(Q, visited, SG3, space, target, cell, factor=1.0, depth=1)
    np.testing.assert_allclose(Q[(target, *cell)], [1, 2, 3, 4, 5])  # closest ancestor only
    visited[(space.index["wood"], *cell)] = False  # unvisited ancestors are left out of the average
    assert psl.bias_transfer(Q, visited, SG3, space, target, cell, factor=1.0, depth=2)
    np.testing.assert_allclose(Q[(target, *cell)], [3, 2, 1, 0, -1])
    visited[:] = False
    Q[(target, *cell)] = 7.0
    assert not psl.bias_transfer(Q, visited, SG3, space, target, cell, factor=1.0, depth=2)
    np.testing.assert_allclose(Q[(target, *cell)], 7.0)


def test_shaped_reward_eq5():
    np.testing.assert_allclose(psl.shaped_reward([0.5, 0.5, 0.0], [False, True, False], 0.1, 1.0), [0.6, -0.5, 0.1])
    np.testing.assert_allclose(psl.shaped_reward(0.0, [True], 0.1, 0.1), [-0.1])


def test_has_converged():
    assert not psl.has_converged([1.0, 1.0, 1.0], window=2, tol=0.01)
    assert not psl.has_converged([0.0, 0.0, 1.0, 1.0], window=2, tol=0.01)
    assert psl.has_converged([5.0, 0.5, 0.5, 0.5, 0.505], window=2, tol=0.01)


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


def _run(tmp_path, **overrides):
    args = psl.Args(**{"total_episodes": 300, "max_episode_steps": 1, "num_envs": 1, "epsilon": 1.0, "alpha": 1.0,
                       "gamma": 0.5, "slip_probability": 0.0, "eval_episodes": 2, "method": "zero-shot", **overrides})
    logger = psl.Logger("t", args, root=str(tmp_path), quiet=True)
    out = psl.run_gridworld(args, logger)
    logger.close()
    return out["Q"][(0, *psl.GRID_START)]


def test_q_learning_updates_the_executed_action(tmp_path):
    # one-step episodes from s0 with random actions: every executed action gets its own value: a move gives
    # 0.1 + 0.5 * 0 (unvisited neighbour); "stay" bootstraps on s0 itself, fixed point 0.1 / (1 - 0.5) = 0.2
    q_s0 = _run(tmp_path)
    np.testing.assert_allclose(q_s0, [0.1, 0.1, 0.1, 0.1, 0.2], atol=1e-6)
    # the authors' update moves only the greedy action (ties broken once, then always the same action)
    q_bug = _run(tmp_path, authors_update=True)
    assert np.count_nonzero(q_bug) == 1


# ---------------------------------------------------------------- the generated Doom map
def test_wad_is_a_pwad_with_udmf_map():
    text = psl.udmf_textmap()
    assert text.startswith('namespace = "zdoom";') and "LAVA1" in text and "type = 3003;" in text
    path = psl.write_wad(os.path.join(os.environ.get("TMPDIR", "/tmp"), f"psl_test_{os.getpid()}.wad"))
    with open(path, "rb") as f:
        data = f.read()
    magic, nlumps, diroff = struct.unpack("<4sii", data[:12])
    names = [data[diroff + 16 * i + 8 : diroff + 16 * i + 16].rstrip(b"\0") for i in range(nlumps)]
    assert magic == b"PWAD" and names == [b"MAP01", b"TEXTMAP", b"ENDMAP"]
    os.remove(path)


@pytest.fixture(scope="module")
def doom(tmp_path_factory):
    wad = psl.write_wad(str(tmp_path_factory.mktemp("wad") / "map.wad"))
    env = psl.DoomVecEnv(1, wad, seed=0, frame_skip=4, episode_tics=2000, stack=2, cheats=True)
    yield env
    env.close()


def _warp(env, x, y, steps=3, action=1):
    """Teleport the player (cheat `warp`; it keeps facing north) and repeat an action (1 = turn left: stay put,
    0 = forward: items are picked up by touching them, a teleport onto them does not count)."""
    env.reset_one(0)
    env.games[0].send_game_command(f"warp {x} {y}")
    return [env.step([action]) for _ in range(steps)]


def test_wad_loads_and_start_is_safe(doom):
    doom.reset_one(0)
    assert doom.obs().shape == (1, 6, 60, 80) and doom.obs().max() > 0  # something was rendered
    assert doom.labels() == [E]
    assert doom.vars[0][4] == 100  # HEALTH


def test_label_lava_fires_and_lava_hurts(doom):
    out = _warp(doom, 256, 448, steps=12)
    assert all("lava" in o[2][0] for o in out)
    assert doom.vars[0][4] < 100  # the damaging floor works


def test_label_armor_fires_on_pickup_with_reward(doom):
    out = _warp(doom, 416, 100, steps=6, action=0)
    assert "armor" not in out[0][2][0] and "armor" in out[-1][2][0] and doom.vars[0][2] == 100
    assert sum(o[1][0] for o in out) == pytest.approx(1.0)  # 0.01 per armor point


def test_label_weapon_fires_on_pickup(doom):
    out = _warp(doom, 256, 640, steps=6, action=0)
    assert "weapon" not in out[0][2][0] and "weapon" in out[-1][2][0]
    assert sum(o[1][0] for o in out) == pytest.approx(1.0)


def test_label_boss_area_fires_after_opening_and_crossing_the_door(doom):
    _warp(doom, 256, 850)
    assert "boss_area" not in doom.labels()[0]
    seen = []
    for _ in range(30):  # forward + use: the door opens, the player walks through (start angle: north)
        seen.append(doom.step([6])[2][0])
    assert any("boss_area" in labels for labels in seen)


# ---------------------------------------------------------------- smoke tests: the script as a user runs it
GRID_TAGS = {"charts/episodic_return", "charts/episodic_cost", "charts/episodic_length", "charts/cost_rate",
             "charts/SPS", "charts/V_s0", "charts/violations", "charts/safeguard_index", "eval/episodic_return",
             "eval/episodic_cost"}  # fmt: skip


@pytest.mark.parametrize("method", psl.METHODS)
def test_smoke_minecraft(tmp_path, method):
    run_script("psl.py", "--method", method, "--progression", "fixed", "--total-episodes", "40",
               "--max-episode-steps", "30", "--num-envs", "4", "--eval-episodes", "5", cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    assert run_dir.name.startswith("minecraft__psl__1__")
    scalars = read_scalars(run_dir)
    assert GRID_TAGS <= set(scalars)
    assert len(scalars["charts/episodic_return"]) >= 40
    sg = [v for _, v in scalars["charts/safeguard_index"]]
    assert max(sg) == 4 and (min(sg) == 0) == (method == "psl")  # psl walks the progression, others: final only


DOOM_SMOKE = ["--env-id", "vizdoom", "--total-timesteps", "64", "--num-envs", "2", "--num-steps", "16",
              "--doom-episode-tics", "80", "--doom-eval-episodes", "1", "--hidden-size", "32"]  # fmt: skip


@pytest.mark.parametrize("method", psl.METHODS)
def test_smoke_vizdoom(tmp_path, method):
    run_script("psl.py", "--method", method, "--save-model", *DOOM_SMOKE, cwd=tmp_path)
    (run_dir,) = run_dirs(tmp_path)
    scalars = read_scalars(run_dir)
    assert {"charts/SPS", "charts/violations", "charts/safeguard_index", "losses/policy_loss", "losses/value_loss",
            "charts/V_s0", "eval/episodic_return"} <= set(scalars)  # fmt: skip
    assert (run_dir / "psl_vizdoom.pt").exists()
    if method == "psl":
        assert [v for _, v in scalars["charts/safeguard_index"]] == [0.0, 1.0]  # 64 steps: stage ends at 4 and 24


@pytest.mark.parametrize("bad, message", [
    ({"method": "ppo"}, "--method must be one of psl, zero-shot, intrinsic-fear, baseline"),
    ({"env_id": "doom"}, "--env-id must be one of minecraft, vizdoom"),
    ({"total_episodes": 0}, "--total-episodes must be positive"),
    ({"env_id": "vizdoom", "total_timesteps": -5}, "--total-timesteps must be positive"),
    ({"transfer_factor": -1.0}, "--transfer-factor must be in [0, 1]"),
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
              slip_probability=0.05, progression="fixed")  # fmt: skip
    a, b = (psl.Args(seed=3, eval_episodes=3, **kw) for _ in range(2))
    runs = []
    for k, args in enumerate((a, b, psl.Args(seed=4, eval_episodes=3, **kw))):
        logger = psl.Logger(f"r{k}", args, root=str(tmp_path), quiet=True)
        runs.append(psl.run_gridworld(args, logger))
        logger.close()
    np.testing.assert_array_equal(runs[0]["Q"], runs[1]["Q"])
    assert runs[0]["training_violations"] == runs[1]["training_violations"]
    assert not np.array_equal(runs[0]["Q"], runs[2]["Q"])
