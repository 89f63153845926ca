"""The training loop in plain PyTorch. Read top to bottom, every step:

    draw the step's language     a function of (seed, step): every DDP worker and a resumed run draw the same
    take the next batch          the stream carries every training language; keep the drawn one's columns, so
                                 every batch is monolingual (the seeds' MetaLoader)
    one optimizer step           TrainState.train_step (train/state.py)
    log                          every train.log_every steps and at the last: a record in state.history, on_log
    validate                     every train.eval_every steps and at the last: on_eval
    stop                         at train.max_steps (or after `steps` more, for callers that step in slices)

Ray never appears here. The Ray Train worker (train/worker.py) hands it its shard's batches and an `on_eval` that
validates, checkpoints and reports to Ray Train; benchmarks and tests hand it local batches and their own hooks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from ccr_ray.data.preprocess import select_language
from ccr_ray.train.state import TrainState

Batch = dict[str, torch.Tensor]


def language_for_step(seed: int, step: int, languages: list[str]) -> str:
    """The MetaLoader's draw: a uniform language per step, a pure function of (seed, step), so every DDP worker
    picks the same language (the global batch is monolingual) and a resumed run continues the same sequence."""
    if len(languages) == 1:
        return languages[0]
    return languages[int(np.random.default_rng([seed, step]).integers(len(languages)))]


class Throughput:
    """samples/s over the steps since the last `rate()` call."""

    def __init__(self):
        self.start, self.samples = time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.samples += n

    def rate(self) -> float:
        now = time.perf_counter()
        value = self.samples / max(now - self.start, 1e-9)
        self.start, self.samples = now, 0
        return value


def run(state: TrainState, batches: Iterator[Batch], *,
        on_log: Callable[[TrainState, dict], None] | None = None,
        on_eval: Callable[[TrainState], None] | None = None,
        on_step: Callable[[TrainState, dict], None] | None = None,
        steps: int | None = None) -> TrainState:
    """Train `state` from its current step to `train.max_steps` on `batches` (stream batches with every training
    language's columns; global-batch rows for one process, this worker's share under DDP).

    on_step(state, metrics)  after every optimizer step
    on_log(state, record)    at the log cadence; `record` (step, language, lr, samples/s, loss terms) is already in
                             state.history
    on_eval(state)           at the validation cadence (validate, checkpoint, report: the caller's business)
    steps                    stop after this many steps even before train.max_steps
    """
    cfg = state.cfg
    languages = state.train_languages
    english_only = languages == ["en"]
    max_steps = cfg.train.max_steps
    stop = max_steps if steps is None else min(max_steps, state.step + steps)
    eval_every = cfg.train.eval_every or max_steps
    speed = Throughput()
    while state.step < stop:
        lang = language_for_step(cfg.train.seed, state.step, languages)
        batch = select_language(next(batches), lang, english_only=english_only)
        metrics = state.train_step(batch, lang)
        speed.add(cfg.train.batch_size)
        if on_step is not None:
            on_step(state, metrics)
        if state.step % cfg.train.log_every == 0 or state.step == max_steps:
            record = {"step": state.step, "lang": lang, "lr": state.optim.lr, "samples_per_s": speed.rate(),
                      "time": round(time.time(), 3), **metrics}
            state.history.append(record)
            if on_log is not None:
                on_log(state, record)
        if (state.step % eval_every == 0 or state.step == max_steps) and on_eval is not None:
            on_eval(state)
    return state


def format_progress(stage: str, step: int, max_steps: int, record: dict) -> str:
    terms = " ".join(f"{k} {v:.4f}" for k, v in record.items()
                     if k not in ("step", "lang", "lr", "samples_per_s", "time", "loss"))
    return (f"[{stage}] step {step}/{max_steps} | loss {record['loss']:.4f} ({terms}) | lang {record['lang']} | "
            f"lr {record['lr']:.2e} | {record['samples_per_s']:.0f} samples/s")
