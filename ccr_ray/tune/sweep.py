"""Ray Tune sweeps over the stage driver: every trial is `run_stage` (the same Ray Train run a stage job makes),
wrapped as Ray documents for Train V2: a function trainable that plans the trial's config, builds and fits the
TorchTrainer with `TuneReportCallback`, so Tune sees each validation (val/mR) and can stop a trial (ASHA).

    SweepSpec            what is swept: stage, base config, overrides, space, search, scheduler, trials; its
                         deterministic name (no timestamps) and folder {home}/sweeps/{name} (beside the runs:
                         {run.storage}/../sweeps/{name} on shared storage, so every node's trials write there)
    run_trial            the function trainable (one trial = one Ray Train run named {sweep}-{trial id}, so a
                         restored trial resumes its Train run from the last checkpoint)
    run_sweep(spec)      a new sweep, or (resume=True) Tune's restore of an interrupted one: finished trials are
                         not run again, errored and interrupted ones continue
Results are rendered from the folder by `report.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ccr_ray.config import ExperimentConfig
from ccr_ray.stages import resolve_config
from ccr_ray.storage import Location
from ccr_ray.tune import report
from ccr_ray.tune.space import Domain, count_trials, parse_domain

log = logging.getLogger(__name__)
DRIVER_CPUS = 0.5  # the trial driver (plans, builds the trainer, waits on fit); Tune rejects 0
SEARCHES = ("random", "optuna")
SCHEDULERS = ("asha", "none")


class SweepError(ValueError):
    """A sweep cannot start or resume; the message says why and what to do."""


@dataclass(frozen=True)
class SweepSpec:
    stage: str
    config: dict  # the --config file's contents, frozen at launch (trials must not see later edits)
    config_source: str  # what --config was, for the commands printed in best.json
    overrides: list[str]
    space: dict[str, str]  # key -> domain text
    num_samples: int = 8
    max_concurrent: int = 0  # 0 = as many as the cluster's resources allow
    search: str = "random"
    scheduler: str = "asha"
    seed: int = 0
    name: str = ""
    home: str = ""
    extra: dict = field(default_factory=dict)  # derived at launch: validations per trial, per-trial resources

    def domains(self) -> dict[str, Domain]:
        return {k: parse_domain(k, v) for k, v in self.space.items()}

    def base_config(self) -> ExperimentConfig:
        return resolve_config(self.stage, self.config, self.overrides)

    def trial_config(self, values: dict[str, Any]) -> ExperimentConfig:
        """Trial values enter last (the documented precedence), through the same validation as every job."""
        return resolve_config(self.stage, self.config, self.overrides, trial=values)

    @property
    def folder(self) -> Location:
        return sweeps_root(self.base_config()) / self.name

    @property
    def trials(self) -> int:
        return count_trials(self.domains(), self.num_samples)

    def identity(self) -> dict:
        """What makes two sweeps the same sweep (the name hashes it; a resume must match it)."""
        return {k: getattr(self, k) for k in ("stage", "config", "overrides", "space", "num_samples", "search",
                                               "scheduler", "seed")}

    def with_default_name(self) -> SweepSpec:
        if self.name:
            return self
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:8]
        return dataclasses.replace(self, name=f"{self.stage}-{digest}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SweepSpec:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------- resources


def trial_cpus(cfg: ExperimentConfig) -> float:
    """What one trial occupies while it trains: its driver, its Train workers and the CPUs its Ray Data stream
    may use (data.max_cpus; the platform notes' 2-core deadlock applies per trial)."""
    return DRIVER_CPUS + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.max_cpus


def trial_gpus(cfg: ExperimentConfig) -> int:
    return cfg.scaling.num_workers if cfg.scaling.use_gpu else 0


def concurrency(cfg: ExperimentConfig, resources: dict[str, float], requested: int = 0) -> tuple[int, str]:
    """Trials at once from the cluster's resources and each trial's needs; and why."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    need_cpu, need_gpu = trial_cpus(cfg), trial_gpus(cfg)
    by_cpu = math.floor(cpus / need_cpu + 1e-9)
    reason = f"{cpus:g} CPUs / {need_cpu:g} per trial"
    if by_cpu == 0 and DRIVER_CPUS + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.data.task_cpus <= cpus:
        by_cpu, reason = 1, f"{reason}, but one fits with Ray Data at data.task_cpus"
    limit = by_cpu
    if need_gpu:
        by_gpu = math.floor(gpus / need_gpu + 1e-9)
        reason += f", {gpus:g} GPUs / {need_gpu} per trial"
        limit = min(limit, by_gpu)
    if requested:
        limit, reason = min(limit, requested), f"{reason}, --max-concurrent {requested}"
    return limit, reason


# --------------------------------------------------------------------------------------------- the trial


def sweeps_root(cfg: ExperimentConfig) -> Location:
    """{home}/sweeps for local runs; beside `run.storage` otherwise, since a trial may run on any node."""
    return Location.of(cfg.runs_root).parent / "sweeps"


def _event(folder: Location, **event) -> None:
    """One object per event (an object store cannot append), named so they list in order."""
    stamp = time.time()
    (folder / report.EVENTS_DIR / f"{stamp:017.6f}-{event['event']}.json").write_text(
        json.dumps({"time": stamp, **event}))


def run_trial(values: dict, sweep: dict) -> None:
    """Tune's function trainable: one trial = one Ray Train run of the stage with the trial's values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage

    spec = SweepSpec.from_dict(sweep)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    folder = spec.folder / "trials" / trial_id
    published = folder / "result.json"
    if any(e.get("event") == "end" for e in report.read_events(folder)) and published.is_file():
        # the trial finished, but the sweep's driver died before Tune recorded it: report its result, train nothing
        tune.report(json.loads(published.read_text())["final_metrics"])
        _event(folder, event="already_finished")
        return
    cfg = spec.trial_config(values)
    plan = dataclasses.replace(plan_stage(cfg, spec.config_source), output_dir=folder)
    _event(folder, event="start", values=values, tune_dir=Path(context.get_trial_dir()).name)
    started = time.perf_counter()
    # named from the sweep and the trial id, never a timestamp: a restored trial resumes this Train run
    run_stage(plan, callbacks=[TuneReportCallback()], name=f"{spec.name}-{trial_id}",
              storage_path=(spec.folder / "train").uri)
    _event(folder, event="end", seconds=round(time.perf_counter() - started, 2))


# --------------------------------------------------------------------------------------------- the sweep


def prepare(spec: SweepSpec) -> SweepSpec:
    """Validate everything a sweep needs without Ray and derive the per-trial settings (named, frozen)."""
    from ccr_ray.train.plan import plan_stage

    if spec.search not in SEARCHES:
        raise SweepError(f"--search: {spec.search!r} is not one of {', '.join(SEARCHES)}")
    if spec.scheduler not in SCHEDULERS:
        raise SweepError(f"--scheduler: {spec.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if spec.num_samples < 1:
        raise SweepError("--num-samples: must be >= 1")
    if spec.max_concurrent < 0:
        raise SweepError(f"--max-concurrent: {spec.max_concurrent} must be >= 0 (0: as many as the cluster fits)")
    cfg = spec.base_config()
    validations = math.ceil(cfg.train.max_steps / (cfg.train.eval_every or cfg.train.max_steps))
    plan_stage(cfg, spec.config_source)  # the stage can start at all (parent checkpoint, data, tokenizer)
    extra = {"max_steps": cfg.train.max_steps, "validations": validations, "trial_cpus": trial_cpus(cfg),
             "trial_gpus": trial_gpus(cfg), "experiment": cfg.run.experiment}
    return dataclasses.replace(spec, home=spec.home or str(cfg.home), extra=extra).with_default_name()


def describe(spec: SweepSpec, resources: dict[str, float]) -> str:
    cfg = spec.base_config()
    limit, why = concurrency(cfg, resources, spec.max_concurrent)
    lines = [f"sweep        {spec.name} -> {spec.folder}",
             f"stage        {spec.stage} ({spec.extra['max_steps']} steps, {spec.extra['validations']} validations "
             f"per trial)",
             "space        " + "\n             ".join(f"{k} = {d}" for k, d in spec.domains().items()),
             f"trials       {spec.trials} ({spec.num_samples} samples{' x grid' if spec.trials > spec.num_samples else ''}), "
             f"search {spec.search}, scheduler {spec.scheduler}"
             + (" (ASHA on val/mR, max; time = validations)" if spec.scheduler == "asha" else ""),
             f"per trial    {DRIVER_CPUS:g} CPU driver + {cfg.scaling.num_workers} worker(s) x "
             f"{cfg.scaling.cpus_per_worker:g} CPU{' + 1 GPU' if cfg.scaling.use_gpu else ''} + Ray Data up to "
             f"{cfg.data.max_cpus:g} CPU = {trial_cpus(cfg):g} CPU, {trial_gpus(cfg)} GPU",
             f"concurrency  {limit} trial(s) at a time ({why})"]
    if spec.scheduler == "asha" and spec.extra["validations"] < 2:
        lines.append("warning      ASHA compares trials at validations; with one validation per trial it stops "
                     "nothing: set train.eval_every below train.max_steps")
    return "\n".join(lines)


def _search(spec: SweepSpec, limit: int):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if spec.search == "optuna":
        try:
            import optuna  # noqa: F401
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise SweepError("--search optuna needs the optional extra: pip install 'ccr-ray[optuna]'") from None
        if any(d.kind == "grid" for d in spec.domains().values()):
            raise SweepError("--search optuna: grid(...) domains are for random search; use choice(...)")
        return ConcurrencyLimiter(OptunaSearch(seed=spec.seed), max_concurrent=limit)
    return BasicVariantGenerator(random_state=spec.seed, max_concurrent=limit)


def _scheduler(spec: SweepSpec):
    if spec.scheduler == "none":
        return None
    from ccr_ray.tune.asha import RungKeepingASHA

    # training_iteration counts forwarded reports = validations, so the rungs are in validations. max_t is one past
    # the last validation: at max_t ASHA stops a trial itself, which would kill the trial's driver at its final
    # report, before it publishes its checkpoint; this way a trial that survives every rung ends on its own
    return RungKeepingASHA(time_attr="training_iteration", max_t=spec.extra["validations"] + 1, grace_period=1,
                           reduction_factor=2)


def to_tune(domain: Domain):
    from ray import tune

    if domain.kind == "choice":
        return tune.choice(list(domain.args))
    if domain.kind == "grid":
        return tune.grid_search(list(domain.args))
    return getattr(tune, domain.kind)(*domain.args)  # uniform, loguniform, quniform, randint


def _trainable(spec: SweepSpec):
    from ray import tune

    return tune.with_resources(tune.with_parameters(run_trial, sweep=spec.to_dict()), {"CPU": DRIVER_CPUS})


def save_meta(spec: SweepSpec, **updates) -> dict:
    path = spec.folder / report.SWEEP_FILE
    meta = json.loads(path.read_text()) if path.is_file() else {}
    meta.update({**spec.to_dict(), "config_source": spec.config_source, **updates})
    path.write_text(json.dumps(meta, indent=2))
    return meta


def run_sweep(spec: SweepSpec, resume: bool = False, verbose: int = 1) -> dict:
    """Fit (or restore and finish) the sweep on the connected Ray cluster; returns sweep.json's contents."""
    import ray
    from ray import tune

    tune_dir = spec.folder / "tune"
    existing = spec.folder / report.SWEEP_FILE
    if existing.is_file():
        previous = json.loads(existing.read_text())
        same = {k: previous.get(k) for k in spec.identity()} == spec.identity()
        if not same:
            raise SweepError(f"{spec.folder} holds another sweep of that name (different stage, config, space or "
                             "settings); choose another --name")
        if not resume:
            raise SweepError(f"sweep {spec.name} exists at {spec.folder}: add --resume to continue it "
                             "(finished trials are kept), or choose another --name")
    elif resume:
        raise SweepError(f"--resume: no sweep {spec.name} at {spec.folder}")
    limit, why = concurrency(spec.base_config(), ray.cluster_resources(), spec.max_concurrent)
    if limit < 1:
        raise SweepError(f"one trial needs {spec.extra['trial_cpus']:g} CPUs and {spec.extra['trial_gpus']} GPUs; "
                         f"the cluster has {why}: lower scaling.cpus_per_worker or data.max_cpus")
    log.info("concurrency: %d trial(s) at a time (%s)", limit, why)
    print(f"[tune] {limit} trial(s) at a time ({why})", flush=True)
    started = time.time()
    meta = save_meta(spec, finished=False, started=started)
    trainable = _trainable(spec)
    fs = None if tune_dir.is_local else tune_dir.fs
    if resume and tune.Tuner.can_restore(tune_dir.path, storage_filesystem=fs):
        # Tune's restore: finished trials stay finished; errored and interrupted trials run again, and each one's
        # Train run (same name) resumes from its last checkpoint
        tuner = tune.Tuner.restore(tune_dir.path, trainable=trainable, resume_errored=True, resume_unfinished=True,
                                   storage_filesystem=fs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={k: to_tune(d) for k, d in spec.domains().items()},
            # the concurrency limit lives in the search algorithm (max_concurrent / ConcurrencyLimiter)
            tune_config=tune.TuneConfig(metric=report.METRIC, mode="max", num_samples=spec.num_samples,
                                        search_alg=_search(spec, limit), scheduler=_scheduler(spec)),
            run_config=tune.RunConfig(name="tune", storage_path=spec.folder.path, verbose=verbose,
                                      storage_filesystem=None if spec.folder.is_local else spec.folder.fs,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    tuner.fit()
    records = report.collect_trials(spec.folder)
    wall = time.time() - started + float(meta.get("timing", {}).get("wall_seconds", 0.0) if resume else 0.0)
    timing = {"wall_seconds": round(wall, 1), "trial_seconds": round(sum(r.seconds for r in records), 1)}
    return save_meta(spec, finished=True, timing=timing)
