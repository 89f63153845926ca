"""On-disk layout of every dataset ccr-ray reads: the synthetic demo and the real-data converters write it.

A dataset is a folder:

    <root>/dataset.json                    manifest (see `Manifest`): name, languages, splits, counts, image storage
    <root>/<split>/part-00000.parquet      sharded Parquet, one row per image
    <root>/tokenizer/                      optional: a Hugging Face tokenizer folder trained for this data (demo)
    <root>/rejects/*.parquet               optional: quarantined records (converters), with a reason each
    <root>/prepare_report.json             optional: the converter's report (counts per split/language, rejects)

Row format ("wide": one row per image, one caption-list column per language):

    image_id     string      unique within the dataset, e.g. "1007129816.jpg" or "demo-000017"
    split        string      "train", "val", "test", ...
    image        binary      encoded image (PNG/JPEG bytes), or null when images are referenced by path
    image_path   string      path relative to the dataset root (or absolute), or null when bytes are embedded
    fold         int16       k-fold id for evaluation (COCO 5x1K); -1 when the split has no folds
    captions_<l> list<str>   captions in language <l>; empty list = no caption in that language

Captions of different languages are *parallel by index* where the source is parallel (CC300K translations,
Multi30K task1, the demo): captions_de[i] translates captions_en[i]. Stages that need an English teacher pair
index i of the target list with index i of the English list (the seeds do the same), so only
min(len(en), len(target)) pairs exist per image for them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from ccr_ray.storage import Location, read_table

IMAGE_ID = "image_id"
SPLIT = "split"
IMAGE = "image"
IMAGE_PATH = "image_path"
FOLD = "fold"
CAPTIONS_PREFIX = "captions_"
MANIFEST = "dataset.json"
TOKENIZER_DIR = "tokenizer"
NO_FOLD = -1
REJECTS_DIR = "rejects"
PREPARE_REPORT = "prepare_report.json"  # what the converters write beside the manifest (counts, rejects by reason)


def captions_column(lang: str) -> str:
    return f"{CAPTIONS_PREFIX}{lang}"


def arrow_schema(languages: list[str]) -> pa.Schema:
    fields = [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(SPLIT, pa.string(), nullable=False),
        pa.field(IMAGE, pa.binary()),
        pa.field(IMAGE_PATH, pa.string()),
        pa.field(FOLD, pa.int16(), nullable=False),
    ]
    fields += [pa.field(captions_column(lang), pa.list_(pa.string()), nullable=False) for lang in languages]
    return pa.schema(fields)


def reject_schema() -> pa.Schema:
    """Quarantined records (`<root>/rejects/*.parquet`): one row per source record that could not be used."""
    return pa.schema([
        pa.field("source_file", pa.string(), nullable=False),  # the input file that held the record
        pa.field("key", pa.string()),  # image key (or id) where known
        pa.field("split", pa.string()),
        pa.field("language", pa.string()),
        pa.field("line", pa.int64(), nullable=False),  # 1-based line in source_file; 0 = not line-based
        pa.field("reason", pa.string(), nullable=False),  # a stable name, e.g. corrupt_image, empty_caption
        pa.field("detail", pa.string()),
        pa.field("captions", pa.int32(), nullable=False),  # captions lost with the record
        pa.field("raw", pa.binary()),  # the offending bytes (a line, a caption), capped, where there are any
    ])


def languages_of(schema: pa.Schema) -> list[str]:
    return [n[len(CAPTIONS_PREFIX):] for n in schema.names if n.startswith(CAPTIONS_PREFIX)]


@dataclass
class SplitInfo:
    images: int
    captions: dict[str, int]  # language -> number of captions
    folds: int = 0  # number of k-fold groups (0 = none)
    files: list[str] = field(default_factory=list)  # shard paths relative to the root


@dataclass
class Manifest:
    name: str
    languages: list[str]
    splits: dict[str, SplitInfo]
    image_storage: str = "bytes"  # "bytes" (embedded) or "path"
    image_format: str = "PNG"
    tokenizer: str | None = None  # folder relative to the root, when the dataset ships its own tokenizer
    source: str = ""  # what produced it (generator, converter + inputs)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        data = dict(data)
        data["splits"] = {k: SplitInfo(**v) for k, v in data["splits"].items()}
        return cls(**data)


class DatasetError(ValueError):
    """A dataset folder is missing, incomplete or not in the layout above; the message names the path."""


def load_manifest(root: str | os.PathLike) -> Manifest:
    """The manifest of a dataset folder on any storage (storage.Location)."""
    path = Location.of(root) / MANIFEST
    if not path.is_file():
        raise DatasetError(f"{path}: no dataset manifest (is {root} a ccr-ray dataset folder?)")
    try:
        return Manifest.from_dict(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise DatasetError(f"{path}: malformed manifest: {err}") from None


def write_manifest(root: str | os.PathLike, manifest: Manifest) -> None:
    """Written last by every writer, atomically: readers never see a half-written manifest."""
    (Location.of(root) / MANIFEST).write_text(manifest.to_json())


def split_files(root: str | os.PathLike, split: str) -> list[str]:
    """The split's shards as paths or URIs (on the dataset's own storage), in manifest order."""
    manifest = load_manifest(root)
    if split not in manifest.splits:
        raise DatasetError(f"{root}: no split {split!r} (splits: {', '.join(manifest.splits)})")
    base = Location.of(root)
    files = [base / f for f in manifest.splits[split].files]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetError(f"{missing[0]}: shard listed in the manifest is missing")
    return [f.uri for f in files]


def read_split_table(root: str | os.PathLike, split: str, languages: list[str] | None = None,
                     with_images: bool = True) -> pa.Table:
    """All rows of a split as one table (evaluation-sized splits; training reads through Ray Data)."""
    manifest = load_manifest(root)
    cols = [IMAGE_ID, FOLD] + ([IMAGE, IMAGE_PATH] if with_images else [])
    langs = languages or manifest.languages
    cols += [captions_column(lang) for lang in langs if lang in manifest.languages]
    return pa.concat_tables(read_table(f, columns=cols) for f in split_files(root, split))
