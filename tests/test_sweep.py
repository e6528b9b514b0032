"""benchmarks/sweep.py: what a sweep plans (skip finished runs, resume interrupted ones, start the rest), its checks
before any task starts, and a real sweep of two tiny runs on a local Ray with two workers."""

import json
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import sweep  # noqa: E402

TINY_PSL = "--progression fixed --total-episodes 20 --max-episode-steps 20 --num-envs 2 --eval-episodes 2"


def test_plan_skips_finished_runs_resumes_interrupted_ones_and_starts_the_rest(tmp_path):
    out = tmp_path / "sweep"
    finished = out / "psl" / "minecraft" / "psl" / "seed1" / "runs" / "minecraft__psl__1__100"
    interrupted = out / "psl" / "minecraft" / "psl" / "seed2" / "runs" / "minecraft__psl__2__100"
    for d in (finished, interrupted):
        d.mkdir(parents=True)
        (d / "checkpoint.pt").write_bytes(b"x")
    (finished / "summary.json").write_text("{}")
    argv = ["--scripts", "psl", "--methods", "psl", "zero-shot", "--env-ids", "minecraft", "--seeds", "1", "2",
            "--out", str(out), "--extra", "--total-episodes 20", "--dry-run"]
    runs = {(r["method"], r["seed"]): r for r in sweep.main(argv)}
    assert {k: r["action"] for k, r in runs.items()} == {("psl", 1): "skip", ("psl", 2): "resume",
                                                         ("zero-shot", 1): "start", ("zero-shot", 2): "start"}
    assert runs[("psl", 2)]["cmd"][2:] == ["--resume", "runs/minecraft__psl__2__100", "--total-episodes", "20"]
    assert runs[("zero-shot", 1)]["cmd"][2:] == ["--env-id", "minecraft", "--seed", "1", "--exp-name", "zero-shot",
                                                 "--method", "zero-shot", "--total-episodes", "20"]
    assert runs[("zero-shot", 1)]["cwd"] == out / "psl" / "minecraft" / "zero-shot" / "seed1"


@pytest.mark.parametrize("argv, message", [
    (["--scripts", "ppo"], "unknown script 'ppo'; accepted: actsafe, latent_barrier, anoseqs, psl, sagui"),
    (["--scripts", "psl", "--methods", "fear"], "psl has no method 'fear'; accepted: psl, zero-shot"),
    (["--scripts", "psl", "--env-ids", "doom"], "psl runs on minecraft or vizdoom, not 'doom'"),
    (["--scripts", "anoseqs", "--env-ids", "SafetyPointGoall"], "Unknown environment id .SafetyPointGoall.. Closest valid ids: SafetyPointGoal2, SafetyPointGoal1"),
    (["--scripts", "actsafe", "--methods", "actsafe-gp", "--env-ids", "SafetyPointGoal1"],
     "GP methods run on SafePendulum"),
    (["--scripts", "psl", "--seeds", "-1"], "--seeds must be non-negative"),
])
def test_bad_sweeps_are_refused_before_any_task_starts(tmp_path, argv, message):
    argv = [*argv, "--out", str(tmp_path / "sweep")]
    if "--env-ids" not in argv:
        argv += ["--env-ids", "minecraft"]
    with pytest.raises(SystemExit, match=message):
        sweep.main(argv)
    assert not (tmp_path / "sweep").exists()  # nothing written, nothing started


def test_a_ray_address_that_does_not_answer_is_a_clear_message(tmp_path):
    with pytest.raises(SystemExit, match="--address 127.0.0.1:9: no Ray cluster answers there.*Nothing was started"):
        sweep.main(["--scripts", "psl", "--env-ids", "minecraft", "--seeds", "1", "--out", str(tmp_path / "s"),
                    "--address", "127.0.0.1:9", "--connect-timeout", "2"])
    assert not (tmp_path / "s").exists()


def test_a_sweep_of_two_tiny_runs_on_a_local_ray_then_skips_them(tmp_path):
    argv = ["--scripts", "psl", "--methods", "psl", "baseline", "--env-ids", "minecraft", "--seeds", "1",
            "--out", str(tmp_path / "sweep"), "--num-cpus", "2", "--extra", TINY_PSL]
    runs = sweep.main(argv)
    assert [r["exit_code"] for r in runs] == [0, 0]
    summaries = sorted((tmp_path / "sweep").glob("psl/minecraft/*/seed1/runs/*/summary.json"))
    assert len(summaries) == 2
    assert sorted(json.loads(s.read_text())["method"] for s in summaries) == ["baseline", "psl"]
    again = sweep.main(argv)  # everything finished: nothing runs (no Ray started)
    assert [r["action"] for r in again] == ["skip", "skip"]
    # and the plot of the sweep: one table row per method, from the runs' summary.json
    import plot

    doc = plot.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "plots" / "s"), "--reps", "200",
                     "--curve-reps", "100"])
    assert "### minecraft" in doc and "| baseline | 1 |" in doc and "| psl | 1 |" in doc
