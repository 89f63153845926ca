"""The frozen-feature cache without Ray: what may be cached (from the stage table), the fingerprint, stale and
broken caches, reading, and the contract that matters: a stage trained from the cache takes the same steps."""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ccr_ray.data import schema
from ccr_ray.data.local import local_batches
from ccr_ray.data.preprocess import PreprocessSpec, TrainPreprocessor, select_language
from ccr_ray.features import encoder, keys, store
from ccr_ray.features import plan as cache_plan
from ccr_ray.stages import STAGES, Languages, Stage, resolve_config
from ccr_ray.train import loop
from ccr_ray.train.loop import language_for_step
from ccr_ray.train.state import TrainState, trim_padding
from tests.conftest import micro_config

STEPS = 4
BATCH = 16


@pytest.fixture(scope="module")
def home(micro_data, tmp_path_factory):
    """Parent checkpoints with random weights: clip (nlt's and cla's parent), nlt (le's), cla (cma's)."""
    root = tmp_path_factory.mktemp("fc-home")
    tokenizer = os.path.join(micro_data, "tokenizer")
    for stage, parent in (("clip", None), ("nlt", "clip"), ("cla", "clip")):
        cfg = resolve_config(stage, config(micro_data, root))
        parent_dir = cfg.stage_dir(parent) / "checkpoint" if parent else None
        TrainState.create(cfg, tokenizer, parent_dir, "cpu").save(cfg.stage_dir() / "checkpoint",
                                                                  with_optimizer=False)
    return root


def config(micro_data, root, **sections):
    sections.setdefault("optim", {}).update({"lr": 1e-2, "warmup": 0.0})
    sections.setdefault("train", {}).update({"batch_size": BATCH, "max_steps": STEPS})
    sections.setdefault("data", {}).setdefault("feature_cache", True)
    return micro_config(micro_data, str(root), **sections)


def plan_for(stage, micro_data, home, **sections):
    from ccr_ray.train.plan import plan_stage

    return plan_stage(resolve_config(stage, config(micro_data, home, **sections)))


def build(plan):
    return cache_plan.ensure_cache(plan.feature_cache, lambda r, k: encoder.build_cache_in_process(r, k, batch_size=48))


# ----------------------------------------------------------------------------------------------- what is cached


def test_cacheable_inputs_follow_the_stage_table():
    got = {name: keys.cacheable_inputs(stage) for name, stage in STAGES.items()}
    assert got == {"clip": (), "finetune-en": (), "nlt": ("text_en",), "cla": ("text_en",), "le": ("image",),
                   "finetune-all": ("image",), "cma": ("image", "text_en")}
    partly = Stage(name="x", summary="", trains=("image_tower", "adapters"), losses={}, dataset="pretrain",
                   inputs=("image", "text_en", "text_target"), languages=Languages.TARGETS,
                   validation=Languages.TARGETS)
    assert keys.cacheable_inputs(partly) == ("text_en",)  # a trained tower is never cached


def test_plan_says_when_the_cache_does_not_apply(micro_data, home):
    plan = plan_for("clip", micro_data, home)
    assert plan.feature_cache is not None and not plan.feature_cache.applicable
    assert "not applicable" in plan.summary() and "image_tower" in plan.summary()
    plan = plan_for("le", micro_data, home, data={"feature_cache": False})
    assert plan.feature_cache is None and "frozen-feature cache" not in plan.summary()
    plan = plan_for("le", micro_data, home, data={"feature_cache_dir": str(home / "fresh-cache")})
    assert plan.feature_cache.features == ("image",) and not plan.feature_cache.status.valid
    assert "will be built" in plan.summary()


def test_model_refuses_cached_features_for_a_trained_tower(micro_data, home):
    state = TrainState.create(resolve_config("clip", config(micro_data, home)), os.path.join(micro_data, "tokenizer"),
                              None, "cpu")
    batch = {"image_features": torch.zeros(2, 32), "text_en_ids": torch.zeros(2, 5, dtype=torch.long)}
    with pytest.raises(ValueError, match="being trained"):
        state.model(batch, None, ("image", "text_en"))


# ----------------------------------------------------------------------------------------------- contents


def batches(files, spec, n):
    """The first n batches of the given shards in order (what the stream yields with order preserved)."""
    source = local_batches(files, spec, BATCH, repeat=False)
    out = [batch for _, batch in zip(range(n), source)]
    assert len(out) == n
    return out


def specs(plan, info):
    common = dict(languages=tuple(plan.train_languages), inputs=plan.stage.inputs, context_length=plan.context_length,
                  tokenizer=plan.tokenizer_dir, dataset_root=plan.dataset_root)
    plain = PreprocessSpec(image=plan.preprocess if plan.stage.needs_images else None, **common)
    cached = PreprocessSpec(image=None, cached=info.features, feature_dim=info.embed_dim, **common)
    return plain, cached


def test_cache_rows_follow_the_dataset_and_hold_the_towers_features(micro_data, home):
    plan = plan_for("cma", micro_data, home)
    info, action = build(plan)
    assert action in ("built", "used") and info.features == ("image", "text_en")
    table = store.read_cache_table(info.folder)
    source = schema.read_split_table(micro_data, "train", with_images=False)
    assert table.column("image_id").equals(source.column("image_id"))
    assert table.column("captions_de").equals(source.column("captions_de"))
    assert len(info.files) == len(schema.split_files(micro_data, "train"))
    assert table.schema.field(store.IMAGE_EMBEDDING).type == pa.list_(pa.float32(), 32)
    # the stream's samples from the cache carry exactly what the frozen towers compute from the images/captions
    state = TrainState.create(plan.cfg, plan.tokenizer_dir, plan.parent, "cpu")
    plain, cached = specs(plan, info)
    rows = {c: v.to_numpy(zero_copy_only=False) for c, v in zip(source.column_names, source.columns)}
    with_images = TrainPreprocessor(plain)({**rows, **{c: schema.read_split_table(micro_data, "train").column(c)
                                                       .to_numpy(zero_copy_only=False) for c in ("image", "image_path")}})
    cache_rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    from_cache = TrainPreprocessor(cached)(cache_rows)
    assert "pixels" not in from_cache and "text_en_ids_de" not in from_cache
    state.model.eval()
    with torch.no_grad():
        image = state.model.encode_image(state.model_inputs({"pixels": torch.from_numpy(with_images["pixels"])})["pixels"])
        ids = trim_padding({"text_en_ids": torch.from_numpy(with_images["text_en_ids_zh"])}, True)["text_en_ids"]
        teacher = state.model.encode_text_en(ids)
    assert torch.allclose(torch.from_numpy(from_cache["image_features"]), image, atol=1e-5)
    assert torch.allclose(torch.from_numpy(from_cache["text_en_features_zh"]), teacher, atol=1e-5)
    assert image.std() > 0.01 and (teacher[0] - teacher[1]).abs().max() > 1e-3  # real, distinct features


@pytest.mark.parametrize("stage", ["le", "nlt", "cma"])
def test_same_loss_trajectory_with_and_without_the_cache(micro_data, home, stage):
    plan = plan_for(stage, micro_data, home)
    info, _ = build(plan)
    plain, cached = specs(plan, info)
    runs = {}
    for name, spec, files in (("images", plain, schema.split_files(micro_data, "train")), ("cache", cached, info.files)):
        state = TrainState.create(plan.cfg, plan.tokenizer_dir, plan.parent, "cpu")
        start = trained_params(state)
        losses = []

        def checked(source, state=state, name=name):
            for batch in source:  # the loop pulls the batch of step state.step
                lang = language_for_step(plan.cfg.train.seed, state.step, plan.train_languages)
                picked = select_language(batch, lang, english_only=False)
                assert ("image_features" in picked) == (name == "cache" and "image" in info.features)
                assert ("text_en_features" in picked) == (name == "cache" and "text_en" in info.features)
                assert ("pixels" in picked) == ("image" in plan.stage.inputs and name == "images")
                yield batch

        loop.run(state, checked(iter(batches(files, spec, STEPS))), on_step=lambda s, m, losses=losses: losses.append(m["loss"]))
        runs[name] = (np.array(losses), start, trained_params(state))
    (a, start, pa_), (b, start_b, pb) = runs["images"], runs["cache"]
    assert torch.equal(start, start_b)
    assert np.abs(np.diff(a)).max() > 1e-4 and (pa_ - start).abs().max() > 1e-3  # training moved: not trivial
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    # the trained weights agree to float noise relative to how far training moved them. Not element-wise: the
    # cache's features differ from the batched towers' by float rounding (~1e-6, kernel order: 1.3e-5 on one CPU,
    # 1.0e-4 on another CI's), and Adam divides by sqrt(v), so a weight with a near-zero gradient can take a
    # different step of up to lr (the norm of the difference is 1.6e-5 of the movement here); a cache of the
    # wrong rows or features differs by O(1) of it
    moved = (pa_ - start).norm()
    assert (pb - pa_).norm() < 1e-2 * moved, ((pb - pa_).norm() / moved).item()


def trained_params(state):
    return torch.cat([p.detach().flatten().clone() for _, p in state.model.named_parameters() if p.requires_grad])


# ----------------------------------------------------------------------------------------------- fingerprint


def perturbed_copy(src: Path, dst: Path, key: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    # random, not constant: a constant shift of visual.proj is invisible after ln_post (zero-mean rows)
    state[key] = state[key] + 0.05 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_fingerprint_changes_with_weights_preprocessing_tokenizer_and_data(micro_data, home, tmp_path):
    base = plan_for("cma", micro_data, home).feature_cache.request
    key = keys.cache_key(base)

    def differs(**changes):
        other = keys.cache_key(keys.CacheRequest(**{**base.__dict__, **changes}))
        return store.differing({"components": other.components}, key)

    parent = Path(base.weights)
    visual = perturbed_copy(parent, tmp_path / "visual", "clip.visual.proj")
    text = perturbed_copy(parent, tmp_path / "text", "clip.text_projection")
    assert differs(weights=str(visual)) == ["image_tower"]
    assert differs(weights=str(text)) == ["text_tower"]
    image_only = keys.CacheRequest(**{**base.__dict__, "features": ("image",)})
    assert keys.cache_key(image_only).components["image_tower"] == key.components["image_tower"]
    assert keys.cache_key(keys.CacheRequest(**{**image_only.__dict__, "weights": str(text)})) == keys.cache_key(image_only)
    assert differs(preprocess={**base.preprocess, "mean": [0.5, 0.5, 0.5]}) == ["preprocess"]
    assert differs(context_length=base.context_length - 1) == ["tokenizer"]
    assert differs(clip_cfg={**base.clip_cfg, "quick_gelu": False}, quick_gelu=False) == ["architecture"]
    assert differs(features=("image",)) == sorted(["features", "text_tower", "tokenizer"])
    data = tmp_path / "data"
    shutil.copytree(micro_data, data)  # copy2: sizes and mtimes kept, so the moved dataset keeps its cache
    moved = keys.cache_key(keys.CacheRequest(**{**base.__dict__, "dataset_root": str(data)}))
    assert moved == key
    shard = Path(schema.split_files(str(data), "train")[0])
    pq.write_table(pq.read_table(shard).slice(1), shard)  # the data changed
    changed = keys.cache_key(keys.CacheRequest(**{**base.__dict__, "dataset_root": str(data)}))
    assert changed.components["data"] != moved.components["data"]
    assert changed.fingerprint != key.fingerprint


# ----------------------------------------------------------------------------------------------- validity


def test_a_stale_or_broken_cache_is_rebuilt_never_used(micro_data, home, tmp_path, caplog):
    cache_dir = str(tmp_path / "caches")
    plan = plan_for("le", micro_data, home, data={"feature_cache_dir": cache_dir}).feature_cache
    first, action = cache_plan.ensure_cache(plan, encoder.build_cache_in_process)
    assert action == "built"
    assert cache_plan.ensure_cache(plan, encoder.build_cache_in_process)[1] == "used"

    # new weights for the frozen image tower (the parent was retrained): a different cache, the old one is stale
    nlt = Path(plan.request.weights)
    retrained = perturbed_copy(nlt, tmp_path / "nlt-retrained", "clip.visual.proj")
    newer = cache_plan.FeatureCachePlan(plan.features, keys.CacheRequest(**{**plan.request.__dict__, "weights": str(retrained)}))
    newer.key = keys.cache_key(newer.request)
    newer.status = store.check_cache(newer.folder, newer.key)
    assert newer.folder != first.folder and not newer.status.valid
    assert not store.check_cache(first.folder, newer.key).valid  # the old folder is never valid for the new inputs
    with caplog.at_level(logging.WARNING):
        second, action = cache_plan.ensure_cache(newer, encoder.build_cache_in_process)
    assert action == "built"
    assert f"{first.folder} is stale (image_tower changed)" in caplog.text
    old = store.read_cache_table(first.folder).column(store.IMAGE_EMBEDDING).to_pylist()
    new = store.read_cache_table(second.folder).column(store.IMAGE_EMBEDDING).to_pylist()
    assert np.abs(np.array(old) - np.array(new)).max() > 1e-4  # rebuilt from the new weights

    # a damaged cache under the right name: detected, rebuilt
    shard = Path(second.files[1])
    pq.write_table(pq.read_table(shard).slice(0, 3), shard)
    assert "changed since it was written" in store.check_cache(second.folder, newer.key).reason
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third, action = cache_plan.ensure_cache(newer, encoder.build_cache_in_process)
    assert action == "rebuilt" and "is invalid" in caplog.text
    assert store.check_cache(third.folder, newer.key).valid and third.rows == 256
    # a cache.json claiming another fingerprint, or missing: invalid
    meta = json.loads((third.folder / store.CACHE_FILE).read_text())
    (third.folder / store.CACHE_FILE).write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    assert "built from other inputs" in store.check_cache(third.folder, newer.key).reason
    (third.folder / store.CACHE_FILE).delete()
    assert "missing or unreadable" in store.check_cache(third.folder, newer.key).reason
    assert cache_plan.ensure_cache(newer, encoder.build_cache_in_process)[1] == "rebuilt"
    # pruning removes the stale cache of the old weights, keeps the current one
    assert store.prune_stale(newer.request, newer.key) == [first.folder]
    assert not first.folder.exists() and store.check_cache(newer.folder, newer.key).valid
    assert not [p for p in Path(cache_dir).iterdir() if p.name.startswith(".")]  # no staging leftovers


def test_writer_refuses_rows_out_of_order(micro_data, home, tmp_path):
    plan = plan_for("nlt", micro_data, home, data={"feature_cache_dir": str(tmp_path / "c")}).feature_cache
    features = encoder.FeatureEncoder(plan.request, expected=plan.key.components)
    writer = store.CacheWriter(plan.request, plan.key)
    rows = pq.read_table(schema.split_files(micro_data, "train")[0], columns=encoder.encoder_columns(plan.request))
    encoded = features({c: rows.column(c).to_numpy(zero_copy_only=False) for c in rows.column_names})
    swapped = pa.concat_tables([encoded.slice(1, 1), encoded.slice(0, 1), encoded.slice(2)])
    with pytest.raises(keys.CacheError, match="out of order"):
        writer.add(swapped)
    writer.abort()
    assert not plan.folder.exists() and not list(Path(tmp_path / "c").iterdir())


def test_encoder_checks_the_weights_it_loads(micro_data, home):
    plan = plan_for("le", micro_data, home).feature_cache
    with pytest.raises(keys.CacheError, match="image_tower weights changed"):
        encoder.FeatureEncoder(plan.request, expected={"image_tower": "0" * 64})


def test_an_undecodable_image_is_stored_as_null_and_skipped_like_without_the_cache(micro_data, home):
    plan = plan_for("le", micro_data, home).feature_cache
    features = encoder.FeatureEncoder(plan.request)
    table = schema.read_split_table(micro_data, "train").slice(0, 3)
    rows = {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}
    rows["image"] = rows["image"].copy()
    rows["image"][1] = b"not an image"
    encoded = features(rows)
    assert encoded.column(store.IMAGE_EMBEDDING).null_count == 1 and features.bad_images == 1
    common = dict(languages=("de",), inputs=("image", "text_target"), context_length=24,
                  tokenizer=os.path.join(micro_data, "tokenizer"))
    plain = TrainPreprocessor(PreprocessSpec(image=plan.request.preprocess, **common))
    cached = TrainPreprocessor(PreprocessSpec(image=None, cached=("image",), feature_dim=32, **common))
    a = plain(rows)
    b = cached({**rows, store.IMAGE_EMBEDDING: encoded.column(store.IMAGE_EMBEDDING).to_numpy(zero_copy_only=False)})
    assert a["pixels"].shape[0] == b["image_features"].shape[0] == 2
    assert np.array_equal(a["text_ids_de"], b["text_ids_de"]) and plain.bad_images == cached.bad_images == 1


def test_vectors_reads_object_and_dense_columns():
    dense, ok = store.vectors(np.ones((2, 3), dtype=np.float64), 3)
    assert dense.dtype == np.float32 and ok.all()
    obj = np.array([np.ones(3, dtype=np.float32), None], dtype=object)
    values, ok = store.vectors(obj, 3)
    assert ok.tolist() == [True, False] and values[1].sum() == 0 and values[0].sum() == 3


def test_cached_teacher_pairs_caption_slots_by_index(micro_data, home):
    """Rows with several captions: slot k of language l takes English caption k mod n_l from the cache, exactly
    the caption TrainPreprocessor would tokenize for the teacher."""
    stage_plan = plan_for("nlt", micro_data, home)
    plan = stage_plan.feature_cache
    features = encoder.FeatureEncoder(plan.request)
    model = TrainState.create(stage_plan.cfg, stage_plan.tokenizer_dir, stage_plan.parent, "cpu").model.eval()
    obj = lambda values: np.array(values, dtype=object)  # noqa: E731
    rows = {"image_id": obj(["a", "b"]),
            "captions_en": obj([["a red circle", "a circle that is red", "red round"], ["a blue square"]]),
            "captions_de": obj([["ein roter Kreis", "ein Kreis, der rot ist", "rot rund"], ["ein blaues Quadrat"]]),
            "captions_zh": obj([["一个红色的圆形"], ["一个蓝色的正方形"]])}
    encoded = features(rows)
    assert [len(v) for v in encoded.column(store.TEXT_EN_EMBEDDINGS).to_pylist()] == [3, 1]
    common = dict(languages=("de", "zh"), inputs=("text_en", "text_target"), image=None, context_length=77,
                  tokenizer=os.path.join(micro_data, "tokenizer"))
    plain = TrainPreprocessor(PreprocessSpec(**common))(rows)
    cached = TrainPreprocessor(PreprocessSpec(cached=("text_en",), feature_dim=32, **common))(
        {**rows, store.TEXT_EN_EMBEDDINGS: encoded.column(store.TEXT_EN_EMBEDDINGS).to_numpy(zero_copy_only=False)})
    with torch.no_grad():
        for lang in ("de", "zh"):
            ids = trim_padding({"text_en_ids": torch.from_numpy(plain[f"text_en_ids_{lang}"])}, True)["text_en_ids"]
            expected = model.encode_text_en(ids).numpy()
            assert cached[f"text_en_features_{lang}"].shape == (4, 32)
            np.testing.assert_allclose(cached[f"text_en_features_{lang}"], expected, atol=1e-5)
    # zh has one caption for row a: its three slots all take English caption 0
    assert np.array_equal(cached["text_en_features_zh"][0], cached["text_en_features_zh"][2])
    assert not np.allclose(cached["text_en_features_de"][0], cached["text_en_features_de"][1])



@pytest.mark.parametrize("field,value", [("cache_actors", 0), ("cache_actor_cpus", 0), ("cache_batch_size", 0),
                                         ("feature_cache_dir", "")])
def test_cache_settings_are_checked_naming_the_field(micro_data, tmp_path, field, value):
    from ccr_ray.config import ConfigError

    with pytest.raises(ConfigError, match=f"data.{field}"):
        resolve_config("le", config(micro_data, tmp_path, data={field: value}))


def test_a_cache_build_that_would_starve_its_reads_is_refused_before_it_starts(monkeypatch):
    """On 2 CPUs one actor at 2 CPUs leaves the read tasks none: the build would wait for ever (seen). One line
    naming the fields instead."""
    import types

    from ccr_ray.config import DataConfig
    from ccr_ray.features import CacheError
    from ccr_ray.features.build import check_build_resources

    monkeypatch.setitem(__import__("sys").modules, "ray", types.SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0}))
    check_build_resources(DataConfig(cache_actors=1, cache_actor_cpus=1.5, task_cpus=0.5), use_gpu=False)
    with pytest.raises(CacheError, match="data.cache_actor_cpus"):
        check_build_resources(DataConfig(cache_actors=1, cache_actor_cpus=2.0, task_cpus=0.5), use_gpu=False)
