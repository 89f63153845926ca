"""The frozen-feature cache on Ray: built by the job CLI with a Ray Data actor pool, then a DASD cma stage (image
and English-teacher features both cached) trained under Ray Train with and without it: same losses, step by step."""

import json
import os
import time

import numpy as np
import pytest

from ccr_ray.stages import resolve_config
from tests.conftest import micro_config

pytestmark = pytest.mark.ray
STEPS = 4


def write_config(tmp_path, micro_data, cache: bool):
    cfg = micro_config(micro_data, str(tmp_path / "home"), optim={"lr": 1e-2, "warmup": 0.0},
                       train={"max_steps": STEPS, "eval_every": STEPS, "log_every": 1},
                       data={"feature_cache": cache, "preserve_order": True, "val_max_images": 16})
    path = tmp_path / f"cma-{'cache' if cache else 'images'}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_cache_built_by_actors_gives_the_same_training_run(ray_local, micro_data, tmp_path, capsys):
    import cache_features

    from ccr_ray.features import encoder, keys, store
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage
    from ccr_ray.train.state import TrainState

    with_cache, without = write_config(tmp_path, micro_data, True), write_config(tmp_path, micro_data, False)
    cla = resolve_config("cla", with_cache)  # cma's parent, random weights: the cache only needs its backbone
    TrainState.create(cla, os.path.join(micro_data, "tokenizer"), None, "cpu").save(
        cla.stage_dir() / "checkpoint", with_optimizer=False)

    assert cache_features.main(["--stage", "cma", "--config", with_cache, "--check"]) == 1
    assert cache_features.main(["--stage", "clip", "--config", with_cache]) == 2  # trains its towers: nothing to cache
    assert "nothing to cache: stage 'clip' trains image_tower, text_tower" in capsys.readouterr().err
    started = time.perf_counter()
    assert cache_features.main(["--stage", "cma", "--config", with_cache]) == 0
    build_s = time.perf_counter() - started
    assert "built: " in capsys.readouterr().out
    assert cache_features.main(["--stage", "cma", "--config", with_cache, "--check"]) == 0

    # the actor pool wrote what one in-process encoder writes, row for row
    plan = plan_stage(resolve_config("cma", with_cache)).feature_cache
    assert plan.status.valid
    built_at = (plan.folder / store.CACHE_FILE).local_path().stat().st_mtime_ns
    reference = encoder.build_cache_in_process(keys.CacheRequest(**{**plan.request.__dict__,
                                                             "cache_dir": str(tmp_path / "reference")}), plan.key)
    ours, theirs = store.read_cache_table(plan.folder), store.read_cache_table(reference.folder)
    assert ours.column("image_id").equals(theirs.column("image_id"))
    for col in (store.IMAGE_EMBEDDING, store.TEXT_EN_EMBEDDINGS):
        assert ours.schema.field(col).type == theirs.schema.field(col).type
        np.testing.assert_allclose(np.array(ours.column(col).to_pylist()), np.array(theirs.column(col).to_pylist()),
                                   atol=1e-5)

    cached_run = run_stage(plan_stage(resolve_config("cma", with_cache)), publish=False)
    assert (plan.folder / store.CACHE_FILE).local_path().stat().st_mtime_ns == built_at  # valid: used, not rebuilt
    image_run = run_stage(plan_stage(resolve_config("cma", without)), publish=False)
    assert cached_run.run_path != image_run.run_path
    events = lambda result: [r for r in result.history if r.get("event") == "feature_cache"]  # noqa: E731
    assert [r["path"] for r in events(cached_run)] == [str(plan.folder)] and not events(image_run)

    def losses(result):
        rows = sorted((r["step"], r) for r in result.history if "loss" in r)
        assert [s for s, _ in rows] == list(range(1, STEPS + 1))
        return {k: np.array([r[k] for _, r in rows]) for k in ("loss", "contrastive_target", "distill_mse",
                                                                 "consistency_smoothl1", "discriminator")}

    a, b = losses(image_run), losses(cached_run)
    assert np.abs(np.diff(a["loss"])).max() > 1e-4  # the loss moves, so agreement is not trivial
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    print(f"cache build (job, Ray actors) {build_s:.1f}s; losses {a['loss'].round(4)} vs {b['loss'].round(4)}")
