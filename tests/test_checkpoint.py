"""common/checkpoint.py: atomic, verified checkpoints; foreign ones refused; RNG states; compressed arrays; the
logger's resume (same run directory, the curves continue, the cost rate too)."""

import os
import random

import numpy as np
import pytest
import torch

from common.checkpoint import (
    load_checkpoint,
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
    assert sorted(scalars["losses/x"]) == [(100, 100.0), (300, -300.0)]  # the first writer's 200 and 300 purged
    assert scalars["charts/cost_rate"][-1] == (300, pytest.approx(3 / 8))  # counts continued: 3 costly of 8 steps
