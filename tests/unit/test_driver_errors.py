"""A failed Ray Train run reaches the user as one line: the stage, the root cause (a worker's or the controller's,
out of Ray Train's exception whose message is a whole traceback), and the run folder the same command resumes."""

from types import SimpleNamespace

import pytest
from ray.train import ControllerError, WorkerGroupError

from ccr_ray.storage import Location
from ccr_ray.train.driver import TrainingFailed, training_failure
from ccr_ray.train.plan import StageError

TRACEBACK = "Traceback (most recent call last):\n  File \"x.py\", line 3, in f\n    upload()\n"


@pytest.fixture()
def where(tmp_path):
    return SimpleNamespace(stage=SimpleNamespace(name="nlt")), Location.of(tmp_path / "runs" / "t" / "nlt-1a2b")


def test_a_controller_failure_names_its_root_cause_and_the_run(where):
    plan, run_dir = where
    cause = OSError(TRACEBACK + "OSError: When uploading 'ccr/runs/t/nlt-1a2b/checkpoint_000001/model.safetensors' "
                    "in bucket 'ccr-test': AWS Error NETWORK_CONNECTION: Couldn't connect to server")
    err = training_failure(plan, run_dir, ControllerError(cause))
    message = str(err)
    assert isinstance(err, TrainingFailed) and isinstance(err, StageError)  # the CLIs print StageError as one line
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith("stage nlt failed (controller: OSError: When uploading")
    assert "bucket 'ccr-test'" in message and run_dir.uri in message and "resumes" in message


def test_a_worker_failure_reports_the_lowest_rank_and_keeps_a_bare_message_typed(where):
    plan, run_dir = where
    failures = {1: ValueError(TRACEBACK + "ValueError: rank one"), 0: RuntimeError("CUDA out of memory")}
    message = str(training_failure(plan, run_dir, WorkerGroupError("2 workers failed", failures)))
    assert "(worker: RuntimeError: CUDA out of memory)" in message and "rank one" not in message


def test_an_error_that_is_not_ray_trains_is_still_one_line(where):
    plan, run_dir = where
    message = str(training_failure(plan, run_dir, KeyError("split")))
    assert message.startswith("stage nlt failed (Ray Train: KeyError: 'split')")


def test_run_stage_turns_a_raised_train_failure_into_one_line(where, monkeypatch):
    """Train V2's fit() raises (it does not return a Result with .error): run_stage must catch that, as the S3
    drill saw (a ControllerError reached the caller before this was caught)."""
    from ccr_ray.train import driver

    plan, run_dir = where
    plan.cfg = SimpleNamespace()
    cause = OSError("When initiating multiple part upload for key 'ccr/x' in bucket 'ccr-test': AWS Error "
                    "NETWORK_CONNECTION")

    class Trainer:
        def fit(self):
            raise ControllerError(cause)

    monkeypatch.setattr(driver, "ensure_ray", lambda: None)
    monkeypatch.setattr(driver, "check_resources", lambda cfg: None)
    monkeypatch.setattr(driver, "build_trainer", lambda *a, **k: Trainer())
    with pytest.raises(TrainingFailed, match=r"^stage nlt failed \(controller: OSError: When initiating") as err:
        driver.run_stage(plan, storage_path=str(run_dir.parent), name=run_dir.name)
    assert err.value.__cause__.controller_failure is cause and run_dir.uri in str(err.value)


def test_a_slow_worker_group_start_is_retried_and_a_storage_failure_is_not(micro_cfg):
    """Ray's own failure policy with the stage's FailureConfig: a worker group that did not start in time (a busy
    machine) is tried again WORKER_GROUP_START_RETRIES times, then the stage fails; a controller error that is not a
    start-up failure (an upload to an unreachable store) fails at once, and worker crashes get run.max_failures."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError
    from ray.train.v2._internal.execution.failure_handling import FailureDecision
    from ray.train.v2._internal.execution.failure_handling.default import DefaultFailurePolicy

    from ccr_ray.train.driver import WORKER_GROUP_START_RETRIES, failure_config

    assert WORKER_GROUP_START_RETRIES >= 1
    cfg = micro_cfg("nlt", run={"max_failures": 1})
    policy = DefaultFailurePolicy(failure_config(cfg))
    slow = ControllerError(WorkerGroupStartupTimeoutError(num_workers=1))
    decisions = [policy.make_decision(slow) for _ in range(WORKER_GROUP_START_RETRIES + 1)]
    assert decisions == [FailureDecision.RETRY] * WORKER_GROUP_START_RETRIES + [FailureDecision.RAISE]
    assert DefaultFailurePolicy(failure_config(cfg)).make_decision(
        ControllerError(OSError("When uploading: Couldn't connect to server"))) == FailureDecision.RAISE
    crash = WorkerGroupError("1 worker failed", {0: RuntimeError("boom")})
    policy = DefaultFailurePolicy(failure_config(cfg))
    assert [policy.make_decision(crash) for _ in range(2)] == [FailureDecision.RETRY, FailureDecision.RAISE]
    waiting = micro_cfg("nlt", scaling={"wait_for_resources": True})
    assert failure_config(waiting).controller_failure_limit == -1
