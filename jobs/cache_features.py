"""Build or check the frozen-feature cache of a stage: the image and English-teacher embeddings of its training
split, computed once by the frozen towers of the weights the stage starts from (Ray Data, an actor pool).

Usage:
    python jobs/cache_features.py --stage STAGE [--config FILE|NAME] [--set key=value ...]
                                  [--check] [--dry-run] [--rebuild] [--prune-stale]

    --stage        the stage whose inputs to cache (le, finetune-all: images; nlt, cla: English teacher; cma: both)
    --config/--set as for train_stage.py (the cache depends on the stage's parent checkpoint, backbone,
                   preprocessing, tokenizer context and training split)
    --check        say whether a valid cache exists; exit 0 if it does, 1 if not; builds nothing
    --dry-run      print the plan and the cache status; start nothing
    --rebuild      build even when a valid cache exists (replaces it)
    --prune-stale  afterwards delete caches of the same split built from other weights, preprocessing,
                   tokenizer or data (they are never read, only kept until pruned)

train_stage.py builds the cache itself before training when data.feature_cache=true; this job does it ahead of
time (e.g. once on a GPU node for every later run). Caches go to {data.feature_cache_dir}/{fingerprint[:16]}.
Resources: data.cache_actors actors x data.cache_actor_cpus CPUs (x 1 GPU with --use-gpu), data.cache_batch_size.
"""

from __future__ import annotations

import argparse
import sys

from ccr_ray.cli import fail, plan_from_args, quiet_ray_env
from ccr_ray.config import ConfigError
from ccr_ray.stages import STAGES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", required=True, choices=list(STAGES))
    parser.add_argument("--config", default="demo")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--rebuild", action="store_true")
    parser.add_argument("--prune-stale", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_ray_env()
    overrides = [*args.overrides, "data.feature_cache=true"]
    if args.use_gpu:
        overrides.append("scaling.use_gpu=true")
    from ccr_ray.features.store import prune_stale, stale_caches
    from ccr_ray.train.plan import StageError

    try:
        cfg, plan = plan_from_args(args.stage, args.config, overrides)
    except (ConfigError, StageError) as err:
        return fail(str(err))
    cache = plan.feature_cache
    if not cache.applicable:
        return fail(f"--stage {cfg.stage}: nothing to cache: {cache.note}")
    print(f"[{cfg.stage}] frozen-feature cache: {cache.describe()}")
    for folder, changed in stale_caches(cache.request, cache.key):
        print(f"[{cfg.stage}] stale cache (not used): {folder} ({', '.join(changed)} changed)")
    if args.check:
        return 0 if cache.status.valid else 1
    if args.dry_run:
        return 0
    from ccr_ray.features.build import ensure_feature_cache
    from ccr_ray.ray_utils import RayUnavailable, ensure_ray

    try:
        ensure_ray()
    except RayUnavailable as err:
        return fail(str(err))
    from ccr_ray.features import CacheError

    try:
        info, action = ensure_feature_cache(cache, cfg.data, use_gpu=cfg.scaling.use_gpu, force=args.rebuild,
                                            report=print)
    except CacheError as err:
        return fail(f"data.feature_cache: {err}")
    print(f"[{cfg.stage}] {action}: {info.folder} ({info.rows} images, {', '.join(info.features)}, "
          f"{len(info.files)} shards)")
    if args.prune_stale:
        for folder in prune_stale(cache.request, cache.key):
            print(f"[{cfg.stage}] removed stale cache {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
