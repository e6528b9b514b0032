"""benchmarks/plot.py: the IQM and its stratified-bootstrap CI against hand computations, and the whole plot on
synthetic runs (summary.json + TensorBoard scalars, as the scripts write them)."""

import dataclasses
import sys

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from common.summary import write_summary
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import plot  # noqa: E402


def test_iqm_is_the_mean_of_the_middle_half():
    assert plot.iqm([7, 1, 100, 3, 5, 2, 6, 4]) == pytest.approx((3 + 4 + 5 + 6) / 4)  # 8 runs: 2 cut at each end
    assert plot.iqm([1, 2, 3, 1000, -1000, 4]) == pytest.approx((1 + 2 + 3 + 4) / 4)  # 6 runs: 1 cut at each end
    assert plot.iqm([[1, 5], [3, 7]]) == pytest.approx(4.0)  # a (runs, tasks) matrix: over all its values


def test_bootstrap_interval_against_hand_computed_distributions():
    # 3 runs (0, 0, 3): no value is trimmed (int(0.25 * 3) = 0), a resample's IQM is its mean = the number k of 3s
    # drawn, k ~ Binomial(3, 1/3): P(k=0) = 8/27 > 2.5%, P(k <= 2) = 26/27 < 97.5%: the 95% interval is [0, 3]
    assert plot.interval_estimates({"a": np.array([0.0, 0.0, 3.0])}, reps=2000)["a"] == (1.0, 0.0, 3.0)
    # 2 runs (0, 1): resamples (0,0), (0,1), (1,1) with probabilities 1/4, 1/2, 1/4 -> IQM 0, 0.5, 1: interval [0, 1]
    assert plot.interval_estimates({"b": np.array([0.0, 1.0])}, reps=2000)["b"] == (0.5, 0.0, 1.0)
    # equal runs: no uncertainty
    assert plot.interval_estimates({"c": np.full(5, 2.5)})["c"] == (2.5, 2.5, 2.5)


def test_bootstrap_interval_matches_an_independent_bootstrap():
    scores = np.random.default_rng(0).normal(size=10)
    mid, low, high = plot.interval_estimates({"a": scores}, reps=4000)["a"]
    rng = np.random.default_rng(1)  # an independent percentile bootstrap of the 25%-trimmed mean, written out here
    resampled = np.sort(scores[rng.integers(0, 10, size=(20000, 10))], axis=1)[:, 2:8].mean(1)
    assert mid == pytest.approx(np.sort(scores)[2:8].mean())
    assert low == pytest.approx(np.percentile(resampled, 2.5), abs=0.06)
    assert high == pytest.approx(np.percentile(resampled, 97.5), abs=0.06)


def test_the_bootstrap_is_stratified_by_task():
    # within each task (column) every run is equal: resampling runs inside a task never changes the pooled values,
    # so the stratified interval has no width (pooling the tasks' runs before resampling would give a wide one)
    scores = np.array([[0.0, 100.0]] * 4)
    assert plot.interval_estimates({"a": scores})["a"] == (50.0, 50.0, 50.0)


def test_curve_estimates_pointwise():
    curves = np.array([[0.0, 1.0, 2.0], [0.0, 1.0, 4.0], [0.0, 1.0, 6.0], [0.0, 1.0, 8.0]])
    mid, low, high = plot.curve_estimates(curves, reps=2000)
    np.testing.assert_allclose(mid, [0.0, 1.0, 5.0])  # 4 runs: IQM of the middle two at each point
    np.testing.assert_allclose(low[:2], [0.0, 1.0])
    np.testing.assert_allclose(high[:2], [0.0, 1.0])
    assert 2.0 <= low[2] < 5.0 < high[2] <= 8.0


@dataclasses.dataclass
class FakeArgs:
    exp_name: str = "method"
    seed: int = 1


def fake_run(root, method, seed, returns, costs, cost_limit=25.0):
    run_dir = root / f"Env-v0__{method}__{seed}"
    writer = SummaryWriter(str(run_dir))
    for i, (r, c) in enumerate(zip(returns, costs)):
        writer.add_scalar("charts/episodic_return", r, (i + 1) * 100)
        writer.add_scalar("charts/episodic_cost", c, (i + 1) * 100)
    writer.close()
    write_summary(str(run_dir), FakeArgs(method, seed), script="fake", start_time=0.0, env_id="Env-v0",
                  total_steps=100 * len(returns), eval_return=float(returns[-1]), eval_cost=float(costs[-1]),
                  train_cost=float(np.mean(costs)), train_episodes=len(costs),
                  train_violating_episodes=int((np.array(costs) > cost_limit).sum()), cost_limit=cost_limit,
                  cost_rate=0.1 * seed, sps=100)


def test_plot_writes_tables_and_figures_from_runs(tmp_path):
    for seed in (1, 2, 3, 4):
        fake_run(tmp_path / "runs", "safe", seed, returns=[seed, 2 * seed, 3 * seed], costs=[0, 0, 0])
        fake_run(tmp_path / "runs", "risky", seed, returns=[10, 20, 30 + seed], costs=[30, 40, 10 * seed])
    out = tmp_path / "plots" / "fake"
    doc = plot.main([str(tmp_path / "runs"), "--out", str(out), "--reps", "500", "--curve-reps", "200"])
    assert (tmp_path / "plots" / "fake_Env-v0_final.png").stat().st_size > 0
    assert (tmp_path / "plots" / "fake_Env-v0_curves.png").stat().st_size > 0
    assert (tmp_path / "plots" / "fake.md").read_text().strip() == doc.strip()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines() if line.startswith("| risky")
            or line.startswith("| safe")}
    # eval return: safe 3,6,9,12 -> IQM 7.5; risky 31..34 -> IQM 32.5; over the limit 25: risky's episodes 30, 40
    # and 10*seed (> 25 for seeds 3, 4): 2/3, 2/3, 1, 1 -> IQM 0.833; safe never
    assert "| 4 | 7.5 [3.0, 12.0]" in rows["safe"] and "| 4 | 32.5 [" in rows["risky"]
    assert rows["risky"].rstrip(" |").endswith("0.833 [0.667, 1.000]")
    assert rows["safe"].rstrip(" |").endswith("0.000 [0.000, 0.000]")
    with pytest.raises(SystemExit, match="no summary.json under"):
        plot.main([str(tmp_path / "plots")])
    with pytest.raises(SystemExit, match="no such directory"):
        plot.main([str(tmp_path / "missing")])
