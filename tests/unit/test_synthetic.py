"""The embedded default dataset: layout, determinism, parallel captions, held-out combinations."""

import io

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from ccr_ray.data import grammar, schema
from ccr_ray.data.scenes import POSITIONS, SHAPES, SceneSampler, heldout_pairs
from ccr_ray.data.synthetic import DemoDataConfig, write_demo_dataset


def test_layout_and_manifest(micro_data):
    m = schema.load_manifest(micro_data)
    assert m.languages == list(grammar.LANGUAGES)
    assert {s: i.images for s, i in m.splits.items()} == {"train": 256, "val": 64, "test": 64}
    assert m.splits["test"].captions["de"] == 128  # two captions per test image
    table = schema.read_split_table(micro_data, "train")
    assert table.num_rows == 256 and len(set(table["image_id"].to_pylist())) == 256
    image = Image.open(io.BytesIO(table["image"][0].as_py()))
    assert image.size == (32, 32) and image.format == "PNG"
    assert (schema.load_manifest(micro_data).tokenizer == "tokenizer")


def test_captions_are_parallel_across_languages(micro_data):
    table = schema.read_split_table(micro_data, "test")
    for lang in grammar.LANGUAGES:
        lengths = [len(c) for c in table[schema.captions_column(lang)].to_pylist()]
        assert lengths == [2] * table.num_rows
    # the two captions of an image use different templates (paraphrases)
    en = table["captions_en"].to_pylist()
    assert all(a != b for a, b in en)


def test_deterministic_by_seed(tmp_path):
    def make(name, seed):
        out = tmp_path / name
        write_demo_dataset(DemoDataConfig(out=str(out), sizes={"train": 40, "val": 8, "test": 8}, image_size=32,
                                          seed=seed, shard_size=20, tokenizer_vocab=300, workers=1))
        return pq.read_table(out / "train" / "part-00001.parquet")

    a, b, c = make("a", 1), make("b", 1), make("c", 2)
    assert a.equals(b)
    assert not a.equals(c)


def test_held_out_pairs_only_in_test():
    held = heldout_pairs(0)
    assert len(held) == len(POSITIONS) and {p for _, p in held} == set(POSITIONS)
    assert {s for s, _ in held} <= set(SHAPES)
    sampler = SceneSampler(held)
    rng = np.random.default_rng(0)
    assert not any(sampler.sample(rng).pairs() & held for _ in range(3000))
    assert all(sampler.sample(rng, include_held_out=True).pairs() & held for _ in range(300))


def test_test_split_contains_held_out_scenes(micro_data):
    m = schema.load_manifest(micro_data)
    held = {tuple(p) for p in m.extra["heldout_pairs"]}
    table = schema.read_split_table(micro_data, "test")
    en = [caps[0] for caps in table["captions_en"].to_pylist()]
    hits = sum(any(f"{shape} " in cap and pos in cap for shape, pos in held) for cap in en)
    assert hits >= 0.3 * len(en)
