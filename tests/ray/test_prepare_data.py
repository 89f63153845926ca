"""`jobs/prepare_data.py` end to end on a private local Ray cluster: the bad-input Multi30K fixture (every
bad-input kind) is converted with several shards in parallel, and the output, rejects and report are checked
exactly; a run whose image stage pushes the bad fraction over the limit fails without a manifest; the seeds'
k-fold layout comes out as the fold column, images by path.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccr_ray.data import schema
from tests.unit.test_converters import bad_multi30k_fixture, seeds_fixture

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_bad_multi30k_end_to_end(ray_local, tmp_path, capsys):
    import prepare_data

    root, images, expected = bad_multi30k_fixture(tmp_path)
    out = tmp_path / "out"
    args = ["multi30k", "--out", str(out), "--multi30k", str(root), "--images", str(images), "--shard-size", "3",
            "--task-cpus", "0.5"]
    assert prepare_data.main(args + ["--max-bad-fraction", "0.5"]) == 0, capsys.readouterr().err
    manifest = schema.load_manifest(out)
    assert manifest.languages == ["en", "de", "fr", "cs"] and manifest.image_storage == "bytes"
    assert manifest.image_format == "JPEG"
    assert {s: i.images for s, i in manifest.splits.items()} == {"train": 5, "val": 3}
    assert manifest.splits["train"].captions == {"en": 4, "de": 3, "fr": 0, "cs": 5}
    assert manifest.splits["val"].captions == {"en": 15, "de": 15, "fr": 3, "cs": 3}
    assert manifest.splits["train"].files == ["train/part-00000.parquet", "train/part-00001.parquet"]  # shard 3: all bad
    train = schema.read_split_table(out, "train")
    assert train[schema.IMAGE_ID].to_pylist() == expected["kept_train"]  # order survives the parallel write
    assert set(train[schema.FOLD].to_pylist()) == {schema.NO_FOLD}
    for data, key in zip(train[schema.IMAGE].to_pylist(), expected["kept_train"]):
        assert data == (images / key).read_bytes()
        Image.open(io.BytesIO(data)).load()
    rejects = pq.read_table(out / schema.REJECTS_DIR / "part-00000.parquet")
    assert Counter(rejects["reason"].to_pylist()) == expected["parse"] + expected["images"]
    image_rows = [r for r in rejects.to_pylist() if r["reason"] in expected["images"]]
    assert all(r["captions"] == 3 and r["split"] == "train" for r in image_rows)  # en + de + cs each
    report = json.loads((out / schema.PREPARE_REPORT).read_text())
    assert report["status"] == "ok"
    assert report["truncated_caption"]["counts"]["train"]["en"] == expected["truncated_en"]
    assert report["truncated_caption"]["not_checked"] == ["de", "fr", "cs"]  # no --tokenizer given
    assert report["rejected"]["captions"] == 32 and report["kept"]["captions"] == 48
    assert report["bad_fraction"] == pytest.approx(32 / 80)

    # parsing alone rejects 23/80 = 0.29, the image stage brings it to 0.40: over 0.35, the job fails after it
    code = prepare_data.main(args + ["--force", "--max-bad-fraction", "0.35"])
    err = capsys.readouterr().err
    assert code == prepare_data.EXIT_TOO_MANY_BAD
    assert "worst reasons: unknown_language (9 records, 9 captions), length_mismatch (8 records, 8 captions), " \
           "corrupt_image (2 records, 6 captions)" in err
    assert not (out / schema.MANIFEST).exists()
    assert json.loads((out / schema.PREPARE_REPORT).read_text())["status"] == "failed"


def test_seeds_folds_by_path(ray_local, tmp_path, capsys):
    import prepare_data

    path_json, data = seeds_fixture(tmp_path, k_folds=3, per_fold=2)
    out = tmp_path / "coco"
    assert prepare_data.main(["seeds", "--out", str(out), "--path-json", str(path_json), "--data-root", str(data),
                              "--images-as", "path", "--shard-size", "4"]) == 0, capsys.readouterr().err
    manifest = schema.load_manifest(out)
    assert manifest.image_storage == "path"
    assert manifest.splits["test"].folds == 3 and manifest.splits["val"].folds == 0
    assert manifest.splits["test"].captions == {"en": 6, "ja": 12}
    test = schema.read_split_table(out, "test")
    assert test[schema.FOLD].to_pylist() == [0, 0, 1, 1, 2, 2]
    assert all(d is None for d in test[schema.IMAGE].to_pylist())
    keys = test[schema.IMAGE_ID].to_pylist()
    assert test[schema.IMAGE_PATH].to_pylist() == [str(data / "MSCOCO/images" / k) for k in keys]
    assert not (out / schema.REJECTS_DIR).exists()


def task_that_dies_once(batch, spec):
    """ingest.process_batch, except that the task of shard 1 kills its worker process the first time (a marker
    file beside the output records it), as a preprocessing worker lost mid-job."""
    import os as _os

    import pyarrow as _pa

    from ccr_ray.data.converters.shards import SUMMARY_SCHEMA, process_shard

    marker = _os.path.join(_os.path.dirname(spec.out), ".killed-once")
    if int(batch["shard"][0].as_py()) == 1 and not _os.path.exists(marker):
        open(marker, "w").close()
        _os._exit(1)
    tables = [process_shard(row["split"], int(row["shard"]), row["records"], spec) for row in batch.to_pylist()]
    return _pa.concat_tables(tables) if tables else SUMMARY_SCHEMA.empty_table()


def shard_digests(out) -> dict[str, tuple[int, str]]:
    """Per shard: its row count and a hash of its rows (what a rerun must reproduce)."""
    import hashlib

    digests = {}
    for path in sorted(out.glob("*/part-*.parquet")):
        table = pq.read_table(path)
        digests[str(path.relative_to(out))] = (table.num_rows, hashlib.sha256(
            json.dumps(table.to_pylist(), default=lambda b: hashlib.sha256(b).hexdigest()).encode()).hexdigest())
    return digests


def test_drill_a_preprocessing_worker_killed_mid_job(ray_local, tmp_path, monkeypatch, capsys):
    """A worker running one shard's task dies mid-job: Ray Data retries the task, the job completes with every good
    record, and a clean rerun writes the same shards (row counts and content hashes)."""
    import time

    import prepare_data

    from ccr_ray.data import ingest

    root, images, expected = bad_multi30k_fixture(tmp_path)
    args = ["multi30k", "--multi30k", str(root), "--images", str(images), "--shard-size", "2", "--task-cpus", "0.5",
            "--max-bad-fraction", "0.5"]
    monkeypatch.setattr(ingest, "process_batch", task_that_dies_once)
    killed = tmp_path / "killed"
    started = time.time()
    assert prepare_data.main(args + ["--out", str(killed / "out")]) == 0, capsys.readouterr().err
    seconds = time.time() - started
    assert (killed / ".killed-once").exists()  # the fault fired
    monkeypatch.undo()
    clean = tmp_path / "clean" / "out"
    assert prepare_data.main(args + ["--out", str(clean)]) == 0, capsys.readouterr().err
    assert schema.read_split_table(killed / "out", "train")[schema.IMAGE_ID].to_pylist() == expected["kept_train"]
    assert shard_digests(killed / "out") == shard_digests(clean) and shard_digests(clean)
    lost = len(expected["kept_train"]) - schema.load_manifest(killed / "out").splits["train"].images
    assert lost == 0
    from tests.ray.test_multinode import report_drill

    report_drill("preprocessing worker killed mid prepare_data", steps_redone="1 shard task rerun",
                 records_lost=lost, recovery_seconds=None, job_seconds=round(seconds, 1))
