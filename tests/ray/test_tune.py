"""`jobs/tune.py` on a local Ray cluster, micro model: a sweep whose driver is killed mid-sweep, then resumed.

One sweep covers the issue's contract (a sweep costs several Train runs, so one is shared): ASHA stops at least one
trial early; the killed driver's finished trials are not run again after `--resume` (counted from the trials' own
start events); the best trial's checkpoint opens with `load_checkpoint`; the plots are PNGs; `--report` re-renders
everything from the folder without a cluster.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, micro_config
from tests.ray.drills import Gate, wait_for

pytestmark = pytest.mark.ray
PNG = b"\x89PNG\r\n\x1a\n"
TRIALS = 2


def finished_trials(sweep_dir):
    from ccr_ray.storage import Location
    from ccr_ray.tune.report import read_events

    trials = Location.of(sweep_dir) / "trials"
    return sorted(t for t in trials.children() if any(e.get("event") == "end" for e in read_events(trials / t)))


def test_sweep_stops_weak_trials_survives_a_killed_driver_and_reports(ray_local, micro_data, tmp_path):
    import tune

    from ccr_ray import checkpoint as ckpt

    home = tmp_path / "home"
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(micro_config(micro_data, str(home), train={"max_steps": 30, "eval_every": 10},
                                              run={"verbose": False})))
    # `clip` from scratch learns the micro scenes fast (val mR ~29 after 10 steps at lr 3e-3, chance ~16). A grid in a
    # fixed order: the first trial learns, the second (lr 1e-7) stays at chance, so ASHA's first rung (the first
    # validation; reduction factor 2) stops it against the first. Two trials, the fewest that show everything: each
    # is a Train run (~40 s of start-up here), and the first finishes before the kill, the second after the resume
    args = ["--stage", "clip", "--config", str(config), "--space", "optim.lr=grid(3e-3,1e-7)",
            "--num-samples", "1", "--name", "micro"]
    sweep_dir = home / "sweeps" / "micro"

    # 1. the driver in its own process, on this test's cluster, its later trials held at their start
    # (tests/ray/drills.py); killed once the first trial has finished and the second waits, whatever the speed
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "PYTHONPATH": f"{REPO}:{REPO / 'jobs'}"}
    gate = Gate(str(tmp_path / "gate"), 0)
    driver_log = tmp_path / "driver.log"
    with open(driver_log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.ray.drills", "--gate-folder", gate.folder, "tune",
                                 *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        gate.wait_reached(running=lambda: proc.poll() is None)
        before = wait_for(lambda: finished_trials(sweep_dir), 300, "the first trial's end event",
                          running=lambda: proc.poll() is None)
    except AssertionError as err:  # the driver's own words say why
        raise AssertionError(f"{err}; driver exit {proc.poll()}, its log:\n{driver_log.read_text()[-4000:]}") from None
    assert len(before) == 1
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(finished_trials(sweep_dir)) == 1  # killed mid-sweep: the held trial never trained

    # 2. the same command with --resume finishes it
    resumed_at = time.perf_counter()
    assert tune.main([*args, "--resume"]) == 0
    resume_seconds = time.perf_counter() - resumed_at
    from ccr_ray.tune import report

    records = {r.trial_id: r for r in report.collect_trials(sweep_dir)}
    assert len(records) == TRIALS
    for trial in before:  # finished before the kill: never started again
        assert records[trial].attempts == 1, (trial, records[trial].attempts)
    from tests.ray.test_multinode import report_drill

    report_drill("sweep driver killed, --resume", finished_trials_kept=len(before),
                 finished_trials_rerun=sum(records[t].attempts > 1 for t in before), records_lost=0,
                 resume_to_done_seconds=round(resume_seconds, 1))
    stopped = [r for r in records.values() if r.status == report.STOPPED]
    assert stopped, {t: (r.status, r.curve) for t, r in records.items()}
    assert all(r.steps < 30 for r in stopped)
    assert all(r.status in (report.COMPLETED, report.STOPPED) for r in records.values())

    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["score"] == max(r.best for r in records.values())
    model, meta = ckpt.load_checkpoint(best["checkpoint"])
    assert meta.stage == "clip" and meta.step == 30 and best["values"] == {"optim.lr": 3e-3}
    for png in ("sweep_values.png", "sweep_curves.png"):
        assert (sweep_dir / png).read_bytes()[:8] == PNG
    rows = (sweep_dir / "trials.csv").read_text().splitlines()
    assert len(rows) == TRIALS + 1  # and the header

    # 3. --report re-renders from the folder alone
    (sweep_dir / "trials.csv").unlink()
    (sweep_dir / "sweep_curves.png").unlink()
    assert tune.main(["--report", str(sweep_dir)]) == 0
    assert (sweep_dir / "trials.csv").read_text().splitlines() == rows
    assert (sweep_dir / "sweep_curves.png").read_bytes()[:8] == PNG
    timing = json.loads((sweep_dir / "sweep.json").read_text())["timing"]
    assert timing["wall_seconds"] > 0 and timing["trial_seconds"] > 0
