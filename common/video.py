"""Evaluation videos as mp4 files under `runs/<run>/videos/`, in CleanRL's convention (one file per episode).

    frames = []                                  # (H, W, 3) uint8 images, one per agent step
    ... frames.append(env.render()) ...
    save_video(frames, video_path(run_dir, "eval", episode), fps=30)

Writing uses imageio with its ffmpeg plugin (`imageio-ffmpeg`, a wheel that carries its own ffmpeg binary).
"""

from __future__ import annotations

import os

import numpy as np


def video_path(run_dir: str, prefix: str, episode: int) -> str:
    """runs/<run>/videos/<prefix>-episode-<n>.mp4 (CleanRL's RecordVideo names files rl-video-episode-<n>.mp4)."""
    os.makedirs(os.path.join(run_dir, "videos"), exist_ok=True)
    return os.path.join(run_dir, "videos", f"{prefix}-episode-{episode}.mp4")


def save_video(frames, path: str, fps: int = 30) -> str:
    """Write (H, W, 3) uint8 frames as an H.264 mp4 (imageio resizes odd sizes to a multiple of 16 for the codec)."""
    import imageio.v2 as imageio

    if len(frames) == 0:
        raise ValueError(f"no frames to write to {path}")
    frames = [np.asarray(f, dtype=np.uint8) for f in frames]
    if frames[0].ndim == 2:  # a grey image: three equal channels
        frames = [np.repeat(f[..., None], 3, -1) for f in frames]
    imageio.mimwrite(path, frames, fps=fps, macro_block_size=16)
    return path
