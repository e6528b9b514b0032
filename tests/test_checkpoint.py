"""common/checkpoint.py: atomic, verified checkpoints; foreign ones refused; RNG states; compressed arrays; the
logger's resume (same run directory, the curves continue, the cost rate too)."""

import dataclasses
import os
import random

import numpy as np
import pytest
import torch

from common.buffers import EpisodeBuffer, ReplayBuffer
from common.checkpoint import (
    Checkpointer,
    load_checkpoint,
    resume_run,
    pack_array,
    rng_state,
    save_checkpoint,
    set_rng_state,
    unpack_array,
)
from common.logger import Logger
from conftest import read_scalars

IDENTITY = {"script": "actsafe", "env_id": "SafetyPointGoal1-v0", "deter_dim": 200}


def test_save_load_round_trip_and_identity_checks(tmp_path):
    path = tmp_path / "checkpoint.pt"
    net = torch.nn.Linear(3, 2)
    save_checkpoint(path, {"net": net.state_dict(), "step": 1200}, IDENTITY)
    state = load_checkpoint(path, IDENTITY)
    assert state["step"] == 1200 and torch.equal(state["net"]["weight"], net.weight)
    with pytest.raises(SystemExit, match="written by 'actsafe', not by 'sagui'"):
        load_checkpoint(path, {**IDENTITY, "script": "sagui"})
    with pytest.raises(SystemExit, match="env_id: checkpoint 'SafetyPointGoal1-v0', now 'SafetyCarGoal1-v0'"):
        load_checkpoint(path, {**IDENTITY, "env_id": "SafetyCarGoal1-v0"})
    with pytest.raises(SystemExit, match="deter_dim: checkpoint 200, now 100"):
        load_checkpoint(path, {**IDENTITY, "deter_dim": 100})
    with pytest.raises(SystemExit, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt", IDENTITY)


def test_truncated_or_altered_checkpoint_is_detected_not_loaded(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"x": torch.arange(1000)}, IDENTITY)
    data = path.read_bytes()
    path.write_bytes(data[:-100])  # cut short on disk
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        load_checkpoint(path, IDENTITY)
    altered = bytearray(data)
    altered[-10] ^= 0xFF
    path.write_bytes(bytes(altered))
    with pytest.raises(SystemExit, match="truncated or corrupt"):
        load_checkpoint(path, IDENTITY)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint of this repository"):
        load_checkpoint(path, IDENTITY)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1}, IDENTITY)

    def crash(*a, **k):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(os, "replace", crash)  # the process dies after writing the temporary file, before the rename
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2}, IDENTITY)
    monkeypatch.undo()
    assert load_checkpoint(path, IDENTITY)["step"] == 1


def test_rng_state_restores_every_generator():
    state = rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_packed_arrays_round_trip_and_shrink():
    frames = np.zeros((50, 3, 64, 64), np.uint8)
    frames[:, :, 20:40, 20:40] = 200
    packed = pack_array(frames)
    assert len(packed["data"]) < frames.nbytes / 10
    np.testing.assert_array_equal(unpack_array(packed), frames)


def test_logger_resume_continues_the_same_curves(tmp_path):
    class Args:
        total_timesteps = 1000

    logger = Logger("run", Args(), root=str(tmp_path), quiet=True)
    for step in (100, 200, 300):
        logger.log_costs(step, np.array([1.0, 0.0]))
        logger.scalar("losses/x", step, step)
    logger.console(200)
    saved = logger.state_dict()  # a checkpoint at step 200; the run then logs step 300 and is killed
    logger.close()
    resumed = Logger("run", Args(), root=str(tmp_path), quiet=True, resume_step=200)
    resumed.load_state_dict(saved)
    resumed.scalar("losses/x", -300, 300)  # step 300 redone after resuming
    resumed.log_costs(300, np.array([0.0, 0.0]))
    resumed.console(300)
    resumed.close()
    scalars = read_scalars(tmp_path / "run")
    # the checkpoint was written after step 200's logging: the first writer's 300 is purged, its 100 and 200 kept
    assert sorted(scalars["losses/x"]) == [(100, 100.0), (200, 200.0), (300, -300.0)]
    assert scalars["charts/cost_rate"][-1] == (300, pytest.approx(3 / 8))  # counts continued: 3 costly of 8 steps


@dataclasses.dataclass
class TinyArgs:
    env_id: str = "SafetyPointGoal1"
    seed: int = 1
    hidden: int = 64
    total_timesteps: int = 1000
    checkpoint_every: int = 0
    resume: str | None = None


def test_resume_run_takes_the_runs_flags_and_refuses_conflicting_ones(tmp_path, capsys):
    run_dir = tmp_path / "runs" / "a"
    run_dir.mkdir(parents=True)
    started = TinyArgs(env_id="SafetyCarGoal1", seed=3, checkpoint_every=500)
    ckpt = Checkpointer(str(run_dir), started.checkpoint_every, {"script": "actsafe", "env_id": started.env_id})
    assert not ckpt.due(499) and ckpt.due(500)
    ckpt.save(500, {"net": torch.zeros(2)}, started)
    assert not ckpt.due(999) and ckpt.due(1000)
    assert "checkpoint: step 500" in capsys.readouterr().out
    # --resume alone: the run's flags (not the defaults)
    args, resumed = resume_run(TinyArgs(resume=str(run_dir)), "actsafe")
    assert (args.env_id, args.seed, args.checkpoint_every, args.resume) == ("SafetyCarGoal1", 3, 500, str(run_dir))
    assert resumed["state"]["step"] == 500 and resumed["identity"]["env_id"] == "SafetyCarGoal1"
    assert "rng" in resumed["state"] and resumed["state"]["args"]["seed"] == 3
    # a longer run may be asked for; another seed or size may not
    args, _ = resume_run(TinyArgs(resume=str(run_dir), total_timesteps=5000), "actsafe")
    assert args.total_timesteps == 5000 and args.seed == 3
    with pytest.raises(SystemExit, match=r"--seed: the run has 3, given 7.*--hidden: the run has 64, given 32|"
                                         r"--hidden: the run has 64, given 32"):
        resume_run(TinyArgs(resume=str(run_dir), seed=7, hidden=32), "actsafe")
    # a flag typed with its default value is seen too: the run's SafetyCarGoal1 is not silently continued
    with pytest.raises(SystemExit, match="--env-id: the run has 'SafetyCarGoal1', given 'SafetyPointGoal1'"):
        resume_run(TinyArgs(resume=str(run_dir)), "actsafe", argv=["--resume", str(run_dir), "--env-id",
                                                                   "SafetyPointGoal1"])
    args, _ = resume_run(TinyArgs(resume=str(run_dir), seed=3), "actsafe", argv=["--resume", str(run_dir), "--seed=3"])
    assert args.env_id == "SafetyCarGoal1"  # a typed flag equal to the run's is fine
    with pytest.raises(SystemExit, match="written by actsafe.py, not by sagui.py"):
        resume_run(TinyArgs(resume=str(run_dir)), "sagui")
    with pytest.raises(SystemExit, match="no such run directory"):
        resume_run(TinyArgs(resume=str(tmp_path / "runs" / "missing")), "actsafe")
    (tmp_path / "runs" / "empty").mkdir()
    with pytest.raises(SystemExit, match="no checkpoint.pt in it"):
        resume_run(TinyArgs(resume=str(tmp_path / "runs" / "empty")), "actsafe")
    assert resume_run(TinyArgs(), "actsafe") == (TinyArgs(), None)
    with pytest.raises(SystemExit, match="--checkpoint-every must be 0"):
        Checkpointer(str(run_dir), -1, {})
    # a resumed run at step 500 with a checkpoint every 300 saves next at 600
    assert Checkpointer(str(run_dir), 300, {}, start_step=500).next == 600


def test_buffers_round_trip_through_a_checkpoint(tmp_path):
    fields = {"obs": ((3, 8, 8), np.uint8), "reward": ((), np.float32)}
    buffer = ReplayBuffer(10, fields, seed=0)
    for i in range(13):  # wraps around
        buffer.add(obs=np.full((1, 3, 8, 8), i, np.uint8), reward=np.array([i], np.float32))
    save_checkpoint(tmp_path / "c.pt", {"buffer": buffer.state_dict()}, IDENTITY)
    restored = ReplayBuffer(10, fields, seed=99)
    restored.load_state_dict(load_checkpoint(tmp_path / "c.pt", IDENTITY)["buffer"])
    assert (restored.pos, restored.size) == (buffer.pos, buffer.size) == (3, 10)
    a, b = buffer.sample(5), restored.sample(5)  # same rows and the same sampling RNG
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SystemExit, match="does not fit"):
        ReplayBuffer(20, fields).load_state_dict(buffer.state_dict())

    episodes = EpisodeBuffer(100, seed=0)
    for t in range(12):
        episodes.add({"obs": np.full((3, 8, 8), t, np.uint8), "reward": np.float32(t)}, t % 2, done=t in (8, 9))
    episodes.add({"obs": np.zeros((3, 8, 8), np.uint8), "reward": np.float32(0)}, 0)  # an open episode: left out
    copy = EpisodeBuffer(100, seed=5)
    copy.load_state_dict(episodes.state_dict())
    assert len(copy) == len(episodes) == 10 and copy.open == {}
    a, b = episodes.sample(4, 3), copy.sample(4, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
