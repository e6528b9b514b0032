"""Tests of anoseqs.py: the window labels, threshold, shaped reward, ROC AUC and autoencoder by hand; each stage as a user runs it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, read_scalars, run_dirs, run_script, run_until_killed

import anoseqs

# --------------------------------------------------------------------------------------------------
# Unit tests: the parts the paper is about
# --------------------------------------------------------------------------------------------------


def hand_made_source():
    """Two episodes: A = rows 0-4 with a cost on its last row 4; B = rows 5-9, terminated at row 9."""
    cost = np.array([0, 0, 0, 0, 1, 0, 0, 0, 0, 0], dtype=np.float32)
    terminal = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=bool)
    episode_start = np.array([0, 0, 0, 0, 0, 5, 5, 5, 5, 5])
    return cost, terminal, episode_start


def test_window_labels_on_hand_made_episodes():
    cost, terminal, start = hand_made_source()
    ends, safe = anoseqs.label_windows(cost, terminal, start, window=3)
    assert ends.tolist() == list(range(10))
    # row 4 has a cost: only windows containing it are unsafe; row 5 starts episode B, whose windows never
    # reach back into A (the window ending at 5 is [5, 5, 5], safe); row 9 is a termination (ended early)
    assert safe.tolist() == [True, True, True, True, False, True, True, True, True, False]
    idx = anoseqs.window_indices(start, np.array([0, 1, 4, 5, 6, 9]), 3)
    assert idx.tolist() == [[0, 0, 0], [0, 0, 1], [2, 3, 4], [5, 5, 5], [5, 5, 6], [7, 8, 9]]


def test_window_labels_cost_in_the_middle_and_stride():
    cost = np.zeros(8, dtype=np.float32)
    cost[3] = 0.5
    start = np.zeros(8, dtype=int)
    ends, safe = anoseqs.label_windows(cost, np.zeros(8, dtype=bool), start, window=3)
    # windows ending at 3, 4, 5 contain row 3
    assert safe.tolist() == [True, True, True, False, False, False, True, True]
    ends, safe = anoseqs.label_windows(*hand_made_source(), window=3, stride=2)
    assert ends.tolist() == [0, 2, 4, 5, 7, 9]  # every 2nd row counted from each episode's start
    assert safe.tolist() == [True, True, False, True, True, False]


def test_split_episodes_keeps_whole_episodes_on_each_side():
    _, _, start = hand_made_source()
    ends = np.arange(10)
    held = anoseqs.split_episodes(start, ends, 0.5, np.random.default_rng(0))
    assert held[:5].all() != held[5:].all()  # one episode held out, the other not
    assert len(set(held[:5])) == 1 and len(set(held[5:])) == 1
    with pytest.raises(SystemExit, match="at least 2"):
        anoseqs.split_episodes(np.zeros(4, dtype=int), np.arange(4), 0.5, np.random.default_rng(0))


def test_percentile_threshold_by_hand():
    # 1..100: the 99th percentile sits at position 0.99 * 99 = 98.01 -> 99 + 0.01 * (100 - 99)
    assert anoseqs.percentile_threshold(np.arange(1, 101), 99) == pytest.approx(99.01)
    assert anoseqs.percentile_threshold(np.array([10.0, 0.0]), 50) == pytest.approx(5.0)
    assert anoseqs.percentile_threshold(np.array([3.0, 1.0, 2.0]), 100) == pytest.approx(3.0)


def test_shaped_reward_on_hand_made_scores():
    reward = torch.tensor([1.0, 1.0, 1.0, 1.0])
    score = torch.tensor([0.1, 0.4, 0.5, 0.9])
    out = anoseqs.shaped_reward(reward, score, threshold=0.4, coef=2.0, form="proportional")
    # at or below the threshold: untouched; above: r - 2 * score
    assert out.tolist() == pytest.approx([1.0, 1.0, 0.0, -0.8])
    out = anoseqs.shaped_reward(reward, score, threshold=0.4, coef=2.0, form="binary")
    assert out.tolist() == pytest.approx([1.0, 1.0, -1.0, -1.0])
    assert anoseqs.shaped_reward(reward, score, threshold=0.4, coef=0.0, form="proportional").tolist() == reward.tolist()


def test_roc_auc_hand_example():
    neg, pos = np.array([0.1, 0.4, 0.35]), np.array([0.8, 0.4])
    # pairs (pos > neg = 1, tie = 1/2): 0.8 beats all 3; 0.4 beats 0.1 and 0.35 and ties 0.4 -> (3 + 2.5) / 6
    assert anoseqs.roc_auc(neg, pos) == pytest.approx(5.5 / 6)
    assert anoseqs.roc_auc(np.array([0.0, 1.0]), np.array([2.0, 3.0])) == 1.0
    assert anoseqs.roc_auc(np.array([2.0, 3.0]), np.array([0.0, 1.0])) == 0.0
    assert anoseqs.roc_auc(np.ones(4), np.ones(3)) == 0.5
    assert np.isnan(anoseqs.roc_auc(np.ones(4), np.zeros(0)))
    # against the O(n^2) pair count on random data with ties
    rng = np.random.default_rng(0)
    neg, pos = rng.integers(0, 10, 50).astype(float), rng.integers(3, 13, 40).astype(float)
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
    assert anoseqs.roc_auc(neg, pos) == pytest.approx(pairs)


def test_minmax_stats():
    lo, scale = anoseqs.minmax_stats(np.array([[0.0, 2.0, 5.0], [4.0, 2.0, 7.0]]))
    assert lo.tolist() == [0.0, 2.0, 5.0] and scale.tolist() == [4.0, 1.0, 2.0]  # a constant feature gets range 1


def test_autoencoder_learns_safe_sequences_and_separates_an_anomaly():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # small networks: one thread is fastest (and the machine is shared)
    rng = np.random.default_rng(0)
    W, D = 10, 3

    def sines(n):  # smooth safe sequences: sines of random phase and slightly varying frequency
        t = np.arange(W)[None, :, None]
        phase = rng.uniform(0, 2 * np.pi, (n, 1, D))
        freq = rng.uniform(0.5, 0.7, (n, 1, D))
        return np.sin(freq * t + phase).astype(np.float32)

    train, test = sines(2048), sines(256)
    anomalous = test.copy()
    anomalous[:, 5, 0] += 3.0  # an obvious spike in the middle of the window
    lo, scale = anoseqs.minmax_stats(train.reshape(-1, D))
    model = anoseqs.TransformerAutoencoder(D, W, d_model=32, heads=4, layers=1, latent_dim=16, lo=lo, scale=scale)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    train_t = torch.as_tensor(train)
    first = None
    for step in range(300):
        loss = anoseqs.anomaly_score(model, train_t[torch.randint(len(train_t), (128,))]).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        safe_scores = anoseqs.anomaly_score(model, torch.as_tensor(test)).numpy()
        bad_scores = anoseqs.anomaly_score(model, torch.as_tensor(anomalous)).numpy()
    # inputs live in [0, 1] after normalisation; a mean abs error of 0.05 is a 5% error
    print(f"first loss {first:.4f}, held-out safe score {safe_scores.mean():.4f}, anomalous {bad_scores.mean():.4f}")
    assert safe_scores.mean() < 0.05 < first
    threshold = anoseqs.percentile_threshold(safe_scores, 99)
    assert (bad_scores > threshold).mean() > 0.95
    assert anoseqs.roc_auc(safe_scores, bad_scores) > 0.99


def test_detector_splits_auc_classes_are_the_held_out_episodes_windows():
    """The ROC AUC's positives are exactly the unsafe windows of held-out episodes (and its negatives their safe
    windows), with and without the warm-up windows; checked against a window-by-window loop."""
    rng = np.random.default_rng(3)
    lengths = [7, 9, 6, 8, 10, 7]
    start = np.repeat(np.cumsum([0] + lengths[:-1]), lengths)
    n = len(start)
    cost = (rng.random(n) < 0.12).astype(np.float32)
    cost[start == np.arange(n)] = 0  # reset rows have no cost
    terminal = np.zeros(n, bool)
    terminal[np.cumsum(lengths)[1] - 1] = True  # episode 2 ended early
    warmup = np.arange(n) < 25  # the first 25 rows were recorded during the random warm-up (into episode 4)
    data = {"cost": cost, "terminal": terminal, "warmup": warmup, "episode_start": start}
    W = 3
    splits = anoseqs.detector_splits(data, W, 2, 0.5, False, np.random.default_rng(0))
    held_episodes = set(start[anoseqs.split_episodes(start, np.arange(n), 0.5, np.random.default_rng(0))])
    expected = {k: [] for k in ("train", "threshold", "safe_policy", "unsafe_policy", "safe_all", "unsafe_all")}
    for end in range(n):
        rows = [max(r, start[end]) for r in range(end - W + 1, end + 1)]
        unsafe = any(cost[r] > 0 or terminal[r] for r in rows)
        warm = any(warmup[r] for r in rows)
        held = start[end] in held_episodes
        if held:
            expected["unsafe_all" if unsafe else "safe_all"].append(end)
            if not warm:
                expected["unsafe_policy" if unsafe else "safe_policy"].append(end)
                if not unsafe:
                    expected["threshold"].append(end)
        elif not unsafe and not warm and (end - start[end]) % 2 == 0:
            expected["train"].append(end)
    assert 0 < len(held_episodes) < len(lengths)
    for name, ends in expected.items():
        assert splits[name].tolist() == ends, name
    assert len(expected["unsafe_policy"]) and len(expected["safe_policy"]) < len(expected["safe_all"])
    # --detector-windows all: the warm-up windows train the detector and set the threshold too
    keep = anoseqs.detector_splits(data, W, 2, 0.5, True, np.random.default_rng(0))
    assert keep["threshold"].tolist() == expected["safe_all"]
    assert set(keep["train"]) > set(expected["train"])


def test_autoencoder_score_of_the_last_state():
    torch.manual_seed(0)
    model = anoseqs.TransformerAutoencoder(3, 4, 8, 2, 1, 4, lo=np.zeros(3), scale=np.full(3, 2.0)).eval()
    x = torch.rand(5, 4, 3)
    with torch.no_grad():
        error = (model(x / 2.0) - x / 2.0).abs()  # normalised by scale 2
        assert torch.allclose(anoseqs.anomaly_score(model, x, "window"), error.mean(dim=(1, 2)))
        assert torch.allclose(anoseqs.anomaly_score(model, x, "last"), error[:, -1].mean(-1))
        model.score_on = "last"
        assert torch.allclose(model.score(x), error[:, -1].mean(-1))


def test_nearest_neighbour_score_by_hand():
    lo, scale = np.array([0.0, 1.0]), np.array([2.0, 2.0])
    memory_raw = np.array([[[0, 1], [2, 3]], [[2, 1], [0, 1]], [[1, 2], [1, 2]]], dtype=np.float32)  # 3 windows, W=2
    memory = torch.as_tensor((memory_raw - lo) / scale, dtype=torch.float32)
    query = np.array([[[0, 1], [2, 2]], [[1, 1.5], [1, 2.5]]], dtype=np.float32)
    for score_on in ("window", "last"):
        nn_det = anoseqs.NearestNeighbourDetector(2, 2, 3, lo, scale, memory, score_on)
        got = nn_det.score(torch.as_tensor(query)).numpy()
        for q, g in zip(query, got):
            a = (q - lo) / scale
            b = (memory_raw - lo) / scale
            if score_on == "last":
                a, b = a[-1:], b[:, -1:]
            dists = [np.sqrt(((a - m) ** 2).sum() / a.size) for m in b]
            assert g == pytest.approx(min(dists), abs=1e-6)
    # a window of the memory itself scores 0
    nn_det = anoseqs.NearestNeighbourDetector(2, 2, 3, lo, scale, memory)
    assert nn_det.score(torch.as_tensor(memory_raw[1:2])).item() == pytest.approx(0.0, abs=1e-6)


def test_to_host_is_one_copy_of_several_tensors(monkeypatch):
    calls = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: calls.append(1) or real_cpu(self, *a, **k))
    a, r = torch.arange(6.0).view(3, 2), torch.tensor([0.5, -1.0, 2.0])
    actions, rewards = anoseqs.to_host(a, r)
    assert len(calls) == 1
    assert actions.shape == (3, 2) and actions.tolist() == a.tolist() and rewards.tolist() == r.tolist()


def test_warning_before_stage_3_when_the_detector_ranks_unsafe_below_safe(capsys):
    anoseqs.warn_about_detector(0.41)
    assert "WARNING" in capsys.readouterr().out
    anoseqs.warn_about_detector(float("nan"))
    assert "undefined" in capsys.readouterr().out
    anoseqs.warn_about_detector(0.8)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------------------------------
# run_td3 on a counting environment: what is recorded, stored and read back, step by step
# --------------------------------------------------------------------------------------------------


class CountingEnv:
    """obs = (env index, episode number, step t in the episode); reward = 10 * index + t; cost depends on the
    observation it comes with: 1 when (t + episode) % 3 == 0 (t > 0). Env 1 terminates at t = 4, all envs are
    truncated at t = 6, so a run of two envs holds terminations, truncations and auto-resets."""

    def __new__(cls, index: int):
        import gymnasium as gym

        class _Env(gym.Env):
            observation_space = gym.spaces.Box(-np.inf, np.inf, (3,), np.float64)
            action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

            def __init__(self):
                self.index, self.episode, self.t = index, -1, 0
                self.spec = gym.envs.registration.EnvSpec("Counting-v0", max_episode_steps=6)

            def obs(self):
                return np.array([self.index, self.episode, self.t], dtype=np.float64)

            def reset(self, seed=None, options=None):
                super().reset(seed=seed)
                self.episode, self.t = self.episode + 1, 0
                return self.obs(), {}

            def step(self, action):
                self.t += 1
                cost = float((self.t + self.episode) % 3 == 0)
                terminated = self.index == 1 and self.t == 4
                return self.obs(), 10.0 * self.index + self.t, terminated, self.t == 6, {"cost": cost}

        return _Env()


def counting_cost(obs: np.ndarray) -> float:
    return float(obs[2] > 0 and (obs[2] + obs[1]) % 3 == 0)


@pytest.fixture
def counting_envs(monkeypatch, tmp_path):
    import gymnasium as gym

    from common.envs import EpisodeStatistics, SafeVectorEnv

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)

    def make(env_id, num_envs, seed, **kwargs):
        return SafeVectorEnv(gym.vector.SyncVectorEnv([lambda i=i: EpisodeStatistics(CountingEnv(i)) for i in range(num_envs)]))

    monkeypatch.setattr(anoseqs, "make_vector_env", make)
    stored = []

    class RecordingBuffer(anoseqs.ReplayBuffer):
        def add(self, **rows):
            stored.append({k: np.array(v, copy=True) for k, v in rows.items()})
            super().add(**rows)

    monkeypatch.setattr(anoseqs, "ReplayBuffer", RecordingBuffer)
    return stored


def tiny_args(**kw):
    base = dict(num_envs=2, learning_starts=10, hidden_size=8, batch_size=4, buffer_size=1000, log_every=1000,
                eval_episodes=0)
    return anoseqs.Args(**{**base, **kw})


def test_each_recorded_row_holds_the_cost_of_its_own_observation(counting_envs):
    from common import Logger

    args = tiny_args()
    logger = Logger("record", args, quiet=True)
    _, _, data, _ = anoseqs.run_td3(args, "counting", 40, logger, torch.device("cpu"), seed=0, record=True)
    logger.close()
    obs, start = data["obs"], data["episode_start"]
    first = start == np.arange(len(obs))
    assert first.sum() >= 8  # 2 envs x 20 steps, episodes of 4 and 6 steps (the last unfinished ones included)
    for i in range(len(obs)):
        if first[i]:  # the reset observation: t = 0, no cost
            assert obs[i, 2] == 0 and data["cost"][i] == 0 and not data["terminal"][i]
        else:  # the same env and episode as the row before, one step later, with the cost that step gave
            assert obs[i, :2].tolist() == obs[i - 1, :2].tolist() and obs[i, 2] == obs[i - 1, 2] + 1
            assert data["cost"][i] == counting_cost(obs[i]), i
            assert data["terminal"][i] == (obs[i, 0] == 1 and obs[i, 2] == 4)
    assert data["terminal"].sum() >= 3 and (obs[:, 2] == 6).sum() >= 2  # terminations and truncations were recorded
    # 40 steps / 2 envs: vector steps 1..5 (global steps <= 10) are the random warm-up: the 2 first reset rows,
    # 2 x 5 step rows, and the reset row of env 1 after its termination at t = 4
    assert data["warmup"].sum() == 2 + 10 + 1
    assert not data["warmup"][(obs[:, 1] >= 2)].any()  # later episodes hold no warm-up row
    assert all((obs[:, 0] == e).sum() == 20 + (first & (obs[:, 0] == e)).sum() for e in (0, 1))


class ThreeStepDetector:
    """A stand-in detector (W = 3) whose score tells which rows, in which order, make the window."""
    window, obs_dim = 3, 3

    def score(self, windows):  # rows oldest first: t_oldest, t_middle, t_newest
        return 0.01 * windows[:, 0, 2] + 0.001 * windows[:, 1, 2] + 0.1 * windows[:, 2, 2] + 0.0001 * windows[:, 2, 1]


def test_stored_reward_is_shaped_by_the_window_ending_at_the_next_observation(counting_envs):
    """r' = r - lambda s 1[s > threshold], s the score of (s_{t-1}, s_t, s_{t+1}) left-padded with the episode's s_0,
    for two envs with terminations, truncations and auto-resets."""
    from common import Logger

    stored = counting_envs
    args = tiny_args(penalty_coef=2.0)
    logger = Logger("shape", args, quiet=True)
    anoseqs.run_td3(args, "counting", 60, logger, torch.device("cpu"), seed=0, method="anoseqs",
                    detector=ThreeStepDetector(), threshold=0.25)
    logger.close()
    assert len(stored) == 30
    flagged = 0
    for rows in stored:
        for nxt, reward, o in zip(rows["next_obs"], rows["reward"], rows["obs"]):
            t, episode = nxt[2], nxt[1]
            s = 0.01 * max(t - 2, 0) + 0.001 * max(t - 1, 0) + 0.1 * t + 0.0001 * episode
            raw = 10 * nxt[0] + t
            expected = raw - 2.0 * s * (s > 0.25)
            flagged += s > 0.25
            assert reward == pytest.approx(expected, abs=1e-5), (nxt, reward, expected)
            assert o[2] == t - 1 and o[1] == episode  # the transition s_t -> s_{t+1} of one episode
    assert 0 < flagged < 60


def test_oracle_shaping_stores_the_reward_minus_the_true_cost(counting_envs):
    from common import Logger

    stored = counting_envs
    args = tiny_args(cost_penalty_coef=0.5)
    logger = Logger("oracle", args, quiet=True)
    anoseqs.run_td3(args, "counting", 30, logger, torch.device("cpu"), seed=0, method="oracle-shaping")
    logger.close()
    for rows in stored:
        for nxt, reward, cost in zip(rows["next_obs"], rows["reward"], rows["cost"]):
            assert cost == counting_cost(nxt)
            assert reward == pytest.approx(10 * nxt[0] + nxt[2] - 0.5 * cost)
    assert sum(rows["cost"].sum() for rows in stored) > 0


def test_scoring_timer_counts_the_device_time_not_only_the_host_call(monkeypatch):
    """On a GPU the host queues the scoring kernels and returns; the device finishes later, and the stage used to
    stop its timer before that (simulated here: each scoring leaves 20 ms of device work behind)."""
    device_busy_until = [0.0]

    class FakeEvent:  # a CUDA event on the simulated device: reached when the device has finished its queue
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = max(time.perf_counter(), device_busy_until[0])

        def synchronize(self):
            time.sleep(max(0.0, self.t - time.perf_counter()))

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    class QueuedDetector(ThreeStepDetector):
        def score(self, windows):
            device_busy_until[0] = max(time.perf_counter(), device_busy_until[0]) + 0.02  # 20 ms of kernels queued
            return super().score(windows)

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    obs = np.zeros((2, 3))
    scorer = anoseqs.WindowScorer(QueuedDetector(), 0.25, obs, 1.0, "proportional", torch.device("cpu"), 20)
    scorer.timer.events = True  # as on a CUDA device
    host = time.perf_counter()
    for _ in range(5):
        scorer.step(np.zeros(2), obs, obs, np.zeros(2, bool))
    host = time.perf_counter() - host
    total = scorer.timer.total()
    assert total >= 5 * 0.02 * 0.99 and total > host  # the device's time is counted, not just the host's call
    # and on the CPU (no events) the timer is the host's wall time around the scoring
    cpu = anoseqs.ScoringTimer(torch.device("cpu"))
    with cpu:
        time.sleep(0.01)
    assert cpu.total() >= 0.01


SYNCS = ("cpu", "item", "__bool__", "__int__", "__float__", "tolist")


def count_reads(monkeypatch) -> dict:
    """Count the device->host reads (cpu, item, bool, int, float, tolist) made by anoseqs.py and common/."""
    counts = dict.fromkeys(SYNCS, 0)
    ours = (anoseqs.__file__, str(REPO / "common"))

    def counted(name, real):
        def wrapped(self, *a, **k):
            if sys._getframe(1).f_code.co_filename.startswith(ours):
                counts[name] += 1
            return real(self, *a, **k)
        return wrapped

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
    return counts


@pytest.mark.parametrize("method", ["anoseqs", "td3-lag"])
def test_one_device_to_host_read_per_env_step(counting_envs, method):
    """Each env step reads the device once (the action, with the shaped reward for AnoSeqs), as CleanRL; the NaN
    check, the multiplier and the counters stay on the device until the log line. Runs of 60 and 120 steps with one
    log line each must differ by exactly one read per extra vector step."""
    from common import Logger

    reads = []
    for steps in (60, 120):
        with pytest.MonkeyPatch.context() as mp:
            counts = count_reads(mp)
            args = tiny_args(log_every=10_000, learning_starts=20)
            logger = Logger(f"reads{steps}", args, quiet=True)
            detector = ThreeStepDetector() if method == "anoseqs" else None
            anoseqs.run_td3(args, "counting", steps, logger, torch.device("cpu"), seed=0, method=method,
                            detector=detector, threshold=0.25)
            logger.close()
            reads.append(dict(counts))
    extra = {k: reads[1][k] - reads[0][k] for k in SYNCS}
    assert extra == {**dict.fromkeys(SYNCS, 0), "cpu": 30}, reads


# --------------------------------------------------------------------------------------------------
# Bad input: a clear message, no traceback
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--total-timesteps", "0"], "--total-timesteps must be positive"),
    (["--stage", "4"], "--stage must be one of all, 1, 2, 3"),
    (["--penalty-form", "square"], "--penalty-form must be one of proportional, binary"),
    (["--stage", "3"], "needs a trained detector"),
    (["--method", "ppo"], "--method must be one of anoseqs, td3, td3-lag, oracle-shaping"),
    (["--method", "td3-lag", "--stage", "1"], "--method td3-lag does not use"),
    (["--detector", "lstm"], "--detector must be one of autoencoder, nearest-neighbour"),
    (["--stage", "2", "--source-run", "nowhere"], "holds no source_data.npz"),
    (["--resume", "runs/nowhere"], "--resume runs/nowhere: no such run directory"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--capture-video", "--eval-episodes", "0"], "--capture-video records the final evaluation episodes"),
    (["--env-id", "SafetyPointGaol1"], "Closest valid ids: SafetyPointGoal1"),
    (["--noise-clip", "-0.5"], "--noise-clip must be >= 0"),
    (["--policy-noise", "-0.2"], "--policy-noise must be >= 0"),
    (["--exploration-noise", "-0.1"], "--exploration-noise must be >= 0"),
    # refused before stage 1, not after stages 1 and 2 (Goal0 has no hazard/vase lidar: 28 values, Goal1 60)
    (["--env-id", "SafetyPointGoal1", "--source-env-id", "SafetyPointGoal0"], "gives observations of size 28"),
    # a Vision id ran silently on the state observations of the same task
    (["--env-id", "SafetyPointGoal1Vision"], "AnoSeqs works on state observations"),
    (["--env-id", "SafetyPointGoal1", "--source-env-id", "SafetyPointGoal1Vision"], "drop 'Vision'"),
])
def test_bad_input_is_rejected_clearly(tmp_path, args, message):
    proc = subprocess.run([sys.executable, str(REPO / "anoseqs.py"), *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------------
# Smoke tests: each stage and the whole pipeline, as a user runs them
# --------------------------------------------------------------------------------------------------

TINY = ["--env-id", "SafetyPointCircle1", "--num-envs", "2", "--source-timesteps", "1000", "--total-timesteps", "1000",
        "--learning-starts", "200", "--hidden-size", "16", "--batch-size", "16", "--detector-steps", "20",
        "--detector-d-model", "16", "--detector-heads", "2", "--detector-latent-dim", "8",
        "--detector-batch-size", "32", "--log-every", "400", "--eval-episodes", "1", "--no-cuda"]
TD3_TAGS = {"charts/episodic_return", "charts/episodic_cost", "charts/episodic_length", "charts/cost_rate", "charts/SPS",
            "losses/qf1_loss", "losses/qf2_loss", "losses/actor_loss", "eval/episodic_return", "eval/episodic_cost"}
DETECTOR_TAGS = {"detector/charts/anomaly_threshold", "detector/charts/detector_roc_auc",
                 "detector/charts/detector_roc_auc_with_warmup"}
AUTOENCODER_TAGS = {"detector/losses/detector_loss", "detector/losses/detector_heldout_loss",
                    "detector/charts/nearest_neighbour_roc_auc", "detector/charts/nearest_neighbour_roc_auc_with_warmup"}
SHAPING_TAGS = {"charts/penalised_fraction", "charts/anomaly_score_mean", "charts/scoring_time_fraction",
                "charts/target_roc_auc", "charts/anomaly_threshold"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("anoseqs_all")
    proc = run_script("anoseqs.py", *TINY, "--save-model", "--capture-video", "--video-size", "64", cwd=cwd)
    (run,) = run_dirs(cwd)
    return cwd, run, proc


def test_smoke_pipeline_all_stages(pipeline):
    cwd, run, proc = pipeline
    scalars = read_scalars(run)
    missing = (TD3_TAGS | DETECTOR_TAGS | AUTOENCODER_TAGS | SHAPING_TAGS | {"source/charts/cost_rate"}) - set(scalars)
    assert not missing, f"missing tags: {sorted(missing)}"
    for name in ("source_data.npz", "detector.pt", "anoseqs.cleanrl_model", "checkpoint.pt", "summary.json",
                 "videos/eval-episode-0.mp4"):
        assert (run / name).is_file(), name
    assert "ROC AUC on held-out episodes" in proc.stdout and "stage 3: anoseqs in the target" in proc.stdout
    # the plan, first: every stage with its budget, so --total-timesteps 1000 does not hide stage 1's own budget
    plan = proc.stdout.index("plan: stage 1: TD3 in SafetyPointCircle1-v0 for 1000 steps (--source-timesteps)")
    assert plan < proc.stdout.index("\nstage 1: TD3")  # before stage 1 starts
    assert "then stage 3: anoseqs in SafetyPointCircle1-v0 for 1000 steps (--total-timesteps)" in proc.stdout
    # charts/cost_rate is written once per console line (every 400 steps and at the end), not at every env step
    assert [s for s, _ in scalars["charts/cost_rate"]] == [400, 800, 1000]
    assert [s for s, _ in scalars["source/charts/cost_rate"]] == [400, 800, 1000]
    frac = [v for _, v in scalars["charts/penalised_fraction"]]
    assert all(0.0 <= f <= 1.0 for f in frac)
    assert scalars["charts/cost_rate"][-1][0] == 1000  # the last step logged is the budget
    # TD3's delayed policy update: one actor update every policy_frequency (2) critic updates, not every step;
    # 400 critic updates (steps 202..1000 with 2 envs) -> 200 actor updates
    assert scalars["charts/actor_updates_per_critic_update"][-1][1] == pytest.approx(0.5)
    with np.load(run / "source_data.npz") as f:
        assert f["obs"].shape == (1000 + 2, 28)  # 2 envs x (reset row + 500 steps); the empty new episodes dropped
        assert f["episode_start"].tolist().count(0) == 501
        assert f["warmup"].sum() == 2 * (1 + 100)  # the reset rows and global steps <= 200 (100 vector steps)


def test_smoke_stage2_then_stage3_reuse_artefacts(pipeline, tmp_path):
    """Stage 2 alone (the nearest-neighbour detector, scoring the last state), then stage 3 alone from its
    detector.pt, whose ROC AUC is then set below 0.5: stage 3 must warn before it starts."""
    _, run, _ = pipeline
    run_script("anoseqs.py", *TINY, "--stage", "2", "--source-run", str(run), "--detector", "nearest-neighbour",
               "--score-on", "last", cwd=tmp_path)
    (detector_run,) = run_dirs(tmp_path)
    assert (detector_run / "detector.pt").is_file()
    assert not (detector_run / "source_data.npz").exists()
    assert DETECTOR_TAGS <= set(read_scalars(detector_run))
    ckpt = torch.load(detector_run / "detector.pt", weights_only=False)
    assert ckpt["config"]["kind"] == "nearest-neighbour" and ckpt["config"]["score_on"] == "last"
    ckpt["config"]["roc_auc_policy"] = 0.3
    torch.save(ckpt, detector_run / "detector.pt")
    proc = run_script("anoseqs.py", *TINY, "--stage", "3", "--source-run", str(detector_run),
                      "--penalty-form", "binary", "--eval-episodes", "0", cwd=tmp_path)
    (target_run,) = [r for r in run_dirs(tmp_path) if r != detector_run]
    scalars = read_scalars(target_run)
    assert (TD3_TAGS - {"eval/episodic_return", "eval/episodic_cost"} | SHAPING_TAGS) <= set(scalars)
    assert not any(k.startswith(("source/", "detector/")) for k in scalars)
    assert "nearest-neighbour detector from" in proc.stdout and "score on the last" in proc.stdout
    assert "WARNING: the detector's ROC AUC on held-out episodes is 0.300 < 0.5" in proc.stdout
    assert proc.stdout.index("WARNING") < proc.stdout.index("stage 3: anoseqs in the target")


def test_smoke_stage1_alone(tmp_path):
    args = [a for a in TINY]
    run_script("anoseqs.py", *args, "--stage", "1", "--source-timesteps", "600", "--num-envs", "1", cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    assert (run / "source_data.npz").is_file() and not (run / "detector.pt").exists()
    scalars = read_scalars(run)
    assert {"source/charts/episodic_return", "source/charts/cost_rate", "source/losses/actor_loss"} <= set(scalars)


def test_smoke_baseline_td3_lag(tmp_path):
    run_script("anoseqs.py", *TINY, "--method", "td3-lag", "--exp-name", "td3_lag", cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    scalars = read_scalars(run)
    assert (TD3_TAGS | {"charts/lagrange_multiplier", "losses/qc_loss"}) <= set(scalars)
    assert not (run / "detector.pt").exists() and "charts/penalised_fraction" not in scalars
    assert all(v >= 0 for _, v in scalars["charts/lagrange_multiplier"])


def test_a_detector_file_that_is_no_detector_is_refused_clearly(tmp_path):
    """--stage 3 --source-run <dir> whose detector.pt is truncated, foreign or incomplete: a message, no traceback."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "detector.pt").write_bytes(b"truncated")
    with pytest.raises(SystemExit, match="is not a detector saved by stage 2.*cannot read it"):
        anoseqs.load_detector(str(bad / "detector.pt"), torch.device("cpu"))
    torch.save({"model": {}, "tau": 0.1}, bad / "detector.pt")  # an older file: no threshold, no config
    with pytest.raises(SystemExit, match="lacks the model, threshold or config"):
        anoseqs.load_detector(str(bad / "detector.pt"), torch.device("cpu"))
    # complete, matching files load and score like the saved models (both kinds)
    model = anoseqs.TransformerAutoencoder(3, 4, 8, 2, 1, 4, score_on="last")
    config = {"kind": "autoencoder", "obs_dim": 3, "window_length": 4, "d_model": 8, "heads": 2, "layers": 1,
              "latent_dim": 4, "score_on": "last", "source_env_id": "SafetyPointCircle1-v0", "roc_auc_policy": 0.7}
    torch.save({"model": model.state_dict(), "threshold": 0.25, "config": config}, tmp_path / "detector.pt")
    loaded, threshold, _ = anoseqs.load_detector(str(tmp_path / "detector.pt"), torch.device("cpu"))
    x = torch.rand(5, 4, 3)
    model.eval()
    assert threshold == 0.25 and torch.allclose(loaded.score(x), model.score(x))
    nn_det = anoseqs.NearestNeighbourDetector(3, 4, 6, np.zeros(3), np.ones(3), torch.rand(6, 4, 3))
    nn_config = {**config, "kind": "nearest-neighbour", "memory_size": 6, "score_on": "window"}
    torch.save({"model": nn_det.state_dict(), "threshold": 0.1, "config": nn_config}, tmp_path / "detector.pt")
    loaded, _, _ = anoseqs.load_detector(str(tmp_path / "detector.pt"), torch.device("cpu"))
    assert torch.allclose(loaded.score(x), nn_det.score(x))
    # weights that do not fit the config
    torch.save({"model": model.state_dict(), "threshold": 0.25, "config": {**config, "d_model": 16}}, bad / "detector.pt")
    with pytest.raises(SystemExit, match="do not match its config"):
        anoseqs.load_detector(str(bad / "detector.pt"), torch.device("cpu"))
    # as a user runs it
    (bad / "detector.pt").write_bytes(b"truncated")
    proc = subprocess.run([sys.executable, str(REPO / "anoseqs.py"), "--stage", "3", "--source-run", str(bad)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is not a detector saved by stage 2" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


def test_sps_counts_only_the_stage_being_run(tmp_path, monkeypatch):
    """With --stage all the stage-3 logger exists while stages 1 and 2 run; its SPS must not count their time."""
    from common import Logger

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    args = anoseqs.Args(learning_starts=20, hidden_size=8, batch_size=8, buffer_size=500, log_every=40,
                        eval_episodes=0)
    logger = Logger("sps", args, quiet=True)
    logger.start_time -= 1e6  # as if stages 1 and 2 had taken a very long time before stage 3
    anoseqs.run_td3(args, "SafetyPointCircle1", 40, logger, torch.device("cpu"), seed=0)
    logger.close()
    (sps,) = [v for _, v in read_scalars(tmp_path / "runs" / "sps")["charts/SPS"]]
    assert sps >= 1  # 40 steps / (1e6 s + run time) would log 0


# --------------------------------------------------------------------------------------------------
# Video, summary.json, and resuming a killed run (issue 15)
# --------------------------------------------------------------------------------------------------


def test_pipeline_video_and_summary(pipeline):
    """--capture-video writes the evaluation episode as an mp4 of 64x64 frames; summary.json reports stage 3."""
    import imageio.v2 as imageio

    _, run, _ = pipeline
    frames = imageio.mimread(run / "videos" / "eval-episode-0.mp4", memtest=False)
    assert len(frames) == 501 and frames[0].shape == (64, 64, 3)  # the reset frame and 500 steps of SafetyPointCircle1
    summary = json.loads((run / "summary.json").read_text())
    scalars = read_scalars(run)
    assert summary["script"] == "anoseqs" and summary["method"] == "anoseqs" and summary["seed"] == 1
    assert summary["env_id"] == "SafetyPointCircle1-v0" and summary["total_steps"] == 1000
    assert summary["source_steps"] == 1000 and summary["stages"] == ["1", "2", "3"]
    # the training episodes the run logged (2 envs x one 500-step episode), their mean cost and the violations
    costs = [v for _, v in scalars["charts/episodic_cost"]]
    assert summary["train_episodes"] == len(costs) == 2
    assert summary["train_cost"] == pytest.approx(np.mean(costs))
    assert summary["train_violating_episodes"] == sum(c > 25.0 for c in costs) and summary["cost_limit"] == 25.0
    assert summary["eval_return"] == pytest.approx(scalars["eval/episodic_return"][0][1], rel=1e-5)
    assert summary["eval_cost"] == pytest.approx(scalars["eval/episodic_cost"][0][1])
    assert summary["cost_rate"] == pytest.approx(scalars["charts/cost_rate"][-1][1], rel=1e-5)
    assert 0 < summary["sps"] and summary["anomaly_threshold"] == pytest.approx(
        scalars["charts/anomaly_threshold"][0][1], rel=1e-5)


RESUME = ["--env-id", "SafetyPointCircle1", "--num-envs", "2", "--source-timesteps", "600", "--total-timesteps", "600",
          "--learning-starts", "200", "--hidden-size", "16", "--batch-size", "16", "--detector-steps", "5",
          "--detector-d-model", "16", "--detector-heads", "2", "--detector-latent-dim", "8",
          "--detector-batch-size", "32", "--log-every", "200", "--eval-episodes", "0", "--checkpoint-every", "300",
          "--no-cuda"]


def read_state(run: Path) -> dict:
    from common.checkpoint import read_checkpoint

    return read_checkpoint(run / "checkpoint.pt")["state"]


def first_update_losses(saved: dict, final: dict, num_envs: int, batch_size: int) -> tuple[float, float]:
    """The critic losses of the first update after resuming from `saved`, recomputed from its networks on the batch
    its replay buffer draws then: the saved rows plus the first vector step after resuming (read from the run's
    `final` checkpoint), sampled with the saved sampling RNG; the target smoothing noise comes from the saved torch
    RNG after the one draw that precedes it (the exploration noise of the next step's action)."""
    from common.checkpoint import pack_array, unpack_array

    args, td3 = anoseqs.Args(**saved["args"]), saved["td3"]
    obs_dim, act_dim = td3["nets"]["actor"]["net.0.weight"].shape[1], td3["nets"]["actor"]["net.4.weight"].shape[0]
    nets = {name: anoseqs.Actor(obs_dim, act_dim, args.hidden_size, -np.ones(act_dim), np.ones(act_dim))
            for name in ("actor", "actor_target")}
    nets.update({name: anoseqs.QNetwork(obs_dim, act_dim, args.hidden_size)
                 for name in ("qf1", "qf2", "qf1_target", "qf2_target")})
    for name, net in nets.items():
        net.load_state_dict(td3["nets"][name])
    rows = td3["replay_buffer"]["size"] + num_envs
    after = final["td3"]["replay_buffer"]
    rb = anoseqs.ReplayBuffer(after["capacity"], {k: (unpack_array(v).shape[1:], np.float32)
                                                  for k, v in after["data"].items()})
    rb.load_state_dict({**after, "data": {k: pack_array(unpack_array(v)[:rows]) for k, v in after["data"].items()},
                        "pos": rows, "size": rows, "rng": td3["replay_buffer"]["rng"]})
    torch.set_rng_state(saved["rng"]["torch"])
    torch.randn(num_envs, act_dim)  # the exploration noise of the next action, drawn before the update
    data = rb.sample(batch_size)
    scale, bias = nets["actor"].action_scale, nets["actor"].action_bias
    with torch.no_grad():
        noise = (torch.randn_like(data["action"]) * args.policy_noise).clamp(-args.noise_clip, args.noise_clip) * scale
        next_act = (nets["actor_target"](data["next_obs"]) + noise).clamp(bias - scale, bias + scale)
        min_q = torch.min(nets["qf1_target"](data["next_obs"], next_act), nets["qf2_target"](data["next_obs"], next_act))
        next_q = data["reward"] + (1 - data["done"]) * args.gamma * min_q
        return (torch.nn.functional.mse_loss(nets["qf1"](data["obs"], data["action"]), next_q).item(),
                torch.nn.functional.mse_loss(nets["qf2"](data["obs"], data["action"]), next_q).item())


def test_killed_in_stage_1_then_in_stage_3_resumes_each_stage_where_it_stopped(tmp_path):
    """All stages, a checkpoint every 300 env steps of the run: killed in stage 1 (step 300), resumed and killed
    again in stage 3 (step 300 of the target), resumed to the end. Each resume continues its own stage without
    redoing the finished ones, the curves have no doubled or missing step, the counters and the replay buffer are
    those of an uninterrupted run, and the first losses after resuming equal those of the saved state."""
    run = run_until_killed("anoseqs.py", *RESUME, cwd=tmp_path, after=1)
    state = read_state(run)
    assert (state["stage"], state["stage_step"], state["step"]) == ("1", 300, 300)
    assert not (run / "source_data.npz").exists()
    # resumed: stage 1 from 300 to 600 (save 1), stage 2 (save 2: the detector, before stage 3), stage 3 to 300
    run_until_killed("anoseqs.py", "--resume", str(run), cwd=tmp_path, after=3)
    saved = read_state(run)
    assert (saved["stage"], saved["stage_step"], saved["step"]) == ("3", 300, 900)
    assert (run / "source_data.npz").is_file() and (run / "detector.pt").is_file()
    assert saved["td3"]["counters"]["updates"] == 50 and saved["td3"]["replay_buffer"]["size"] == 300
    with np.load(run / "source_data.npz") as f:  # 300 + 300 steps, the episodes in progress cut at the kill
        assert f["obs"].shape == (600 + 2 * 2, 28) and f["episode_start"].tolist().count(0) == 151

    # a conflicting flag or a damaged checkpoint: refused with a message, nothing run
    proc = subprocess.run([sys.executable, str(REPO / "anoseqs.py"), "--resume", str(run), "--env-id",
                           "SafetyPointGoal1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--env-id: the run has 'SafetyPointCircle1', given 'SafetyPointGoal1'" in proc.stderr
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    data = (broken / "checkpoint.pt").read_bytes()
    (broken / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    proc = subprocess.run([sys.executable, str(REPO / "anoseqs.py"), "--resume", str(broken)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr
    shutil.rmtree(broken)

    proc = run_script("anoseqs.py", "--resume", str(run), cwd=tmp_path)
    assert f"resuming {run} at step 300 (stage 3; stages 1 and 2 are done)" in proc.stdout
    assert "(--source-timesteps) (done); then stage 2: the detector" in proc.stdout  # the plan says what is done
    assert "stage 1: TD3 in the source" not in proc.stdout and "detector step" not in proc.stdout  # not redone
    final = read_state(run)
    assert (final["stage"], final["stage_step"], final["step"]) == ("3", 600, 1200)
    # an uninterrupted run's counters: critic updates at steps 202..600, one actor update per two; 600 transitions
    assert final["td3"]["counters"]["updates"] == 200 and final["td3"]["counters"]["actor_updates"] == 100
    assert final["td3"]["replay_buffer"]["size"] == 600 and final["td3"]["scorer"]["count"] == 600

    scalars = read_scalars(run)
    # one curve across the kills: the log lines every 200 steps, plus the first update after each resume (302)
    assert [s for s, _ in scalars["source/charts/SPS"]] == [200, 302, 400, 600]
    assert [s for s, _ in scalars["charts/SPS"]] == [200, 302, 400, 600]
    assert [s for s, _ in scalars["charts/anomaly_threshold"]] == [0]
    assert [s for s, _ in scalars["detector/charts/detector_roc_auc"]] == [5]
    qf1, qf2 = first_update_losses(saved, final, num_envs=2, batch_size=16)
    assert dict(scalars["losses/qf1_loss"])[302] == pytest.approx(qf1, rel=1e-5)
    assert dict(scalars["losses/qf2_loss"])[302] == pytest.approx(qf2, rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["total_steps"] == 600 and summary["eval_return"] is None and summary["train_episodes"] == 0


def test_td3_lag_resumes_its_multiplier_and_refills_a_buffer_left_out(tmp_path):
    """--no-checkpoint-buffer: the resumed run keeps the multiplier and counters, acts with its policy for
    --learning-starts steps to refill the buffer, then updates again."""
    args = ["--method", "td3-lag", "--lagrange-init", "0.7", *RESUME, "--no-checkpoint-buffer"]
    run = run_until_killed("anoseqs.py", *args, cwd=tmp_path, after=1)
    saved = read_state(run)
    assert saved["td3"]["replay_buffer"] is None and saved["td3"]["counters"]["updates"] == 50
    multiplier = saved["td3"]["counters"]["lagrange_multiplier"].item()
    assert 0 < multiplier < 0.7
    run_script("anoseqs.py", "--resume", str(run), cwd=tmp_path)
    final = read_state(run)
    assert final["td3"]["counters"]["updates"] == 50 + 50  # refilled at steps 302..500, updates at 502..600
    logged = dict(read_scalars(run)["charts/lagrange_multiplier"])
    # step 400: no update since the resume; step 502: the first update, a critic update (51 is odd): unchanged
    assert logged[400] == pytest.approx(multiplier, rel=1e-6) and logged[502] == pytest.approx(multiplier, rel=1e-6)
    assert sorted(logged) == [400, 502, 600]  # none at 200 and 302: no update yet
