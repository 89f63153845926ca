"""The cache on disk, pyarrow only: layout, validity, writing (atomic publish) and reading.

Layout: `{data.feature_cache_dir}/{fingerprint[:16]}/` (default `{home}/cache/features/...`)

    cache.json              format version, full fingerprint and its components, what it was built from, shards
    part-00000.parquet      one file per dataset shard: the same rows in the same order
        image_id            string                                  checked against the source shard when written
        captions_<l>        list<string>                            every caption column of the source shard
        image_embedding     fixed_size_list<float32>[D]             raw (unnormalised) CLIP image feature;
                                                                    null = the image did not decode
        text_en_embeddings  list<fixed_size_list<float32>[D]>       teacher feature of English caption i, by index

Caches are content-addressed by their fingerprint (keys.py): a stage only ever opens the folder of its current
fingerprint, and a folder is used only when its cache.json carries that full fingerprint and every shard is present
with its recorded size and row count. Caches of the same split built from other inputs are stale: reported (with
the components that differ) and never read. A cache is built in a hidden staging folder and renamed into place,
so a half-built cache is never seen. Parquet + JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ccr_ray.data import schema
from ccr_ray.features import CacheError
from ccr_ray.features.keys import FORMAT_VERSION, CacheKey, CacheRequest, dataset_identity
from ccr_ray.storage import Location, parquet_file, publish_folder, read_table, swap_in

log = logging.getLogger(__name__)

CACHE_FILE = "cache.json"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EN_EMBEDDINGS = "text_en_embeddings"
FEATURE_COLUMNS = {"image": IMAGE_EMBEDDING, "text_en": TEXT_EN_EMBEDDINGS}  # stage input -> cache column
BATCH_KEYS = {"image": "image_features", "text_en": "text_en_features"}  # stage input -> model batch key


@dataclass(frozen=True)
class CacheStatus:
    valid: bool
    reason: str = ""  # why not (missing, incomplete, changed shard, other fingerprint)


def cache_folder(request: CacheRequest, key: CacheKey) -> Location:
    return Location.of(request.cache_dir) / key.short


def _read_meta(folder: Location) -> dict | None:
    try:
        return json.loads((folder / CACHE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_cache(folder: str | os.PathLike | Location, key: CacheKey) -> CacheStatus:
    """Valid = built for exactly this fingerprint, complete, and no shard changed since. Reads metadata only."""
    folder = Location.of(folder)
    if not folder.is_dir():
        return CacheStatus(False, f"no cache at {folder}")
    meta = _read_meta(folder)
    if meta is None:
        return CacheStatus(False, f"{folder / CACHE_FILE} is missing or unreadable")
    if meta.get("format_version") != FORMAT_VERSION:
        return CacheStatus(False, f"format version {meta.get('format_version')} (this code writes {FORMAT_VERSION})")
    if meta.get("fingerprint") != key.fingerprint:
        return CacheStatus(False, f"built from other inputs ({', '.join(differing(meta, key)) or 'fingerprint'} differ)")
    needed = {schema.IMAGE_ID} | {FEATURE_COLUMNS[f] for f in meta.get("features", [])}
    for shard in meta.get("shards", []):
        path = folder / shard["file"]
        if not path.is_file():
            return CacheStatus(False, f"shard {path} is missing")
        if path.size() != shard["bytes"]:
            return CacheStatus(False, f"shard {path} changed since it was written")
        try:
            footer = parquet_file(path)
        except (OSError, pa.ArrowException) as err:
            return CacheStatus(False, f"shard {path} is unreadable ({err})")
        if footer.metadata.num_rows != shard["rows"] or not needed <= set(footer.schema_arrow.names):
            return CacheStatus(False, f"shard {path} does not hold the recorded rows and columns")
    if not meta.get("shards"):
        return CacheStatus(False, f"{folder / CACHE_FILE} lists no shards")
    return CacheStatus(True)


def differing(meta: dict, key: CacheKey) -> list[str]:
    """Components of a cache's fingerprint that differ from `key` (what made it stale)."""
    theirs = meta.get("components", {})
    return sorted(name for name in set(theirs) | set(key.components) if theirs.get(name) != key.components.get(name))


def stale_caches(request: CacheRequest, key: CacheKey) -> list[tuple[Location, list[str]]]:
    """Caches of the same dataset split and inputs built from other weights, preprocessing, tokenizer or data."""
    root = Location.of(request.cache_dir)
    out = []
    for name in root.children():
        if name.startswith("."):
            continue
        folder = root / name
        meta = _read_meta(folder)
        if meta is None or meta.get("fingerprint") == key.fingerprint:
            continue
        built = meta.get("request", {})
        if (built.get("dataset_root"), built.get("split"), built.get("features")) == (
                request.dataset_root, request.split, list(request.features)):
            out.append((folder, differing(meta, key)))
    return out


def prune_stale(request: CacheRequest, key: CacheKey) -> list[Location]:
    removed = []
    for folder, _ in stale_caches(request, key):
        folder.delete()
        removed.append(folder)
    return removed


def feature_schema(features: tuple[str, ...], dim: int) -> pa.Schema:
    fields = [pa.field(schema.IMAGE_ID, pa.string(), nullable=False)]
    vector = pa.list_(pa.float32(), dim)
    if "image" in features:
        fields.append(pa.field(IMAGE_EMBEDDING, vector))
    if "text_en" in features:
        fields.append(pa.field(TEXT_EN_EMBEDDINGS, pa.list_(vector)))
    return pa.schema(fields)


@dataclass(frozen=True)
class CacheInfo:
    """An opened cache: what the training stream reads."""

    folder: Location
    features: tuple[str, ...]
    files: list[str]  # cache shards (paths or URIs), in dataset shard order
    rows: int
    embed_dim: int
    fingerprint: str
    meta: dict = field(default_factory=dict, compare=False, repr=False)


class CacheWriter:
    """Receives encoded rows in dataset order (any batching) and writes one cache shard per dataset shard into a
    local staging folder; `finish` puts it in place (a rename on local disk; on shared storage an upload with
    cache.json last, storage.publish_folder), so a half-built cache is never seen."""

    def __init__(self, request: CacheRequest, key: CacheKey):
        self.request, self.key = request, key
        self.sources = schema.split_files(request.dataset_root, request.split)
        self.expected = [parquet_file(f).metadata.num_rows for f in self.sources]
        self.folder = cache_folder(request, key)
        if self.folder.is_local:  # beside the target, so publishing is a rename
            parent = self.folder.parent.local_path()
            parent.mkdir(parents=True, exist_ok=True)
            self.staging = parent / f".{self.folder.name}.building-{uuid.uuid4().hex[:8]}"
            self.staging.mkdir()
        else:
            self.staging = Path(tempfile.mkdtemp(prefix=f"ccr-cache-{self.folder.name}-"))
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.counts = {"rows": 0, "undecodable_images": 0, "english_captions": 0}
        self.started = time.perf_counter()
        self._drain()  # empty leading shards

    @property
    def done(self) -> int:
        return len(self.shards)

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.pending.append(table)
            self.pending_rows += table.num_rows
        self._drain()

    def _drain(self) -> None:
        while self.done < len(self.sources) and self.pending_rows >= self.expected[self.done]:
            rows = pa.concat_tables(self.pending) if self.pending else None
            need = self.expected[self.done]
            self._write_shard(rows.slice(0, need) if rows is not None else None)
            rest = rows.slice(need) if rows is not None else None
            self.pending = [rest] if rest is not None and rest.num_rows else []
            self.pending_rows = rest.num_rows if rest is not None else 0

    def _write_shard(self, encoded: pa.Table | None) -> None:
        index = self.done
        source = self.sources[index]
        captions = [c for c in parquet_file(source).schema_arrow.names if c.startswith(schema.CAPTIONS_PREFIX)]
        table = read_table(source, columns=[schema.IMAGE_ID, *captions])
        if encoded is None:
            encoded = feature_schema(self.request.features, self.request.embed_dim).empty_table()
        if not table.column(schema.IMAGE_ID).equals(encoded.column(schema.IMAGE_ID)):
            raise CacheError(f"{source}: encoded rows arrived out of order (image_id mismatch); nothing written")
        for name in self.request.features:
            col = FEATURE_COLUMNS[name]
            table = table.append_column(encoded.schema.field(col), encoded.column(col))
        if IMAGE_EMBEDDING in table.column_names:
            self.counts["undecodable_images"] += table.column(IMAGE_EMBEDDING).null_count
        if TEXT_EN_EMBEDDINGS in table.column_names:
            self.counts["english_captions"] += int(pc.sum(pc.list_value_length(
                table.column(TEXT_EN_EMBEDDINGS))).as_py() or 0)
        name = f"part-{index:05d}.parquet"
        pq.write_table(table, self.staging / name)
        self.counts["rows"] += table.num_rows
        self.shards.append({"file": name, "source": Location.of(source).relative_to(self.request.dataset_root), "rows": table.num_rows,
                            "bytes": (self.staging / name).stat().st_size})

    def finish(self, build: dict | None = None, replace: bool = False) -> CacheInfo:
        if self.done != len(self.sources) or self.pending_rows:
            raise CacheError(f"feature cache {self.folder}: got rows for {self.done}/{len(self.sources)} shards "
                             f"(+{self.pending_rows} extra rows); the build is incomplete")
        meta = {"format_version": FORMAT_VERSION, "fingerprint": self.key.fingerprint,
                "components": self.key.components, "features": list(self.request.features),
                "embed_dim": self.request.embed_dim, "request": self.request.describe(),
                "dataset": dataset_identity(self.request.dataset_root, self.request.split), "shards": self.shards,
                **self.counts,
                "build": {"seconds": round(time.perf_counter() - self.started, 2), **(build or {})}}
        (self.staging / CACHE_FILE).write_text(json.dumps(meta, indent=1))
        self._publish(replace)
        return open_cache(self.folder)

    def _publish(self, replace: bool) -> None:
        if not replace and check_cache(self.folder, self.key).valid:
            log.info("feature cache %s was built concurrently; keeping that one", self.folder)
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        if not self.folder.is_local:
            try:
                publish_folder(self.staging, self.folder, marker=CACHE_FILE)
            finally:
                shutil.rmtree(self.staging, ignore_errors=True)
            return
        try:
            swap_in(self.staging, self.folder.local_path())
        except OSError:  # another builder renamed its copy in between
            if not check_cache(self.folder, self.key).valid:
                raise
            shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def open_cache(folder: str | os.PathLike | Location) -> CacheInfo:
    """Read cache.json (callers check validity first: `check_cache`)."""
    folder = Location.of(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise CacheError(f"{folder}: not a feature cache (no readable {CACHE_FILE})")
    return CacheInfo(folder=folder, features=tuple(meta["features"]),
                     files=[(folder / s["file"]).uri for s in meta["shards"]], rows=int(meta["rows"]),
                     embed_dim=int(meta["embed_dim"]), fingerprint=meta["fingerprint"], meta=meta)


def read_cache_table(folder: str | os.PathLike | Location, columns: list[str] | None = None) -> pa.Table:
    """All rows of a cache as one table, in dataset order."""
    return pa.concat_tables(read_table(f, columns=columns) for f in open_cache(folder).files)


def vectors(values, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A column of embeddings as read by pyarrow or Ray Data (an object array of arrays, None for null; or a 2-D
    array) -> float32 [N, dim] and a mask of the non-null rows."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        out = values.astype(np.float32, copy=False).reshape(len(values), dim)
        return out, np.ones(len(values), dtype=bool)
    ok = np.asarray([v is not None for v in values], dtype=bool)
    out = np.zeros((len(values), dim), dtype=np.float32)
    for i, v in enumerate(values):
        if v is not None:
            out[i] = np.asarray(v, dtype=np.float32)
    return out, ok
