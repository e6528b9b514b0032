"""Replay buffers: `ReplayBuffer` for off-policy transitions, `EpisodeBuffer` for world-model sequences.

Both keep numpy arrays on the host and return torch tensors on `device` when sampled. On a GPU a sampled batch is
copied through pinned (page-locked) memory with a non-blocking copy, so sampling never waits for the device to finish
the previous update.
"""

from __future__ import annotations

import numpy as np
import torch

from common.checkpoint import pack_array, unpack_array


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`; to a GPU through pinned memory, without waiting for the device."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class ReplayBuffer:
    """Ring buffer of transitions with named fields.

    buffer = ReplayBuffer(1_000_000, {"obs": ((60,), np.float32), "action": ((2,), np.float32),
                                      "reward": ((), np.float32), "cost": ((), np.float32),
                                      "next_obs": ((60,), np.float32), "done": ((), np.float32)}, device)
    buffer.add(obs=o, action=a, ...)   # each field with a leading batch axis (e.g. one row per env)
    batch = buffer.sample(256)          # dict of tensors, float32 unless the field is another dtype
    Any extra field (a guide's log-probability, a "who acted" flag) is just another entry.
    """

    def __init__(self, capacity: int, fields: dict, device: torch.device | str = "cpu", seed: int | None = None):
        if capacity <= 0:
            raise ValueError(f"buffer capacity must be positive, got {capacity}")
        self.capacity, self.device = capacity, torch.device(device)
        self.data = {k: np.zeros((capacity, *shape), dtype=dtype) for k, (shape, dtype) in fields.items()}
        self.pos, self.size = 0, 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(self, **rows) -> None:
        missing = set(self.data) - set(rows)
        if missing:
            raise KeyError(f"ReplayBuffer.add is missing fields {sorted(missing)}")
        n = len(next(iter(rows.values())))
        idx = (self.pos + np.arange(n)) % self.capacity
        for k, v in rows.items():
            self.data[k][idx] = v
        self.pos = int((self.pos + n) % self.capacity)
        self.size = min(self.size + n, self.capacity)

    def sample(self, batch_size: int, indices: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty ReplayBuffer")
        if indices is None:
            indices = self.rng.integers(0, self.size, size=batch_size)
        return {k: to_device(v[indices], self.device) for k, v in self.data.items()}

    def state_dict(self) -> dict:
        """The stored rows (zlib-compressed), position, size and sampling RNG, for a checkpoint."""
        return {"data": {k: pack_array(v[: self.size]) for k, v in self.data.items()}, "pos": self.pos,
                "size": self.size, "capacity": self.capacity, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state["capacity"] != self.capacity or set(state["data"]) != set(self.data):
            raise SystemExit(f"error: the checkpoint's replay buffer (capacity {state['capacity']}, fields "
                             f"{sorted(state['data'])}) does not fit this run's (capacity {self.capacity}, fields "
                             f"{sorted(self.data)})")
        for k, packed in state["data"].items():
            self.data[k][: state["size"]] = unpack_array(packed)
        self.pos, self.size = state["pos"], state["size"]
        self.rng.bit_generator.state = state["rng"]


class EpisodeBuffer:
    """Whole episodes for world models; samples fixed-length sequences that stay inside one episode.

    Steps are added per environment (`add(step_dict, env_index)`) and an episode is stored when it ends
    (`done=True`); unfinished episodes are not sampled. `sample(batch, length)` draws episodes with
    probability proportional to the number of windows they hold and a uniform start inside each, so a
    sequence never crosses an episode boundary; episodes shorter than `length` are never drawn.
    The oldest episodes are dropped once more than `capacity_steps` steps are stored.

    The step convention is Dreamer's: the row t holds the observation o_t, the action a_{t-1} that led
    to it, the reward and cost received for it, and whether it is the first of its episode.
    """

    def __init__(self, capacity_steps: int, device: torch.device | str = "cpu", seed: int | None = None):
        if capacity_steps <= 0:
            raise ValueError(f"buffer capacity must be positive, got {capacity_steps}")
        self.capacity_steps, self.device = capacity_steps, torch.device(device)
        self.episodes: list[dict[str, np.ndarray]] = []
        self.open: dict[int, list[dict]] = {}
        self.num_steps = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.num_steps

    def add(self, step: dict, env_index: int = 0, done: bool = False) -> None:
        """Append one step of environment `env_index`; `done=True` closes and stores the episode."""
        self.open.setdefault(env_index, []).append({k: np.asarray(v) for k, v in step.items()})
        if done:
            steps = self.open.pop(env_index)
            self.add_episode({k: np.stack([s[k] for s in steps]) for k in steps[0]})

    def add_episode(self, episode: dict[str, np.ndarray]) -> None:
        self.episodes.append(episode)
        self.num_steps += len(next(iter(episode.values())))
        while self.num_steps > self.capacity_steps and len(self.episodes) > 1:
            self.num_steps -= len(next(iter(self.episodes.pop(0).values())))

    def sample(self, batch_size: int, length: int) -> dict[str, torch.Tensor]:
        """Tensors of shape (batch_size, length, ...), each row a window of one stored episode."""
        lengths = np.array([len(next(iter(e.values()))) for e in self.episodes])
        windows = np.maximum(lengths - length + 1, 0)
        if windows.sum() == 0:
            raise RuntimeError(f"no stored episode has {length} steps yet (stored lengths: {lengths.tolist()})")
        ep_idx = self.rng.choice(len(self.episodes), size=batch_size, p=windows / windows.sum())
        starts = self.rng.integers(0, windows[ep_idx])
        batch = {
            k: np.stack([self.episodes[e][k][s : s + length] for e, s in zip(ep_idx, starts)])
            for k in self.episodes[0]
        }
        return {k: to_device(v, self.device) for k, v in batch.items()}

    def state_dict(self) -> dict:
        """The stored episodes (zlib-compressed: uint8 frames shrink several times) and the sampling RNG. Episodes
        still open are left out: a resumed run resets its environments and starts new ones."""
        return {"episodes": [{k: pack_array(v) for k, v in e.items()} for e in self.episodes],
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.episodes, self.open, self.num_steps = [], {}, 0
        for packed in state["episodes"]:
            self.add_episode({k: unpack_array(v).copy() for k, v in packed.items()})
        self.rng.bit_generator.state = state["rng"]
