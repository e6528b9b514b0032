"""What the update-speed benchmarks (actsafe_gpu.py, latent_barrier_speed.py) share: the machine's description, a
fake replay batch, and the timing and profiling of one update call. Nothing of an algorithm is here."""

from __future__ import annotations

import os
import platform
import time

import numpy as np
import torch


def machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ", no GPU"
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return (f"{os.cpu_count()} CPU cores ({cpu}){gpu}{load}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def fake_batch(args, device) -> dict:
    """A replay batch of args.batch_size x args.sequence_length rows of 64x64 images and 2-d actions."""
    b, t = args.batch_size, args.sequence_length
    return {"obs": torch.randint(0, 256, (b, t, 3, 64, 64), dtype=torch.uint8, device=device),
            "action": torch.rand(b, t, 2, device=device) * 2 - 1,
            "reward": torch.randn(b, t, device=device), "cost": (torch.rand(b, t, device=device) < 0.1).float()}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(fn, batch, device, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of `repeats` further calls)."""
    sync(device)
    t0 = time.perf_counter()
    fn(batch)
    sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def kernels_and_busy(fn, batch, device) -> tuple[int, float | None]:
    """Kernels (CUDA) or top-level operator calls (CPU) of one call, and on CUDA the GPU's busy share of its wall."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn(batch)
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        return len(kernels), sum(e.device_time for e in kernels) / 1e6 / wall  # device_time in microseconds
    return sum(1 for e in events if e.name.startswith("aten::") and e.cpu_parent is None), None
