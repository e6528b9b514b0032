"""Raw environment steps per second (random actions, one env, one process), state and 64x64 vision.

    python benchmarks/env_speed.py --steps 3000

Reports both the bare Safety-Gymnasium env and the same env through `common.make_safety_env`, side by side,
so the wrappers' overhead is visible. Results are single readings: compare ratios taken in the same run.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `common`
from common import import_safety_gymnasium, make_safety_env


def steps_per_second(env, steps: int, five_tuple: bool) -> float:
    env.reset(seed=0)
    rng = np.random.default_rng(0)
    low, high = env.action_space.low, env.action_space.high
    actions = rng.uniform(low, high, size=(steps, *low.shape))
    start = time.perf_counter()
    for a in actions:
        out = env.step(a)
        if out[-3] or out[-2]:  # terminated or truncated, in both APIs
            env.reset()
    return steps / (time.perf_counter() - start)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--vision-steps", type=int, default=500)
    args = parser.parse_args()
    sg = import_safety_gymnasium()
    rows = [
        ("SafetyPointGoal1-v0, bare safety_gymnasium.make", sg.make("SafetyPointGoal1-v0"), args.steps, False),
        ("SafetyPointGoal1, common.make_safety_env", make_safety_env("SafetyPointGoal1"), args.steps, True),
        (
            "SafetyPointGoal1 vision 64x64, common.make_safety_env",
            make_safety_env("SafetyPointGoal1", vision=True, image_size=64),
            args.vision_steps,
            True,
        ),
    ]
    for name, env, steps, five in rows:
        print(f"| {name} | {steps_per_second(env, steps, five):,.0f} |", flush=True)
        env.close()
