"""A sweep's results from its folder alone (JSON files, no Ray, no unpickling): the trial table, `trials.csv`,
`best.json` and the plots. `jobs/tune.py` renders them when a sweep ends; `--report SWEEP_DIR` re-renders them.

    {home}/sweeps/{name}/       (on shared storage: beside run.storage; every file goes through storage.Location)
        sweep.json              what was swept (stage, base config, space, search, scheduler) and its timings
        tune/<trial folder>/    Ray Tune's: params.json (the trial's values), result.json (one line per validation)
        trials/<trial id>/      ours: events/ (one small file per start / end of an attempt, with the seconds of
                                training) and, for a trial that ran to its last step, the published stage output
                                (checkpoint/, result.json, train_log.jsonl, training_curve.png)
        train/                  the trials' Ray Train runs (resumable checkpoints)
        trials.csv, best.json, sweep_values.png, sweep_curves.png
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccr_ray.storage import Location

SWEEP_FILE = "sweep.json"
EVENTS_DIR = "events"
METRIC = "val/mR"
TUNE_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})_")  # an experiment's 5 hex digits, the trial's index
COMPLETED, STOPPED, ERROR, UNFINISHED = "completed", "stopped early", "error", "unfinished"


@dataclass
class TrialRecord:
    trial_id: str
    values: dict[str, Any]  # the swept values
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val/mR) per validation report
    status: str = UNFINISHED
    checkpoint: str | None = None  # the published checkpoint of a completed trial
    last_checkpoint: str | None = None  # the last checkpoint Ray Train reported (also for stopped trials)
    attempts: int = 0  # how many times the trial's driver started (1 unless the sweep was resumed mid-trial)
    train_seconds: float = 0.0  # wall seconds inside run_stage, over all attempts (completed trials)
    tune_seconds: float = 0.0  # the trial's running time as Tune measured it at its last report

    @property
    def seconds(self) -> float:
        """The trial's own time: run_stage's when it completed, else up to its last report (ASHA stops it there)."""
        return self.train_seconds or self.tune_seconds

    @property
    def best(self) -> float:
        return max((v for _, v in self.curve), default=float("nan"))

    @property
    def steps(self) -> int:
        return max((s for s, _ in self.curve), default=0)


def read_jsonl(path: Location) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed process
    return rows


def read_events(trial_folder: Location) -> list[dict]:
    """The events of a trial (start / end / already_finished), in time order."""
    events = trial_folder / EVENTS_DIR
    return [json.loads((events / name).read_text()) for name in events.children() if name.endswith(".json")]


def read_sweep(sweep_dir: str | os.PathLike | Location) -> dict:
    path = Location.of(sweep_dir) / SWEEP_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{sweep_dir}: not a sweep folder (no {SWEEP_FILE})")
    return json.loads(path.read_text())


def collect_trials(sweep_dir: str | os.PathLike | Location) -> list[TrialRecord]:
    sweep_dir = Location.of(sweep_dir)
    meta = read_sweep(sweep_dir)
    finished = bool(meta.get("finished"))
    records: dict[str, TrialRecord] = {}
    tune = sweep_dir / "tune"
    for name in tune.children():
        folder = tune / name
        params_file = folder / "params.json"
        if not params_file.is_file():
            continue
        results = read_jsonl(folder / "result.json")
        trial_id = next((r["trial_id"] for r in results if "trial_id" in r), None)
        if trial_id is None:
            trial_id = _trial_id_from_events(sweep_dir, folder) or _trial_id_in_name(folder.name)
        record = records.setdefault(trial_id, TrialRecord(trial_id, json.loads(params_file.read_text())))
        for row in results:
            if METRIC in row and "step" in row:
                record.curve.append((int(row["step"]), float(row[METRIC])))
            if row.get("checkpoint_path"):
                record.last_checkpoint = row["checkpoint_path"]
            record.tune_seconds = max(record.tune_seconds, float(row.get("time_total_s", 0.0)))
        if (folder / "error.txt").is_file():
            record.status = ERROR
    for record in records.values():
        record.curve = sorted(dict(record.curve).items())
        ours = sweep_dir / "trials" / record.trial_id
        events = read_events(ours)
        record.attempts = sum(1 for e in events if e.get("event") == "start")
        record.train_seconds = sum(float(e.get("seconds", 0.0)) for e in events if e.get("event") == "end")
        if any(e.get("event") == "end" for e in events):
            record.status = COMPLETED
            if (ours / "checkpoint").is_dir():
                record.checkpoint = (ours / "checkpoint").uri
        elif record.status != ERROR and finished:
            record.status = STOPPED  # Tune ended the sweep and the trial never reached its last step: ASHA
    return sorted(records.values(), key=lambda r: r.trial_id)


def _trial_id_in_name(name: str) -> str:
    """Tune names a trial's folder `{trainable}_{trial_id}_{index}_{values}_{time}`. A trial the driver's kill caught
    before its first report can have two folders (Tune's last snapshot did not name the first one yet, so the resume
    made another): both are the one trial."""
    found = TUNE_TRIAL_ID.search(name)
    return found.group(1) if found else name


def _trial_id_from_events(sweep_dir: Location, folder: Location) -> str | None:
    trials = sweep_dir / "trials"
    for trial_id in trials.children():
        if any(e.get("tune_dir") == folder.name for e in read_events(trials / trial_id)):
            return trial_id
    return None


def best_trial(records: list[TrialRecord]) -> TrialRecord | None:
    scored = [r for r in records if not math.isnan(r.best)]
    return max(scored, key=lambda r: r.best) if scored else None


def format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_table(records: list[TrialRecord], keys: list[str]) -> str:
    header = ["trial", *keys, "best val mR", "steps", "stopped early"]
    rows = [[r.trial_id, *(format_value(r.values.get(k)) for k in keys), f"{r.best:.2f}", str(r.steps),
             "yes" if r.status == STOPPED else ("error" if r.status == ERROR else
                                                "no" if r.status == COMPLETED else "unfinished")]
            for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join([line, rule, *body])


def next_commands(meta: dict, best: TrialRecord) -> list[str]:
    """How to continue from the best trial: its child stages from its checkpoint, and evaluating it."""
    from ccr_ray.stages import STAGES

    checkpoint = best.checkpoint or best.last_checkpoint
    config = meta.get("config_source") or "demo"
    values = " ".join(f"--set {k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in best.values.items()
                      if not k.startswith("optim.") and not k.startswith("loss."))
    sets = " ".join(f"--set {o}" for o in meta.get("overrides", []))
    out = []
    for child in STAGES.values():
        if child.parent == meta["stage"]:
            out.append(f"python jobs/train_stage.py --stage {child.name} --config {config} {sets} {values} "
                       f"--set run.init_from={checkpoint}".replace("  ", " "))
    out.append(f"python jobs/evaluate.py {checkpoint}")
    return out


def render(sweep_dir: str | os.PathLike | Location) -> str:
    """Write trials.csv, best.json and the plots; return the printed summary."""
    from ccr_ray.plots import plot_sweep_curves, plot_sweep_values

    sweep_dir = Location.of(sweep_dir)
    meta = read_sweep(sweep_dir)
    keys = list(meta.get("space", {}))
    records = collect_trials(sweep_dir)
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *keys, "best_val_mR", "steps", "status", "attempts", "seconds", "checkpoint"])
        for r in records:
            writer.writerow([r.trial_id, *(r.values.get(k) for k in keys), round(r.best, 4), r.steps, r.status,
                             r.attempts, round(r.seconds, 1), r.checkpoint or r.last_checkpoint or ""])
        (sweep_dir / "trials.csv").write_text(f.getvalue())
    lines = [f"sweep {meta['name']}: stage {meta['stage']}, {len(records)} trials, search {meta['search']}, "
             f"scheduler {meta['scheduler']}", trial_table(records, keys)]
    best = best_trial(records)
    if best is not None:
        config = _trial_config(meta, best)
        summary = {"trial_id": best.trial_id, "score": best.best, "metric": METRIC, "values": best.values,
                   "status": best.status, "checkpoint": best.checkpoint or best.last_checkpoint,
                   "next": next_commands(meta, best), "config": config}
        (sweep_dir / "best.json").write_text(json.dumps(summary, indent=2))
        lines.append(f"best: trial {best.trial_id}, val mR {best.best:.2f} with "
                     + ", ".join(f"{k}={format_value(v)}" for k, v in best.values.items()))
        lines.append(f"checkpoint: {summary['checkpoint']}")
        lines += ["continue with:", *(f"  {c}" for c in summary["next"])]
    timing = meta.get("timing")
    if timing and timing.get("trial_seconds"):
        lines.append(f"sweep wall time {timing['wall_seconds']:.0f}s for {timing['trial_seconds']:.0f}s of trial "
                     f"training ({timing['wall_seconds'] / timing['trial_seconds']:.2f}x)")
    with tempfile.TemporaryDirectory() as tmp:  # plots render locally, then go wherever the sweep lives
        for name, plot in (("sweep_values.png", lambda p: plot_sweep_values(records, meta.get("space", {}), p,
                                                                            title=meta["name"])),
                           ("sweep_curves.png", lambda p: plot_sweep_curves(records, p, title=meta["name"]))):
            if plot(Path(tmp) / name) is not None:
                (sweep_dir / name).write_bytes((Path(tmp) / name).read_bytes())
    lines.append(f"wrote {sweep_dir / 'trials.csv'}, best.json, sweep_values.png, sweep_curves.png")
    return "\n".join(lines)


def _trial_config(meta: dict, record: TrialRecord) -> dict | None:
    """The trial's resolved config: from its published checkpoint when it completed, else rebuilt."""
    if record.checkpoint and (Location.of(record.checkpoint) / "config.json").is_file():
        return json.loads((Location.of(record.checkpoint) / "config.json").read_text()).get("experiment")
    try:
        from ccr_ray.stages import resolve_config

        return resolve_config(meta["stage"], meta["config"], meta.get("overrides", []), trial=record.values).to_dict()
    except Exception:  # noqa: BLE001 - the report must render even if the config no longer resolves
        return None
