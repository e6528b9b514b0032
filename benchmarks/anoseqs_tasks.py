"""Which Safety-Gymnasium task can the AnoSeqs benchmark afford? Random actions, one env, one process.

Per task: env steps per wall second and per CPU second (user + sys of this process), the fraction of steps with
cost > 0, and how many episodes ended and how many of them by termination (a fall of the Ant, for instance).

    nice -n 10 python benchmarks/anoseqs_tasks.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `common`
from common import make_safety_env  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", nargs="+", default=["SafetyPointRun0:3000", "SafetyCarRun0:3000", "SafetyAntRun0:1000",
                                                  "SafetyPointCircle1:3000"], help="id:steps")
    for task in p.parse_args().tasks:
        name, steps = task.split(":")
        steps = int(steps)
        env = make_safety_env(name, seed=0)
        env.action_space.seed(0)
        obs, _ = env.reset(seed=0)
        cost_steps = episodes = terminated = 0
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            obs, _, term, trunc, info = env.step(env.action_space.sample())
            cost_steps += info["cost"] > 0
            if term or trunc:
                episodes, terminated = episodes + 1, terminated + term
                env.reset()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{name}: obs {obs.shape[0]}, action {env.action_space.shape[0]}; {steps / wall:.0f} random steps per "
              f"wall second, {steps / cpu:.0f} per CPU second; fraction of steps with cost > 0: {cost_steps / steps:.3f}; "
              f"{episodes} episodes ended ({terminated} terminated) in {steps} steps", flush=True)
        env.close()


if __name__ == "__main__":
    main()
