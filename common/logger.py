"""TensorBoard logging under `runs/<run_name>/` with the tag names of the style guide, plus a console line.

Tags: `charts/episodic_return`, `charts/episodic_cost`, `charts/episodic_length`, `charts/cost_rate`,
`charts/SPS`, `eval/...`, `losses/<name>`, `charts/<multiplier>`; the hyperparameters as a text table.
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
from torch.utils.tensorboard import SummaryWriter


class Logger:
    """Thin wrapper over SummaryWriter that also tracks the cost rate, SPS and a console line.

    logger = Logger(run_name, args)
    logger.log_episode(global_step, ret, cost, length)   # every finished training episode
    logger.log_costs(global_step, costs)                  # per-step costs (array), for charts/cost_rate
    logger.scalar("losses/qf_loss", value, global_step)
    logger.console(global_step)                           # every few thousand steps: step, SPS, return, cost
    """

    def __init__(self, run_name: str, args=None, root: str = "runs", quiet: bool = False):
        self.run_dir = os.path.join(root, run_name)
        os.makedirs(self.run_dir, exist_ok=True)
        self.writer = SummaryWriter(self.run_dir)
        if args is not None:
            params = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
            table = "\n".join(f"|{k}|{v}|" for k, v in params.items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        self.quiet = quiet
        self.start_time, self.start_step = time.time(), 0
        self.steps_seen, self.cost_steps = 0, 0
        self.last_return, self.last_cost = float("nan"), float("nan")

    def scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, float(value), step)

    def log_episode(self, step: int, ret: float, cost: float, length: int, prefix: str = "charts") -> None:
        """One finished episode (`prefix="eval"` for evaluation episodes: return and cost only)."""
        self.scalar(f"{prefix}/episodic_return", ret, step)
        self.scalar(f"{prefix}/episodic_cost", cost, step)
        if prefix == "charts":
            self.scalar("charts/episodic_length", length, step)
            self.last_return, self.last_cost = float(ret), float(cost)

    def log_costs(self, step: int, costs) -> None:
        """Count training steps with cost > 0 and write `charts/cost_rate` (= those steps / steps so far)."""
        costs = np.asarray(costs).ravel()
        self.steps_seen += costs.size
        self.cost_steps += int((costs > 0).sum())
        self.scalar("charts/cost_rate", self.cost_steps / max(self.steps_seen, 1), step)

    def sps(self, step: int) -> int:
        return int((step - self.start_step) / max(time.time() - self.start_time, 1e-9))

    def console(self, step: int, extra: str = "") -> int:
        """Write `charts/SPS` and print one line: step, SPS, last episodic return and cost. Returns SPS."""
        sps = self.sps(step)
        self.scalar("charts/SPS", sps, step)
        if not self.quiet:
            print(
                f"global_step={step} SPS={sps} episodic_return={self.last_return:.2f} "
                f"episodic_cost={self.last_cost:.2f}" + (f" {extra}" if extra else ""),
                flush=True,
            )
        return sps

    def close(self) -> None:
        self.writer.close()
