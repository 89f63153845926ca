"""The frozen-feature cache: image and English-teacher embeddings of a training split, computed once by the frozen
CLIP towers and read by the training stream instead of images and English captions (issue 4).

Ray-free: what may be cached, the layout, the fingerprint, the validity check, the encoder both builders run,
writing and reading. The Ray Data build (an actor pool holding the towers) is `cache_builder.py`; the driver
calls it before training when `data.feature_cache` is on; `jobs/cache_features.py` builds or checks ahead of time.

What a stage may take from the cache follows from the stage table alone (`cacheable_inputs`): the image embedding
when the stage needs images and does not train `image_tower`; the English teacher embedding when it needs
`text_en` and does not train `text_tower`. With the packaged table: le, finetune-all -> image; nlt, cla -> text_en;
cma -> both; clip and finetune-en train the towers, so the cache does not apply to them (the plan says so, and
training reads images as usual: a recipe-wide `data.feature_cache=true` is not an error there).

Layout: `{data.feature_cache_dir}/{fingerprint[:16]}/` (default `{home}/cache/features/...`)

    cache.json              format version, full fingerprint and its components, what it was built from, shards
    part-00000.parquet      one file per dataset shard: the same rows in the same order
        image_id            string                                  checked against the source shard when written
        captions_<l>        list<string>                            every caption column of the source shard
        image_embedding     fixed_size_list<float32>[D]             raw (unnormalised) CLIP image feature;
                                                                    null = the image did not decode
        text_en_embeddings  list<fixed_size_list<float32>[D]>       teacher feature of English caption i, by index

The training stream reads these shards *instead of* the dataset's, so no image bytes are read or decoded and no
English caption is tokenized; `TrainPreprocessor` pairs caption slots with the cached rows exactly as it pairs
them with images and English captions. Features are computed in fp32, in eval mode, without gradients, by the same
functions the model runs (`CCRModel.encode_image` / `encode_text_en`), so a stage gives the same losses with and
without the cache up to float reordering (batched matmuls over different batch shapes, ~1e-6).

Fingerprint (sha256 over named components, each a sha256): format version, cached inputs, CLIP architecture
(open_clip config + QuickGELU), the weights of each cached tower (`tensor_fingerprint`), image preprocessing (for
image features), the English tokenizer (BPE vocabulary file hash + context length, for teacher features) and the
dataset split's identity (each shard's relative path, size and mtime). Caches are content-addressed by it: a
stage only ever opens the folder of its current fingerprint, and a folder is used only when its cache.json
carries that full fingerprint and every shard is present with its recorded size and row count. Caches of the same
split built from other inputs are stale: they are reported (with the components that differ) and never read;
`jobs/cache_features.py --prune-stale` deletes them. A cache is built in a hidden staging folder and renamed
into place, so a half-built cache is never seen. Caches are Parquet + JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ccr_ray.data import schema
from ccr_ray.data.transforms import ImageTransform, open_image

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the encoding or the layout changes: every older cache then reads as stale
CACHE_FILE = "cache.json"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EN_EMBEDDINGS = "text_en_embeddings"
FEATURE_COLUMNS = {"image": IMAGE_EMBEDDING, "text_en": TEXT_EN_EMBEDDINGS}  # stage input -> cache column
BATCH_KEYS = {"image": "image_features", "text_en": "text_en_features"}  # stage input -> model batch key
TOWERS = {"image": "image_tower", "text_en": "text_tower"}  # stage input -> parameter group that computes it
KEY_CHARS = 16  # fingerprint characters in the folder name (cache.json holds the full one)


class CacheError(ValueError):
    """A cache cannot be planned, built or read; the message names the path or field."""


def cacheable_inputs(stage) -> tuple[str, ...]:
    """Stage inputs computed by towers the stage does not train: exactly what a cache may replace."""
    return tuple(name for name, tower in TOWERS.items() if name in stage.inputs and tower not in stage.trains)


# --------------------------------------------------------------------------------------------- fingerprint


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _input_of_weight(name: str) -> str | None:
    """Which cached input a CLIP state-dict entry feeds (open_clip names: visual.* is the image tower; the logit
    scale feeds neither; everything else is the text path of `encode_text_en`)."""
    if name.startswith("visual."):
        return "image"
    if name in ("logit_scale", "logit_bias"):
        return None
    return "text_en"


@dataclass(frozen=True)
class CacheRequest:
    """Everything that determines a cache's content. Plain data: it pickles into Ray actors cheaply."""

    dataset_root: str
    split: str
    features: tuple[str, ...]  # cached stage inputs, in TOWERS order: "image", "text_en"
    clip_cfg: dict  # open_clip model config (as the checkpoint stores it)
    quick_gelu: bool  # model.backbone.quick_gelu of the stage (build_clip ORs it with the config's)
    weights: str  # the stage's parent checkpoint folder, or a local CLIP weights file (model.backbone.pretrained)
    preprocess: dict  # image preprocessing of the model (ImageTransform config)
    context_length: int  # English token ids per caption
    cache_dir: str  # where caches live: {cache_dir}/{fingerprint[:16]}

    @property
    def effective_quick_gelu(self) -> bool:
        return bool(self.clip_cfg.get("quick_gelu", False) or self.quick_gelu)

    @property
    def embed_dim(self) -> int:
        return int(self.clip_cfg["embed_dim"])

    def describe(self) -> dict:
        return {"dataset_root": self.dataset_root, "split": self.split, "features": list(self.features),
                "weights": self.weights, "preprocess": self.preprocess, "context_length": self.context_length,
                "quick_gelu": self.effective_quick_gelu}


@dataclass(frozen=True)
class CacheKey:
    fingerprint: str  # sha256 over the components
    components: dict[str, str]  # name -> sha256 of that input

    @property
    def short(self) -> str:
        return self.fingerprint[:KEY_CHARS]


def _stat(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _weights_file(weights: str) -> Path:
    path = Path(weights)
    if path.is_dir():
        from ccr_ray.train.checkpoint import MODEL_FILE

        path = path / MODEL_FILE
    if not path.is_file():
        raise CacheError(f"{weights}: no weights to encode with (neither a ccr-ray checkpoint folder nor a file)")
    return path


def load_clip_state(weights: str, clip_cfg: dict, quick_gelu: bool) -> dict:
    """The CLIP weights the stage starts from, named as in open_clip's state dict."""
    if Path(weights).is_dir():  # a ccr-ray checkpoint folder: the CCRModel's clip.* tensors
        from safetensors import safe_open

        with safe_open(str(_weights_file(weights)), framework="pt") as f:
            return {k[len("clip."):]: f.get_tensor(k) for k in f.keys() if k.startswith("clip.")}
    return load_frozen_clip(weights, clip_cfg, quick_gelu).state_dict()


def tower_digests(state: dict, features: tuple[str, ...]) -> dict[str, str]:
    from ccr_ray.train.checkpoint import tensor_fingerprint

    out = {}
    for name in features:
        tensors = {k: v for k, v in state.items() if _input_of_weight(k) == name}
        if not tensors:
            raise CacheError(f"the backbone weights hold no {TOWERS[name]} tensors")
        out[TOWERS[name]] = tensor_fingerprint(tensors)
    return out


@functools.lru_cache(maxsize=16)
def _weights_digests(weights: str, stat: tuple[int, int], clip_cfg_json: str, quick_gelu: bool,
                     features: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    # memoised per weights file (path + size + mtime): planning a stage twice fingerprints its weights once
    state = load_clip_state(weights, json.loads(clip_cfg_json), quick_gelu)
    return tuple(sorted(tower_digests(state, features).items()))


@functools.lru_cache(maxsize=8)
def _english_tokenizer_digest(context_length: int) -> str:
    from ccr_ray.tokenization import clip_bpe_vocab_file

    vocab = hashlib.sha256(clip_bpe_vocab_file().read_bytes()).hexdigest()
    return _digest({"bpe_vocab_sha256": vocab, "context_length": context_length})


def dataset_identity(root: str, split: str) -> list[dict]:
    """Each shard of the split: path relative to the root, size, mtime (moving the dataset keeps the cache;
    rewriting a shard invalidates it)."""
    out = []
    for file in schema.split_files(root, split):
        size, mtime = _stat(Path(file))
        out.append({"file": os.path.relpath(file, root), "bytes": size, "mtime_ns": mtime})
    return out


def cache_key(request: CacheRequest) -> CacheKey:
    """Compute the fingerprint of what the cache would hold (reads the weights; memoised per file)."""
    unknown = set(request.features) - set(TOWERS)
    if unknown or not request.features:
        raise CacheError(f"features: {sorted(unknown) or 'none'}; a cache holds some of {', '.join(TOWERS)}")
    components = {
        "format": f"v{FORMAT_VERSION}",
        "features": ",".join(request.features),
        "architecture": _digest({"clip_cfg": request.clip_cfg, "quick_gelu": request.effective_quick_gelu}),
        "data": _digest(dataset_identity(request.dataset_root, request.split)),
    }
    components.update(dict(_weights_digests(request.weights, _stat(_weights_file(request.weights)),
                                            json.dumps(request.clip_cfg, sort_keys=True), request.quick_gelu,
                                            request.features)))
    if "image" in request.features:
        components["preprocess"] = _digest(ImageTransform.from_config(request.preprocess).to_config())
    if "text_en" in request.features:
        components["tokenizer"] = _english_tokenizer_digest(request.context_length)
    return CacheKey(fingerprint=_digest(components), components=components)


# --------------------------------------------------------------------------------------------- validity


@dataclass(frozen=True)
class CacheStatus:
    valid: bool
    reason: str = ""  # why not (missing, incomplete, changed shard, other fingerprint)


def cache_folder(request: CacheRequest, key: CacheKey) -> Path:
    return Path(request.cache_dir) / key.short


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / CACHE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_cache(folder: str | os.PathLike, key: CacheKey) -> CacheStatus:
    """Valid = built for exactly this fingerprint, complete, and no shard changed since. Reads metadata only."""
    folder = Path(folder)
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
        if path.stat().st_size != shard["bytes"]:
            return CacheStatus(False, f"shard {path} changed since it was written")
        try:
            footer = pq.ParquetFile(path)
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


def stale_caches(request: CacheRequest, key: CacheKey) -> list[tuple[Path, list[str]]]:
    """Caches of the same dataset split and inputs built from other weights, preprocessing, tokenizer or data."""
    root = Path(request.cache_dir)
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        meta = _read_meta(folder)
        if meta is None or meta.get("fingerprint") == key.fingerprint:
            continue
        built = meta.get("request", {})
        if (built.get("dataset_root"), built.get("split"), built.get("features")) == (
                request.dataset_root, request.split, list(request.features)):
            out.append((folder, differing(meta, key)))
    return out


# --------------------------------------------------------------------------------------------- the stage's plan


@dataclass
class FeatureCachePlan:
    """What `data.feature_cache` means for one stage; computed by the driver before any cluster work."""

    features: tuple[str, ...]  # cacheable inputs of the stage (empty: not applicable)
    request: CacheRequest | None = None
    key: CacheKey | None = None
    status: CacheStatus | None = None
    note: str = ""  # why the cache does not apply

    @property
    def applicable(self) -> bool:
        return bool(self.features)

    @property
    def folder(self) -> Path:
        return cache_folder(self.request, self.key)

    def describe(self) -> str:
        if not self.applicable:
            return f"not applicable: {self.note}; it reads images and captions as usual"
        state = "valid" if self.status.valid else f"will be built ({self.status.reason})"
        return f"{', '.join(self.features)} from {self.folder}: {state}"


def plan_feature_cache(cfg, stage, parent: str | None, dataset_root: str, clip_cfg: dict, preprocess: dict,
                       context_length: int) -> FeatureCachePlan | None:
    """None when `data.feature_cache` is off. The weights are those the stage starts from: its parent checkpoint,
    else `model.backbone.pretrained`. Raises CacheError naming the field when the cache cannot be planned."""
    if not cfg.data.feature_cache:
        return None
    features = cacheable_inputs(stage)
    if not features:
        return FeatureCachePlan(features=(), note=f"stage {stage.name!r} trains "
                                f"{', '.join(t for t in TOWERS.values() if t in stage.trains)}, so none of its "
                                "inputs is frozen")
    weights = parent or (cfg.path(cfg.model.backbone.pretrained) if cfg.model.backbone.pretrained else "")
    if not weights:
        raise CacheError("data.feature_cache: the stage starts from a randomly initialised backbone (no parent "
                         "checkpoint, no model.backbone.pretrained); there are no frozen weights to cache")
    request = CacheRequest(dataset_root=dataset_root, split=cfg.data.train_split, features=features,
                           clip_cfg=clip_cfg, quick_gelu=cfg.model.backbone.quick_gelu, weights=str(weights),
                           preprocess=preprocess, context_length=context_length,
                           cache_dir=cfg.path(cfg.data.feature_cache_dir))
    key = cache_key(request)
    return FeatureCachePlan(features=features, request=request, key=key, status=check_cache(cache_folder(request, key), key))


# --------------------------------------------------------------------------------------------- encoding


def load_frozen_clip(weights: str, clip_cfg: dict, quick_gelu: bool):
    """The stage's CLIP with its starting weights, fp32, eval mode, no gradients (exactly what training freezes):
    built as `build_model` builds it, loaded from the parent checkpoint's clip.* tensors or the pretrained file."""
    from ccr_ray.models import backbone

    clip = backbone.build_clip(clip_cfg, quick_gelu=quick_gelu)
    if Path(weights).is_dir():
        clip.load_state_dict(load_clip_state(weights, clip_cfg, quick_gelu), strict=True)
    else:
        backbone.load_backbone_weights(clip, str(_weights_file(weights)))
    clip.float().eval().requires_grad_(False)
    return clip


def encoder_columns(request: CacheRequest) -> list[str]:
    """Dataset columns the encoder reads."""
    cols = [schema.IMAGE_ID]
    if "image" in request.features:
        cols += [schema.IMAGE, schema.IMAGE_PATH]
    if "text_en" in request.features:
        cols.append(schema.captions_column("en"))
    return cols


def feature_schema(features: tuple[str, ...], dim: int) -> pa.Schema:
    fields = [pa.field(schema.IMAGE_ID, pa.string(), nullable=False)]
    vector = pa.list_(pa.float32(), dim)
    if "image" in features:
        fields.append(pa.field(IMAGE_EMBEDDING, vector))
    if "text_en" in features:
        fields.append(pa.field(TEXT_EN_EMBEDDINGS, pa.list_(vector)))
    return pa.schema(fields)


class FeatureEncoder:
    """Dataset rows -> image_id + embeddings (a pyarrow table, rows in input order).

    A callable class: Ray Data's `map_batches` builds one per actor, so the towers load once per actor
    (cache_builder.py); the in-process builder below runs the same class. The features are what
    `CCRModel.forward` would compute: the same functions, fp32, eval mode, no autograd. The actor checks the
    weights it loaded against the planned fingerprint, so a cache can never hold features of other weights.
    """

    def __init__(self, request: CacheRequest, expected: dict[str, str] | None = None, device: str = "cpu",
                 threads: int = 0):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.request = request
        self.device = torch.device(device)
        self.clip = load_frozen_clip(request.weights, request.clip_cfg, request.quick_gelu)
        if expected is not None:
            got = tower_digests(self.clip.state_dict(), request.features)
            changed = [name for name, digest in got.items() if expected.get(name) != digest]
            if changed:
                raise CacheError(f"{request.weights}: the {', '.join(changed)} weights changed since the cache was "
                                 "planned; plan again")
        self.clip.to(self.device)
        self.dim = request.embed_dim
        self.schema = feature_schema(request.features, self.dim)
        self.transform = ImageTransform.from_config(request.preprocess) if "image" in request.features else None
        self.bad_images = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        columns: dict[str, pa.Array] = {schema.IMAGE_ID: pa.array([str(v) for v in batch[schema.IMAGE_ID]],
                                                                 pa.string())}
        if "image" in self.request.features:
            columns[IMAGE_EMBEDDING] = self._images(batch)
        if "text_en" in self.request.features:
            columns[TEXT_EN_EMBEDDINGS] = self._teacher(batch[schema.captions_column("en")])
        return pa.table(columns, schema=self.schema)

    def _encode(self, fn, inputs: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = fn(self, torch.from_numpy(inputs).to(self.device))
        return out.float().cpu().numpy().astype(np.float32, copy=False)

    def _images(self, batch: dict[str, np.ndarray]) -> pa.Array:
        """Decode + transform exactly as TrainPreprocessor does; an undecodable image becomes a null (the stream
        then drops its samples, as it drops them when it decodes images itself)."""
        from ccr_ray.models.ccr import CCRModel

        n = len(batch[schema.IMAGE_ID])
        pixels, ok = [], np.zeros(n, dtype=bool)
        for r in range(n):
            data = batch[schema.IMAGE][r] if schema.IMAGE in batch else None
            path = batch[schema.IMAGE_PATH][r] if schema.IMAGE_PATH in batch else None
            try:
                pixels.append(self.transform(open_image(data, path, self.request.dataset_root or None)))
                ok[r] = True
            except Exception as err:  # noqa: BLE001 - any decoder error makes the record unusable
                self.bad_images += 1
                log.warning("feature cache: undecodable image %s (%s: %s) is stored as null; %d so far",
                            batch[schema.IMAGE_ID][r], type(err).__name__, err, self.bad_images)
        values = np.zeros((n, self.dim), dtype=np.float32)
        if pixels:
            values[ok] = self._encode(CCRModel.encode_image, np.stack(pixels))  # [n_ok, D]
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), self.dim, mask=pa.array(~ok))

    def _teacher(self, captions: np.ndarray) -> pa.Array:
        """Every English caption of every row, tokenized as the stream tokenizes it; encoded with the padding
        columns that are padding in every row cut (exact under the causal mask, as `trim_padding` in training)."""
        from ccr_ray.models.ccr import CCRModel
        from ccr_ray.tokenization import english_tokenizer

        counts = np.asarray([len(c) for c in captions], dtype=np.int64)
        texts = [str(t) for c in captions for t in c]
        values = np.zeros((len(texts), self.dim), dtype=np.float32)
        if texts:
            ids = english_tokenizer(self.request.context_length)(texts)  # [N, T]
            ids = ids[:, : int(ids.argmax(axis=1).max()) + 1]  # EOT has the largest id: trim common padding
            values = self._encode(CCRModel.encode_text_en, ids)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), self.dim)
        return pa.ListArray.from_arrays(pa.array(offsets), inner)


# --------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class CacheInfo:
    """An opened cache: what the training stream reads."""

    folder: Path
    features: tuple[str, ...]
    files: list[str]  # cache shards, in dataset shard order
    rows: int
    embed_dim: int
    fingerprint: str
    meta: dict = field(default_factory=dict, compare=False, repr=False)


class CacheWriter:
    """Receives encoded rows in dataset order (any batching) and writes one cache shard per dataset shard, into a
    staging folder that `finish` renames into place."""

    def __init__(self, request: CacheRequest, key: CacheKey):
        self.request, self.key = request, key
        self.sources = schema.split_files(request.dataset_root, request.split)
        self.expected = [pq.ParquetFile(f).metadata.num_rows for f in self.sources]
        self.folder = cache_folder(request, key)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.folder.with_name(f".{self.folder.name}.building-{uuid.uuid4().hex[:8]}")
        self.staging.mkdir()
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
        captions = [c for c in pq.read_schema(source).names if c.startswith(schema.CAPTIONS_PREFIX)]
        table = pq.read_table(source, columns=[schema.IMAGE_ID, *captions])
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
        self.shards.append({"file": name, "source": os.path.relpath(source, self.request.dataset_root),
                            "rows": table.num_rows, "bytes": (self.staging / name).stat().st_size})

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
        if self.folder.exists():
            if not replace and check_cache(self.folder, self.key).valid:
                log.info("feature cache %s was built concurrently; keeping that one", self.folder)
                shutil.rmtree(self.staging, ignore_errors=True)
                return
            aside = self.folder.with_name(f".{self.folder.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.folder, aside)
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(self.staging, self.folder)
        except OSError:  # another builder renamed its copy in between
            if not check_cache(self.folder, self.key).valid:
                raise
            shutil.rmtree(self.staging, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def build_cache_in_process(request: CacheRequest, key: CacheKey, batch_size: int = 64, replace: bool = False,
                           device: str = "cpu") -> CacheInfo:
    """The cache without Ray: one encoder in this process over the shards in order (tests, benchmarks, and
    machines without a cluster). Same encoder and writer as the Ray build."""
    encoder = FeatureEncoder(request, expected=key.components, device=device)
    writer = CacheWriter(request, key)
    try:
        for source in writer.sources:
            for rb in pq.ParquetFile(source).iter_batches(batch_size=batch_size, columns=encoder_columns(request)):
                writer.add(encoder({c: rb.column(c).to_numpy(zero_copy_only=False) for c in rb.schema.names}))
        return writer.finish({"builder": "in-process", "batch_size": batch_size}, replace=replace)
    except BaseException:
        writer.abort()
        raise


def ensure_cache(plan: FeatureCachePlan, build: Callable[[CacheRequest, CacheKey], CacheInfo],
                 force: bool = False, report: Callable[[str], None] | None = None) -> tuple[CacheInfo, str]:
    """Open the plan's cache, building it when it is missing or invalid (or `force`). Returns the cache and what
    happened: "used", "built" (none existed) or "rebuilt" (one existed and was invalid, or `force`). Stale caches
    of the same split (other weights, preprocessing, tokenizer or data) are logged and never read."""
    say = report or log.info
    status = check_cache(plan.folder, plan.key)
    if status.valid and not force:
        say(f"feature cache: using {plan.folder} ({', '.join(plan.features)})")
        return open_cache(plan.folder), "used"
    for folder, changed in stale_caches(plan.request, plan.key):
        log.warning("feature cache %s is stale (%s changed) and is not used; `jobs/cache_features.py "
                    "--prune-stale` deletes it", folder, ", ".join(changed))
    existed = plan.folder.exists()
    if existed and not status.valid:
        log.warning("feature cache %s is invalid (%s); rebuilding it", plan.folder, status.reason)
    say(f"feature cache: building {plan.folder} ({', '.join(plan.features)})")
    info = build(plan.request, plan.key)
    plan.status = CacheStatus(True)
    return info, "rebuilt" if existed or force else "built"


def prune_stale(request: CacheRequest, key: CacheKey) -> list[Path]:
    removed = []
    for folder, _ in stale_caches(request, key):
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


# --------------------------------------------------------------------------------------------- reading


def open_cache(folder: str | os.PathLike) -> CacheInfo:
    """Read cache.json (callers check validity first: `check_cache`)."""
    folder = Path(folder)
    meta = _read_meta(folder)
    if meta is None:
        raise CacheError(f"{folder}: not a feature cache (no readable {CACHE_FILE})")
    return CacheInfo(folder=folder, features=tuple(meta["features"]),
                     files=[str(folder / s["file"]) for s in meta["shards"]], rows=int(meta["rows"]),
                     embed_dim=int(meta["embed_dim"]), fingerprint=meta["fingerprint"], meta=meta)


def read_cache_table(folder: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    """All rows of a cache as one table, in dataset order."""
    return pa.concat_tables(pq.read_table(f, columns=columns) for f in open_cache(folder).files)


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
