"""The Ray Train worker: its shard of the training stream -> the plain training loop (loop.py) -> Ray Train.

    train_loop_per_worker(spec dict)    what the TorchTrainer runs: WorkerSpec.from_dict -> run_worker
    run_worker(spec, on_step=None)      build the TrainState (resume from Ray's checkpoint if there is one), wrap
                                        it for DDP, then loop.run(state, shard batches, on_eval=report)

Every `eval_every` steps and at the last step rank 0 validates and all workers report; rank 0 attaches a
checkpoint (our Ray-agnostic folder format), so a replaced worker resumes from it (`FailureConfig`).
`on_step` is for callers that wrap the worker (tests inject faults through it); production passes none.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Callable

import ray.train
import ray.train.torch
import torch

from ccr_ray.data import schema
from ccr_ray.data.pipeline import TRAIN_KEY
from ccr_ray.ray_utils import quiet_worker_console
from ccr_ray.train import loop
from ccr_ray.train.plan import WorkerSpec
from ccr_ray.train.state import TrainState

log = logging.getLogger(__name__)
# Progress lines go through logging, not print: Ray Train tees a worker's print to the console twice.
progress = logging.getLogger("ccr_ray.progress")


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

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
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


def default_torch_threads(node_cpus: int, data_cpus: float, local_workers: int) -> int:
    """Intra-op threads per worker: the node's cores less those Ray Data may use, shared by the node's workers.

    An OpenMP team that counts on a core the data pipeline is using stalls at every barrier: on 2 cores with
    2 torch threads, `clip` ran at ~110 samples/s while the stream was producing and ~390 after it finished;
    with 1 thread it held ~230-290 throughout (NOTES.md).
    """
    return max(1, (node_cpus - math.ceil(data_cpus)) // max(local_workers, 1))


def train_loop_per_worker(config: dict) -> None:
    run_worker(WorkerSpec.from_dict(config))  # back to typed values on the worker's first line


def run_worker(spec: WorkerSpec, on_step: Callable[[TrainState, dict], None] | None = None) -> None:
    cfg = spec.cfg
    if not cfg.run.verbose:
        quiet_worker_console()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    threads = cfg.scaling.torch_threads or default_torch_threads(os.cpu_count() or 1, cfg.data.max_cpus,
                                                                 context.get_local_world_size())
    torch.set_num_threads(threads)
    device = ray.train.torch.get_device()
    verbose = cfg.run.verbose and rank == 0
    name = cfg.stage

    started = time.perf_counter()
    state = TrainState.create(cfg, spec.tokenizer_dir, spec.parent, device, rank, world)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state.restore(folder)
        state.history.append({"step": state.step, "event": "resumed"})
        if verbose:
            progress.info(f"[{name}] resumed from step {state.step} (checkpoint {checkpoint.path})")
    if world > 1:
        # acquirers of the languages not drawn this step get no gradient: DDP must look for unused parameters
        find_unused = "adapters" in state.stage.trains and len(cfg.model.languages) > 1
        state.module = ray.train.torch.prepare_model(
            state.model, move_to_device=False,
            parallel_strategy_kwargs={"find_unused_parameters": find_unused, "broadcast_buffers": False})
    if spec.feature_cache and not any(r.get("event") == "feature_cache" for r in state.history):
        state.history.append({"step": state.step, "event": "feature_cache", "path": spec.feature_cache})

    batches = BatchStream(ray.train.get_dataset_shard(TRAIN_KEY), cfg.train.batch_size // world,
                          cfg.data.shuffle_buffer, cfg.data.prefetch_batches, cfg.train.seed + 1000 * rank)
    # validation rows for rank 0, read directly with pyarrow: a small split, read once, no stream needed (English
    # too: the gallery of a text-only backbone's text-to-text validation)
    val_table = (schema.read_split_table(spec.dataset_root, cfg.data.val_split,
                                         list(dict.fromkeys(["en", *spec.eval_languages])))
                 if rank == 0 else None)
    if verbose:
        progress.info(f"[{name}] set up in {time.perf_counter() - started:.1f}s: {world} worker(s), {threads} threads "
                      f"each, device {device}, precision {state.precision}, languages "
                      f"{','.join(state.train_languages)}, steps {state.step}->{cfg.train.max_steps}"
                      + (f", frozen features from {spec.feature_cache}" if spec.feature_cache else ""))
    if cfg.train.eval_before_training and state.step == 0 and val_table is not None:
        metrics = state.score_starting_weights(val_table, spec.dataset_root)
        if verbose:
            progress.info(f"[{name}] before training: mean mR {metrics['val/mR']:.2f}")

    bar = ProgressBar(name, state.step, cfg.train.max_steps) if rank == 0 else None

    def log_progress(state: TrainState, record: dict) -> None:
        if bar is not None:
            bar.log(record)
        if verbose:
            progress.info(loop.format_progress(name, state.step, cfg.train.max_steps, record))

    def stepped(state: TrainState, metrics: dict) -> None:
        if bar is not None:
            bar.step()
        if on_step is not None:
            on_step(state, metrics)

    loop.run(state, batches, on_log=log_progress, on_eval=_reporter(spec, val_table, rank, verbose, bar),
             on_step=stepped)
    if bar is not None:
        bar.close()
    if verbose:
        progress.info(f"[{name}] done: {cfg.train.max_steps} steps in {time.perf_counter() - started:.1f}s")


class ProgressBar:
    """One bar per stage on the driver's console (Ray's tqdm_ray: the worker sends the bar's state, the driver
    draws it): steps, ETA, and in its description the last loss, samples/s and validation mR."""

    def __init__(self, stage: str, step: int, total: int):
        from ray.experimental.tqdm_ray import tqdm

        self.stage, self.last, self.val = stage, "", ""
        self.bar = tqdm(desc=stage, total=total, unit="step")
        self.bar.n = step  # a resumed run starts where its checkpoint left off

    def step(self) -> None:
        self.bar.update(1)

    def log(self, record: dict) -> None:
        self.last = f"loss {record['loss']:.4f} | {record['samples_per_s']:.0f} samples/s"
        self._describe()

    def validated(self, mean_mr: float) -> None:
        self.val = f" | val mR {mean_mr:.1f}"
        self._describe()

    def _describe(self) -> None:
        self.bar.set_description(f"{self.stage} {self.last}{self.val}")

    def close(self) -> None:
        self.bar.close()


def _reporter(spec: WorkerSpec, val_table, rank: int, verbose: bool, bar: ProgressBar | None = None
              ) -> Callable[[TrainState], None]:
    """on_eval: rank 0 validates, logs and reports with a checkpoint; the other ranks report without one."""

    def report(state: TrainState) -> None:
        metrics: dict = {"step": state.step}
        if rank != 0:
            ray.train.report(metrics)
            return
        if val_table is not None:
            start = time.perf_counter()
            metrics.update(state.validate(val_table, spec.dataset_root))
            if bar is not None:
                bar.validated(metrics["val/mR"])
            if verbose:
                per_lang = " ".join(f"{k.split('/')[-1]} {v:.1f}" for k, v in metrics.items()
                                    if k.startswith("val/mR/"))
                progress.info(f"[{state.stage.name}] step {state.step} validation: mean mR {metrics['val/mR']:.2f} "
                              f"({per_lang}) [{time.perf_counter() - start:.1f}s]")
        state.history.append({"step": state.step, **{k: v for k, v in metrics.items() if k != "step"}})
        with tempfile.TemporaryDirectory() as tmp:
            folder = state.save(os.path.join(tmp, "checkpoint"), metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))

    return report
