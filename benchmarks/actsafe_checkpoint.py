"""What an actsafe.py checkpoint costs: the size of each part, the time to write and read it, and the video paths.

    python actsafe.py --env-id SafetyPointGoal1 --num-envs 1 --total-timesteps 2000 --warmup-steps 1000 \
        --train-every 1000 --train-steps 1 --checkpoint-every 1000 --eval-episodes 0      # default sizes, 2 episodes
    nice -n 10 python benchmarks/actsafe_checkpoint.py runs/<that run>/checkpoint.pt

Reads the checkpoint (and verifies its hash), prints each part's serialised size (the networks, the optimisers with
Adam's moments, the compressed replay), the compression of the stored frames, the time to compress one episode
anew (a checkpoint recompresses the whole replay), the time to write the whole checkpoint again with
`save_checkpoint`, and the cost of `--capture-video`: one stored episode's frames upscaled 4x and written as an mp4
(the pixel variant), and 101 drawn pendulum frames (the GP variant). Writes into a temporary directory only.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import actsafe  # noqa: E402
from common.checkpoint import pack_array, read_checkpoint, save_checkpoint, unpack_array  # noqa: E402
from common.video import save_video  # noqa: E402


def mib(part) -> float:
    buffer = io.BytesIO()
    torch.save(part, buffer, pickle_protocol=4)  # as common/checkpoint.py writes it
    return len(buffer.getvalue()) / 2**20


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/actsafe_checkpoint.py runs/<run>/checkpoint.pt")
    start = time.perf_counter()
    saved = read_checkpoint(sys.argv[1])
    print(f"read and verify: {time.perf_counter() - start:.2f} s")
    state = saved["state"]
    nets = ("world_model", "actor_critics", "model_opt", "actor_opts", "critic_opts")
    for part in (*nets, "buffer", "logger", "counters", "rng"):
        print(f"{part}: {mib(state[part]):.2f} MiB")
    print(f"networks and optimisers: {mib({k: state[k] for k in nets}):.2f} MiB")
    episodes = state["buffer"]["episodes"]
    if episodes:
        raw = sum(np.prod(e["obs"]["shape"]) for e in episodes) / 2**20
        packed = sum(len(e["obs"]["data"]) for e in episodes) / 2**20
        print(f"{len(episodes)} stored episodes, rows {[e['reward']['shape'][0] for e in episodes]}; frames "
              f"{raw:.2f} MiB raw, {packed:.2f} MiB compressed ({raw / packed:.1f}x)")
        episode = {k: unpack_array(v) for k, v in episodes[0].items()}
        for _ in range(2):
            start = time.perf_counter()
            {k: pack_array(v) for k, v in episode.items()}
            print(f"compress one episode: {time.perf_counter() - start:.3f} s")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        size = save_checkpoint(os.path.join(tmp, "checkpoint.pt"), state, saved["identity"])
        print(f"save_checkpoint: {size / 2**20:.1f} MiB in {time.perf_counter() - start:.2f} s")
        if episodes:
            frames = [f.transpose(1, 2, 0).repeat(4, 0).repeat(4, 1) for f in episode["obs"]]
            start = time.perf_counter()
            save_video(frames, os.path.join(tmp, "pixel.mp4"), fps=25)
            print(f"pixel video: {len(frames)} frames of 256x256 written in {time.perf_counter() - start:.2f} s, "
                  f"{os.path.getsize(os.path.join(tmp, 'pixel.mp4')) / 2**10:.0f} KiB")
        start = time.perf_counter()
        drawn = [actsafe.draw_pendulum(np.array([np.cos(a), np.sin(a), 6 * np.sin(a)]))
                 for a in np.linspace(np.pi, 0, 101)]
        drawing = time.perf_counter() - start
        start = time.perf_counter()
        save_video(drawn, os.path.join(tmp, "gp.mp4"), fps=20)
        print(f"GP video: 101 frames drawn in {drawing:.2f} s, written in {time.perf_counter() - start:.2f} s, "
              f"{os.path.getsize(os.path.join(tmp, 'gp.mp4')) / 2**10:.0f} KiB")
