"""Converters without Ray: each source format built from the real caption text in ../shared/data plus generated
images, parsed and checked (counts, languages, alignment, folds, CC300K selection); a fixture seeded with every
bad-input kind gives exactly the expected rejects and keeps every good record; fail-fast errors name the field
or path and start no Ray work.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ccr_ray.data import schema
from ccr_ray.data.converters import cc300k, coco_cn, multi30k, records, seeds, xflickrco, xtd10
from ccr_ray.data.converters.records import InputError
from ccr_ray.data.converters.shards import WriteSpec, plan_shards, process_shard
from tests.conftest import SHARED_DATA

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "multi30k").is_dir(), reason="../shared/data not present")
AUTHORS = "/disk/dzy/VisualSearch/MLA_dataset/dataset/"


# ------------------------------------------------------------------------------------------------ fixtures


def real(rel: str, n: int, start: int = 0) -> list[bytes]:
    """Lines (bytes, line ends dropped) of a real caption file."""
    return (SHARED_DATA / rel).read_bytes().splitlines()[start:start + n]


def write_lines(path: Path, lines: list[bytes], end: bytes = b"\n", final: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(end.join(lines) + (end if final and lines else b""))
    return path


def make_image(path: Path, seed: int, fmt: str = "JPEG", size=(40, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def truncate(path: Path, keep: float = 0.6) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def multi30k_fixture(tmp: Path, n: dict[str, int] | None = None) -> tuple[Path, Path]:
    """Multi30K layout (task1 + task2) from the first n lines of the real files, with a JPEG per image."""
    n = n or {"train": 6, "val": 4, "test_2016_flickr": 5}
    root, images = tmp / "m30k", tmp / "flickr30k_images"
    t2_name = {"val": "val", "test_2016_flickr": "test_2016"}
    for split, k in n.items():
        keys = real(f"multi30k/task1/image_splits/{split}.txt", k)
        write_lines(root / "task1/image_splits" / f"{split}.txt", keys)
        for i, key in enumerate(keys):
            make_image(images / key.decode(), seed=hash((split, i)) % 1000)
        for lang in ("en", "de", "fr", "cs"):
            write_lines(root / "task1" / f"{split}.{lang}", real(f"multi30k/task1/{split}.{lang}", k))
        if split in t2_name:
            s2 = t2_name[split]
            write_lines(root / "task2/image_splits" / f"{s2}_images.txt",
                        real(f"multi30k/task2/image_splits/{s2}_images.txt", k))
            for j in range(1, 6):
                for lang in ("en", "de"):
                    write_lines(root / "task2" / f"{s2}.{j}.{lang}", real(f"multi30k/task2/{s2}.{j}.{lang}", k))
    return root, images


def by_id(result) -> dict[str, records.Record]:
    return {r.image_id: r for r in result.records}


def reasons(result_or_rejects) -> Counter:
    rejects = getattr(result_or_rejects, "rejects", result_or_rejects)
    return Counter(r.reason for r in rejects)


# ---------------------------------------------------------------------------------------------- sources


def test_multi30k_counts_languages_and_alignment(tmp_path):
    root, images = multi30k_fixture(tmp_path)
    result = multi30k.parse(str(root), [str(images)])
    assert not result.rejects
    assert result.splits() == ["train", "val", "test"]  # test_2016_flickr is the seeds' "test"
    assert result.languages() == ["en", "de", "fr", "cs"]
    rows = by_id(result)
    assert Counter(r.split for r in result.records) == {"train": 6, "val": 4, "test": 5}
    test_keys = [k.decode() for k in real("multi30k/task1/image_splits/test_2016_flickr.txt", 5)]
    assert [r.image_id for r in result.records if r.split == "test"] == test_keys  # evaluation order kept
    for i, key in enumerate(test_keys):
        row = rows[key]
        # en/de: the 5 task2 descriptions in k order; fr/cs: the task1 translation (spec 4.5)
        assert row.captions["en"] == [real(f"multi30k/task2/test_2016.{j}.en", 1, i)[0].decode().strip()
                                      for j in range(1, 6)]
        assert len(row.captions["de"]) == 5
        assert row.captions["fr"] == [real("multi30k/task1/test_2016_flickr.fr", 1, i)[0].decode().strip()]
        assert row.captions["cs"] == [real("multi30k/task1/test_2016_flickr.cs", 1, i)[0].decode().strip()]
        assert row.image_file == str(images / key)
    train = [r for r in result.records if r.split == "train"]
    assert all(len(r.captions[lang]) == 1 for r in train for lang in ("en", "de", "fr", "cs"))


def test_multi30k_task1_only_is_parallel_by_index_and_reads_raw_gz(tmp_path):
    import gzip

    root, images = multi30k_fixture(tmp_path, {"test_2016_flickr": 3})
    (root / "task1/raw").mkdir()
    for path in (root / "task1").glob("test_2016_flickr.*"):  # the upstream repo's data/task1/raw/*.gz
        (root / "task1/raw" / (path.name + ".gz")).write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
    result = multi30k.parse(str(root), [str(images)], languages=["en", "de"], task2=False)
    assert result.languages() == ["en", "de"]
    for i, r in enumerate(result.records):
        assert r.captions["en"] == [real("multi30k/task1/test_2016_flickr.en", 1, i)[0].decode().strip()]
        assert r.captions["de"] == [real("multi30k/task1/test_2016_flickr.de", 1, i)[0].decode().strip()]


def test_xtd10_crlf_no_final_newline_and_jp_alias(tmp_path):
    root, images = tmp_path / "xtd10", tmp_path / "coco"
    keys = real("xtd10/XTD10/test_image_names.txt", 4)
    write_lines(root / "XTD10/test_image_names.txt", keys)
    for i, key in enumerate(keys):  # COCO images live in train2014/ and val2014/ subfolders
        sub = key.decode().split("_")[1]
        make_image(images / sub / key.decode(), seed=i)
    write_lines(root / "XTD10/test_1kcaptions_es.txt", real("xtd10/XTD10/test_1kcaptions_es.txt", 4),
                end=b"\r\n", final=False)  # as the real es/it/ko/... files
    write_lines(root / "MIC/test_1kcaptions_de.txt", real("xtd10/MIC/test_1kcaptions_de.txt", 4))
    write_lines(root / "STAIR/test_1kcaptions_jp.txt", real("xtd10/STAIR/test_1kcaptions_jp.txt", 4))
    result = xtd10.parse(str(root), [str(images)])
    assert not result.rejects
    assert result.languages() == ["de", "ja", "es"]
    for i, r in enumerate(result.records):
        assert r.split == "test" and r.image_id == keys[i].decode()
        assert r.captions["es"] == [real("xtd10/XTD10/test_1kcaptions_es.txt", 1, i)[0].decode().strip()]
        assert "\r" not in r.captions["es"][0]
        assert r.captions["ja"] == [real("xtd10/STAIR/test_1kcaptions_jp.txt", 1, i)[0].decode().strip()]
        assert Path(r.image_file).is_file()


def test_xflickrco_merges_languages_and_takes_first_sentence_of_mt_val(tmp_path):
    root, flickr, coco = tmp_path / "xfc", tmp_path / "flickr", tmp_path / "coco"
    for lang in ("de", "ja"):
        write_lines(root / f"test_{lang}.jsonl", real(f"xflickrco/test_{lang}.jsonl", 2)
                    + real(f"xflickrco/test_{lang}.jsonl", 2, 1000))  # 2 Flickr + 2 COCO images
    write_lines(root / "flickr30k_val_mt/valid-zh_gmt.jsonl", real("xflickrco/flickr30k_val_mt/valid-zh_gmt.jsonl", 3))
    lines = real("xflickrco/test_de.jsonl", 2) + real("xflickrco/test_de.jsonl", 2, 1000) \
        + real("xflickrco/flickr30k_val_mt/valid-zh_gmt.jsonl", 3)
    for i, line in enumerate(lines):
        name = json.loads(line)["img_path"]
        make_image((coco if name.startswith("COCO") else flickr) / name, seed=i)
    result = xflickrco.parse(str(root), [str(flickr), str(coco)])
    assert not result.rejects
    assert Counter(r.split for r in result.records) == {"val": 3, "test": 4}
    rows = by_id(result)
    for line in real("xflickrco/test_ja.jsonl", 2, 1000):
        item = json.loads(line)
        assert rows[item["img_path"]].captions["ja"] == item["sentences"]
        assert rows[item["img_path"]].image_file == str(coco / item["img_path"])
    for line in real("xflickrco/flickr30k_val_mt/valid-zh_gmt.jsonl", 3):
        item = json.loads(line)
        assert len(item["sentences"]) == 5
        assert rows[item["img_path"]].captions == {"zh": item["sentences"][:1]}  # the rest is untranslated English


def test_coco_cn_orders_sentences_and_uses_split_lists(tmp_path):
    lines = real("coco_cn/coco-cn_ext.icap2020.txt", 4712)
    per_image: dict[str, list[tuple[int, bytes]]] = {}
    for line in lines:
        key, text = line.split(b"\t", 1)
        base, n = key.decode().split("#")
        per_image.setdefault(base, []).append((int(n), text))
    multi = [b for b, s in per_image.items() if len(s) >= 2][:2]
    single = [b for b, s in per_image.items() if len(s) == 1][:3]
    chosen = multi + single
    # sentences of one image in reverse order: the parser must sort them by #n
    fixture = [f"{b}#{n}".encode() + b"\t" + t for b in chosen for n, t in sorted(per_image[b], reverse=True)]
    cap_file = write_lines(tmp_path / "coco-cn.txt", fixture)
    images = tmp_path / "coco"
    for i, b in enumerate(chosen):
        make_image(images / f"{b}.jpg", seed=i)
    split_test = write_lines(tmp_path / "test.txt", [b.encode() for b in [chosen[3], chosen[0]]])
    np.save(tmp_path / "train.npy", np.array([chosen[1], chosen[2]]))
    result = coco_cn.parse([str(cap_file)], [str(images)],
                           split_lists={"train": str(tmp_path / "train.npy"), "test": str(split_test)})
    assert not result.rejects
    assert [(r.split, r.image_id) for r in result.records] == [
        ("train", f"{chosen[1]}.jpg"), ("train", f"{chosen[2]}.jpg"), ("test", f"{chosen[3]}.jpg"),
        ("test", f"{chosen[0]}.jpg")]
    assert result.filtered == {"not_in_split_lists": 1}
    first = by_id(result)[f"{chosen[0]}.jpg"]
    assert first.captions["zh"] == [t.decode().strip() for _, t in sorted(per_image[chosen[0]])]
    assert len(first.captions["zh"]) >= 2


def seeds_fixture(tmp: Path, k_folds: int = 2, per_fold: int = 3) -> tuple[Path, Path]:
    """A COCO-style benchmark in the seeds' layout with the authors' absolute paths: en (XTD10 English) over the
    whole test set, ja (STAIR) as k folds, val with one .npy; returns (path JSON, data root)."""
    data = tmp / "dataset"
    n = k_folds * per_fold + 2
    names = real("xtd10/XTD10/test_image_names.txt", n)
    keys = [f"{name.decode().split('_')[1]}/{name.decode()}" for name in names]  # val2014/COCO_val2014_...jpg
    for i, key in enumerate(keys):
        make_image(data / "MSCOCO/images" / key, seed=i)
    en = [c.decode().strip() for c in real("xtd10/XTD10/test_1kcaptions_en.txt", n)]
    ja = [c.decode().strip() for c in real("xtd10/STAIR/test_1kcaptions_jp.txt", n)]
    ann = data / "MSCOCO/annotation"
    ann.mkdir(parents=True)
    (ann / "ref_captions.json").write_text(json.dumps({k: [c] for k, c in zip(keys, en)}, ensure_ascii=False))
    (ann / "ref_captions_stair_jp.json").write_text(json.dumps({k: [c, c + "。"] for k, c in zip(keys, ja)},
                                                               ensure_ascii=False))
    split = data / "MSCOCO/public_split"
    (split / "test1k").mkdir(parents=True)
    test = keys[:k_folds * per_fold]
    np.save(split / "tst_names.npy", np.array(test))
    for f in range(k_folds):
        np.save(split / f"test1k/tst.{f}.npy", np.array(test[f * per_fold:(f + 1) * per_fold]))
    np.save(split / "val_names.npy", np.array(keys[-2:]))
    p = AUTHORS + "MSCOCO/"
    path_json = data / "MSCOCO/COCO_path.json"
    path_json.write_text(json.dumps({
        "val": {"anno_file": [p + "annotation/ref_captions.json"], "feature": [p + "images"],
                "name_file": [p + "public_split/val_names.npy"], "langs": ["en"]},
        "test": {"anno_file": [p + "annotation/ref_captions.json", p + "annotation/ref_captions_stair_jp.json"],
                 "feature": [p + "images", p + "images"],
                 "name_file": [p + "public_split/tst_names.npy",
                               [p + f"public_split/test1k/tst.{f}.npy" for f in range(k_folds)]],
                 "langs": ["en", "jp"]}}))
    return path_json, data


def test_seeds_rewrites_author_paths_and_maps_name_file_lists_to_folds(tmp_path):
    path_json, data = seeds_fixture(tmp_path)
    result = seeds.parse([str(path_json)], data_root=str(data))
    assert not result.rejects
    assert result.splits() == ["val", "test"]
    test = [r for r in result.records if r.split == "test"]
    assert [r.fold for r in test] == [0, 0, 0, 1, 1, 1]
    assert all(r.fold == schema.NO_FOLD for r in result.records if r.split == "val")
    assert all(len(r.captions["ja"]) == 2 and len(r.captions["en"]) == 1 for r in test)
    assert all(Path(r.image_file).is_file() and r.image_file.startswith(str(data)) for r in result.records)
    assert result.notes and "ja" in result.notes[0]  # en shares the ja folds: said in the report


def test_seeds_config_errors_name_the_field_or_path(tmp_path):
    path_json, data = seeds_fixture(tmp_path)
    cfg = json.loads(path_json.read_text())
    with pytest.raises(InputError, match="anno_file"):  # without --data-root the authors' paths do not exist
        seeds.parse([str(path_json)])
    bad = dict(cfg, test={k: v for k, v in cfg["test"].items() if k != "feature"})
    path_json.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"test\.feature is missing"):
        seeds.parse([str(path_json)], data_root=str(data))
    bad = dict(cfg, test=dict(cfg["test"], langs=["en"]))
    path_json.write_text(json.dumps(bad))
    with pytest.raises(InputError, match=r"parallel lists differ in length.*langs 1"):
        seeds.parse([str(path_json)], data_root=str(data))
    np.save(data / "MSCOCO/public_split/val_names.npy", np.array(["a.jpg", None], dtype=object))
    path_json.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"val_names\.npy.*pickled"):  # never unpickled
        seeds.parse([str(path_json)], data_root=str(data))


def test_cc300k_selection_follows_the_seeds_recipe(tmp_path):
    # six aligned languages: Multi30K test_2016 en/de/fr/cs + xFlickr&CO zh/ja on the same 40 images
    n, langs = 40, ("en", "de", "fr", "cs", "zh", "ja")
    text = {lang: [c.decode() for c in real(f"multi30k/task1/test_2016_flickr.{lang}", n)]
            for lang in ("en", "de", "fr", "cs")}
    for lang in ("zh", "ja"):
        text[lang] = [json.loads(line)["sentences"][0] for line in real(f"xflickrco/test_{lang}.jsonl", n)]
    ids = [1000 + 7 * i for i in range(n)]
    fail_de = {ids[3]}  # status fail in one language: not in every language
    no_ja = {ids[5]}  # missing from the ja TSV
    tsv = tmp_path / "tsv"
    for lang in langs:
        rows = [f"{i}\thttp://x/{i}.jpg\t{text[lang][k]}\t{'fail' if lang == 'de' and i in fail_de else 'success'}"
                for k, i in enumerate(ids) if not (lang == "ja" and i in no_ja)]
        write_lines(tsv / f"train_imageId2Ann_{lang}.tsv", [r.encode() for r in reversed(rows)])
    images = tmp_path / "images"
    downloaded = [i for k, i in enumerate(ids) if k % 3 != 1]  # a third were never downloaded
    for i in downloaded:
        make_image(images / f"{i:08d}.jpg", seed=i)
    result = cc300k.parse(str(images), tsv_dir=str(tsv), top=12)
    assert not result.rejects
    # the seeds' recipe, written the seeds' way
    names = np.array([f"{i:08d}.jpg" for i in sorted(set(ids) - fail_de - no_ja)])
    np.random.seed(42)
    np.random.shuffle(names)
    expected = [x for x in names if int(x[:-4]) in set(downloaded)][:12]
    assert [r.image_id for r in result.records] == expected
    assert expected != sorted(expected)
    assert result.filtered["status_fail"] == 1 and result.filtered["not_in_every_language"] == 2
    assert result.filtered["beyond_top"] > 0 and result.filtered["image_not_found"] > 0
    for r in result.records:
        k = ids.index(int(r.image_id[:-4]))
        assert r.split == "train" and r.captions == {lang: [text[lang][k].strip()] for lang in langs}


# ------------------------------------------------------------------------------------------ bad input


def bad_multi30k_fixture(tmp: Path) -> tuple[Path, Path, dict]:
    """Multi30K train split of 8 real images + one repeated key, seeded with bad input; val stays clean.

    image list: 9 lines, line 9 repeats line 3's key                    -> duplicate_key (+ its 3 caption lines)
    train.en:   line 2 empty, line 4 a 10x repeated caption              -> empty_caption; truncated (kept)
    train.de:   line 3 invalid UTF-8, line 5 whitespace only              -> invalid_utf8, empty_caption
    train.fr:   one line short                                          -> length_mismatch x 8
    train.xx:   an unknown language code                                -> unknown_language x 9
    images:     #6 missing, #7 random bytes, #8 truncated JPEG           -> missing_image, corrupt_image x 2
    """
    root, images = multi30k_fixture(tmp, {"train": 8, "val": 3})
    t1 = root / "task1"
    keys = (t1 / "image_splits/train.txt").read_bytes().splitlines()
    write_lines(t1 / "image_splits/train.txt", keys + [keys[2]])
    en = real("multi30k/task1/train.en", 9)
    en[1] = b""
    en[3] = b" ".join([en[3]] * 10)
    write_lines(t1 / "train.en", en)
    de = real("multi30k/task1/train.de", 9)
    de[2] = b"Ein Hund \xff\xfe l\xe4uft"  # latin-1 bytes in a UTF-8 file
    de[4] = b"   \t "
    write_lines(t1 / "train.de", de)
    write_lines(t1 / "train.fr", real("multi30k/task1/train.fr", 8))
    write_lines(t1 / "train.cs", real("multi30k/task1/train.cs", 9))
    write_lines(t1 / "train.xx", real("multi30k/task1/train.en", 9))
    (images / keys[5].decode()).unlink()
    (images / keys[6].decode()).write_bytes(np.random.default_rng(0).bytes(600))
    truncate(images / keys[7].decode())
    expected = {
        "parse": Counter({"unknown_language": 9, "length_mismatch": 8, "duplicate_key": 4, "empty_caption": 2,
                          "invalid_utf8": 1}),
        "images": Counter({"corrupt_image": 2, "missing_image": 1}),
        "kept_train": [k.decode() for k in keys[:5]],
        "captions_train": {"en": 4, "de": 3, "cs": 5},
        "truncated_en": 1,
    }
    return root, images, expected


def test_every_bad_text_kind_is_rejected_exactly_and_good_records_kept(tmp_path):
    root, images, expected = bad_multi30k_fixture(tmp_path)
    result = multi30k.parse(str(root), [str(images)])
    assert reasons(result) == expected["parse"]
    by_reason = {}
    for r in result.rejects:
        by_reason.setdefault(r.reason, []).append(r)
    assert {r.line for r in by_reason["length_mismatch"]} == set(range(1, 9))
    assert all(Path(r.source_file).name == "train.fr" for r in by_reason["length_mismatch"])
    assert {(Path(r.source_file).name, r.line) for r in by_reason["empty_caption"]} == {("train.en", 2),
                                                                                      ("train.de", 5)}
    bad_utf8 = by_reason["invalid_utf8"][0]
    assert (Path(bad_utf8.source_file).name, bad_utf8.line, bad_utf8.raw) == ("train.de", 3,
                                                                               b"Ein Hund \xff\xfe l\xe4uft")
    assert {(Path(r.source_file).name, r.captions) for r in by_reason["duplicate_key"]} == {
        ("train.txt", 0), ("train.en", 1), ("train.de", 1), ("train.cs", 1)}
    assert all(r.language == "xx" and r.split == "train" for r in by_reason["unknown_language"])
    train = [r for r in result.records if r.split == "train"]
    assert len(train) == 8  # images are checked later, in the shard stage
    good = by_id(result)
    # neighbours of every bad line keep their captions
    assert good[expected["kept_train"][0]].captions["de"] == [real("multi30k/task1/train.de", 1)[0].decode()]
    assert "en" not in good[expected["kept_train"][1]].captions  # its only en caption was empty
    assert good[expected["kept_train"][2]].captions["en"] == [real("multi30k/task1/train.en", 1, 2)[0].decode()]
    assert "fr" not in good[expected["kept_train"][0]].captions
    assert Counter(r.split for r in result.records)["val"] == 3 and all(
        len(r.captions["en"]) == 5 for r in result.records if r.split == "val")


def test_bad_json_lines_tsv_and_caption_json(tmp_path):
    # xFlickr&CO: malformed JSON, missing img_path, repeated img_path, a lone surrogate, an empty sentence
    good = real("xflickrco/test_de.jsonl", 3)
    lines = [good[0], b'{"sentences": ["Ein Hund"', b'{"sentences": ["x"], "id": 1}', good[1],
             good[1], b'{"sentences": ["\\udc80 kaputt", "  "], "img_path": "z.jpg"}', good[2]]
    root = tmp_path / "xfc"
    write_lines(root / "test_de.jsonl", lines)
    images = tmp_path / "img"
    images.mkdir()
    result = xflickrco.parse(str(root), [str(images)])
    assert reasons(result) == Counter({"malformed_json": 2, "duplicate_key": 1, "invalid_utf8": 1,
                                       "empty_caption": 1, "no_caption": 1})
    assert [r.image_id for r in result.records] == [json.loads(x)["img_path"] for x in good]
    assert sorted(r.line for r in result.rejects if r.reason != "no_caption") == [2, 3, 5, 6, 6]

    # CC TSV: 3 fields, a non-numeric id, an unknown status, a repeated id, an empty caption, invalid UTF-8
    tsv = tmp_path / "tsv"
    en = [c for c in real("multi30k/task1/test_2016_flickr.en", 6)]
    de = [c for c in real("multi30k/task1/test_2016_flickr.de", 6)]
    write_lines(tsv / "train_imageId2Ann_en.tsv", [b"%d\tu\t%s\tsuccess" % (i, c) for i, c in enumerate(en)]
                + [b"7\tu\tonly three", b"x8\tu\tcap\tsuccess", b"9\tu\tcap\tmaybe", b"1\tu\tagain\tsuccess"])
    write_lines(tsv / "train_imageId2Ann_de.tsv", [b"%d\tu\t%s\tsuccess" % (i, c) for i, c in enumerate(de)]
                [:4] + [b"4\tu\t \tsuccess", b"5\tu\tGr\xfc\xdfe\tsuccess"])
    cc_images = tmp_path / "cc"
    for i in range(6):
        make_image(cc_images / f"{i:08d}.jpg", seed=i)
    result = cc300k.parse(str(cc_images), tsv_dir=str(tsv), languages=["en", "de"], top=10)
    assert reasons(result) == Counter({"malformed_line": 3, "duplicate_key": 1, "empty_caption": 1,
                                       "invalid_utf8": 1})
    assert sorted(r.image_id for r in result.records) == [f"{i:08d}.jpg" for i in range(4)]

    # seeds caption JSON: repeated key, a value that is not a list, a listed key without captions, a file
    # that does not parse at all; an unknown language code
    path_json, data = seeds_fixture(tmp_path / "s", k_folds=1, per_fold=3)
    ann = data / "MSCOCO/annotation/ref_captions.json"
    caps = json.loads(ann.read_text())
    keys = list(caps)
    body = json.dumps({keys[0]: caps[keys[0]], keys[1]: "not a list"}, ensure_ascii=False)[:-1]
    ann.write_text(body + ", " + json.dumps(keys[0]) + ': ["again"]}')  # keys[2] missing, keys[0] repeated
    stair = data / "MSCOCO/annotation/ref_captions_stair_jp.json"
    stair.write_text(stair.read_text()[:-5])  # cut: no longer JSON
    cfg = json.loads(path_json.read_text())
    cfg["val"]["langs"] = ["xx"]
    path_json.write_text(json.dumps(cfg))
    result = seeds.parse([str(path_json)], data_root=str(data))
    assert reasons(result) == Counter({"malformed_json": 4, "duplicate_key": 1, "missing_caption": 1,
                                       "unknown_language": 2})
    assert [r.image_id for r in result.records] == [keys[0]]
    assert by_id(result)[keys[0]].captions == {"en": caps[keys[0]]}  # the first value of the repeated key


def test_coco_cn_bad_lines(tmp_path):
    good = real("coco_cn/coco-cn_ext.icap2020.txt", 3)
    key0 = good[0].split(b"\t")[0]
    lines = [good[0], b"not a coco key\tsentence", good[1], key0 + b"\tagain", key0.replace(b"#0", b"#7") + b"\t ",
             good[2], good[2].split(b"\t")[0].replace(b"#0", b"#1") + b"\t\xc3\x28"]
    f = write_lines(tmp_path / "cn.txt", lines)
    (tmp_path / "img").mkdir()
    result = coco_cn.parse([str(f)], [str(tmp_path / "img")])
    assert reasons(result) == Counter({"malformed_line": 1, "duplicate_key": 1, "empty_caption": 1,
                                       "invalid_utf8": 1})
    assert [len(r.captions["zh"]) for r in result.records] == [1, 1, 1]


def test_shard_checks_images_embeds_bytes_and_counts_truncation(tmp_path):
    from ccr_ray.tokenization import train_wordpiece

    img = tmp_path / "img"
    good_jpg, good_png = make_image(img / "a.jpg", 1), make_image(img / "b.png", 2, "PNG")
    corrupt = img / "c.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(1).bytes(500))
    trunc_jpg, trunc_png = make_image(img / "d.jpg", 3, size=(200, 150)), make_image(img / "e.png", 4, "PNG")
    truncate(trunc_jpg, 0.9)
    truncate(trunc_png)
    empty = img / "f.jpg"
    empty.write_bytes(b"")
    en = [c.decode() for c in real("multi30k/task1/train.en", 7)]
    de = [c.decode() for c in real("multi30k/task1/train.de", 7)]
    de[1] = " ".join([de[1]] * 20)  # longer than 32 tokens in any tokenizer
    en[0] = " ".join([en[0]] * 20)
    names = ["a.jpg", "b.png", "c.jpg", "d.jpg", "e.png", "f.jpg", "missing.jpg"]
    recs = [records.Record(n, "train", str(img / n), "list.txt", {"en": [en[i]], "de": [de[i]]})
            for i, n in enumerate(names)]
    tok = train_wordpiece(de + en, tmp_path / "tok", vocab_size=300, min_frequency=1)
    spec = WriteSpec(out=str(tmp_path / "out"), languages=("en", "de"), context_length=32, tokenizer=str(tok))
    (shard,) = plan_shards(recs, ["en", "de"], shard_size=100)
    summary = process_shard(shard["split"], shard["shard"], shard["records"], spec).to_pylist()
    rows = {r["image_id"]: r for r in summary if r["kind"] == "record"}
    assert {k: r["reason"] for k, r in rows.items()} == {
        "a.jpg": "", "b.png": "", "c.jpg": "corrupt_image", "d.jpg": "corrupt_image", "e.png": "corrupt_image",
        "f.jpg": "corrupt_image", "missing.jpg": "missing_image"}
    assert "truncated" in rows["d.jpg"]["detail"]
    (meta,) = [r for r in summary if r["kind"] == "shard"]
    assert meta["images"] == 2 and meta["truncated"] == [1, 1]
    table = pq.read_table(tmp_path / "out" / meta["file"])
    assert table.schema.equals(schema.arrow_schema(["en", "de"]))
    assert table[schema.IMAGE].to_pylist() == [good_jpg.read_bytes(), good_png.read_bytes()]
    assert table[schema.captions_column("de")].to_pylist() == [[de[0]], [de[1]]]
    Image.open(io.BytesIO(table[schema.IMAGE][1].as_py())).load()
    # path mode: no bytes, the absolute path
    spec_path = WriteSpec(out=str(tmp_path / "out2"), languages=("en", "de"), image_storage="path")
    process_shard("train", 0, pa.ipc.open_stream(shard["records"]).read_all(), spec_path)
    t2 = pq.read_table(tmp_path / "out2/train/part-00000.parquet")
    assert t2[schema.IMAGE].to_pylist() == [None, None]
    assert t2[schema.IMAGE_PATH].to_pylist() == [str(good_jpg), str(good_png)]


# --------------------------------------------------------------------------------------------- the job


@pytest.fixture()
def no_ray(monkeypatch):
    """Fails the test if the job reaches any Ray work."""
    from ccr_ray import ray_utils
    from ccr_ray.data import ingest

    def boom(*a, **k):
        raise AssertionError("Ray work started")

    monkeypatch.setattr(ray_utils, "ensure_ray", boom)
    monkeypatch.setattr(ingest, "run_shards", boom)


def test_job_fails_fast_naming_the_field_or_path(tmp_path, capsys, no_ray):
    import prepare_data

    assert prepare_data.main(["nosuch", "--out", str(tmp_path / "o")]) == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err
    missing = tmp_path / "absent"
    assert prepare_data.main(["multi30k", "--out", str(tmp_path / "o"), "--multi30k", str(missing),
                              "--images", str(tmp_path)]) == 2
    assert f"--multi30k: {missing} does not exist" in capsys.readouterr().err
    path_json, data = seeds_fixture(tmp_path)
    cfg = json.loads(path_json.read_text())
    del cfg["test"]["name_file"]
    path_json.write_text(json.dumps(cfg))
    assert prepare_data.main(["seeds", "--out", str(tmp_path / "o"), "--path-json", str(path_json),
                              "--data-root", str(data)]) == 2
    assert "test.name_file is missing" in capsys.readouterr().err
    assert prepare_data.main(["xtd10", "--out", str(tmp_path / "o"), "--xtd10", str(tmp_path), "--images",
                              str(tmp_path), "--languages", "en,klingon"]) == 2
    assert "--languages: unknown language code(s) klingon" in capsys.readouterr().err
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    root, images = multi30k_fixture(tmp_path / "m", {"val": 2})
    args = ["multi30k", "--out", str(occupied), "--multi30k", str(root), "--images", str(images)]
    assert prepare_data.main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert prepare_data.main(args + ["--force"]) == 2  # not a folder this job wrote: never deleted
    assert "refusing to delete" in capsys.readouterr().err and (occupied / "keep.txt").exists()
    assert not (tmp_path / "o").exists()


def test_job_stops_before_ray_when_parsing_rejects_too_much(tmp_path, capsys, no_ray):
    import prepare_data

    root, images, expected = bad_multi30k_fixture(tmp_path)
    out = tmp_path / "out"
    code = prepare_data.main(["multi30k", "--out", str(out), "--multi30k", str(root), "--images", str(images)])
    err = capsys.readouterr().err
    assert code == prepare_data.EXIT_TOO_MANY_BAD
    assert "worst reasons: unknown_language (9 records, 9 captions), length_mismatch (8 records" in err
    assert not (out / schema.MANIFEST).exists()
    report = json.loads((out / schema.PREPARE_REPORT).read_text())
    assert report["status"] == "failed"
    assert {k: v["records"] for k, v in report["rejected"]["by_reason"].items()} == dict(expected["parse"])
    rejects = pq.read_table(out / schema.REJECTS_DIR / "part-00000.parquet")
    assert rejects.schema.equals(schema.reject_schema())
    assert Counter(rejects["reason"].to_pylist()) == expected["parse"]
