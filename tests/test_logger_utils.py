"""common/logger.py and common/utils.py: tags written, cost rate, console line, argument checks, NaN guard."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from common import Logger, check_choice, check_finite, check_positive, get_device, seed_everything
from conftest import read_scalars


@dataclass
class Args:
    exp_name: str = "test"
    seed: int = 1
    total_timesteps: int = 1000


def test_logger_writes_style_guide_tags(tmp_path, capsys):
    logger = Logger("run", Args(), root=str(tmp_path))
    logger.log_episode(100, ret=3.5, cost=2.0, length=50)
    logger.log_episode(100, ret=1.0, cost=0.0, length=0, prefix="eval")
    logger.log_costs(100, np.array([0.0, 1.0, 0.0, 2.0]))
    logger.log_costs(200, np.array([0.0, 0.0, 0.0, 0.0]))
    logger.scalar("losses/qf_loss", 0.25, 200)
    sps = logger.console(200)
    logger.close()
    scalars = read_scalars(tmp_path / "run")
    assert scalars["charts/episodic_return"] == [(100, 3.5)]
    assert scalars["charts/episodic_cost"] == [(100, 2.0)] and scalars["charts/episodic_length"] == [(100, 50.0)]
    assert scalars["eval/episodic_return"] == [(100, 1.0)] and scalars["eval/episodic_cost"] == [(100, 0.0)]
    # the cost rate is counted at every call but written once, with the console line: 2 of 8 steps
    assert scalars["charts/cost_rate"] == [(200, 0.25)]
    assert scalars["losses/qf_loss"] == [(200, 0.25)] and scalars["charts/SPS"] == [(200, sps)]
    line = capsys.readouterr().out
    assert "global_step=200/1000 (20%)" in line and f"SPS={sps}" in line and " ETA " in line
    assert "episodic_return=3.50" in line and "episodic_cost=2.00" in line


def test_logger_console_before_any_episode_and_one_cost_rate_per_line(tmp_path, capsys):
    logger = Logger("run", Args(), root=str(tmp_path))
    for step in range(1, 101):  # 100 env steps, one console line
        logger.log_costs(step, np.array([float(step % 4 == 0)]))
    logger.console(100, "updates/s=3.0")
    logger.close()
    line = capsys.readouterr().out
    assert "nan" not in line and "no episode finished yet" in line and "updates/s=3.0" in line
    assert read_scalars(tmp_path / "run")["charts/cost_rate"] == [(100, 0.25)]


def test_logger_restart_clock_and_eta_format(tmp_path):
    from common.logger import format_eta

    assert format_eta(3 * 3600 + 25 * 60 + 7) == "3:25:07" and format_eta(float("inf")) == "?"
    logger = Logger("run", Args(), root=str(tmp_path), quiet=True)
    logger.start_time -= 1e6  # as if an earlier stage had taken very long
    logger.restart_clock(500, total_steps=2000)
    assert logger.total_steps == 2000 and logger.start_step == 500
    done, eta = logger.progress(1000)
    assert done == "1000/2000 (50%)" and eta != "?"
    logger.close()


def test_logger_writes_hyperparameter_table(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = Logger("run", Args(seed=7), root=str(tmp_path))
    logger.close()
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"tensors": 0})
    acc.Reload()
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "|seed|7|" in text and "|total_timesteps|1000|" in text


def test_check_positive_and_choice():
    check_positive(Args(), "total_timesteps", "seed")
    with pytest.raises(SystemExit, match="--total-timesteps must be positive, got 0"):
        check_positive(Args(total_timesteps=0), "total_timesteps")
    with pytest.raises(SystemExit, match="--seed must be positive, got -3"):
        check_positive(Args(seed=-3), "seed")
    with pytest.raises(SystemExit, match="--exp-name must be one of a, b; got 'test'"):
        check_choice(Args(), "exp_name", ["a", "b"])


def test_check_finite_catches_nan_and_inf():
    check_finite("loss", torch.tensor(1.0), 2.0)
    with pytest.raises(FloatingPointError, match="actor_loss is not finite"):
        check_finite("actor_loss", torch.tensor([1.0, float("nan")]))
    with pytest.raises(FloatingPointError):
        check_finite("x", float("inf"))


def test_seed_everything_reproduces_and_device_falls_back(capsys, monkeypatch):
    seed_everything(3)
    a = (np.random.rand(), torch.rand(2))
    seed_everything(3)
    b = (np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert get_device(True).type == "cpu"
    assert "not available" in capsys.readouterr().out
    assert get_device(False).type == "cpu"
