"""Image indexes (ccr_ray.inference.index, export/build_index.py): exact search ranks as the evaluation does,
approximate indexes measure their recall@10 on build and are refused below the threshold, ids and the model
fingerprint travel with the index, and search refuses queries from another model. No Ray here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ccr_ray.inference import index as ix
from ccr_ray.inference.embeddings import EMBEDDING_SCHEMA, SIDECAR, EmbedError
from tests.export.conftest import load_cli

FINGERPRINT = "f" * 64


def batches(ids, matrix, size=1000):
    for start in range(0, len(ids), size):
        yield ids[start:start + size], matrix[start:start + size]


@pytest.fixture(scope="module")
def vectors():
    x = ix.clustered_vectors(6000 + 300, 48, clusters=60, spread=1.0, seed=5)
    return [f"img-{i:05d}" for i in range(6000)], x[:6000], x[6000:]


def write_embeddings(folder: Path, ids, images, captions=None, files=3, fingerprint=FINGERPRINT) -> Path:
    """An embeddings folder in export/embed.py's schema: image rows, then caption rows."""
    folder.mkdir(parents=True)
    captions = np.zeros((0, images.shape[1]), np.float32) if captions is None else captions
    n, m = len(ids), len(captions)
    matrix = np.concatenate([images, captions]).astype(np.float32)
    table = pa.table({
        "id": ids + [ids[i % n] for i in range(m)], "kind": ["image"] * n + ["text"] * m,
        "lang": [None] * n + ["de"] * m, "caption_index": [-1] * n + [0] * m, "text": [None] * n + ["x"] * m,
        "fold": [-1] * (n + m),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1]).cast(
            pa.list_(pa.float32()))}).cast(EMBEDDING_SCHEMA)
    for i, part in enumerate(np.array_split(np.arange(n + m), files)):
        pq.write_table(table.take(pa.array(part)), folder / f"part-{i:05d}.parquet")
    (folder / SIDECAR).write_text(json.dumps({"model": {"fingerprint": fingerprint}, "embed_dim": matrix.shape[1]}))
    return folder


# ------------------------------------------------------------------------------------------------ exact


def test_exact_search_ranks_like_a_stable_sort_of_the_scores(vectors, monkeypatch):
    ids, matrix, queries = vectors
    index = ix.build_index(batches(ids, matrix), "exact", meta={"model": {"fingerprint": FINGERPRINT}})
    scores = queries[:20] @ matrix.T
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :10]
    got_scores, rows = index.search(queries[:20], 10)
    assert (rows == expected).all()
    assert np.allclose(got_scores, np.take_along_axis(scores, expected, 1), atol=1e-6)
    monkeypatch.setattr(ix, "SCORE_BUDGET", 6000 * 3)  # three queries per score block: same answer
    assert (index.search(queries[:20], 10)[1] == expected).all()
    tied = ix.Index(["a", "b", "c"], np.asarray([[1, 0], [0, 1], [1, 0]], np.float32))
    assert tied.top_k(np.asarray([[1, 0]], np.float32), 3)[0] == [("a", 1.0), ("c", 1.0), ("b", 0.0)]
    assert index.meta["recall_at_10"] == 1.0 and len(index) == 6000


# ------------------------------------------------------------------------------------------------ approximate


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_index_measures_recall_and_keeps_it_with_ids_and_fingerprint(vectors, kind, tmp_path):
    ids, matrix, queries = vectors
    index = ix.build_index(batches(ids, matrix), kind, count=len(ids), meta={"model": {"fingerprint": FINGERPRINT}},
                           queries=queries, min_recall=0.95)
    recall = index.meta["recall"]
    assert recall["queries"] == len(queries) and recall["query_source"] == "captions"
    assert recall["recall_at_10"] >= 0.95 and recall["params"] == index.params
    # the figure is what it claims: recompute it against brute force
    exact = ix.exact_search(matrix, queries, 10)[1]
    found = index.search(queries, 10)[1]
    assert ix.recall_at_k(found, exact) == pytest.approx(recall["recall_at_10"], abs=0.01)
    index.save(tmp_path / "index")
    back = ix.Index.load(tmp_path / "index")
    meta = json.loads((tmp_path / "index" / ix.META_FILE).read_text())
    assert meta["kind"] == kind and meta["count"] == 6000 and meta["model"]["fingerprint"] == FINGERPRINT
    assert meta["recall_at_10"] == recall["recall_at_10"] and back.params == index.params
    assert back.ids == ids and (back.search(queries, 10)[1] == found).all()


def test_recall_with_image_queries_leaves_each_querys_own_image_out(vectors):
    ids, matrix, _ = vectors
    index = ix.build_index(batches(ids, matrix), "hnsw", count=len(ids), n_queries=200, min_recall=0.9)
    assert index.meta["recall"]["query_source"].startswith("images") and index.meta["recall"]["queries"] == 200
    assert ix.recall_at_k(np.asarray([[5, 1, 2]]), np.asarray([[5, 3, 4]]), k=2, exclude=np.asarray([5])) == 0
    assert ix.recall_at_k(np.asarray([[5, 1, 2]]), np.asarray([[5, 3, 4]]), k=2) == 0.5


def test_an_index_below_the_threshold_is_refused(vectors):
    ids, matrix, queries = vectors
    with pytest.raises(ix.RecallError, match="recall@10 .* < --min-recall 0.98"):
        ix.build_index(batches(ids, matrix), "hnsw", hnsw_m=4, ef_construction=8, ef_search=1, queries=queries)
    with pytest.raises(ix.RecallError):
        ix.build_index(batches(ids, matrix), "ivf", count=len(ids), nlist=64, nprobe=1, queries=queries,
                       min_recall=0.999)


def test_build_cli_writes_the_index_or_refuses_it(vectors, tmp_path, capsys):
    ids, matrix, queries = vectors
    embeddings = write_embeddings(tmp_path / "emb", ids, matrix, captions=queries)
    cli = load_cli("build_index")
    assert cli.main([str(embeddings), "--out", str(tmp_path / "hnsw"), "--kind", "hnsw", "--queries", "200"]) == 0
    meta = json.loads((tmp_path / "hnsw" / ix.META_FILE).read_text())
    assert meta["recall"]["query_source"] == "captions" and meta["recall"]["queries"] == 200
    assert meta["recall_at_10"] >= 0.98 and meta["build"]["engine"] == "local"
    assert meta["model"]["fingerprint"] == FINGERPRINT
    assert pq.read_table(tmp_path / "hnsw" / ix.IDS_FILE)["id"].to_pylist() == ids  # images only, in order
    capsys.readouterr()
    code = cli.main([str(embeddings), "--out", str(tmp_path / "bad"), "--kind", "hnsw", "--hnsw-m", "4",
                     "--ef-construction", "8", "--ef-search", "1"])
    assert code == 3 and "refused" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert cli.main([str(embeddings), "--out", str(tmp_path / "x"), "--min-recall", "1.5"]) == 2
    assert "--min-recall" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "none"), "--out", str(tmp_path / "x")]) == 2
    assert "none" in capsys.readouterr().err
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("x")
    assert cli.main([str(embeddings), "--out", str(tmp_path / "occupied")]) == 2
    assert (tmp_path / "occupied" / "keep.txt").exists()


def test_build_cli_refuses_an_out_that_is_a_file_before_building(vectors, tmp_path, capsys):
    ids, matrix, queries = vectors
    embeddings = write_embeddings(tmp_path / "emb", ids, matrix, captions=queries)
    (tmp_path / "index").write_text("a file")
    assert load_cli("build_index").main([str(embeddings), "--out", str(tmp_path / "index"), "--kind", "hnsw"]) == 2
    out = capsys.readouterr()
    # was a NotADirectoryError traceback, after the build
    assert out.err.strip() == f"error: --out: {tmp_path / 'index'} is a file, not a folder" and "indexing" not in out.out


# ------------------------------------------------------------------------------------------------ the model


class FakeEncoder:
    def __init__(self, fingerprint, dim=48):
        self.manifest = {"model": {"fingerprint": fingerprint}, "embed_dim": dim}
        self.embed_dim, self.folder = dim, "fake"


def test_queries_from_another_model_are_refused(vectors, tmp_path):
    ids, matrix, _ = vectors
    index = ix.build_index(batches(ids[:100], matrix[:100]), "exact", meta={"model": {"fingerprint": FINGERPRINT}})
    index.check_model(FakeEncoder(FINGERPRINT))
    with pytest.raises(EmbedError, match="re-run export/embed.py"):
        index.check_model(FakeEncoder("0" * 64))
    with pytest.raises(EmbedError, match="dims"):
        index.check_model(FakeEncoder(FINGERPRINT, dim=32))
    index.save(tmp_path / "i")
    ix.check_pair(FakeEncoder(FINGERPRINT).manifest, ix.read_index_meta(tmp_path / "i"))
    with pytest.raises(ix.SearchIndexError, match="--index"):
        ix.check_pair(FakeEncoder("0" * 64).manifest, ix.read_index_meta(tmp_path / "i"))


def test_search_cli_reads_an_index_and_refuses_another_models(demo_model, tmp_path, capsys):
    cli = load_cli("search")
    answers = {}
    for kind in ("exact", "hnsw"):
        assert cli.main(["--model", demo_model["model"], "--index", demo_model[kind], "--lang", "de", "--k", "3",
                         "--json", "ein roter Kreis"]) == 0
        answers[kind] = json.loads(capsys.readouterr().out.strip())
        assert len(answers[kind]["hits"]) == 3
    # the embeddings folder itself still works, searched exactly: the exact index's answer
    assert cli.main(["--model", demo_model["model"], "--embeddings", demo_model["embeddings"], "--lang", "de",
                     "--k", "3", "--json", "ein roter Kreis"]) == 0
    assert json.loads(capsys.readouterr().out.strip()) == answers["exact"]
    other = shutil.copytree(demo_model["hnsw"], tmp_path / "other")
    meta = json.loads((other / ix.META_FILE).read_text())
    meta["model"]["fingerprint"] = "0" * 64  # another model with the same image tower: its index still serves
    (other / ix.META_FILE).write_text(json.dumps(meta))
    assert cli.main(["--model", demo_model["model"], "--index", str(other), "--lang", "de", "x"]) == 0
    capsys.readouterr()
    meta["model"]["image_fingerprint"] = "1" * 64  # another image tower: refused
    (other / ix.META_FILE).write_text(json.dumps(meta))
    assert cli.main(["--model", demo_model["model"], "--index", str(other), "--lang", "de", "x"]) == 2
    assert "re-run export/embed.py" in capsys.readouterr().err


def test_serve_cli_refuses_bad_input_before_starting_anything(demo_model, tmp_path, capsys):
    cli = load_cli("serve")
    other = shutil.copytree(demo_model["exact"], tmp_path / "other")
    meta = json.loads((other / ix.META_FILE).read_text())
    meta["model"].update(fingerprint="0" * 64, image_fingerprint="1" * 64)  # images of another image tower
    (other / ix.META_FILE).write_text(json.dumps(meta))
    cases = [
        (["--index", str(other)], "--index"),
        (["--index", str(tmp_path / "none")], "none"),
        (["--index", demo_model["exact"], "--images", str(tmp_path / "no-data")], "no-data"),
        (["--index", demo_model["exact"], "--port", "70000"], "--port"),
        (["--index", demo_model["exact"], "--int8"], "--int8"),  # exported without int8 graphs
        (["--index", demo_model["exact"], "--replicas", "0"], "--replicas"),
    ]
    for extra, named in cases:
        assert cli.main(["--model", demo_model["model"], *extra]) == 2, extra
        assert named in capsys.readouterr().err, extra
    import ray

    assert not ray.is_initialized()  # refused before any cluster work
