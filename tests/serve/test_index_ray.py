"""An index built on Ray Data from the Parquet embeddings (export/build_index.py --engine ray) equals the
local build: same images, same neighbours for exact search, the recall figure for HNSW."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ccr_ray.inference import index as ix
from tests.conftest import private_ray
from tests.export.conftest import load_cli
from tests.serve.test_index import write_embeddings

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_local():
    with private_ray("ccridx-") as ray:
        yield ray


def test_ray_data_build_equals_the_local_build(ray_local, tmp_path):
    x = ix.clustered_vectors(8000 + 200, 32, clusters=80, spread=1.0, seed=9)
    ids = [f"r{i}" for i in range(8000)]
    embeddings = write_embeddings(tmp_path / "emb", ids, x[:8000], captions=x[8000:], files=6)
    cli = load_cli("build_index")
    for engine in ("local", "ray"):
        assert cli.main([str(embeddings), "--out", str(tmp_path / f"exact-{engine}"), "--engine", engine]) == 0
        assert cli.main([str(embeddings), "--out", str(tmp_path / f"hnsw-{engine}"), "--kind", "hnsw",
                         "--engine", engine, "--queries", "200"]) == 0
    local, remote = ix.Index.load(tmp_path / "exact-local"), ix.Index.load(tmp_path / "exact-ray")
    assert json.loads((tmp_path / "exact-ray" / ix.META_FILE).read_text())["build"]["engine"] == "ray"
    assert sorted(remote.ids) == sorted(local.ids) == sorted(ids)  # every image once, whatever the block order
    queries = x[8000:]
    assert [[i for i, _ in hits] for hits in remote.top_k(queries, 10)] == \
        [[i for i, _ in hits] for hits in local.top_k(queries, 10)]
    order = np.argsort(remote.ids)
    assert np.array_equal(remote.matrix[order], local.matrix[np.argsort(local.ids)])
    meta = json.loads((tmp_path / "hnsw-ray" / ix.META_FILE).read_text())
    assert meta["build"]["engine"] == "ray" and meta["recall_at_10"] >= 0.98 and meta["count"] == 8000


def test_build_cli_embeds_a_dataset_split_then_indexes_it(ray_local, demo_model, tmp_path):
    out = tmp_path / "index"
    assert load_cli("build_index").main(["--model", demo_model["model"], "--data", demo_model["data"], "--split",
                                         "test", "--out", str(out), "--kind", "hnsw", "--queries", "100"]) == 0
    built, reference = ix.Index.load(out), ix.Index.load(demo_model["exact"])
    assert sorted(built.ids) == sorted(reference.ids) and built.kind == "hnsw"
    assert built.fingerprint == reference.fingerprint  # the model's, read from the embeddings' sidecar
    assert (tmp_path / "index-embeddings" / "embeddings.json").exists()
    meta = json.loads((out / ix.META_FILE).read_text())
    assert meta["recall"]["query_source"] == "captions" and meta["recall_at_10"] >= 0.98
