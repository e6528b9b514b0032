"""Small run-time helpers every script needs: argument checks, seeding, device choice, NaN guard."""

from __future__ import annotations

import random

import numpy as np
import torch


def check_positive(args, *names: str) -> None:
    """Reject zero or negative budgets/sizes with a message that names the flag."""
    for name in names:
        value = getattr(args, name)
        if value is None or value <= 0:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(f"error: {flag} must be positive, got {value!r}")


def check_choice(args, name: str, choices) -> None:
    value = getattr(args, name)
    if value not in choices:
        flag = "--" + name.replace("_", "-")
        raise SystemExit(f"error: {flag} must be one of {', '.join(map(str, choices))}; got {value!r}")


def seed_everything(seed: int, torch_deterministic: bool = True) -> None:
    """Seed python, numpy and torch; with `torch_deterministic`, ask cuDNN for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = torch_deterministic


def get_device(cuda: bool) -> torch.device:
    """CUDA when asked for and available; otherwise the CPU, saying so when CUDA was asked for."""
    if cuda and torch.cuda.is_available():
        return torch.device("cuda")
    if cuda:
        print("CUDA was asked for (--cuda) but is not available: running on the CPU.", flush=True)
    return torch.device("cpu")


def check_finite(name: str, *values) -> None:
    """Stop the run with a clear message as soon as a loss or statistic becomes NaN or infinite."""
    for v in values:
        v = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v)
        if not torch.isfinite(v).all():
            raise FloatingPointError(
                f"{name} is not finite ({v.flatten()[:5].tolist()}): the run diverged. "
                "Try a lower learning rate or gradient clipping; rerun with the same --seed to reproduce."
            )
