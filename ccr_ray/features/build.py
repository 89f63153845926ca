"""Build a frozen-feature cache with Ray Data batch inference: an actor pool holding the frozen CLIP towers.

    read_parquet(dataset shards, the columns the encoder needs; order preserved)
      -> map_batches(FeatureEncoder, concurrency=data.cache_actors, num_cpus=data.cache_actor_cpus,
                     batch_size=data.cache_batch_size)          the towers load once per actor
      -> the driver streams the encoded rows (image_id + embeddings only, a few KB per image) into CacheWriter,
         which cuts them at the dataset's shard boundaries, checks image ids against each source shard and
         writes one cache shard per dataset shard into a staging folder, renamed into place at the end.

Layout, fingerprint and validity: `feature_cache.py` (Ray-free). The driver calls `ensure_feature_cache` before
building the training stream when `data.feature_cache` is on; `jobs/cache_features.py` calls it ahead of time.

Resources: the build runs before the Train workers start, so it may use the machine; on 2 cores one actor at
1 CPU plus 0.5-CPU read tasks fit (platform notes: never reserve every CPU, Ray Data must keep one task slot).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from ccr_ray.config import DataConfig
from ccr_ray.data import schema
from ccr_ray.features import CacheError
from ccr_ray.features.encoder import FeatureEncoder, encoder_columns
from ccr_ray.features.keys import CacheKey, CacheRequest
from ccr_ray.features.plan import FeatureCachePlan, ensure_cache
from ccr_ray.features.store import CacheInfo, CacheWriter
from ccr_ray.ray_utils import read_parquet_blocks

log = logging.getLogger(__name__)


def build_feature_cache(request: CacheRequest, key: CacheKey, data: DataConfig, use_gpu: bool = False,
                        replace: bool = False, report: Callable[[str], None] | None = None) -> CacheInfo:
    """Encode the split with an actor pool and write the cache (see the module docstring)."""
    say = report or log.info
    check_build_resources(data, use_gpu)
    files = schema.split_files(request.dataset_root, request.split)
    writer = CacheWriter(request, key)
    started = time.perf_counter()
    ds = read_parquet_blocks(files, columns=encoder_columns(request), num_cpus=data.task_cpus)
    ds = ds.map_batches(
        FeatureEncoder,
        fn_constructor_kwargs={"request": request, "expected": key.components,
                               "device": "cuda" if use_gpu else "cpu",
                               "threads": max(1, math.ceil(data.cache_actor_cpus))},
        batch_size=data.cache_batch_size, batch_format="numpy", concurrency=data.cache_actors,
        num_cpus=data.cache_actor_cpus, num_gpus=1 if use_gpu else 0)
    # rows must come back in dataset order: the writer cuts them at shard boundaries (and checks the ids)
    ds.context.execution_options.preserve_order = True
    try:
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            before = writer.done
            writer.add(table)
            if writer.done > before:
                rate = writer.counts["rows"] / max(time.perf_counter() - started, 1e-9)
                say(f"feature cache: {writer.done}/{len(files)} shards, {writer.counts['rows']} images "
                    f"({rate:.0f} images/s)")
        info = writer.finish({"builder": "ray-data", "actors": data.cache_actors,
                              "cpus_per_actor": data.cache_actor_cpus, "batch_size": data.cache_batch_size,
                              "gpu": use_gpu}, replace=replace)
    except BaseException:
        writer.abort()
        raise
    seconds = info.meta["build"]["seconds"]
    say(f"feature cache: wrote {info.folder}: {info.rows} images, {', '.join(info.features)}, "
        f"{info.meta['undecodable_images']} undecodable, {seconds:.1f}s ({info.rows / max(seconds, 1e-9):.0f} images/s)")
    return info


def check_build_resources(data: DataConfig, use_gpu: bool) -> None:
    """The actor pool must leave the read tasks a slot, or the build waits for ever: on 2 CPUs, one actor at 2
    CPUs held both while the reads that feed it waited for a CPU (seen: the actor idle for 9 minutes)."""
    import ray

    cpus = ray.cluster_resources().get("CPU", 0.0)
    held = data.cache_actors * data.cache_actor_cpus
    if held + data.task_cpus > cpus + 1e-9:
        raise CacheError(f"data.cache_actors x data.cache_actor_cpus = {held:g} CPUs, plus data.task_cpus = "
                         f"{data.task_cpus:g} for the reads that feed them, is more than the cluster's {cpus:g}: the "
                         f"build would wait for ever; lower data.cache_actor_cpus (e.g. {max(cpus - data.task_cpus, 0.5):g})")


def ensure_feature_cache(plan: FeatureCachePlan, data: DataConfig, use_gpu: bool = False, force: bool = False,
                         report: Callable[[str], None] | None = None) -> tuple[CacheInfo, str]:
    """The stage's cache: opened when valid, else (re)built on the connected Ray cluster. Returns the cache and
    "used" / "built" / "rebuilt"."""
    def build(request: CacheRequest, key: CacheKey) -> CacheInfo:
        return build_feature_cache(request, key, data, use_gpu=use_gpu, replace=force, report=report)

    return ensure_cache(plan, build, force=force, report=report)
