"""RungKeepingASHA: a resumed sweep's ASHA still knows the rungs that trials reached before the stop (Tune restores
no scheduler state). No cluster: the scheduler is driven directly, with trials that carry what it reads."""

import json
from types import SimpleNamespace

import pyarrow.fs as pafs
import pytest
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ccr_ray.tune.asha import RungKeepingASHA, reported_results

METRIC = "val/mR"


def trial(folder, trial_id, results=()):
    path = folder / trial_id
    path.mkdir()
    if results:
        lines = [json.dumps({"training_iteration": i + 1, METRIC: v}) for i, v in enumerate(results)]
        (path / "result.json").write_text("\n".join(lines) + "\n{\"training_itera")  # last line cut by a kill
    return SimpleNamespace(trial_id=trial_id, status="TERMINATED",
                           storage=SimpleNamespace(storage_filesystem=pafs.LocalFileSystem()), path=str(path))


def scheduler(kind):
    s = kind(time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2)
    s.set_search_properties(METRIC, "max")
    return s


@pytest.mark.parametrize("kind, expected", [(RungKeepingASHA, TrialScheduler.STOP),
                                            (ASHAScheduler, TrialScheduler.CONTINUE)])
def test_a_restored_trials_rungs_still_stop_a_weak_trial(tmp_path, kind, expected):
    strong = trial(tmp_path, "strong", results=[30.0, 33.0])  # finished before the driver was killed
    weak = trial(tmp_path, "weak")  # added after the resume
    asha = scheduler(kind)
    asha.on_trial_add(None, strong)
    asha.on_trial_add(None, weak)
    decision = asha.on_trial_result(None, weak, {"training_iteration": 1, METRIC: 15.0})
    assert decision == expected  # plain ASHA forgot the strong trial's rung and lets the weak one go on


def test_reported_results_of_a_trial_without_results(tmp_path):
    assert reported_results(trial(tmp_path, "new")) == []


def test_a_new_trial_without_a_folder_yet_has_no_results():
    # a fresh sweep's trials: Tune's Trial.path raises until the trial starts (the CI failure of a plain `tune`)
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    storage = StorageContext(storage_path="/tmp", experiment_dir_name="asha-new-trial")
    fresh = Trial("run_trial", config={}, stub=True, storage=storage)
    with pytest.raises(RuntimeError):
        _ = fresh.path
    assert reported_results(fresh) == []
    asha = scheduler(RungKeepingASHA)
    asha.on_trial_add(None, fresh)  # no error, nothing replayed
    assert asha._trial_info[fresh.trial_id] is not None
