"""What a sagui.py checkpoint costs at the default sizes (--hidden-size 256, --buffer-size 1M): file size and the
seconds `Checkpointer.save` takes, for the guide stage and the student stage, with the replay filled to a few
fill levels, and without the replay (--no-checkpoint-buffer).

    python benchmarks/sagui_checkpoint.py [--rows 50000 1000000] [--real-steps 20000]

The replay rows are real transitions: --real-steps steps of uniform random actions in the source task (guide) and
in the target task (student), stored as sagui.py stores them, repeated to fill the buffer when it holds more rows
than were collected (a repeat lies megabytes away, far outside zlib's 32 KiB window, so it compresses no better
than new rows). Prints one line per case; the checkpoint goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import gymnasium as gym
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sagui  # noqa: E402
from timing import machine  # noqa: E402
from common import Logger, SafeVectorEnv  # noqa: E402
from common.checkpoint import Checkpointer  # noqa: E402


def collect(env_fn, steps: int, seed: int) -> dict:
    """`steps` transitions of uniform random actions, as sagui.py's replay rows (no guide: zeros for its fields)."""
    envs = SafeVectorEnv(gym.vector.SyncVectorEnv([env_fn]))
    envs.single_action_space.seed(seed)
    obs, _ = envs.reset(seed=seed)
    rows = []
    for _ in range(steps):
        action = envs.single_action_space.sample()[None]
        next_obs, reward, cost, term, trunc, info = envs.step(action)
        z = np.zeros((1, action.shape[1]), np.float32)
        rows.append(dict(obs=obs, action=action, next_obs=sagui.real_next_obs(next_obs, trunc, term, info),
                         reward=reward, cost=cost, done=term, rho=np.ones(1), logp_guide=np.zeros(1), guide_mean=z,
                         guide_std=z, guide_next_mean=z, guide_next_std=z))
        obs = next_obs
    envs.close()
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def fill(buffer: sagui.DeviceReplay, rows: dict, n: int) -> None:
    have = len(next(iter(rows.values())))
    while len(buffer) < n:
        take = min(have, n - len(buffer))
        buffer.add(**{k: v[:take] for k, v in rows.items()})


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="+", default=[50_000, 1_000_000])
    p.add_argument("--real-steps", type=int, default=20_000)
    cli = p.parse_args()
    print(machine(sagui.torch.device("cpu")), flush=True)
    args = sagui.Args(cost_limit=25.0)  # the defaults: hidden 256, buffer 1M
    target = sagui.make_target_env(args.env_id, 0)
    source = sagui.make_source_env(args.env_id, 0, 1.0)
    space = target().action_space
    t0 = time.time()
    source_rows, target_rows = collect(source, cli.real_steps, 0), collect(target, cli.real_steps, 1)
    print(f"collected {cli.real_steps} real steps in each task in {time.time() - t0:.0f} s", flush=True)
    g_dim, s_dim = source_rows["obs"].shape[1], target_rows["obs"].shape[1]
    with tempfile.TemporaryDirectory() as tmp:
        logger = Logger("bench", args, root=tmp, quiet=True)
        checkpointer = Checkpointer(logger.run_dir, 0, {"script": "sagui"})
        for stage in ("guide", "student"):
            for rows in [0, *cli.rows]:
                for keep_buffer in ([True, False] if rows == max(cli.rows) else [True]):
                    args.checkpoint_buffer = keep_buffer
                    if stage == "guide":
                        agent = sagui.SACLagrangian(g_dim, 2, args, space, 20.0, "cpu", fixed_alpha=1.0)
                        buffers = {"rb": sagui.DeviceReplay(args.buffer_size, sagui.replay_fields(g_dim, 2), "cpu")}
                        fill(buffers["rb"], source_rows, rows)
                        extra = {}
                    else:  # control-switch: two buffers of half the capacity; say 3/4 of the rows are the student's
                        agent = sagui.SACLagrangian(s_dim, 2, args, space, 25.0, "cpu")
                        buffers = {k: sagui.DeviceReplay(args.buffer_size // 2, sagui.replay_fields(s_dim, 2), "cpu")
                                   for k in ("rb", "rb_guide")}
                        fill(buffers["rb"], target_rows, min(rows * 3 // 4, args.buffer_size // 2))
                        fill(buffers["rb_guide"], target_rows, rows - len(buffers["rb"]))
                        actor = sagui.Actor(g_dim, 2, 256, space.low, space.high)
                        extra = {"guide": {"actor": actor.state_dict(), "hidden_size": 256}}
                    start = time.time()
                    checkpointer.save(rows, sagui.checkpoint_state(stage, agent, buffers, logger, args, **extra),
                                      args)
                    seconds = time.time() - start
                    size = os.path.getsize(checkpointer.path) / 2**20
                    print(f"{stage} stage, {sum(len(b) for b in buffers.values())} replay rows"
                          f"{'' if keep_buffer else ', --no-checkpoint-buffer'}: {size:.1f} MiB, {seconds:.1f} s",
                          flush=True)
                    del agent, buffers
