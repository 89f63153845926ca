"""Batch embeddings on a Ray Data actor pool, evaluation from the embeddings (equal to the PyTorch evaluation),
and search (equal to ranking with the PyTorch model's features; the right image on the trained demo model)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from ccr_ray import runtime as rt
from ccr_ray.data import schema
from ccr_ray.eval.evaluate import evaluate_checkpoint
from ccr_ray.inference.embeddings import EMBEDDING_SCHEMA, EmbedError, embed_table, read_embeddings
from ccr_ray.inference.evaluate import evaluate_embeddings
from ccr_ray.inference.search import ImageIndex, search
from tests.export.conftest import LANGS, load_cli

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def embeddings(ray_cluster, mla_export, micro_data, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("emb") / "test"
    code = load_cli("embed").main(["--model", mla_export, "--data", micro_data, "--out", str(out),
                                   "--concurrency", "2", "--batch-size", "16", "--no-progress"])
    assert code == 0
    return str(out)


def test_embeddings_parquet(embeddings, micro_data):
    table = read_embeddings(embeddings)
    files = list(Path(embeddings).glob("*.parquet"))
    assert files and pq.read_schema(files[0]).field("embedding").type == EMBEDDING_SCHEMA.field("embedding").type
    sidecar = json.loads((Path(embeddings) / "embeddings.json").read_text())
    rows = schema.read_split_table(micro_data, "test", with_images=False)
    n_images = rows.num_rows
    n_caps = {lang: sum(len(c) for c in rows[schema.captions_column(lang)].to_pylist()) for lang in ("en", *LANGS)}
    assert sidecar["images"] == n_images and sidecar["captions"] == n_caps
    assert table.num_rows == n_images + sum(n_caps.values())
    kinds = table["kind"].to_pylist()
    assert kinds.count("image") == n_images
    assert sorted(set(table["lang"].to_pylist()) - {None}) == sorted(["en", *LANGS])
    emb = np.asarray(table["embedding"].to_pylist(), dtype=np.float32)
    assert emb.shape == (table.num_rows, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    # each row equals the runtime on the same input
    enc = rt.Encoder(sidecar["model_dir"])
    first = table.filter(pc.equal(table["lang"], "de")).slice(0, 3)
    assert np.allclose(np.asarray(first["embedding"].to_pylist()), enc.encode_text(first["text"].to_pylist(), "de"),
                       atol=1e-6)


def test_evaluation_from_embeddings_equals_pytorch(embeddings, mla_ckpt, micro_data, capsys, tmp_path):
    ours = evaluate_embeddings(embeddings)
    ref = evaluate_checkpoint(mla_ckpt, data=micro_data, split="test", languages=["en", *LANGS])
    assert list(ours["results"]) == list(ref["results"]) == ["en", *LANGS]
    for lang, metrics in ref["results"].items():
        for key, value in metrics.items():
            assert ours["results"][lang][key] == pytest.approx(value, abs=1e-9), (lang, key)
    assert ours["mean_mR"] == pytest.approx(ref["mean_mR"], abs=1e-9)
    out = tmp_path / "r.json"
    assert load_cli("evaluate_embeddings").main([embeddings, "--langs", "de", "--out", str(out)]) == 0
    assert "| de |" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"]["de"]["mR"] == pytest.approx(ref["results"]["de"]["mR"])


def test_folds_are_scored_per_fold(mla_export, micro_data):
    """COCO-style k-fold splits: the embeddings carry the fold and the evaluation averages over folds."""
    from ccr_ray.eval.retrieval import score_language
    from ccr_ray.inference.evaluate import language_arrays

    table = schema.read_split_table(micro_data, "test", ["de"]).slice(0, 16)
    folds = np.repeat([0, 1], 8).astype(np.int16)
    table = table.set_column(table.column_names.index(schema.FOLD), schema.FOLD, [folds])
    rows = embed_table(rt.Encoder(mla_export), table, ["de"])
    image_feats, caption_feats, caption_image, got_folds = language_arrays(rows, "de")
    assert got_folds.tolist() == folds.tolist()
    metrics = score_language(torch.from_numpy(image_feats), torch.from_numpy(caption_feats), caption_image, got_folds)
    assert metrics["folds"] == 2 and metrics["n_images"] == 8


def test_search_equals_ranking_by_pytorch_features(embeddings, mla_export, mla_ckpt, micro_data, capsys):
    from ccr_ray.checkpoint import load_checkpoint, tokenizer_of
    from ccr_ray.data.transforms import ImageTransform
    from ccr_ray.eval.retrieval import encode_captions, encode_images

    model, meta = load_checkpoint(mla_ckpt)
    model.eval()
    rows = schema.read_split_table(micro_data, "test", ["de", "zh"])
    images = list(zip(rows[schema.IMAGE].to_pylist(), rows[schema.IMAGE_PATH].to_pylist()))
    image_feats = encode_images(model, images, ImageTransform.from_config(meta.preprocess), torch.device("cpu"))
    ids = rows[schema.IMAGE_ID].to_pylist()
    index = ImageIndex.load(embeddings)
    encoder = rt.Encoder(mla_export)
    for lang in ("de", "zh"):
        queries = [caps[0] for caps in rows[schema.captions_column(lang)].to_pylist()[:4]]
        text_feats = encode_captions(model, queries, lang, 77, tokenizer_of(mla_ckpt), torch.device("cpu"))
        scores = (text_feats @ image_feats.T).numpy()
        hits = search(encoder, index, queries, lang, k=5)
        for q, row in enumerate(hits):
            expected = np.argsort(-scores[q], kind="stable")[:5]
            assert [h[0] for h in row] == [ids[i] for i in expected]
            assert np.allclose([h[1] for h in row], scores[q][expected], atol=1e-5)
    cli = load_cli("search")
    assert cli.main(["--model", mla_export, "--embeddings", embeddings, "--lang", "de", "--k", "3", "--json",
                     "ein roter Kreis"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["query"] == "ein roter Kreis" and len(line["hits"]) == 3
    assert cli.main(["--model", mla_export, "--embeddings", embeddings, "--lang", "fr", "x"]) == 2
    assert "--lang" in capsys.readouterr().err


def test_search_refuses_embeddings_of_another_image_tower(embeddings, dasd_export, tmp_path, capsys):
    """Image embeddings depend on the image tower alone: the DASD model trained beside the MLA one (same frozen
    tower) searches MLA's embeddings; embeddings made by another image tower are refused."""
    cli = load_cli("search")
    assert cli.main(["--model", dasd_export, "--embeddings", embeddings, "--lang", "de", "x"]) == 0
    capsys.readouterr()
    other = Path(shutil.copytree(embeddings, tmp_path / "other"))
    sidecar = json.loads((other / "embeddings.json").read_text())
    sidecar["model"].update(fingerprint="0" * 64, image_fingerprint="1" * 64)
    (other / "embeddings.json").write_text(json.dumps(sidecar))
    assert cli.main(["--model", dasd_export, "--embeddings", str(other), "--lang", "de", "x"]) == 2
    assert "re-run export/embed.py" in capsys.readouterr().err


def test_embed_bad_input_is_named(mla_export, micro_data, tmp_path, capsys):
    cli = load_cli("embed")
    assert cli.main(["--model", mla_export, "--data", micro_data, "--out", str(tmp_path / "o"), "--langs", "fr"]) == 2
    assert "--langs" in capsys.readouterr().err
    assert cli.main(["--model", mla_export, "--data", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "none" in capsys.readouterr().err
    assert cli.main(["--model", mla_export, "--data", micro_data, "--split", "dev", "--out", str(tmp_path / "o")]) == 2
    assert "dev" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path), "--data", micro_data, "--out", str(tmp_path / "o")]) == 2
    assert "manifest" in capsys.readouterr().err
    with pytest.raises(EmbedError, match="no such"):
        read_embeddings(tmp_path / "missing")


# ------------------------------------------------------------------------------- the trained demo model

DEMO_CKPT = Path(os.environ.get("CCR_RAY_DEMO_CHECKPOINT", Path.home() / "ccr_ray/runs/demo/le/checkpoint"))
DEMO_DATA = Path(os.environ.get("CCR_RAY_DEMO_DATA", Path.home() / "ccr_ray/data/demo"))


@pytest.mark.skipif(not ((DEMO_CKPT / "model.safetensors").exists() and (DEMO_DATA / "dataset.json").exists()),
                    reason="the trained demo (jobs/demo.py) is not on this machine")
def test_search_finds_the_demo_image_in_each_language(tmp_path):
    """On the trained demo model, a caption in any trained language retrieves its own image among the first
    32 test images (chance: 3%); --json output of the search CLI."""
    import shutil

    from ccr_ray.export.onnx_export import export_checkpoint, resolve_plan

    ckpt = shutil.copytree(DEMO_CKPT, tmp_path / "checkpoint")  # the demo may be retrained meanwhile
    plan, model, meta = resolve_plan(str(ckpt), str(tmp_path / "onnx"), data=str(DEMO_DATA))
    export_checkpoint(plan, model, meta)
    encoder = rt.Encoder(tmp_path / "onnx")
    table = schema.read_split_table(str(DEMO_DATA), "test", encoder.languages).slice(0, 32)
    langs = [lang for lang in encoder.languages if schema.captions_column(lang) in table.column_names]
    rows = embed_table(encoder, table, langs, images=True)
    images = rows.filter(pc.equal(rows["kind"], "image"))
    index = ImageIndex(images["id"].to_pylist(), np.asarray(images["embedding"].to_pylist(), dtype=np.float32),
                       {"model": encoder.manifest["model"]})
    ids = table[schema.IMAGE_ID].to_pylist()
    for lang in langs:
        queries = [caps[0] for caps in table[schema.captions_column(lang)].to_pylist()]
        hits = search(encoder, index, queries, lang, k=1)
        right = [h[0][0] == image_id for h, image_id in zip(hits, ids)]
        assert sum(right) >= 0.5 * len(right), f"{lang}: {sum(right)}/{len(right)} queries found their image"
        print(f"[{lang}] {sum(right)}/{len(right)} captions find their own image first; "
              f"e.g. {queries[right.index(True)]!r} -> {ids[right.index(True)]}")


def test_embed_out_that_is_a_file_is_one_line(mla_export, micro_data, tmp_path, capsys):
    file = tmp_path / "embeddings"
    file.write_text("not a folder")
    assert load_cli("embed").main(["--model", mla_export, "--data", micro_data, "--out", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --out: {file} is a file, not a folder", err  # was a NotADirectoryError traceback
