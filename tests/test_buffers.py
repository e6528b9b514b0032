"""common/buffers.py: transition ring buffer and episode-sequence buffer."""

import numpy as np
import pytest
import torch

from common import EpisodeBuffer, ReplayBuffer


def make_replay(capacity=5):
    fields = {"obs": ((2,), np.float32), "action": ((1,), np.float32), "reward": ((), np.float32), "flag": ((), np.bool_)}
    return ReplayBuffer(capacity, fields, seed=0)


def test_replay_buffer_wraps_around_and_samples_shapes():
    buf = make_replay(5)
    for start in (0, 3, 6):  # three adds of 3, 3 and 1 rows: 7 rows in a buffer of 5
        n = 3 if start < 6 else 1
        ids = np.arange(start, start + n, dtype=np.float32)
        buf.add(obs=np.stack([ids, -ids], 1), action=ids[:, None], reward=ids, flag=ids % 2 == 0)
    assert len(buf) == 5
    assert sorted(buf.data["reward"].tolist()) == [2, 3, 4, 5, 6]  # rows 0 and 1 were overwritten
    batch = buf.sample(64)
    assert batch["obs"].shape == (64, 2) and batch["action"].shape == (64, 1) and batch["reward"].shape == (64,)
    assert batch["obs"].dtype == torch.float32 and batch["flag"].dtype == torch.bool
    torch.testing.assert_close(batch["obs"][:, 1], -batch["reward"])  # fields of a row stay together
    assert set(batch["reward"].tolist()) <= {2.0, 3.0, 4.0, 5.0, 6.0}


def test_replay_buffer_rejects_missing_fields_and_bad_capacity():
    buf = make_replay()
    with pytest.raises(KeyError, match="missing fields"):
        buf.add(obs=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="capacity must be positive"):
        make_replay(0)
    with pytest.raises(RuntimeError, match="empty"):
        buf.sample(1)


def fill_episodes(buf, lengths_per_env):
    """Interleave steps of several envs; each step stores (episode id, step index)."""
    episode_id = 0
    ids = {}
    for env, lengths in lengths_per_env.items():
        ids[env] = []
        for length in lengths:
            ids[env].append((episode_id, length))
            episode_id += 1
    cursors = {env: [0, 0] for env in lengths_per_env}  # (episode index, step)
    active = True
    while active:
        active = False
        for env in lengths_per_env:
            k, t = cursors[env]
            if k >= len(ids[env]):
                continue
            active = True
            eid, length = ids[env][k]
            buf.add({"ep": eid, "t": t, "obs": np.full((3, 4, 4), t, np.uint8)}, env_index=env, done=t == length - 1)
            cursors[env] = [k + 1, 0] if t == length - 1 else [k, t + 1]


def test_episode_buffer_sequences_stay_inside_one_episode():
    buf = EpisodeBuffer(capacity_steps=10_000, seed=0)
    fill_episodes(buf, {0: [12, 3, 20], 1: [7, 15]})
    assert len(buf) == 57 and len(buf.episodes) == 5
    batch = buf.sample(256, length=6)
    assert batch["obs"].shape == (256, 6, 3, 4, 4) and batch["obs"].dtype == torch.uint8
    ep, t = batch["ep"], batch["t"]
    assert torch.all(ep == ep[:, :1])  # one episode per row
    assert torch.all(t[:, 1:] - t[:, :-1] == 1)  # consecutive steps
    assert 1 not in ep.tolist()  # the 3-step episode (id 1) is shorter than 6 and never sampled
    lengths = {0: 12, 2: 20, 3: 7, 4: 15}
    assert all(int(t[i, -1]) < lengths[int(ep[i, 0])] for i in range(len(ep)))
    assert set(ep[:, 0].tolist()) == {0, 2, 3, 4}


def test_episode_buffer_unfinished_episodes_and_capacity():
    buf = EpisodeBuffer(capacity_steps=25, seed=0)
    fill_episodes(buf, {0: [10, 10, 10]})
    assert [int(e["ep"][0]) for e in buf.episodes] == [1, 2]  # the oldest episode was dropped
    assert len(buf) == 20
    buf.add({"ep": 9, "t": 0, "obs": np.zeros((3, 4, 4), np.uint8)}, env_index=3)  # still open
    assert 9 not in buf.sample(64, 5)["ep"].tolist()
    with pytest.raises(RuntimeError, match="no stored episode has 11 steps"):
        buf.sample(4, 11)
