"""Shared test helpers: run a script as a user would, and read the scalars it logged."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The longest test files first (measured with --durations): pytest-xdist (--dist loadfile, pytest.ini) hands out
# whole files in collection order, and a long file handed out last runs alone on one core at the end.
LONGEST_FIRST = ("test_actsafe.py", "test_sagui.py", "test_latent_barrier.py", "test_anoseqs.py", "test_envs.py",
                 "test_psl.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


def run_script(script: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python <repo>/<script> <args>` in `cwd` on the CPU; fail the test with its output if it fails."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(f"{script} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                    f"--- stderr\n{proc.stderr[-4000:]}")
    return proc


def run_until_killed(script: str, *args: str, cwd: Path, after: int = 1, timeout: int = 600) -> Path:
    """Run a script that the OS kills (SIGKILL, as an OOM killer or a preempted job would) right after its `after`-th
    checkpoint (common/checkpoint.py's SAFERL_KILL_AFTER_CHECKPOINT); return the run directory it leaves behind."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1", SAFERL_KILL_AFTER_CHECKPOINT=str(after))
    # its own process group, output to files: the script's worker processes (env workers, Doom engines) outlive a
    # SIGKILL of the script and would hold its output pipes open; they are killed with the group once it died
    with open(cwd / "killed_run.out", "w+") as out:
        proc = subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        output = out.read()
    if code != -9:
        pytest.fail(f"{script} {' '.join(args)} was to be killed after checkpoint {after} but exited {code}\n"
                    f"--- output\n{output[-6000:]}")
    dirs = [d for d in run_dirs(cwd) if (d / "checkpoint.pt").exists()]
    assert len(dirs) == 1, f"expected one run directory with a checkpoint under {cwd / 'runs'}, found {dirs}"
    return dirs[0]


def run_dirs(cwd: Path) -> list[Path]:
    """The run directories a script created under `cwd/runs/`."""
    return sorted(Path(p) for p in glob.glob(str(cwd / "runs" / "*")) if os.path.isdir(p))


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the TensorBoard event files under `run_dir` (a subdirectory's tags prefixed with its path),
    as TensorBoard shows them: tag -> [(step, value), ...]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list[tuple[int, float]]] = {}
    event_dirs = sorted({os.path.dirname(p) for p in glob.glob(str(run_dir / "**" / "events.out.tfevents.*"),
                                                               recursive=True)})
    for directory in event_dirs:  # one accumulator per directory, as TensorBoard reads a run (a resumed run's purge)
        acc = EventAccumulator(directory, size_guidance={"scalars": 0})
        acc.Reload()
        prefix = os.path.relpath(directory, run_dir)
        for tag in acc.Tags()["scalars"]:
            key = tag if prefix == "." else f"{prefix}/{tag}"
            scalars.setdefault(key, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def forbid_host_syncs(monkeypatch) -> None:
    """Make every host/device sync a captured CUDA graph cannot contain raise (Tensor.item, tolist, bool, cpu, numpy)
    until `monkeypatch.undo()`; the update under test must run without any of them."""
    import torch

    def refuse(name):
        original = getattr(torch.Tensor, name)

        def raise_(self, *a, **k):
            # one exemption: Adam reads its step counter with .item(); built as the scripts build it for CUDA graphs
            # (capturable=True, impossible on the CPU) the counter lives on the device and is never read
            caller = sys._getframe(1).f_code
            if name == "item" and caller.co_name == "_get_value" and caller.co_filename.endswith("optimizer.py"):
                return original(self, *a, **k)
            raise AssertionError(f"host sync inside the update: Tensor.{name}")
        return raise_

    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse(name))
