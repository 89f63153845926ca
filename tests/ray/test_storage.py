"""Runs, data and the frozen-feature cache on an object store: a local S3 server (moto, on 127.0.0.1, started and
stopped here) stands in for S3/GCS. A stage reads its dataset and parent from S3, builds its cache there, has Ray
Train checkpoint there and publishes its output there; the published checkpoint loads from S3 and equals the same
stage run entirely on local disk."""

import os

import numpy as np
import pytest

from tests.conftest import micro_config

pytestmark = pytest.mark.ray


def test_a_stage_on_s3_publishes_a_checkpoint_equal_to_a_local_run(s3, micro_data, tmp_path):
    from ccr_ray import checkpoint as ckpt
    from ccr_ray.features.store import CACHE_FILE
    from ccr_ray.stages import resolve_config
    from ccr_ray.train.driver import run_stage
    from ccr_ray.train.plan import plan_stage
    from ccr_ray.train.state import TrainState

    data = s3 / "data" / "micro"
    data.upload_from(micro_data)
    common = {"train": {"max_steps": 4, "eval_every": 2}, "run": {"experiment": "t"},
              "optim": {"lr": 1e-2, "warmup": 0.0}}
    deterministic = {"feature_cache": True, "preserve_order": True}
    local = micro_config(micro_data, str(tmp_path / "home"), **common,
                         data={**deterministic, "feature_cache_dir": str(tmp_path / "cache")})
    remote = micro_config(data.uri, str(tmp_path / "home-s3"), **common,
                          data={**deterministic, "feature_cache_dir": (s3 / "cache").uri})
    remote["run"]["storage"] = (s3 / "runs").uri
    # the parent (clip, random weights): on local disk for one, published to S3 for the other
    clip = resolve_config("clip", local)
    parent = TrainState.create(clip, os.path.join(micro_data, "tokenizer"), None, "cpu").save(
        clip.stage_dir() / "checkpoint", with_optimizer=False)
    ckpt.copy_checkpoint(parent, resolve_config("clip", remote).stage_location() / "checkpoint")

    plan = plan_stage(resolve_config("nlt", remote))
    assert plan.parent.startswith("s3://") and plan.dataset_root.startswith("s3://")
    assert plan.storage_path.startswith("s3://") and plan.output_dir.uri.startswith("s3://")
    on_s3 = run_stage(plan)
    on_disk = run_stage(plan_stage(resolve_config("nlt", local)))

    out = on_s3.checkpoint
    assert out.uri.startswith("s3://") and ckpt.is_checkpoint(out)
    assert not (out / ckpt.OPTIM_FILE).exists()  # published outputs carry no optimizer state
    for name in ("result.json", "train_log.jsonl", "training_curve.png"):
        assert (plan.output_dir / name).is_file(), name
    assert any((s3 / "cache" / f / CACHE_FILE).is_file() for f in (s3 / "cache").children())
    assert (s3 / "runs" / "t" / "ray").is_dir()  # Ray Train's own checkpoints went to S3 too
    model_s3, meta_s3 = ckpt.load_checkpoint(out)
    model_disk, meta_disk = ckpt.load_checkpoint(on_disk.checkpoint)
    assert meta_s3.step == meta_disk.step == meta_s3.best_step  # the same selection (train.select=best)
    a, b = model_s3.state_dict(), model_disk.state_dict()
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, worst
    trained = [k for k in a if k.startswith(("embedding.", "adapters."))]
    start = TrainState.create(resolve_config("nlt", local), os.path.join(micro_data, "tokenizer"), str(parent),
                              "cpu").model.state_dict()
    assert max(float((a[k] - start[k]).abs().max()) for k in trained) > 1e-3  # it trained: equality means something
    assert np.isfinite(meta_s3.metrics["val/mR"])
