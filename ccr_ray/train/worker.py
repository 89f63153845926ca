"""The Ray Train worker: dataset shards -> plain training loop (loop.py) -> `ray.train.report`.

Per step every worker draws the same language (a function of seed and step), takes its local share of that
language's batch from the language's stream, and steps the DDP-wrapped model. Every `eval_every` steps and at
the last step rank 0 validates, and all workers report; rank 0 attaches a checkpoint (our Ray-agnostic folder
format), so a replaced worker resumes from it (`FailureConfig`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch

from ccr_ray.config import ExperimentConfig
from ccr_ray.data import schema
from ccr_ray.data.pipeline import TRAIN_KEY
from ccr_ray.data.preprocess import select_language
from ccr_ray.stages import STAGES
from ccr_ray.train.loop import Throughput, TrainState, format_progress, language_for_step, stage_languages

log = logging.getLogger(__name__)
# Progress lines go through logging, not print: Ray Train tees a worker's print to the console twice.
progress = logging.getLogger("ccr_ray.progress")

# Test hook: crash this worker once at the given step (the failure-recovery test sets it via the environment).
CRASH_ENV = "CCR_RAY_CRASH_AT_STEP"


class BatchStream:
    """Epoch-restarting iterator over this worker's shard of the training stream."""

    def __init__(self, shard, batch_size: int, shuffle_buffer: int, prefetch: int, seed: int):
        self.shard, self.batch_size = shard, batch_size
        self.shuffle_buffer, self.prefetch, self.seed = shuffle_buffer, prefetch, seed
        self.epoch = 0
        self.iterator = None

    def _start(self):
        self.epoch += 1
        return iter(self.shard.iter_torch_batches(
            batch_size=self.batch_size, drop_last=True, prefetch_batches=self.prefetch,
            local_shuffle_buffer_size=self.shuffle_buffer or None,
            local_shuffle_seed=(self.seed + self.epoch) if self.shuffle_buffer else None))

    def next(self) -> dict[str, torch.Tensor]:
        if self.iterator is None:
            self.iterator = self._start()
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = self._start()
            try:
                return next(self.iterator)
            except StopIteration:
                raise RuntimeError(f"the training stream yields no full batch of {self.batch_size} (too little "
                                   "data for the batch size and number of workers?)") from None


def _val_table(rank: int, paths: dict, cfg: ExperimentConfig, languages: list[str]) -> pa.Table | None:
    """Validation rows for rank 0, read directly with pyarrow: a small split, read once, no stream needed."""
    if rank != 0:
        return None
    return schema.read_split_table(paths["dataset_root"], cfg.data.val_split, languages)


def default_torch_threads(node_cpus: int, data_cpus: float, local_workers: int) -> int:
    """Intra-op threads per worker: the node's cores less those Ray Data may use, shared by the node's workers.

    An OpenMP team that counts on a core the data pipeline is using stalls at every barrier: on 2 cores with
    2 torch threads, `clip` ran at ~110 samples/s while the stream was producing and ~390 after it finished;
    with 1 thread it held ~230-290 throughout (NOTES.md).
    """
    return max(1, (node_cpus - math.ceil(data_cpus)) // max(local_workers, 1))


def train_loop_per_worker(config: dict) -> None:
    cfg = ExperimentConfig.from_dict(config["experiment"])  # back to a dataclass on the worker's first line
    paths = config["paths"]
    stage = STAGES[cfg.stage]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = cfg.scaling.torch_threads or default_torch_threads(os.cpu_count() or 1, cfg.data.max_cpus,
                                                                 context.get_local_world_size())
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    verbose = cfg.run.verbose and rank == 0

    started = time.perf_counter()
    state = TrainState.create(cfg, paths["tokenizer"], paths.get("parent"), device, rank, world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state.restore(folder)
        state.history.append({"step": state.step, "event": "resumed"})
        if verbose:
            progress.info(f"[{stage.name}] resumed from step {state.step} (checkpoint {checkpoint.path})")
    if world > 1:
        # acquirers of the languages not drawn this step get no gradient: DDP must look for unused parameters
        find_unused = "adapters" in stage.trains and len(cfg.model.languages) > 1
        state.module = ray.train.torch.prepare_model(
            state.model, move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": find_unused, "broadcast_buffers": False})

    if paths.get("feature_cache") and not any(r.get("event") == "feature_cache" for r in state.history):
        state.history.append({"step": state.step, "event": "feature_cache", "path": paths["feature_cache"]})
    languages = stage_languages(cfg, stage, stage.languages)
    stream = BatchStream(ray.train.get_dataset_shard(TRAIN_KEY), cfg.train.batch_size // world,
                         cfg.data.shuffle_buffer, cfg.data.prefetch_batches, cfg.train.seed + 1000 * rank)
    val_table = _val_table(rank, paths, cfg, stage_languages(cfg, stage, stage.eval_languages))
    max_steps, eval_every = cfg.train.max_steps, cfg.train.eval_every or cfg.train.max_steps
    crash_at = int(os.environ.get(CRASH_ENV, "-1"))
    speed = Throughput()
    if verbose:
        progress.info(f"[{stage.name}] set up in {time.perf_counter() - started:.1f}s: {world} worker(s), {threads} threads each, device {device}, precision "
                      f"{state.precision}, languages {','.join(languages)}, steps {state.step}->{max_steps}"
                      + (f", frozen features from {paths['feature_cache']}" if paths.get("feature_cache") else ""))

    if cfg.train.eval_before_training and state.step == 0 and val_table is not None:
        _score_starting_weights(state, val_table, paths.get("dataset_root"), verbose)
    first_batch_logged = False
    while state.step < max_steps:
        lang = language_for_step(cfg.train.seed, state.step, languages)
        batch = select_language(stream.next(), lang, english_only=languages == ["en"])
        if state.step == crash_at and not os.path.exists(paths["crash_marker"]):
            open(paths["crash_marker"], "w").close()
            raise RuntimeError(f"injected crash at step {crash_at} (test hook {CRASH_ENV})")
        if not first_batch_logged and verbose:
            progress.info(f"[{stage.name}] first batch after {time.perf_counter() - started:.1f}s")
            first_batch_logged = True
        metrics = state.train_step(batch, lang)
        speed.add(cfg.train.batch_size)
        if state.step % cfg.train.log_every == 0 or state.step == max_steps:
            rate = speed.rate()
            state.history.append({"step": state.step, "lang": lang, "lr": state.optim.lr, "samples_per_s": rate,
                                  **metrics})
            if verbose:
                progress.info(format_progress(stage.name, state.step, max_steps, metrics, lang, state.optim.lr, rate))
        if state.step % eval_every == 0 or state.step == max_steps:
            _validate_and_report(state, val_table, rank, paths.get("dataset_root"), verbose)
    if verbose:
        progress.info(f"[{stage.name}] done: {max_steps} steps in {time.perf_counter() - started:.1f}s")


def _score_starting_weights(state: TrainState, val_table, dataset_root: str | None, verbose: bool) -> None:
    """Rank 0 scores the weights the stage starts from, as the seeds do before training: logged for the curve and
    the log, neither a checkpoint nor a candidate for model selection."""
    best = (state.best_score, state.best_step)
    metrics = state.validate(val_table, dataset_root)
    state.best_score, state.best_step = best
    metrics.pop("val/best_mR", None)
    state.history.append({"step": 0, "event": "before_training", **metrics})
    if verbose:
        progress.info(f"[{state.stage.name}] before training: mean mR {metrics['val/mR']:.2f}")


def _validate_and_report(state: TrainState, val_table, rank: int, dataset_root: str | None, verbose: bool) -> None:
    metrics: dict = {"step": state.step}
    if rank == 0:
        if val_table is not None:
            start = time.perf_counter()
            metrics.update(state.validate(val_table, dataset_root))
            if verbose:
                per_lang = " ".join(f"{k.split('/')[-1]} {v:.1f}" for k, v in metrics.items()
                                    if k.startswith("val/mR/"))
                progress.info(f"[{state.stage.name}] step {state.step} validation: mean mR {metrics['val/mR']:.2f} "
                              f"({per_lang}) [{time.perf_counter() - start:.1f}s]")
        state.history.append({"step": state.step, **{k: v for k, v in metrics.items() if k != "step"}})
        with tempfile.TemporaryDirectory() as tmp:
            folder = state.save(os.path.join(tmp, "checkpoint"), metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
    else:
        ray.train.report(metrics)


def read_history(checkpoint_dir: str) -> list[dict]:
    with open(os.path.join(checkpoint_dir, "state.json")) as f:
        return json.load(f).get("log", [])
