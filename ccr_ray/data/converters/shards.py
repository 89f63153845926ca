"""The per-shard work of the converters, Ray-free: check every image, embed its bytes (or its path), count
captions the tokenizers would truncate, write one Parquet shard in the layout of schema.py, and return a summary.

`ccr_ray/data/ingest.py` runs `process_shard` in parallel as a Ray Data `map_batches` task; the unit tests call it
directly. Records cross into the task as Arrow IPC bytes (one shard per item), so a task needs nothing but the
shard and a `WriteSpec`.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image

from ccr_ray.data import schema
from ccr_ray.data.converters.records import CORRUPT_IMAGE, MISSING_IMAGE, Record
from ccr_ray.storage import Location, write_table

SOURCE = "source"
IMAGE_FILE = "image_file"
DRAFT_SIZE = 64  # JPEG draft decode target: libjpeg still entropy-decodes every block, at 1/8 the IDCT work
TEXT_ONLY = "none"  # WriteSpec.image_storage of a text-only dataset (captions only, e.g. Multi30K without images)

# summary rows: kind "record" (one per input record) or "shard" (one per shard: file, truncation counts)
SUMMARY_SCHEMA = pa.schema([
    ("kind", pa.string()), ("split", pa.string()), ("shard", pa.int32()), ("image_id", pa.string()),
    ("reason", pa.string()), ("detail", pa.string()), ("source", pa.string()), ("captions", pa.int32()),
    ("image_format", pa.string()), ("file", pa.string()), ("images", pa.int32()),
    ("kept", pa.list_(pa.int32())),  # kept captions per WriteSpec.languages (record rows)
    ("truncated", pa.list_(pa.int32())),  # captions longer than the context per language (shard rows)
])


@dataclass(frozen=True)
class WriteSpec:
    out: str  # absolute dataset folder
    languages: tuple[str, ...]
    image_storage: str = "bytes"  # "bytes": embed the encoded file; "path": its absolute path; "none": text only
    context_length: int = 77
    tokenizer: str | None = None  # target-language tokenizer folder; None = truncation not checked for them
    row_group_size: int = 256


def records_table(records: list[Record], languages: list[str] | tuple[str, ...]) -> pa.Table:
    cols = {schema.IMAGE_ID: [r.image_id for r in records], schema.SPLIT: [r.split for r in records],
            schema.FOLD: [r.fold for r in records],
            IMAGE_FILE: [os.path.abspath(r.image_file) for r in records],
            SOURCE: [r.source for r in records]}
    for lang in languages:
        cols[schema.captions_column(lang)] = [r.captions.get(lang, []) for r in records]
    return pa.table(cols)


def plan_shards(records: list[Record], languages: list[str], shard_size: int) -> list[dict]:
    """Shard descriptors, split by split, in record order (evaluation order survives into the shards)."""
    by_split: dict[str, list[Record]] = {}
    for r in records:
        by_split.setdefault(r.split, []).append(r)
    shards = []
    for split, rows in by_split.items():
        for index, start in enumerate(range(0, len(rows), shard_size)):
            table = records_table(rows[start:start + shard_size], languages)
            sink = io.BytesIO()
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
            shards.append({"split": split, "shard": index, "records": sink.getvalue()})
    return shards


def check_image(path: str, keep_bytes: bool) -> tuple[bytes | None, str, str, str]:
    """(bytes or None, format, reject reason or "", detail): verify() checks the structure, load() decodes every
    pixel, so truncated files and corrupt data both fail here instead of in a training worker."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return None, "", MISSING_IMAGE, f"{path}: no such file"
    except OSError as err:
        return None, "", MISSING_IMAGE, f"{path}: {err.strerror or err}"
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format or ""
            image.verify()
        with Image.open(io.BytesIO(data)) as image:
            if image.format == "JPEG":
                image.draft("RGB", (DRAFT_SIZE, DRAFT_SIZE))
            image.load()
            if min(image.size) <= 0:
                raise ValueError(f"empty image {image.size}")
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        # no object addresses (PIL names its buffer by id): a rerun writes the same rejects
        return None, "", CORRUPT_IMAGE, re.sub(r" at 0x[0-9a-f]+", "", f"{type(err).__name__}: {err}")
    return (data if keep_bytes else None), fmt, "", ""


def _truncated(texts: list[str], lang: str, spec: WriteSpec) -> int:
    from ccr_ray.tokenization import english_tokenizer, target_tokenizer

    if not texts:
        return 0
    if lang == "en":
        return english_tokenizer(spec.context_length).count_truncated(texts)
    if spec.tokenizer:
        return target_tokenizer(spec.tokenizer, spec.context_length).count_truncated(texts)
    return 0


def shard_path(split: str, shard: int) -> str:
    return f"{split}/part-{shard:05d}.parquet"


def process_shard(split: str, shard: int, records: bytes | pa.Table, spec: WriteSpec) -> pa.Table:
    table = records if isinstance(records, pa.Table) else pa.ipc.open_stream(records).read_all()
    langs = list(spec.languages)
    caps = {lang: table[schema.captions_column(lang)].to_pylist() for lang in langs}
    ids, files, sources = (table[c].to_pylist() for c in (schema.IMAGE_ID, IMAGE_FILE, SOURCE))
    folds = table[schema.FOLD].to_pylist()
    summary = {name: [] for name in SUMMARY_SCHEMA.names}
    out = {name: [] for name in schema.arrow_schema(langs).names}
    keep_bytes = spec.image_storage == "bytes"
    text_only = spec.image_storage == TEXT_ONLY
    for i, image_id in enumerate(ids):
        # a text-only dataset reads no image: rows carry their captions and a null image
        data, fmt, reason, detail = (None, "", "", "") if text_only else check_image(files[i], keep_bytes)
        kept = [len(caps[lang][i]) for lang in langs]
        _summary_row(summary, "record", split, shard, image_id, reason, detail, sources[i], sum(kept), fmt, kept)
        if reason:
            continue
        out[schema.IMAGE_ID].append(image_id)
        out[schema.SPLIT].append(split)
        out[schema.IMAGE].append(data)
        out[schema.IMAGE_PATH].append(None if keep_bytes or text_only else files[i])
        out[schema.FOLD].append(folds[i])
        for lang in langs:
            out[schema.captions_column(lang)].append(caps[lang][i])
    n_images = len(out[schema.IMAGE_ID])
    rel = ""
    truncated = [_truncated([c for row in out[schema.captions_column(lang)] for c in row], lang, spec)
                 for lang in langs]
    if n_images:  # a shard whose every image was rejected writes no file
        rel = shard_path(split, shard)
        # local disk or shared storage; readers never see half a shard (rename, or one PUT)
        write_table(pa.Table.from_pydict(out, schema=schema.arrow_schema(langs)), Location.of(spec.out) / rel,
                    row_group_size=spec.row_group_size)
    _summary_row(summary, "shard", split, shard, None, "", "", None, 0, "", None, rel, n_images, truncated)
    return pa.Table.from_pydict(summary, schema=SUMMARY_SCHEMA)


def _summary_row(summary: dict, kind, split, shard, image_id, reason, detail, source, captions, fmt, kept,
                 file="", images=0, truncated=None) -> None:
    for name, value in (("kind", kind), ("split", split), ("shard", shard), ("image_id", image_id),
                        ("reason", reason), ("detail", detail), ("source", source), ("captions", captions),
                        ("image_format", fmt), ("file", file), ("images", images), ("kept", kept),
                        ("truncated", truncated)):
        summary[name].append(value)
