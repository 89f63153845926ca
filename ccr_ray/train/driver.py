"""The Ray Train driver: build the TorchTrainer for a planned stage, fit it, publish the selected checkpoint.

    build_trainer(plan)  -> TorchTrainer  (the frozen-feature cache, built if missing or stale) + the Ray Data
                                          stream + DDP workers + checkpoint/failure policy
    run_stage(plan)      -> StageResult   fit, then copy the selected checkpoint to {home}/runs/{exp}/{stage}/

Planning (every check that fails without a cluster) is `train/plan.py`: callers plan once, print the plan, and
pass it here. Ray Tune calls `run_stage` per trial (ccr_ray/tune), so nothing here assumes it owns the process.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ccr_ray import checkpoint as ckpt
from ccr_ray.config import ExperimentConfig
from ccr_ray.ray_utils import ensure_ray, train_logging_config
from ccr_ray.storage import Location
from ccr_ray.train.plan import CHECKPOINT_DIR, StageError, StagePlan, WorkerSpec

log = logging.getLogger(__name__)


@dataclass
class StageResult:
    checkpoint: Location  # {run.storage}/{experiment}/{stage}/checkpoint
    metrics: dict
    run_path: str
    history: list[dict] = field(default_factory=list)


WORKER_GROUP_START_RETRIES = 2


def check_resources(cfg: ExperimentConfig) -> None:
    """Refuse, before any cluster work, a request the cluster cannot meet: more CPUs, GPUs or custom resources than
    it has (Train would wait forever). With `scaling.wait_for_resources` (an autoscaling cluster whose worker nodes
    come on demand) a shortfall is only logged, and the run waits for the nodes."""
    import ray

    resources = ray.cluster_resources()
    s = cfg.scaling
    wanted = {"CPU": s.num_workers * s.cpus_per_worker, **{k: s.num_workers * v for k, v in s.resources_per_worker.items()}}
    if s.use_gpu:
        wanted["GPU"] = s.num_workers
    short = {k: (v, resources.get(k, 0.0)) for k, v in wanted.items() if v > resources.get(k, 0.0) + 1e-9}
    if short:
        detail = ", ".join(f"{v:g} {k} (the cluster has {have:g})" for k, (v, have) in short.items())
        message = (f"scaling: {s.num_workers} worker(s) need {detail}; lower scaling.cpus_per_worker (e.g. 0.5) or "
                   "scaling.num_workers, or set scaling.wait_for_resources=true on an autoscaling cluster")
        if not s.wait_for_resources:
            raise StageError(message)
        log.warning("%s: waiting for the autoscaler", message)
    cpus = resources.get("CPU", 0.0)
    if cpus - wanted["CPU"] < min(cfg.data.max_cpus, 1.0) - 1e-9:
        log.warning("scaling: Train reserves %.1f of %.1f CPUs, leaving less than data.max_cpus=%.1f for Ray Data; "
                    "the input pipeline may stall", wanted["CPU"], cpus, cfg.data.max_cpus)


def failure_config(cfg: ExperimentConfig):
    """Worker failures: `run.max_failures` restarts from the last checkpoint. Controller failures: the only ones Ray
    retries are worker-group start-up failures and time-outs (Ray 2.60); a busy machine can take longer than
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s) to start the workers, so they get WORKER_GROUP_START_RETRIES more
    tries. A request the cluster cannot meet is refused before the run (check_resources) or raises
    InsufficientClusterResourcesError, which is not retried; an autoscaling cluster waits for its nodes."""
    import ray.train

    return ray.train.FailureConfig(
        max_failures=cfg.run.max_failures,
        controller_failure_limit=-1 if cfg.scaling.wait_for_resources else WORKER_GROUP_START_RETRIES)


def build_trainer(plan: StagePlan, callbacks: list | None = None, storage_path: str | None = None,
                  name: str | None = None, train_fn: Callable[[dict], None] | None = None):
    """`train_fn` replaces the worker function (it receives the WorkerSpec dict); tests wrap `run_worker` with it."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ccr_ray.data.pipeline import build_datasets
    from ccr_ray.tokenization import english_tokenizer_folder
    from ccr_ray.train.worker import train_loop_per_worker

    cfg = plan.cfg
    ray.data.DataContext.get_current().enable_progress_bars = False  # the train log shows progress instead
    cache = None
    if plan.feature_cache is not None and plan.feature_cache.applicable:
        from ccr_ray.features import CacheError
        from ccr_ray.features.build import ensure_feature_cache

        try:
            cache, _ = ensure_feature_cache(plan.feature_cache, cfg.data, use_gpu=cfg.scaling.use_gpu,
                                            report=print)
        except CacheError as err:
            raise StageError(f"data.feature_cache: {err}") from None
    datasets, data_config = build_datasets(cfg, plan.stage, plan.dataset_root, plan.tokenizer_dir, plan.preprocess,
                                           plan.context_length, plan.train_languages, cache=cache,
                                           english_tokenizer=english_tokenizer_folder(plan.clip_cfg))
    spec = WorkerSpec.from_plan(plan, feature_cache=str(cache.folder) if cache is not None else None,
                                run_name=name, storage_path=storage_path)
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
        resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker},
        placement_strategy=cfg.scaling.placement_strategy)
    # checkpoints and Train's own snapshot ride through a storage outage of up to run.storage_retry_s
    storage = Location.of(spec.storage_path).with_retry(cfg.run.storage_retry_s)
    run_config = ray.train.RunConfig(
        name=spec.run_name,
        # shared storage is handed over as its pyarrow filesystem, so URI options (endpoint, region) carry over
        storage_path=storage.path,
        storage_filesystem=None if storage.is_local else storage.fs,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep,
                                                     checkpoint_score_attribute="val/mR",
                                                     checkpoint_score_order="max"),
        failure_config=failure_config(cfg),
        callbacks=callbacks or None,
        logging_config=train_logging_config(cfg.run.verbose),
    )
    return TorchTrainer(train_fn or train_loop_per_worker, train_loop_config=spec.to_dict(), scaling_config=scaling,
                        run_config=run_config, datasets=datasets, dataset_config=data_config,
                        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"))


def run_stage(plan: StagePlan, fresh: bool = False, callbacks: list | None = None, publish: bool = True,
              storage_path: str | None = None, name: str | None = None,
              train_fn: Callable[[dict], None] | None = None) -> StageResult:
    """Fit the planned stage on the connected (or a new local) Ray cluster and publish its selected checkpoint.
    `fresh` discards an earlier run of the same name instead of resuming it."""
    cfg = plan.cfg
    ensure_ray()
    check_resources(cfg)
    run_dir = Location.of(storage_path or plan.storage_path) / (name or plan.run_name)
    if fresh:
        run_dir.delete()
    trainer = build_trainer(plan, callbacks=callbacks, storage_path=storage_path, name=name, train_fn=train_fn)
    from ray.train import TrainingFailedError

    try:
        result = trainer.fit()  # Train V2 raises on failure; a Result carrying .error is handled the same way
    except TrainingFailedError as err:
        raise training_failure(plan, run_dir, err) from err
    if result.error:
        raise training_failure(plan, run_dir, result.error) from result.error
    with result.checkpoint.as_directory() as last:
        history = ckpt.read_meta(last).log  # the whole log lives in the last checkpoint
    out = plan.output_dir / CHECKPOINT_DIR
    with select_checkpoint(result, cfg.train.select).as_directory() as folder:
        meta = ckpt.read_meta(folder)
        if publish:
            ckpt.copy_checkpoint(folder, out)
            publish_run_files(plan, meta, history, result, run_dir)
    return StageResult(checkpoint=out, metrics=meta.metrics, run_path=run_dir.uri, history=history)


class TrainingFailed(StageError):
    """A stage's Ray Train run failed after its retries (`run.max_failures`). The message names the stage, the run
    folder on its storage and the root cause in one line; the full chain stays on the exception (`__cause__`)."""


def training_failure(plan: StagePlan, run_dir: Location, error: BaseException) -> TrainingFailed:
    """Ray Train's TrainingFailedError as one line. Its message is the cause's whole traceback; the root cause is a
    worker's exception (WorkerGroupError.worker_failures, lowest rank first) or the controller's (ControllerError,
    e.g. an upload to an unreachable object store), and its last line says what happened."""
    failures = getattr(error, "worker_failures", None) or {}
    cause = failures[min(failures)] if failures else getattr(error, "controller_failure", error)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    detail = lines[-1] if lines else type(cause).__name__
    if not detail.startswith(type(cause).__name__):
        detail = f"{type(cause).__name__}: {detail}"
    where = "worker" if failures else "controller" if hasattr(error, "controller_failure") else "Ray Train"
    return TrainingFailed(f"stage {plan.stage.name} failed ({where}: {detail}); its run is {run_dir.uri}: the same "
                          "command again resumes it from its last checkpoint there")


def select_checkpoint(result, select: str):
    """'final': the last checkpoint; 'best': the highest val/mR among those Ray kept (it always keeps the latest)."""
    if select == "final" or not result.best_checkpoints:
        return result.checkpoint
    return max(result.best_checkpoints, key=lambda cm: cm[1].get("val/mR", float("-inf")))[0]


def publish_run_files(plan: StagePlan, meta: ckpt.CheckpointMeta, history: list[dict], result,
                      run_dir: Location) -> None:
    """result.json, train_log.jsonl and training_curve.png beside the published checkpoint (any storage)."""
    from ccr_ray.plots import plot_training_curve

    out = plan.output_dir
    summary = {"stage": plan.stage.name, "run": run_dir.uri, "run_name": run_dir.name, "selected": plan.cfg.train.select,
               "selected_step": meta.step, "metrics": meta.metrics, "best_step": meta.best_step,
               "best_val_mR": meta.best_score, "final_metrics": result.metrics}
    (out / "train_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_training_curve(history, Path(tmp) / "training_curve.png",
                                  title=f"{plan.cfg.run.experiment} / {plan.stage.name}")
        if png is not None:
            (out / "training_curve.png").write_bytes(png.read_bytes())
    (out / "result.json").write_text(json.dumps(summary, indent=2))  # last: a finished stage has it
