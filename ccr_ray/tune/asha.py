"""ASHA that keeps its rungs across `--resume`.

Tune's restore brings back trials, the searcher and callbacks, but not the scheduler's state: the scheduler object
comes back as it was built, with empty rungs (TuneController.save_to_dir saves no scheduler). After a resume,
ASHA would compare the remaining trials only with each other, so a weak trial that the finished ones would have
stopped runs to the end (seen in tests/ray/test_tune.py: the two lr=1e-7 trials both completed at chance level
after the resume). `RungKeepingASHA` replays a restored trial's reported results (its result.json, which Tune
keeps in the trial's folder) into its bracket when the restored trial is added, so the rungs are what they were.
"""

from __future__ import annotations

import json
import logging

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler

log = logging.getLogger(__name__)
RESULT_FILE = "result.json"


def reported_results(trial: Trial) -> list[dict]:
    """The results a trial reported before the sweep stopped, read from its folder (local or object store)."""
    try:
        path = f"{trial.path}/{RESULT_FILE}"
    except RuntimeError:  # a trial added for the first time: Tune names its folder only when it starts
        return []
    fs = trial.storage.storage_filesystem
    try:
        with fs.open_input_stream(path) as stream:
            text = stream.readall().decode()
    except (FileNotFoundError, OSError):
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short when the driver was killed
    return rows


class RungKeepingASHA(ASHAScheduler):
    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        # a new trial has no results yet; a restored one (finished, or interrupted and about to continue) gets the
        # rungs it had reached, so its decisions and everyone's cutoffs are the ones made before the stop
        bracket = self._trial_info[trial.trial_id]
        replayed = 0
        for row in reported_results(trial):
            if self._time_attr in row and self._metric in row:
                bracket.on_result(trial, row[self._time_attr], self._metric_op * row[self._metric])
                replayed += 1
        if replayed:
            log.info("ASHA: %d earlier result(s) of trial %s back in its rungs", replayed, trial.trial_id)
