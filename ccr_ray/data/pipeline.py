"""Ray Data for training: the only Ray Data code on the training path.

One stream per stage: `read_parquet` (parallel, file order shuffled) -> `map_batches(TrainPreprocessor)`
(decode, resize/crop to uint8 from the model's own preprocessing config, tokenize every stream language) ->
Ray Train shards it across workers with `streaming_split`. The worker draws the language per step and takes
that language's columns, so every batch is monolingual, as with the seeds' MetaLoader (train/worker.py).

Why one stream and not one per language: on small machines five concurrent executions (five split
coordinators, five sets of task processes) cost ~30 s of start-up per stage and contend for the one CPU
Train leaves to Data; one stream tokenizes a few more captions and starts once.

With a frozen-feature cache (`data.feature_cache`, data/feature_cache.py) the stream reads the cache's shards
instead of the dataset's: the same rows in the same order, with the image / English-teacher embeddings in place of
image bytes, so nothing is decoded or run through a frozen tower; `TrainPreprocessor` pairs them with caption
slots exactly as it pairs images and English captions.

Pixels travel as uint8 and are normalised by the training step: a 224-px image is 150 KB through the object
store instead of 600 KB as float32, and the arithmetic runs on the GPU where there is one.

Validation is small and read once by rank 0 with pyarrow (`schema.read_split_table`), scored by
`eval/retrieval.py`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import ray
import ray.data
import ray.train
from ray.data import ExecutionOptions, ExecutionResources

from ccr_ray.config import ExperimentConfig
from ccr_ray.data import schema
from ccr_ray.data.preprocess import PREPROCESS_BATCH, PreprocessSpec, TrainPreprocessor
from ccr_ray.features.store import CacheInfo
from ccr_ray.ray_utils import read_parquet_blocks
from ccr_ray.stages import Stage

TRAIN_KEY = "train"


@dataclass(frozen=True)
class StreamPlan:
    root: str
    split: str
    files: list[str]
    spec: PreprocessSpec
    passes: int = 1  # how many times the stream reads the files (iteration mode: enough for max_steps)
    seed: int = 42  # file-order shuffle


def _preprocess(batch, spec: PreprocessSpec):
    return TrainPreprocessor(spec)(batch)


def training_stream(plan: StreamPlan, task_cpus: float) -> ray.data.Dataset:
    ds = read_parquet_blocks(plan.files * plan.passes, columns=plan.spec.columns,
                             shuffle=ray.data.FileShuffleConfig(seed=plan.seed), num_cpus=task_cpus)
    return ds.map_batches(_preprocess, fn_kwargs={"spec": plan.spec}, batch_size=PREPROCESS_BATCH,
                          batch_format="numpy", num_cpus=task_cpus)


def build_datasets(cfg: ExperimentConfig, stage: Stage, dataset_root: str, tokenizer_dir: str | None,
                   preprocess: dict, context_length: int, train_languages: list[str], cache: CacheInfo | None = None,
                   english_tokenizer: str | None = None) -> tuple[dict[str, ray.data.Dataset], ray.train.DataConfig]:
    """The Ray datasets of one stage and the DataConfig that shards the training stream. `cache`: a valid
    frozen-feature cache of the training split, read instead of the dataset's shards. `english_tokenizer`: the
    English tower's tokenizer folder (None: CLIP's BPE)."""
    os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", str(cfg.data.parquet_footer_actors))
    files = cache.files if cache is not None else schema.split_files(dataset_root, cfg.data.train_split)
    cached = cache.features if cache is not None else ()
    # Iteration mode (the seeds' MetaLoader): the stream lists the files as many times as max_steps needs, so
    # one execution feeds the whole run instead of restarting (and stalling ~10 s) at every epoch boundary.
    images = schema.load_manifest(dataset_root).splits[cfg.data.train_split].images
    passes = max(1, math.ceil(cfg.train.max_steps * cfg.train.batch_size / max(images, 1)))
    spec = PreprocessSpec(languages=tuple(train_languages), inputs=stage.inputs,
                          image=preprocess if stage.needs_images and "image" not in cached else None,
                          context_length=context_length, tokenizer=tokenizer_dir, dataset_root=dataset_root,
                          cached=cached, feature_dim=cache.embed_dim if cache is not None else 0,
                          english_tokenizer=english_tokenizer)
    datasets = {TRAIN_KEY: training_stream(StreamPlan(dataset_root, cfg.data.train_split, files, spec, passes, cfg.train.seed),
                                           cfg.data.task_cpus)}
    # Data may use at most data.max_cpus of what Train leaves: on small machines this keeps the preprocessing
    # tasks from queueing behind the Train workers' reservation (the 2-core deadlock, platform notes).
    options = ExecutionOptions(resource_limits=ExecutionResources(cpu=cfg.data.max_cpus))
    options.preserve_order = cfg.data.preserve_order
    config = ray.train.DataConfig(datasets_to_split=[TRAIN_KEY], execution_options={TRAIN_KEY: options})
    return datasets, config
