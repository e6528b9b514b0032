"""Tests of anoseqs.py: the window labels, threshold, shaped reward, ROC AUC and autoencoder by hand; each stage as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, read_scalars, run_dirs, run_script

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
    out = anoseqs.shaped_reward(reward, score, tau=0.4, coef=2.0, form="proportional")
    # at or below tau: untouched; above: r - 2 * score
    assert out.tolist() == pytest.approx([1.0, 1.0, 0.0, -0.8])
    out = anoseqs.shaped_reward(reward, score, tau=0.4, coef=2.0, form="binary")
    assert out.tolist() == pytest.approx([1.0, 1.0, -1.0, -1.0])
    assert anoseqs.shaped_reward(reward, score, tau=0.4, coef=0.0, form="proportional").tolist() == reward.tolist()


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
    tau = anoseqs.percentile_threshold(safe_scores, 99)
    assert (bad_scores > tau).mean() > 0.95
    assert anoseqs.roc_auc(safe_scores, bad_scores) > 0.99


# --------------------------------------------------------------------------------------------------
# Bad input: a clear message, no traceback
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--total-timesteps", "0"], "--total-timesteps must be positive"),
    (["--stage", "4"], "--stage must be one of all, 1, 2, 3"),
    (["--penalty-form", "square"], "--penalty-form must be one of proportional, binary"),
    (["--stage", "3"], "needs a trained detector"),
    (["--lagrangian"], "pass --penalty-coef 0"),
    (["--stage", "2", "--source-run", "nowhere"], "holds no source_data.npz"),
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
DETECTOR_TAGS = {"detector/losses/detector_loss", "detector/losses/detector_heldout_loss",
                 "detector/charts/anomaly_threshold", "detector/charts/detector_roc_auc"}
SHAPING_TAGS = {"charts/penalised_fraction", "charts/anomaly_score_mean", "charts/scoring_time_fraction",
                "charts/target_roc_auc", "charts/anomaly_threshold"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("anoseqs_all")
    proc = run_script("anoseqs.py", *TINY, "--save-model", cwd=cwd)
    (run,) = run_dirs(cwd)
    return cwd, run, proc


def test_smoke_pipeline_all_stages(pipeline):
    cwd, run, proc = pipeline
    scalars = read_scalars(run)
    missing = (TD3_TAGS | DETECTOR_TAGS | SHAPING_TAGS | {"source/charts/cost_rate"}) - set(scalars)
    assert not missing, f"missing tags: {sorted(missing)}"
    for name in ("source_data.npz", "detector.pt", "anoseqs.cleanrl_model"):
        assert (run / name).is_file(), name
    assert "ROC AUC" in proc.stdout and "stage 3: AnoSeqs" in proc.stdout
    frac = [v for _, v in scalars["charts/penalised_fraction"]]
    assert all(0.0 <= f <= 1.0 for f in frac)
    assert scalars["charts/cost_rate"][-1][0] == 1000  # the last step logged is the budget
    # TD3's delayed policy update: one actor update every policy_frequency (2) critic updates, not every step;
    # 400 critic updates (steps 202..1000 with 2 envs) -> 200 actor updates
    assert scalars["charts/actor_updates_per_critic_update"][-1][1] == pytest.approx(0.5)
    with np.load(run / "source_data.npz") as f:
        assert f["obs"].shape == (1000 + 2, 28)  # 2 envs x (reset row + 500 steps); the empty new episodes dropped
        assert f["episode_start"].tolist().count(0) == 501


def test_smoke_stage2_then_stage3_reuse_artefacts(pipeline, tmp_path):
    _, run, _ = pipeline
    run_script("anoseqs.py", *TINY, "--stage", "2", "--source-run", str(run), cwd=tmp_path)
    (detector_run,) = run_dirs(tmp_path)
    assert (detector_run / "detector.pt").is_file()
    assert not (detector_run / "source_data.npz").exists()
    assert DETECTOR_TAGS <= set(read_scalars(detector_run))
    proc = run_script("anoseqs.py", *TINY, "--stage", "3", "--source-run", str(detector_run),
                      "--penalty-form", "binary", "--eval-episodes", "0", cwd=tmp_path)
    (target_run,) = [r for r in run_dirs(tmp_path) if r != detector_run]
    scalars = read_scalars(target_run)
    assert (TD3_TAGS - {"eval/episodic_return", "eval/episodic_cost"} | SHAPING_TAGS) <= set(scalars)
    assert not any(k.startswith(("source/", "detector/")) for k in scalars)
    assert "detector from" in proc.stdout


def test_smoke_stage1_alone(tmp_path):
    args = [a for a in TINY]
    run_script("anoseqs.py", *args, "--stage", "1", "--source-timesteps", "600", "--num-envs", "1", cwd=tmp_path)
    (run,) = run_dirs(tmp_path)
    assert (run / "source_data.npz").is_file() and not (run / "detector.pt").exists()
    scalars = read_scalars(run)
    assert {"source/charts/episodic_return", "source/charts/cost_rate", "source/losses/actor_loss"} <= set(scalars)


def test_smoke_baselines_td3_and_td3_lag(tmp_path):
    run_script("anoseqs.py", *TINY, "--penalty-coef", "0", "--lagrangian", "--exp-name", "td3_lag", cwd=tmp_path)
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
    torch.save({"model": {}, "tau": 0.1}, bad / "detector.pt")  # no config
    with pytest.raises(SystemExit, match="lacks the model, tau or config"):
        anoseqs.load_detector(str(bad / "detector.pt"), torch.device("cpu"))
    # a complete, matching file loads and scores like the saved model
    model = anoseqs.TransformerAutoencoder(3, 4, 8, 2, 1, 4)
    config = {"obs_dim": 3, "window_length": 4, "d_model": 8, "heads": 2, "layers": 1, "latent_dim": 4,
              "source_env_id": "SafetyPointCircle1-v0"}
    torch.save({"model": model.state_dict(), "tau": 0.25, "config": config}, tmp_path / "detector.pt")
    loaded, tau, _ = anoseqs.load_detector(str(tmp_path / "detector.pt"), torch.device("cpu"))
    x = torch.rand(5, 4, 3)
    model.eval()
    assert tau == 0.25 and torch.allclose(anoseqs.anomaly_score(loaded, x), anoseqs.anomaly_score(model, x))
    # weights that do not fit the config
    torch.save({"model": model.state_dict(), "tau": 0.25, "config": {**config, "d_model": 16}}, bad / "detector.pt")
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


def test_env_steps_read_back_from_the_device_only_what_they_must(tmp_path, monkeypatch):
    """Per step: the baselines move no reward to the device and back; AnoSeqs copies the shaped rewards once and
    counts penalised steps on the device (no int() of a tensor per step, a host/device sync on a GPU)."""
    from common import Logger

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    args = anoseqs.Args(learning_starts=100, hidden_size=8, batch_size=8, buffer_size=500, log_every=1000,
                        eval_episodes=0, window_length=4)
    calls = {"cpu": 0}
    real_cpu, real_int, real_item = torch.Tensor.cpu, torch.Tensor.__int__, torch.Tensor.item

    def from_anoseqs():
        return sys._getframe(2).f_code.co_filename == anoseqs.__file__

    def cpu(self, *a, **k):
        calls["cpu"] += from_anoseqs()
        return real_cpu(self, *a, **k)

    def no_sync(real):
        def wrapped(self, *a, **k):
            assert not from_anoseqs(), "a per-step read of a tensor in anoseqs.py"
            return real(self, *a, **k)
        return wrapped

    monkeypatch.setattr(torch.Tensor, "cpu", cpu)
    monkeypatch.setattr(torch.Tensor, "__int__", no_sync(real_int))
    monkeypatch.setattr(torch.Tensor, "item", no_sync(real_item))
    logger = Logger("baseline", args, quiet=True)
    anoseqs.run_td3(args, "SafetyPointCircle1", 60, logger, torch.device("cpu"), seed=0)  # random actions only
    logger.close()
    assert calls["cpu"] == 0
    detector = anoseqs.TransformerAutoencoder(28, 4, 8, 2, 1, 4).eval()
    logger = Logger("anoseqs", args, quiet=True)
    anoseqs.run_td3(args, "SafetyPointCircle1", 60, logger, torch.device("cpu"), seed=0, detector=detector,
                    tau_threshold=0.0)
    logger.close()
    assert calls["cpu"] == 60 + 2  # one per step, plus the scores at the log line and at the end
