"""The Ray Train driver: resolve and check everything a stage needs, build the TorchTrainer, fit, publish.

    plan_stage(cfg)      -> StagePlan     all fail-fast checks (dataset, splits, languages, tokenizer, parent
                                          checkpoint, pretrained file, feature cache), before any cluster work
    build_trainer(plan)  -> TorchTrainer  (the frozen-feature cache, built if missing or stale) + the Ray Data
                                          stream + DDP workers + checkpoint/failure policy
    run_stage(cfg)       -> StageResult   fit, then copy the selected checkpoint to {home}/runs/{exp}/{stage}/

Ray Tune calls `run_stage` per trial (ccr_ray/tune), so nothing here assumes it owns the process.
Run names are deterministic (stage + a hash of the training-relevant config): re-running the same command
resumes the same run (Ray Train V2 resumes from the last checkpoint of a run with the same name and storage).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ccr_ray.config import ExperimentConfig
from ccr_ray.data import schema
from ccr_ray.data.feature_cache import CacheError, FeatureCachePlan, plan_feature_cache
from ccr_ray.models import backbone
from ccr_ray.stages import STAGES, Stage
from ccr_ray.train import checkpoint as ckpt
from ccr_ray.train.loop import stage_languages

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoint"  # {stage_dir}/checkpoint: the stage's output, what child stages start from


class StageError(RuntimeError):
    """A stage cannot start: missing parent checkpoint, dataset, split, language or file. Raised before any
    cluster work; the message says what is missing and what to run."""


@dataclass
class StagePlan:
    cfg: ExperimentConfig
    stage: Stage
    dataset_root: str
    tokenizer_dir: str
    parent: str | None
    clip_cfg: dict
    preprocess: dict
    context_length: int
    train_languages: list[str]
    eval_languages: list[str]
    run_name: str
    storage_path: str
    output_dir: Path
    config_source: str | None = None  # what --config was (for "run this first" messages)
    feature_cache: FeatureCachePlan | None = None  # None: data.feature_cache is off

    def summary(self) -> str:
        cfg = self.cfg
        return "\n".join([
            f"stage        {self.stage.name}: {self.stage.summary}",
            f"trains       {', '.join(self.stage.trains)}",
            f"losses       {', '.join(f'{k} x {v:g}' for k, v in cfg.loss.weights.items())}",
            f"data         {self.dataset_root} ({cfg.data.train_split}/{cfg.data.val_split}), "
            f"inputs {', '.join(self.stage.inputs)}",
            f"languages    train {','.join(self.train_languages)} | eval {','.join(self.eval_languages)}",
            f"starts from  {self.parent or (cfg.model.backbone.pretrained or 'random init (' + cfg.model.backbone.name + ')')}",
            f"optimizer    {cfg.optim.name} lr {cfg.optim.lr:g}, {cfg.optim.schedule} (warmup {cfg.optim.warmup}), "
            f"{cfg.train.max_steps} steps x batch {cfg.train.batch_size}",
            f"workers      {cfg.scaling.num_workers} x {cfg.scaling.cpus_per_worker} CPU"
            f"{' + 1 GPU' if cfg.scaling.use_gpu else ''}",
            f"run          {self.storage_path}/{self.run_name}",
            f"output       {self.output_dir / CHECKPOINT_DIR}",
        ] + ([f"features     frozen-feature cache: {self.feature_cache.describe()}"] if self.feature_cache else []))


@dataclass
class StageResult:
    checkpoint: Path  # {stage_dir}/checkpoint
    metrics: dict
    run_path: str
    history: list[dict] = field(default_factory=list)


def run_name(cfg: ExperimentConfig, parent: str | None) -> str:
    """Deterministic: no timestamps or random values (resume depends on it)."""
    d = cfg.to_dict()
    relevant = {k: d[k] for k in ("stage", "model", "data", "loss", "optim", "train")}
    relevant["parent"] = parent
    digest = hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:8]
    return f"{cfg.stage}-{digest}"


INIT_FROM_PRETRAINED = "pretrained"  # run.init_from value: start from model.backbone.pretrained, not a parent


def _parent_checkpoint(cfg: ExperimentConfig, stage: Stage, config_source: str | None) -> str | None:
    if cfg.run.init_from == INIT_FROM_PRETRAINED:
        if not cfg.model.backbone.pretrained:
            raise StageError("run.init_from=pretrained: set model.backbone.pretrained to a local CLIP weights file")
        return None
    if cfg.run.init_from:
        path = Path(cfg.path(cfg.run.init_from))
        if not (path / ckpt.MODEL_FILE).exists():
            raise StageError(f"run.init_from: {path} is not a ccr-ray checkpoint folder (no {ckpt.MODEL_FILE})")
        return str(path)
    if stage.parent is None:
        return None
    path = cfg.stage_dir(stage.parent) / CHECKPOINT_DIR
    if (path / ckpt.MODEL_FILE).exists():
        return str(path)
    if stage.parent_optional and cfg.model.backbone.pretrained:
        return None
    parent = STAGES[stage.parent]
    hint = (" (or set model.backbone.pretrained to a local CLIP weights file, e.g. "
            "--set model.backbone.pretrained=/path/to/ViT-B-32.pt)" if stage.parent_optional else "")
    raise StageError(
        f"stage {stage.name!r} starts from the {parent.name!r} checkpoint, and there is none at {path}.\n"
        f"Run first: {parent.command(config_source)}{hint}")


def plan_stage(cfg: ExperimentConfig, config_source: str | None = None) -> StagePlan:
    """Every check that can fail without a cluster, with messages naming the field or path."""
    stage = STAGES[cfg.stage]
    parent = _parent_checkpoint(cfg, stage, config_source)
    dataset_root = cfg.path(getattr(cfg.data, stage.dataset))
    try:
        manifest = schema.load_manifest(dataset_root)
    except schema.DatasetError as err:
        hint = " (make the embedded default with: python jobs/make_demo_data.py)" if "demo" in dataset_root else ""
        raise StageError(f"data.{stage.dataset}: {err}{hint}") from None
    for split in (cfg.data.train_split, cfg.data.val_split):
        if split not in manifest.splits:
            raise StageError(f"data.{stage.dataset}: {dataset_root} has no split {split!r} "
                             f"(splits: {', '.join(manifest.splits)})")
    train_languages = stage_languages(cfg, stage, stage.languages)
    eval_languages = stage_languages(cfg, stage, stage.eval_languages)
    needed = set(train_languages) | ({"en"} if "text_en" in stage.inputs else set())
    train_caps = manifest.splits[cfg.data.train_split].captions
    missing = sorted(lang for lang in needed if not train_caps.get(lang))
    if missing:
        raise StageError(f"model.languages: {dataset_root} split {cfg.data.train_split!r} has no captions in "
                         f"{', '.join(missing)} (it has {', '.join(k for k, v in train_caps.items() if v)})")
    val_caps = manifest.splits[cfg.data.val_split].captions
    if not any(val_caps.get(lang) for lang in eval_languages):
        raise StageError(f"data.val_split: {dataset_root} split {cfg.data.val_split!r} has no captions in any of "
                         f"{', '.join(eval_languages)}")
    tokenizer_dir = _tokenizer_dir(cfg, stage, parent, dataset_root, manifest)
    if parent:
        meta = ckpt.read_meta(parent)
        clip_cfg, preprocess = meta.clip_cfg, meta.preprocess
    else:
        if cfg.model.backbone.pretrained and not Path(cfg.path(cfg.model.backbone.pretrained)).is_file():
            raise StageError(f"model.backbone.pretrained: no such file {cfg.path(cfg.model.backbone.pretrained)}")
        try:
            clip_cfg = backbone.backbone_model_config(cfg.model.backbone.name)
        except (ValueError, FileNotFoundError) as err:
            raise StageError(str(err)) from None
        preprocess = backbone.preprocess_from_model_config(clip_cfg)
    if cfg.model.text.embeddings_init and not Path(cfg.path(cfg.model.text.embeddings_init)).is_dir():
        raise StageError(f"model.text.embeddings_init: no such folder {cfg.path(cfg.model.text.embeddings_init)}")
    context = cfg.model.text.context_length or int(clip_cfg["text_cfg"].get("context_length", 77))
    try:
        feature_cache = plan_feature_cache(cfg, stage, parent, dataset_root, clip_cfg, preprocess, context)
    except (CacheError, OSError) as err:
        raise StageError(f"data.feature_cache: {err}") from None
    if feature_cache is not None and not feature_cache.applicable:
        log.info("data.feature_cache: %s", feature_cache.note)
    name = run_name(cfg, parent)
    return StagePlan(cfg=cfg, stage=stage, dataset_root=dataset_root, tokenizer_dir=tokenizer_dir, parent=parent,
                     clip_cfg=clip_cfg, preprocess=preprocess, context_length=context,
                     train_languages=train_languages, eval_languages=eval_languages, run_name=name,
                     storage_path=str(cfg.home / "runs" / cfg.run.experiment / "ray"),
                     output_dir=cfg.stage_dir(), config_source=config_source, feature_cache=feature_cache)


def _tokenizer_dir(cfg: ExperimentConfig, stage: Stage, parent: str | None, root: str, manifest) -> str:
    """The tokenizer must match the token table E: inherit the parent's copy when E is inherited."""
    if parent and stage.inherit == "all" and ckpt.tokenizer_of(parent):
        return ckpt.tokenizer_of(parent)
    if cfg.model.text.tokenizer == "auto":
        if not manifest.tokenizer:
            raise StageError(f"model.text.tokenizer: 'auto' needs a tokenizer shipped with the dataset, and "
                             f"{root} has none; set it to a Hugging Face tokenizer folder (M-BERT)")
        folder = Path(root) / manifest.tokenizer
    else:
        folder = Path(cfg.path(cfg.model.text.tokenizer))
    if not folder.is_dir() or not any((folder / f).exists() for f in ("tokenizer.json", "vocab.txt")):
        raise StageError(f"model.text.tokenizer: {folder} is not a tokenizer folder (no tokenizer.json / vocab.txt)")
    return str(folder)


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (set inside `ray job submit`), else start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def check_resources(cfg: ExperimentConfig) -> None:
    import ray

    resources = ray.cluster_resources()
    cpus = resources.get("CPU", 0)
    want = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker
    if want > cpus:
        raise StageError(f"scaling: {cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker} CPU = {want} "
                         f"CPUs, the cluster has {cpus:g}; lower scaling.cpus_per_worker (e.g. 0.5)")
    if cfg.scaling.use_gpu and resources.get("GPU", 0) < cfg.scaling.num_workers:
        raise StageError(f"scaling.use_gpu: {cfg.scaling.num_workers} GPU workers requested, the cluster has "
                         f"{resources.get('GPU', 0):g} GPUs")
    if cpus - want < min(cfg.data.max_cpus, 1.0) - 1e-9:
        log.warning("scaling: Train reserves %.1f of %.1f CPUs, leaving less than data.max_cpus=%.1f for Ray Data; "
                    "the input pipeline may stall", want, cpus, cfg.data.max_cpus)


def build_trainer(plan: StagePlan, callbacks: list | None = None, storage_path: str | None = None,
                  name: str | None = None, env: dict | None = None):
    import ray.data
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ccr_ray.data.pipeline import build_datasets
    from ccr_ray.train.worker import train_loop_per_worker

    cfg = plan.cfg
    ray.data.DataContext.get_current().enable_progress_bars = False  # the train log shows progress instead
    cache = None
    if plan.feature_cache is not None and plan.feature_cache.applicable:
        from ccr_ray.data.cache_builder import ensure_feature_cache

        cache, _ = ensure_feature_cache(plan.feature_cache, cfg.data, use_gpu=cfg.scaling.use_gpu,
                                        report=print if cfg.run.verbose else None)
    datasets, data_config = build_datasets(cfg, plan.stage, plan.dataset_root, plan.tokenizer_dir, plan.preprocess,
                                           plan.context_length, plan.train_languages, cache=cache)
    storage = storage_path or plan.storage_path
    loop_config = {
        "experiment": cfg.to_dict(),
        "paths": {"tokenizer": plan.tokenizer_dir, "parent": plan.parent, "dataset_root": plan.dataset_root,
                  "crash_marker": os.path.join(storage, f".{name or plan.run_name}.crashed"),
                  "feature_cache": str(cache.folder) if cache is not None else None},
    }
    scaling = ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                      resources_per_worker={"CPU": cfg.scaling.cpus_per_worker})
    run_config = ray.train.RunConfig(
        name=name or plan.run_name,
        storage_path=storage,
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep,
                                                     checkpoint_score_attribute="val/mR",
                                                     checkpoint_score_order="max"),
        failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures, controller_failure_limit=0),
        callbacks=callbacks or None,
        worker_runtime_env={"env_vars": env} if env else None,
    )
    return TorchTrainer(train_loop_per_worker, train_loop_config=loop_config, scaling_config=scaling,
                        run_config=run_config, datasets=datasets, dataset_config=data_config,
                        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"))


def run_stage(cfg: ExperimentConfig, config_source: str | None = None, fresh: bool = False,
              callbacks: list | None = None, publish: bool = True, env: dict | None = None,
              storage_path: str | None = None, name: str | None = None) -> StageResult:
    plan = plan_stage(cfg, config_source)
    if cfg.run.verbose:
        print(plan.summary(), flush=True)
    ensure_ray()
    check_resources(cfg)
    run_dir = Path(storage_path or plan.storage_path) / (name or plan.run_name)
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    trainer = build_trainer(plan, callbacks=callbacks, storage_path=storage_path, name=name, env=env)
    result = trainer.fit()
    if result.error:
        raise result.error
    chosen = select_checkpoint(result, cfg.train.select)
    with chosen.as_directory() as folder:
        meta = ckpt.read_meta(folder)
        history = ckpt.read_meta(result.checkpoint.path if os.path.isdir(result.checkpoint.path) else folder).log
        out = plan.output_dir / CHECKPOINT_DIR
        if publish:
            ckpt.copy_checkpoint(folder, out)
            publish_run_files(plan, meta, history, result)
    return StageResult(checkpoint=out, metrics=meta.metrics, run_path=str(run_dir), history=history)


def select_checkpoint(result, select: str):
    """'final': the last checkpoint; 'best': the highest val/mR among those Ray kept (it always keeps the latest)."""
    if select == "final" or not result.best_checkpoints:
        return result.checkpoint
    return max(result.best_checkpoints, key=lambda cm: cm[1].get("val/mR", float("-inf")))[0]


def publish_run_files(plan: StagePlan, meta: ckpt.CheckpointMeta, history: list[dict], result) -> None:
    from ccr_ray.plots import plot_training_curve

    out = plan.output_dir
    out.mkdir(parents=True, exist_ok=True)
    summary = {"stage": plan.stage.name, "run": f"{plan.storage_path}/{plan.run_name}", "selected": plan.cfg.train.select,
               "selected_step": meta.step, "metrics": meta.metrics, "best_step": meta.best_step,
               "best_val_mR": meta.best_score, "final_metrics": result.metrics}
    (out / "result.json").write_text(json.dumps(summary, indent=2))
    with open(out / "train_log.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    plot_training_curve(history, out / "training_curve.png", title=f"{plan.cfg.run.experiment} / {plan.stage.name}")
