"""What `data.feature_cache` means for one stage (planned by the driver before any cluster work), and opening or
(re)building it with a given builder (in process, or Ray Data: build.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from ccr_ray.features import CacheError
from ccr_ray.features.keys import CacheKey, CacheRequest, cache_key, cacheable_inputs
from ccr_ray.features.store import CacheInfo, CacheStatus, cache_folder, check_cache, open_cache, stale_caches
from ccr_ray.stages import INPUT_TOWERS
from ccr_ray.storage import Location

log = logging.getLogger(__name__)


@dataclass
class FeatureCachePlan:
    """What `data.feature_cache` means for one stage; computed by the driver before any cluster work."""

    features: tuple[str, ...]  # cacheable inputs of the stage (empty: not applicable)
    request: CacheRequest | None = None
    key: CacheKey | None = None
    status: CacheStatus | None = None
    note: str = ""  # why the cache does not apply

    @property
    def applicable(self) -> bool:
        return bool(self.features)

    @property
    def folder(self) -> Location:
        return cache_folder(self.request, self.key)

    def describe(self) -> str:
        if not self.applicable:
            return f"not applicable: {self.note}; it reads images and captions as usual"
        state = "valid" if self.status.valid else f"will be built ({self.status.reason})"
        return f"{', '.join(self.features)} from {self.folder}: {state}"


def plan_feature_cache(cfg, stage, parent: str | None, dataset_root: str, clip_cfg: dict, preprocess: dict,
                       context_length: int) -> FeatureCachePlan | None:
    """None when `data.feature_cache` is off. The weights are those the stage starts from: its parent checkpoint,
    else `model.backbone.pretrained`. Raises CacheError naming the field when the cache cannot be planned."""
    if not cfg.data.feature_cache:
        return None
    features = cacheable_inputs(stage)
    if not features:
        return FeatureCachePlan(features=(), note=f"stage {stage.name!r} trains "
                                f"{', '.join(t for t in INPUT_TOWERS.values() if t in stage.trains)}, so none of its "
                                "inputs is frozen")
    weights = parent or (cfg.path(cfg.model.backbone.pretrained) if cfg.model.backbone.pretrained else "")
    if not weights:
        raise CacheError("data.feature_cache: the stage starts from a randomly initialised backbone (no parent "
                         "checkpoint, no model.backbone.pretrained); there are no frozen weights to cache")
    request = CacheRequest(dataset_root=dataset_root, split=cfg.data.train_split, features=features,
                           clip_cfg=clip_cfg, quick_gelu=cfg.model.backbone.quick_gelu, weights=str(weights),
                           preprocess=preprocess, context_length=context_length,
                           cache_dir=cfg.path(cfg.data.feature_cache_dir))
    key = cache_key(request)
    return FeatureCachePlan(features=features, request=request, key=key, status=check_cache(cache_folder(request, key), key))


def ensure_cache(plan: FeatureCachePlan, build: Callable[[CacheRequest, CacheKey], CacheInfo],
                 force: bool = False, report: Callable[[str], None] | None = None) -> tuple[CacheInfo, str]:
    """Open the plan's cache, building it when it is missing or invalid (or `force`). Returns the cache and what
    happened: "used", "built" (none existed) or "rebuilt" (one existed and was invalid, or `force`). Stale caches
    of the same split (other weights, preprocessing, tokenizer or data) are logged and never read."""
    say = report or log.info
    status = check_cache(plan.folder, plan.key)
    if status.valid and not force:
        say(f"feature cache: using {plan.folder} ({', '.join(plan.features)})")
        return open_cache(plan.folder), "used"
    for folder, changed in stale_caches(plan.request, plan.key):
        log.warning("feature cache %s is stale (%s changed) and is not used; `jobs/cache_features.py "
                    "--prune-stale` deletes it", folder, ", ".join(changed))
    existed = plan.folder.exists()
    if existed and not status.valid:
        log.warning("feature cache %s is invalid (%s); rebuilding it", plan.folder, status.reason)
    say(f"feature cache: building {plan.folder} ({', '.join(plan.features)})")
    info = build(plan.request, plan.key)
    plan.status = CacheStatus(True)
    return info, "rebuilt" if existed or force else "built"
