"""TensorBoard logging under `runs/<run_name>/` with the tag names of the style guide, plus a console line.

Tags: `charts/episodic_return`, `charts/episodic_cost`, `charts/episodic_length`, `charts/cost_rate`,
`charts/SPS`, `eval/...`, `losses/<name>`, `charts/<multiplier>`; the hyperparameters as a text table.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time

import numpy as np
from torch.utils.tensorboard import SummaryWriter


def format_eta(seconds: float) -> str:
    """Seconds as H:MM:SS (days counted in hours), '?' when unknown."""
    if not np.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class Logger:
    """Thin wrapper over SummaryWriter that also tracks the cost rate, SPS, progress and a console line.

    logger = Logger(run_name, args)                       # total steps taken from args.total_timesteps if present
    logger.log_episode(global_step, ret, cost, length)   # every finished training episode
    logger.log_costs(global_step, costs)                  # per-step costs (array): counted, written at console time
    logger.scalar("losses/qf_loss", value, global_step)
    logger.console(global_step)                           # every few thousand steps: step/total, SPS, ETA, return, cost
    logger.restart_clock(step, total)                     # a new stage: SPS and ETA of this stage only
    state = logger.state_dict(); logger.load_state_dict(state)   # into / out of a checkpoint
    Logger(run_name, args, resume_step=step)              # a resumed run: same directory, same curves

    `charts/cost_rate` (training steps with cost > 0 / steps so far) is written once per console line, not at every
    env step (one event per log interval instead of one per step).
    """

    def __init__(self, run_name: str, args=None, root: str = "runs", quiet: bool = False,
                 total_steps: int | None = None, resume_step: int | None = None):
        self.run_dir = os.path.join(root, run_name)
        os.makedirs(self.run_dir, exist_ok=True)
        # resuming from a checkpoint written at the end of step `resume_step` (after that step's logging):
        # TensorBoard drops what the interrupted writer logged after it (those steps are redone), so the curves
        # continue without a doubled stretch
        self.writer = SummaryWriter(self.run_dir, purge_step=None if resume_step is None else resume_step + 1)
        if args is not None and resume_step is None:
            params = dataclasses.asdict(args) if dataclasses.is_dataclass(args) else dict(vars(args))
            table = "\n".join(f"|{k}|{v}|" for k, v in params.items())
            self.writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
        self.quiet = quiet
        self.total_steps = total_steps if total_steps is not None else getattr(args, "total_timesteps", None)
        self.start_time, self.start_step = time.time(), resume_step or 0
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
        """Count training steps with cost > 0 (`charts/cost_rate` is written by `console`, once per log interval)."""
        costs = np.asarray(costs).ravel()
        self.steps_seen += costs.size
        self.cost_steps += int((costs > 0).sum())

    @property
    def cost_rate(self) -> float:
        return self.cost_steps / max(self.steps_seen, 1)

    def restart_clock(self, step: int = 0, total_steps: int | None = None) -> None:
        """Measure SPS and the ETA from `step` on (a new stage of a multi-stage script), towards `total_steps`."""
        self.start_time, self.start_step = time.time(), step
        if total_steps is not None:
            self.total_steps = total_steps

    def sps(self, step: int) -> int:
        return int((step - self.start_step) / max(time.time() - self.start_time, 1e-9))

    def progress(self, step: int) -> tuple[str, str | None]:
        """('120000/1000000 (12%)', ETA at this stage's SPS), or (str(step), None) when no total is known."""
        if not self.total_steps:
            return f"{step}", None
        rate = (step - self.start_step) / max(time.time() - self.start_time, 1e-9)
        eta = (self.total_steps - step) / rate if rate > 0 else float("inf")
        return f"{step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%)", format_eta(eta)

    def console(self, step: int, extra: str = "") -> int:
        """Write `charts/SPS` and `charts/cost_rate`; print step/total, SPS, extra, ETA, the last episode. Returns SPS.

        global_step=120000/1000000 (12%) SPS=410 updates/s=19.6 ETA 0:35:12 | episodic_return=3.20 episodic_cost=0.00
        """
        sps = self.sps(step)
        self.scalar("charts/SPS", sps, step)
        if self.steps_seen:
            self.scalar("charts/cost_rate", self.cost_rate, step)
        if not self.quiet:
            done, eta = self.progress(step)
            line = f"global_step={done} SPS={sps}" + (f" {extra}" if extra else "") + (f" ETA {eta}" if eta else "")
            if np.isnan(self.last_return):
                line += " | no episode finished yet"
            else:
                line += f" | episodic_return={self.last_return:.2f} episodic_cost={self.last_cost:.2f}"
            print(line, flush=True)
        return sps

    def state_dict(self) -> dict:
        """What a resumed run needs to continue the cost rate and the console line."""
        # the events still queued in the writer go to disk first: a checkpoint taken now and a kill right after it
        # must not leave a gap in the curves before the checkpoint's step
        self.writer.flush()
        # not the total: a run resumed with a longer --total-timesteps shows its new total (and ETA)
        return {"steps_seen": self.steps_seen, "cost_steps": self.cost_steps, "last_return": self.last_return,
                "last_cost": self.last_cost}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)

    def close(self) -> None:
        self.writer.close()
