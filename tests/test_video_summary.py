"""common/video.py and common/summary.py: the pieces a recorded, summarised run is made of."""

import dataclasses
import json

import numpy as np
import pytest

from common.summary import write_summary
from common.video import save_video, video_path


def test_video_path_follows_cleanrl_naming(tmp_path):
    path = video_path(str(tmp_path), "eval", 3)
    assert path == str(tmp_path / "videos" / "eval-episode-3.mp4") and (tmp_path / "videos").is_dir()


def test_save_video_writes_a_readable_mp4_with_every_frame(tmp_path):
    import imageio.v2 as imageio

    frames = [np.full((64, 64, 3), 20 * i, dtype=np.uint8) for i in range(6)]
    path = save_video(frames, video_path(str(tmp_path), "eval", 0), fps=10)
    read = imageio.mimread(path)
    assert len(read) == 6 and read[0].shape == (64, 64, 3)
    # H.264 is lossy: a flat grey frame comes back close to its value, and the frames stay in order
    assert [int(round(f.mean())) for f in read] == pytest.approx([20 * i for i in range(6)], abs=3)


def test_save_video_refuses_no_frames_and_accepts_grey(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        save_video([], str(tmp_path / "x.mp4"))
    path = save_video([np.zeros((32, 32), dtype=np.uint8)] * 2, str(tmp_path / "grey.mp4"))
    assert (tmp_path / "grey.mp4").stat().st_size > 0 and path.endswith("grey.mp4")


def test_write_summary_is_complete_and_atomic(tmp_path):
    @dataclasses.dataclass
    class Args:
        env_id: str = "SafetyPointGoal1"
        seed: int = 3

    metrics = dict(env_id="SafetyPointGoal1-v0", total_steps=1000, eval_return=1.5, eval_cost=2.0, train_cost=3.0,
                   train_episodes=4, train_violating_episodes=1, cost_limit=25.0, cost_rate=0.1, sps=50)
    path = write_summary(str(tmp_path), Args(), script="actsafe", start_time=0.0, **metrics)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert path == str(tmp_path / "summary.json") and not (tmp_path / "summary.json.tmp").exists()
    assert summary["script"] == "actsafe" and summary["eval_return"] == 1.5 and summary["eval_cost"] == 2.0
    assert summary["seed"] == 3 and summary["method"] == "actsafe"  # no exp_name: the script's name
    with pytest.raises(ValueError, match="missing \\['train_violating_episodes'\\]"):
        write_summary(str(tmp_path), Args(), script="actsafe", start_time=0.0,
                      **{k: v for k, v in metrics.items() if k != "train_violating_episodes"})
    assert summary["args"] == {"env_id": "SafetyPointGoal1", "seed": 3} and summary["wall_time_s"] > 0
    assert summary["git_commit"] is None or len(summary["git_commit"]) == 40
